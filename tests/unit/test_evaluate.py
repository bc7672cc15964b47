"""The inference-time protocol's maths (nested best-of-N, maj@N, pass@N, lifts, standard error), its
checks, its report files, and answer extraction on the small task files in tests/data."""

from __future__ import annotations

import csv
import doctest
import json
import math
import os
import statistics
from collections import Counter
from dataclasses import replace

import pytest
import torch

import sharpening.evaluate.config as config_module
import sharpening.evaluate.power_rows as power_rows_module
import sharpening.evaluate.protocol as protocol_module
from sharpening.evaluate.config import (
    EvalModelConfig,
    ProtocolConfig,
    output_dir_problem,
    prompt_context_problems,
    read_directories,
    validate_data_args,
    validate_model_config,
    validate_protocol_config,
)
from sharpening.evaluate.power_rows import PowerRowConfig
from sharpening.evaluate.protocol import (
    PowerDraws,
    SeedDraws,
    answer_codes,
    loglik_histogram,
    majority_vote_correct,
    majority_vote_indices,
    mean_stderr,
    nested_best_of_n,
    pass_at_n_correct,
    percent_lift,
    points_lift,
    power_metrics,
    protocol_table,
    seed_metrics,
)
from sharpening.evaluate.report import find_row, format_table, read_results, write_results
from sharpening.evaluate.sources import adapter_base_check
from sharpening.rewards import score_samples
from sharpening.tasks.extractors import answers_match, resolve_extractor
from tests.helpers import REPO_ROOT

DATA = str(REPO_ROOT / "tests" / "data")


@pytest.mark.parametrize("module", [protocol_module, config_module, power_rows_module], ids=lambda m: m.__name__)
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def seed_draws(correct, answer_codes, loglik, lengths, truncated) -> SeedDraws:
    """SeedDraws whose self-rewards come from rewards.score_samples, as evaluation scores its draws: each draw's
    log-likelihood on its first token, zeros on the rest of its ``lengths`` tokens."""
    steps = torch.arange(int(lengths.max()))  # [T]
    response_mask = steps < lengths[..., None]  # [P, N, T]
    token_logprobs = torch.where(steps == 0, loglik[..., None], torch.zeros(())) * response_mask  # [P, N, T]
    scores = {reward: score_samples(reward, token_logprobs, response_mask) for reward in ("loglik", "loglik_norm")}
    return SeedDraws(correct, answer_codes, scores, lengths, truncated)


def random_draws(seed: int, prompts: int = 40, n: int = 12, answers: int = 4) -> SeedDraws:
    """Random draws with ties in scores, missing answers and truncated draws."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, answers, (prompts, n), generator=g)  # [P, N], -1: no answer
    right = torch.randint(0, answers, (prompts, 1), generator=g)
    return seed_draws(
        correct=codes == right,  # correctness is a function of the answer, as with a real extractor
        answer_codes=codes,
        loglik=-torch.randint(1, 6, (prompts, n), generator=g).float(),  # few values: many ties
        lengths=torch.randint(1, 5, (prompts, n), generator=g),
        truncated=torch.rand(prompts, n, generator=g) < 0.2,
    )


# ---------------------------------------------------------------- nested best-of-N, maj@N, pass@N


@pytest.mark.parametrize("policy", ["drop", "keep", "penalize"])
def test_best_of_n_uses_the_first_n_draws_and_breaks_ties_to_the_earlier(policy):
    draws = random_draws(0)
    for n in (1, 2, 5, 12):
        got = nested_best_of_n(draws.loglik, draws.truncated, n, policy)
        for p in range(draws.loglik.shape[0]):
            penalty = [10.0 if policy == "penalize" and t else 0.0 for t in draws.truncated[p]]
            scores = [float(s) - d for s, d in zip(draws.loglik[p], penalty)]
            eligible = [j for j in range(n) if not (policy == "drop" and draws.truncated[p, j])]
            want = max(eligible, key=lambda j: (scores[j], -j)) if eligible else 0  # best, then earliest
            assert int(got[p]) == want


def test_majority_vote_matches_a_counter_reference():
    draws = random_draws(1)
    for n in (1, 3, 7, 12):
        got = majority_vote_indices(draws.answer_codes, n)
        for p, row in enumerate(draws.answer_codes[:, :n].tolist()):
            counts = Counter(c for c in row if c >= 0)
            if not counts:
                assert int(got[p]) == -1
                continue
            top = max(counts.values())
            winner = next(c for c in row if c >= 0 and counts[c] == top)  # ties: the answer seen first
            assert int(got[p]) == row.index(winner)


def test_pass_at_least_maj_and_best_of_n_per_prompt_and_non_decreasing_in_n():
    for seed in range(5):
        draws = random_draws(seed)
        previous = torch.zeros(draws.correct.shape[0], dtype=torch.bool)
        for n in range(1, draws.correct.shape[1] + 1):
            passed = pass_at_n_correct(draws.correct, n)
            bon = draws.correct.gather(-1, nested_best_of_n(draws.loglik, draws.truncated, n)[:, None]).squeeze(-1)
            maj = majority_vote_correct(draws.answer_codes, draws.correct, n)
            assert bool((passed >= maj).all()) and bool((passed >= bon).all())
            assert bool((passed >= previous).all())  # once a prompt passes, it passes for every larger N
            previous = passed


def test_best_of_one_is_the_first_draw_and_pass_at_n_max_is_any_draw():
    draws = random_draws(2)
    keep = nested_best_of_n(draws.loglik, draws.truncated, 1, "keep")
    assert bool((keep == 0).all())
    assert torch.equal(pass_at_n_correct(draws.correct, 12), draws.correct.any(-1))


def test_answer_codes_number_answers_by_first_appearance():
    assert answer_codes([["7", None, "3", "7"], [None, "2", "2", "9"]]).tolist() == [[0, -1, 1, 0], [-1, 0, 0, 1]]


# ---------------------------------------------------------------- lifts and standard error


def test_lift_formula_and_undefined_percent_when_greedy_is_zero():
    assert percent_lift(0.6, 0.5) == pytest.approx(20.0)
    assert percent_lift(0.4, 0.5) == pytest.approx(-20.0)
    assert percent_lift(0.3, 0.0) is None
    assert points_lift(0.3, 0.0) == pytest.approx(30.0)
    assert points_lift(0.6, 0.5) == pytest.approx(10.0)


def test_standard_error_over_seeds():
    values = [0.5, 0.7, 0.6, 0.9]
    got = mean_stderr(values)
    assert got["mean"] == pytest.approx(statistics.mean(values))
    assert got["stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert mean_stderr([0.4]) == {"mean": 0.4, "stderr": None, "per_seed": [0.4]}
    assert mean_stderr([0.4, None])["mean"] is None


def hand_draws() -> list[SeedDraws]:
    """Two seeds, two prompts, N_max = 3, small enough to compute every number by hand."""
    return [
        seed_draws(  # seed 0
            correct=torch.tensor([[False, True, True], [True, False, False]]),
            answer_codes=torch.tensor([[0, 1, 1], [0, 1, 1]]),
            loglik=torch.tensor([[-3.0, -1.0, -2.0], [-2.0, -4.0, -1.0]]),
            lengths=torch.tensor([[1, 1, 4], [2, 1, 1]]),
            truncated=torch.zeros(2, 3, dtype=torch.bool),
        ),
        seed_draws(  # seed 1
            correct=torch.tensor([[True, False, False], [False, False, False]]),
            answer_codes=torch.tensor([[0, 1, 2], [0, 0, -1]]),
            loglik=torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]]),
            lengths=torch.ones(2, 3, dtype=torch.long),
            truncated=torch.zeros(2, 3, dtype=torch.bool),
        ),
    ]


def test_protocol_table_by_hand():
    per_seed = [seed_metrics(d, [1, 2, 3]) for d in hand_draws()]
    rows = protocol_table(per_seed, {"accuracy": 0.25, "chosen_loglik": -5.0}, [1, 2, 3])
    row = {(r["method"], r["n"]): r for r in rows}
    # seed 0: bon_loglik picks draws (1, 0) at N=2 -> both right; (1, 2) at N=3 -> right, wrong.
    # seed 1: always draw 0 -> right, wrong.
    assert row["bon_loglik", 2]["accuracy_per_seed"] == [1.0, 0.5]
    assert row["bon_loglik", 3]["accuracy_per_seed"] == [0.5, 0.5]
    assert row["bon_loglik", 2]["accuracy"] == pytest.approx(0.75)
    assert row["bon_loglik", 2]["accuracy_stderr"] == pytest.approx(0.25)
    assert row["bon_loglik", 2]["lift_percent"] == pytest.approx(200.0)
    assert row["bon_loglik", 2]["lift_points"] == pytest.approx(50.0)
    assert row["bon_loglik", 2]["chosen_loglik"] == pytest.approx(((-1 - 2) / 2 + (-1 - 1) / 2) / 2)
    # loglik_norm divides by length: seed 0 scores (-3, -1, -0.5) -> draw 2, right; (-1, -4, -1) -> tie, draw 0, right.
    assert row["bon_loglik_norm", 3]["accuracy_per_seed"] == [1.0, 0.5]
    # maj@3: seed 0 answers (0,1,1) -> 1 right; (0,1,1) -> 1 wrong. seed 1: tie (0,1,2) -> 0 right; 0 wrong.
    assert row["maj", 3]["accuracy_per_seed"] == [0.5, 0.5]
    assert row["pass", 3]["accuracy_per_seed"] == [1.0, 0.5]
    assert row["pass", 1]["accuracy_per_seed"] == [0.5, 0.5]
    assert row["sample", 1]["accuracy_per_seed"] == pytest.approx([0.5, 1 / 6])
    assert row["greedy", 1]["accuracy"] == 0.25 and row["greedy", 1]["lift_points"] == 0.0


def test_zero_greedy_gives_null_percent_lift_but_points():
    per_seed = [seed_metrics(d, [1, 3]) for d in hand_draws()]
    rows = protocol_table(per_seed, {"accuracy": 0.0, "chosen_loglik": -5.0}, [1, 3])
    for r in rows:
        assert r["lift_percent"] is None and r["lift_percent_stderr"] is None
        assert r["lift_points"] == pytest.approx(100 * r["accuracy"])


def test_token_cost_of_every_row_by_hand():
    """tokens = response tokens spent per prompt: one draw for a single sample, the first N draws (summed per
    prompt) for BoN@N, maj@N and pass@N, and best-of-N's N draws once more when a rescoring pass scored them."""
    # seed 0 lengths [[1, 1, 4], [2, 1, 1]]; seed 1 all 1.
    for rescored in (False, True):
        per_seed = [seed_metrics(d, [1, 2, 3], rescored=rescored) for d in hand_draws()]
        greedy = {"accuracy": 0.25, "chosen_loglik": -5.0, "tokens": 3.0}
        row = {(r["method"], r["n"]): r for r in protocol_table(per_seed, greedy, [1, 2, 3])}
        assert row["greedy", 1]["tokens"] == 3.0 and row["greedy", 1]["tokens_stderr"] is None
        assert row["sample", 1]["tokens"] == pytest.approx((10 / 6 + 1.0) / 2)
        drawn = {1: [1.5, 1.0], 2: [2.5, 2.0], 3: [5.0, 3.0]}  # per seed: (prompt 0 + prompt 1) / 2
        for n, per_seed_tokens in drawn.items():
            bon = [t * (2 if rescored else 1) for t in per_seed_tokens]
            assert row["bon_loglik", n]["tokens"] == pytest.approx(sum(bon) / 2), (n, rescored)
            assert row["bon_loglik", n]["tokens_stderr"] == pytest.approx(abs(bon[0] - bon[1]) / 2)
            assert row["bon_loglik_norm", n]["tokens"] == pytest.approx(sum(bon) / 2)
            for method in ("maj", "pass"):  # neither reads scores: never rescored
                assert row[method, n]["tokens"] == pytest.approx(sum(per_seed_tokens) / 2), (method, n)


def hand_power_draws(correct, loglik, tokens_spent, acceptance_rate=None) -> PowerDraws:
    """One returned sample per prompt: [P] lists -> PowerDraws with [P, 1] draws of one token each."""
    column = torch.tensor(correct)[:, None]  # [P] -> [P, 1]
    draws = seed_draws(column, column.long(), torch.tensor(loglik)[:, None], torch.ones_like(column, dtype=torch.long),
                       torch.zeros_like(column))  # fmt: skip
    rate = None if acceptance_rate is None else torch.tensor(acceptance_rate)
    return PowerDraws(draws, torch.tensor(tokens_spent), rate)


def test_power_rows_by_hand():
    """A power row: accuracy, mean log-likelihood of the returned samples and tokens spent per returned sample,
    each as mean and stderr over seeds, prompt batches stacked in order; the acceptance rate for MCMC only."""
    mcmc = [
        PowerDraws.concat(
            [hand_power_draws([True], [-1.0], [30], [0.5]), hand_power_draws([False], [-3.0], [50], [0.25])]
        ),
        hand_power_draws([True, True], [-1.0, -2.0], [40, 40], [1.0, 0.5]),
    ]
    smc = [hand_power_draws([False, True], [-2.0, -1.0], [64, 64]) for _ in range(2)]
    assert mcmc[0].tokens_spent.tolist() == [30, 50] and mcmc[0].draws.correct.shape == (2, 1)
    power = {"power_mcmc_x": [power_metrics(d) for d in mcmc], "power_smc_y": [power_metrics(d) for d in smc]}
    per_seed = [seed_metrics(d, [1, 2]) for d in hand_draws()]
    rows = protocol_table(per_seed, {"accuracy": 0.5, "chosen_loglik": -5.0}, [1, 2], power)
    assert [r["method"] for r in rows[-2:]] == ["power_mcmc_x", "power_smc_y"] and rows[-1]["n"] == 1
    got = find_row({"table": rows}, "power_mcmc_x")
    assert got["accuracy_per_seed"] == [0.5, 1.0] and got["accuracy"] == pytest.approx(0.75)
    assert got["accuracy_stderr"] == pytest.approx(0.25) and got["lift_points"] == pytest.approx(25.0)
    assert got["chosen_loglik"] == pytest.approx((-2.0 + -1.5) / 2)
    assert got["tokens"] == pytest.approx(40.0) and got["tokens_stderr"] == pytest.approx(0.0)
    assert got["acceptance_rate"] == pytest.approx((0.375 + 0.75) / 2)
    smc_row = find_row({"table": rows}, "power_smc_y")
    assert smc_row["tokens"] == 64.0 and smc_row["acceptance_rate"] is None and smc_row["accuracy"] == 0.5
    assert "acceptance_rate" not in find_row({"table": rows}, "bon_loglik", 2)


def test_loglik_histogram_counts_every_draw_once():
    draws = [random_draws(s) for s in range(3)]
    hist = loglik_histogram(draws, bins=7)
    assert len(hist["edges"]) == 8 and len(hist["correct"]) == len(hist["incorrect"]) == 7
    n_correct = sum(int(d.correct.sum()) for d in draws)
    assert sum(hist["correct"]) == hist["correct_count"] == n_correct
    assert sum(hist["incorrect"]) == hist["incorrect_count"] == 3 * 40 * 12 - n_correct


# ---------------------------------------------------------------- report files


def fake_results(greedy: float = 0.25, power: bool = False) -> dict:
    per_seed = [seed_metrics(d, [1, 2, 3]) for d in hand_draws()]
    smc = power_metrics(hand_power_draws([True, False], [-1.0, -2.0], [9, 7]))
    rows = {"power_smc_alpha4_particles8_ess0.5": [smc]} if power else None
    return {
        "config": {"protocol": {"n_values": [1, 2, 3]}},
        "table": protocol_table(per_seed, {"accuracy": greedy, "chosen_loglik": -5.0, "tokens": 2.0}, [1, 2, 3], rows),
        "n_values": [1, 2, 3],
        "samples_per_prompt": 3,
        "seeds": [0, 1],
        "prompts": {"count": 2, "dataset": "hand.jsonl"},
        "loglik_histogram": loglik_histogram(hand_draws(), bins=4),
        "model": {"model_name_or_path": "m", "adapter_path": None, "scored_by": "evaluated"},
    }


@pytest.mark.parametrize("greedy, power", [(0.25, False), (0.0, False), (0.25, True)])
def test_results_round_trip_through_json_and_csv(greedy, power, tmp_path):
    results = fake_results(greedy, power)
    write_results(results, str(tmp_path))
    assert read_results(str(tmp_path)) == results
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["table"])
    for got, want in zip(rows, results["table"]):
        assert got["method"] == want["method"] and int(got["n"]) == want["n"]
        assert float(got["accuracy"]) == pytest.approx(want["accuracy"])
        assert (got["lift_percent"] == "") == (want["lift_percent"] is None)
        assert float(got["tokens"]) == pytest.approx(want["tokens"])
    json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN


def test_table_names_the_lift_unit():
    assert "points (% undefined: greedy is 0)" in format_table(fake_results(0.0))
    text = format_table(fake_results(0.25))
    assert "lift over greedy in %" in text and "200.0" in text  # bon_loglik at N=2
    assert find_row(fake_results(), "pass", 3)["accuracy"] == pytest.approx(0.75)
    assert "power_smc" not in text and "tokens per returned answer" not in text
    power = format_table(fake_results(0.25, power=True)).splitlines()
    line = next(line for line in power if line.startswith("power_smc_alpha4_particles8_ess0.5"))
    assert line.split()[1:] == ["0.500", "-1.50", "8.0"]  # accuracy, loglik, tokens per returned answer


def test_accuracy_vs_tokens_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from sharpening.evaluate.report import write_plots

    results = fake_results(0.25, power=True)
    assert str(tmp_path / "accuracy_vs_tokens.png") in write_plots(results, str(tmp_path))
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 1000


# ---------------------------------------------------------------- configuration checks


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"n_values": []}, "--protocol.n_values=[]"),
        ({"n_values": [0, 4]}, "--protocol.n_values=[0, 4]"),
        ({"samples_per_prompt": 4, "n_values": [1, 8]}, "--protocol.samples_per_prompt=4: N_max must be >="),
        ({"seeds": 0}, "--protocol.seeds=0"),
        ({"max_new_tokens": 0}, "--protocol.max_new_tokens=0"),
        ({"temperature": 0.0}, "--protocol.temperature=0"),
        ({"prompts_per_batch": 0}, "--protocol.prompts_per_batch=0"),
        ({"answer_extractor": "no_such_extractor"}, "--protocol.answer_extractor"),
    ],
)
def test_protocol_checks_name_the_option(changes, fragment):
    problems = validate_protocol_config(ProtocolConfig(**changes))
    assert any(fragment in p for p in problems), problems


@pytest.mark.parametrize(
    "power, fragment",
    [
        ([{"method": "mcmc", "alpha": 0.0}], "--protocol.power[0].alpha=0.0"),
        ([{"method": "smc"}, {"method": "smc", "particles": 0}], "--protocol.power[1].particles=0"),
        ([{"method": "smc", "resample_threshold": 2.0}], "--protocol.power[0].resample_threshold=2.0"),
        ([{"method": "mcmc", "block_tokens": 0}], "--protocol.power[0].block_tokens=0"),
        ([{"method": "smc", "alpha": 4.0}, {"method": "smc", "alpha": 4.0, "block_tokens": 3}],
         "--protocol.power[1] has the settings of --protocol.power[0]"),
    ],
)  # fmt: skip
def test_power_checks_name_the_option(power, fragment):
    problems = validate_protocol_config(ProtocolConfig(power=power))
    assert any(fragment in p for p in problems) and len(problems) == 1, problems


def test_power_rows_share_the_protocols_length_and_batch_checks():
    cfg = ProtocolConfig(max_new_tokens=0, power=[PowerRowConfig("mcmc"), {"method": "smc", "alpha": 2.0}])
    assert [p.split(":")[0] for p in validate_protocol_config(cfg)] == ["--protocol.max_new_tokens=0"]
    assert validate_protocol_config(replace(cfg, max_new_tokens=8)) == []
    assert cfg.power[1] == PowerRowConfig("smc", 2.0)  # mappings (YAML, flags) become typed rows


def test_protocol_defaults_are_the_papers():
    cfg = ProtocolConfig()
    assert validate_protocol_config(cfg) == []
    assert cfg.n_values == [1, 2, 4, 8, 16, 32, 50] and cfg.n_max == 50 and cfg.seeds == 10
    assert cfg.max_new_tokens == 512 and cfg.temperature == 1.0 and cfg.power == []


def test_model_checks(tmp_path):
    assert "is empty" in validate_model_config(EvalModelConfig())[0]
    problems = validate_model_config(EvalModelConfig(model_name_or_path=str(tmp_path / "nope"), score_with="base"))
    assert any("no such directory" in p for p in problems)
    assert any("--model.score_with=base: no base to score with" in p for p in problems)
    assert "no adapter_config.json" in validate_model_config(EvalModelConfig("m", adapter_path=str(tmp_path)))[0]


def test_data_checks_need_an_answer_column(tmp_path):
    problems = validate_data_args({"dataset": str(tmp_path / "missing.jsonl"), "answer_column": None, "max_prompts": 0})
    assert len(problems) == 3
    assert any("file not found" in p for p in problems) and any("--data.answer_column" in p for p in problems)


def test_output_dir_rule(tmp_path):
    assert output_dir_problem(str(tmp_path / "new"), overwrite=False) is None
    assert output_dir_problem(str(tmp_path), overwrite=False) is None  # exists but empty
    (tmp_path / "results.json").write_text("{}")
    problem = output_dir_problem(str(tmp_path), overwrite=False)
    assert "--overwrite=false" in problem and "--overwrite true" in problem and "not empty" in problem
    assert output_dir_problem(str(tmp_path), overwrite=True) is None


def test_output_dir_may_not_be_among_a_models_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    read = read_directories(EvalModelConfig(str(model)))
    assert "is the directory of --model.model_name_or_path" in output_dir_problem(str(model), True, read)
    assert "lies inside the directory" in output_dir_problem(str(model / "eval"), True, read)
    assert "holds the directory" in output_dir_problem(str(tmp_path), True, read)
    assert output_dir_problem(str(tmp_path / "model-evaluate"), False, read) is None  # the suggested place


def test_prompt_context_problems_count_the_prompts_past_the_context():
    prompt_ids = [[1] * 10, [1] * 60, [1] * 30, [1] * 63]
    (problem,) = prompt_context_problems(prompt_ids, 4, "d.jsonl", "m", (64, "max_position_embeddings"))
    assert problem.startswith("--data.dataset='d.jsonl': 1 of 4 prompt(s) do not fit the context of 'm'")
    assert "prompt 3, has 63 tokens" in problem and "lower --protocol.max_new_tokens to 1 or less" in problem
    assert "3 of 4" in prompt_context_problems(prompt_ids, 40, "d.jsonl", "m", (64, "n_positions"))[0]
    assert prompt_context_problems(prompt_ids, 1, "d.jsonl", "m", (64, "n_positions")) == []
    assert prompt_context_problems(prompt_ids, 1000, "d.jsonl", "m", None) == []  # context unknown: loading decides


def _adapter_dir(path, base: str) -> str:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


def test_an_adapter_on_another_hub_model_needs_the_explicit_override(tmp_path):
    """Hub ids whose configs are not here cannot be compared by shape: other names are refused unless asked for."""
    adapter = _adapter_dir(tmp_path / "adapter", "org/base-a")
    problems, warnings = adapter_base_check(EvalModelConfig("org/base-b", adapter_path=adapter))
    assert warnings == [] and len(problems) == 1
    assert f"--model.adapter_path={adapter!r} was trained on 'org/base-a'" in problems[0]
    assert "--model.model_name_or_path org/base-a" in problems[0]
    assert "--model.allow_adapter_base_mismatch true" in problems[0]
    allowed = EvalModelConfig("org/base-b", adapter_path=adapter, allow_adapter_base_mismatch=True)
    problems, warnings = adapter_base_check(allowed)
    assert problems == [] and "not on --model.model_name_or_path='org/base-b'" in warnings[0]
    assert adapter_base_check(EvalModelConfig("org/base-a/", adapter_path=adapter)) == ([], [])
    assert adapter_base_check(EvalModelConfig(adapter)) == ([], [])  # the adapter alone: its base is the recorded one


# ---------------------------------------------------------------- answer extraction on tests/data


TASK_FILES = [
    ("gsm8k_style.jsonl", "answer", "gsm8k"),
    ("gsm8k_style.jsonl", "answer", "last_number"),
    ("math_style.jsonl", "solution", "boxed"),
    ("choice.jsonl", "answer", "choice"),
    ("true_false.jsonl", "answer", "bool"),
    ("reversal.jsonl", "answer", "strip"),
]


@pytest.mark.parametrize("name, answer_column, extractor", TASK_FILES, ids=lambda x: str(x))
def test_extractors_on_task_files(name, answer_column, extractor):
    extract = resolve_extractor(extractor)
    rows = [json.loads(line) for line in open(os.path.join(DATA, name))]
    assert len(rows) >= 5
    for row in rows:
        assert answers_match(extract(row["response"]), row[answer_column], extract), (extractor, row["response"])
        assert not answers_match(extract(row["wrong"]), row[answer_column], extract), (extractor, row["wrong"])


# ---------------------------------------------------------------- the subpackage: imports, draws' scores


@pytest.mark.slow
def test_every_evaluate_module_imports_first_without_a_cycle():
    """Each module of sharpening.evaluate imported first, with no sharpening module loaded yet: an import cycle
    (a module needing a name from one still being initialised) fails here, whichever module a user starts from."""
    import pkgutil
    import subprocess
    import sys

    import sharpening.evaluate as package

    names = sorted(f"sharpening.evaluate.{m.name}" for m in pkgutil.iter_modules(package.__path__))
    names = [n for n in names if not n.endswith("__main__")]  # runs the command when imported
    assert {"config", "sources", "draws", "protocol", "cache", "report", "compare", "command"} <= {
        n.rsplit(".", 1)[1] for n in names
    }
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sharpening' or m.startswith('sharpening.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_draws_are_scored_as_the_training_round_scores(tiny_model):
    """score_draws: the sampler's log-probs for exact draws scored by themselves, else a teacher-forced pass;
    both summed (loglik) and divided by the response length (loglik_norm), checked against a full forward."""
    from sharpening.evaluate.draws import score_draws
    from sharpening.types import PromptBatch, SampleBatch

    prompts = PromptBatch(torch.tensor([[0, 5, 6]]), torch.tensor([[False, True, True]]), torch.tensor([0]), ["x"])
    response_ids = torch.tensor([[[7, 8, 2], [9, 2, 0]]])  # [1, 2, 3]: a 3-token and a 2-token response
    response_mask = torch.tensor([[[True, True, True], [True, True, False]]])
    sampler_logprobs = torch.full((1, 2, 3), -0.25)
    samples = SampleBatch(prompts, response_ids, response_mask, sampler_logprobs, torch.zeros(1, 2, dtype=torch.bool),
                          exact_draws=True)  # fmt: skip
    reused = score_draws(samples, tiny_model, None, "self")
    torch.testing.assert_close(reused["loglik"], torch.tensor([[-0.75, -0.5]]))
    torch.testing.assert_close(reused["loglik_norm"], torch.tensor([[-0.25, -0.25]]))

    want = []
    with torch.no_grad():
        for j, length in enumerate((3, 2)):
            ids = torch.cat([torch.tensor([5, 6]), response_ids[0, j, :length]])[None]  # [1, 2 + length]
            token_logprobs = torch.log_softmax(tiny_model(ids).logits[0].float(), -1)  # [2 + length, V]
            want.append(sum(float(token_logprobs[1 + t, ids[0, 2 + t]]) for t in range(length)))
    samples.exact_draws = False  # e.g. drawn at another temperature: rescored by the model
    rescored = score_draws(samples, tiny_model, None, "self")
    torch.testing.assert_close(rescored["loglik"], torch.tensor([want]), atol=1e-4, rtol=0)
    torch.testing.assert_close(rescored["loglik_norm"], torch.tensor([[want[0] / 3, want[1] / 2]]), atol=1e-4, rtol=0)
