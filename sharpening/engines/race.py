"""Exact categorical draws by an exponential race: per row, the token with the largest exp(l_i - max l) / E_i,
E_i ~ Exp(1) made from 63 random bits per token in float64 (``race`` bounds its distance from the exact
distribution). The sampler decides which rows race and with which generator's bits.
"""

from __future__ import annotations

import torch


def random_bits(n: int, vocab: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """One prompt's block for one step: 63 random bits per token, [n, V] int64 in [0, 2^63)."""
    return torch.empty(n, vocab, dtype=torch.int64, device=device).random_(generator=generator)


def race_by_prompt(
    scaled: torch.Tensor, rows: torch.Tensor, generators: list[torch.Generator], n: int, chunk_tokens: int
) -> torch.Tensor:
    """The draw on CPU for a large vocabulary: each live prompt's block (the same bits), then its live rows
    raced ``chunk_tokens // V`` at a time, so the float64 temporaries stay in cache. [A, V] -> [A]."""
    tokens = torch.empty(rows.shape[0], dtype=torch.long)
    bits = torch.empty(n, scaled.shape[-1], dtype=torch.int64)  # [n, V]: one prompt's block at a time
    per_race = max(1, chunk_tokens // scaled.shape[-1])
    prompts, counts = torch.unique_consecutive(rows // n, return_counts=True)  # rows are in ascending order
    start = 0
    for prompt, count in zip(prompts.tolist(), counts.tolist()):
        bits.random_(generator=generators[prompt])
        for a in range(start, start + count, per_race):
            b = min(a + per_race, start + count)
            tokens[a:b] = race(scaled[a:b], bits.index_select(0, rows[a:b] % n))
        start += count
    return tokens


def race(scaled: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Per row, the token with the largest q_i / E_i, where q_i = exp(l_i - max l) and E_i ~ Exp(1) is made
    from the token's 63 random bits k_i (``negative_exponentials``): the Gumbel-max trick with G_i = -log E_i,
    in float64. scaled [R, V] float32 (-inf = filtered out), bits [R, V] int64 -> [R].

    Exactness: with exact Exp(1) variates token i wins with probability q_i / sum(q). Couple each uniform
    U_i = (k_i + 1/2) 2^-63 (as rounded) with an exactly uniform U'_i: |U_i - U'_i| <= 2^-64 + 2^-52 U'_i,
    and a token's win changes only when U'_i lies that close to the point where it would start or stop
    winning. Summed over tokens that is <= V 2^-64 + 2^-51 (for a token other than the top one, that point
    is below q_i / (sum(q) - q_i) on average). Rounding (l_i - max l, exp, log1p, the division) changes a
    race value by a factor within 1 +- 6e-15 for every token that can win (within 48 nats of the top:
    E_i >= 2^-64 and E_top <= 53 ln 2 rule out the others), and the two best race values are within a
    factor 1 + e of each other with probability <= e. So the total variation distance from the exact
    distribution of the tempered, filtered logits is below 1e-13 per draw for V <= 10^6 (2e-14 at
    V = 151936), generator bits taken as ideal; the tokens more than 48 nats below the top, never drawn,
    have less mass than that."""
    weights = scaled.double().sub_(scaled.amax(-1, keepdim=True)).exp_()  # q_i: 1 at the top, 0 if filtered
    return weights.div_(negative_exponentials(bits)).argmin(-1)  # -q_i / E_i: smallest = largest q_i / E_i


def negative_exponentials(bits: torch.Tensor) -> torch.Tensor:
    """-E = log1p(-U) for U = (k + 1/2) 2^-63, k the random bits [..] int64: float64 values of -Exp(1),
    fine-grained near 0 (where a token far below the top wins; the smallest E is 2^-64) and with U kept below
    1 (E is never infinite)."""
    minus_uniform = bits.double().mul_(-(2.0**-63)).sub_(2.0**-64)  # -U in [-1, 0)
    return minus_uniform.clamp_(min=2.0**-53 - 1.0).log1p_()
