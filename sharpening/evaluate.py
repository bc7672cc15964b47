"""`sharpen evaluate`: inference-time sharpening, the paper's best-of-N protocol (SPEC 3.3).

    sharpen evaluate --config configs/evaluate/demo.yaml
    sharpen evaluate --model.model_name_or_path DIR --data.dataset FILE --output_dir OUT [--overwrite true]
    sharpen evaluate compare --base DIR --sharpened DIR --prompts FILE   (base vs sharpened, as the demo runs it)

Per seed, N_max responses per prompt are drawn ONCE at temperature 1 with no top-k/top-p; best-of-N
(per self-reward), maj@N and pass@N for a smaller N use the first N of them; greedy decoding runs once.
Draws are exact, so the sampler's log-probs ARE the evaluated model's log-likelihoods (SPEC 4.4): no
rescoring, unless ``score_with: base`` asks to score a sharpened model's samples under its base (the
adapter disabled, or the base loaded beside a fully fine-tuned model) or the temperature is not 1.
Draws are cached on disk, so an interrupted run resumes where it stopped. The protocol's maths is in
evaluate_protocol.py, the cache in evaluate_cache.py, the files and plots in evaluate_report.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch

from sharpening.errors import raise_if_problems
from sharpening.evaluate_cache import DrawCache, model_fingerprint
from sharpening.evaluate_protocol import SeedDraws, answer_codes, loglik_histogram, protocol_table, seed_metrics
from sharpening.logprobs import sample_logprobs
from sharpening.policy import _model_source_problem, frozen_base, resolve_dtype, select_attn_implementation
from sharpening.prompts import PromptDataModule, validate_dataset_source
from sharpening.rewards import extract_answers, loglik_reward
from sharpening.sampler import SamplingConfig, decode_responses, generate_samples, validate_sampling_config
from sharpening.selection import TRUNCATED_POLICIES
from sharpening.tasks.extractors import answers_match, resolve_extractor
from sharpening.types import SampleBatch


@dataclass
class EvalModelConfig:
    """The model evaluated, and the model whose log-likelihood scores its samples."""

    model_name_or_path: str = ""
    """Hub id or local directory of the evaluated model (a PEFT adapter directory also works: its base is read from it)."""
    adapter_path: str | None = None
    """PEFT adapter directory put on top of model_name_or_path (e.g. a LoRA-sharpened model)."""
    base_model_name_or_path: str | None = None
    """Base of a FULLY fine-tuned sharpened model; needed for score_with=base when there is no adapter."""
    score_with: Literal["self", "base"] = "self"
    """Self-reward model: self = the evaluated model; base = its base (adapter disabled, or base_model_name_or_path)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto is bfloat16 on a CUDA device that supports it, else float32."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto is flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""
    device: str = "auto"
    """Device to run on: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust its author."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of model_name_or_path."""


@dataclass
class ProtocolConfig:
    """How many draws, which N, how many seeds, and how answers are read (the paper: N up to 50, 10 seeds)."""

    n_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50])
    """The N of best-of-N, maj@N and pass@N; each uses the first N of the same N_max draws."""
    samples_per_prompt: int | None = None
    """N_max: draws per prompt and seed (null = the largest of n_values)."""
    seeds: int = 10
    """Number of seeds (seed, seed+1, ...); each draws N_max fresh samples per prompt."""
    seed: int = 0
    """First seed."""
    max_new_tokens: int = 512
    """Most tokens per response (EOS included); longer responses are truncated (the paper: 512)."""
    temperature: float = 1.0
    """Sampling temperature; 1.0 (the protocol) draws exactly from the model. Other values are rescored."""
    prompts_per_batch: int = 8
    """Prompts sampled together (each with its N_max draws); lower it when memory runs out."""
    answer_extractor: str = "strip"
    """Answer extraction: strip, last_number, gsm8k, boxed, choice, bool, or an import path (pkg.mod:func)."""
    truncated: Literal["drop", "keep", "penalize"] = "drop"
    """Best-of-N treatment of responses without EOS by max_new_tokens (their log-likelihood is unfairly high)."""

    @property
    def n_max(self) -> int:
        return self.samples_per_prompt or max(self.n_values, default=1)


# ---------------------------------------------------------------- validation (before any weights load)


def resolve_model_sources(cfg: EvalModelConfig) -> tuple[str, str | None]:
    """(model, adapter): a model_name_or_path that is an adapter directory becomes the adapter, on the
    base named in its adapter_config.json; so does an adapter_path given without a model."""
    adapter = cfg.adapter_path
    if adapter is None and os.path.isfile(os.path.join(os.path.expanduser(cfg.model_name_or_path), "adapter_config.json")):
        adapter = cfg.model_name_or_path
    if adapter is not None and (not cfg.model_name_or_path or adapter == cfg.model_name_or_path):
        with open(os.path.join(os.path.expanduser(adapter), "adapter_config.json")) as f:
            return json.load(f).get("base_model_name_or_path") or "", adapter
    return cfg.model_name_or_path, adapter


def validate_model_config(cfg: EvalModelConfig, option: str = "--model") -> list[str]:
    """Every problem with the model section; reads only small JSON files."""
    problems = []
    if cfg.adapter_path is not None and not os.path.isfile(os.path.join(os.path.expanduser(cfg.adapter_path), "adapter_config.json")):
        return [f"{option}.adapter_path={cfg.adapter_path!r}: no adapter_config.json there; give a PEFT adapter directory"]
    model, adapter = resolve_model_sources(cfg)
    if not model:
        problems.append(f"{option}.model_name_or_path is empty: give a hub id or a local model directory")
    elif (problem := _model_source_problem(model)) is not None:
        problems.append(f"{option}.model_name_or_path={model!r}: {problem}")
    if cfg.base_model_name_or_path and (problem := _model_source_problem(cfg.base_model_name_or_path)) is not None:
        problems.append(f"{option}.base_model_name_or_path={cfg.base_model_name_or_path!r}: {problem}")
    if cfg.score_with not in ("self", "base"):
        problems.append(f"{option}.score_with={cfg.score_with!r}: must be self or base")
    if cfg.score_with == "base" and adapter is None and not cfg.base_model_name_or_path:
        problems.append(
            f"{option}.score_with=base: no base to score with; give the sharpened model's {option}.adapter_path, or "
            f"{option}.base_model_name_or_path for a fully fine-tuned one (a base model scores itself: use self)"
        )
    if cfg.base_model_name_or_path and adapter is not None:
        problems.append(
            f"{option}.base_model_name_or_path={cfg.base_model_name_or_path!r}: with an adapter the base is the model "
            "under it (adapter disabled); leave base_model_name_or_path empty"
        )
    return problems


def validate_protocol_config(cfg: ProtocolConfig, option: str = "--protocol") -> list[str]:
    """Every problem with the protocol section."""
    problems = []
    if not cfg.n_values or any(n < 1 for n in cfg.n_values):
        problems.append(f"{option}.n_values={cfg.n_values}: give a list of N >= 1, e.g. [1, 2, 4, 8, 16, 32, 50]")
    elif cfg.samples_per_prompt is not None and cfg.samples_per_prompt < max(cfg.n_values):
        problems.append(
            f"{option}.samples_per_prompt={cfg.samples_per_prompt}: N_max must be >= the largest N of "
            f"{option}.n_values ({max(cfg.n_values)}); set it to null to use {max(cfg.n_values)}"
        )
    sampling = SamplingConfig(max(cfg.n_max, 1), cfg.max_new_tokens, cfg.temperature, prompts_per_batch=cfg.prompts_per_batch)
    problems += [p for p in validate_sampling_config(sampling, option) if ".samples_per_prompt" not in p]
    if cfg.temperature == 0:
        problems.append(f"{option}.temperature=0 is greedy: all draws would be identical; the protocol samples at 1.0")
    if cfg.seeds < 1:
        problems.append(f"{option}.seeds={cfg.seeds}: must be >= 1 (the paper uses 10)")
    if cfg.truncated not in TRUNCATED_POLICIES:
        problems.append(f"{option}.truncated={cfg.truncated!r}: must be one of {', '.join(TRUNCATED_POLICIES)}")
    try:
        resolve_extractor(cfg.answer_extractor)
    except ValueError as err:
        problems.append(f"{option}.answer_extractor: {err}")
    return problems


def validate_data_args(data: dict, option: str = "--data") -> list[str]:
    """The PromptDataModule checks that need no file read, plus: evaluation needs an answer column."""
    problems = validate_dataset_source(data.get("dataset", ""), f"{option}.dataset")
    if data.get("max_prompts") is not None and data["max_prompts"] < 1:
        problems.append(f"{option}.max_prompts={data['max_prompts']}: must be >= 1, or null for all prompts")
    if not data.get("answer_column"):
        problems.append(f"{option}.answer_column is not set: accuracy needs reference answers; name their column")
    if data.get("system_prompt") and not data.get("use_chat_template"):
        problems.append(f"{option}.system_prompt is set but {option}.use_chat_template is false; turn it on")
    return problems


def output_dir_problem(output_dir: str, overwrite: bool) -> str | None:
    """Why results may not be written to ``output_dir`` (non-empty without --overwrite true), or None."""
    if not output_dir:
        return "--output_dir is empty: name a directory for results.json, results.csv and the plots"
    if os.path.isfile(output_dir):
        return f"--output_dir={output_dir!r} is a file; name a directory"
    found = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if found and not overwrite:
        return (
            f"--overwrite=false: --output_dir={output_dir!r} is not empty (holds {found[:6]}) and results are never "
            "overwritten silently. Pass --overwrite true to replace them (draws cached there are reused, so an "
            "interrupted run resumes), or choose another --output_dir"
        )
    return None


# ---------------------------------------------------------------- models, draws and scores


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer_for(cfg: EvalModelConfig, model: str, adapter: str | None):
    """The tokenizer used for templating, sampling and decoding: the adapter's when it saved one."""
    from sharpening.policy import PolicyConfig, load_tokenizer

    source = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else model
    return load_tokenizer(PolicyConfig(model_name_or_path=source, trust_remote_code=cfg.trust_remote_code,
                                       revision=None if source == adapter else cfg.revision))  # fmt: skip


def load_models(cfg: EvalModelConfig, model: str, adapter: str | None, device: torch.device):
    """(evaluated model, separate frozen base or None), in eval mode on ``device``.

    The separate base is loaded only for score_with=base without an adapter; with an adapter the base is
    the same weights with the adapter disabled (no second copy, SPEC 4.3).
    """
    from transformers import AutoModelForCausalLM

    attn = select_attn_implementation(cfg.attn_implementation, torch.cuda.is_available(), _has_flash_attn())
    kwargs = dict(dtype=resolve_dtype(cfg.dtype, device), attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    evaluated = AutoModelForCausalLM.from_pretrained(model, revision=cfg.revision, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        evaluated = PeftModel.from_pretrained(evaluated, adapter)
    base = None
    if cfg.score_with == "base" and adapter is None:
        base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path, **kwargs).to(device).eval()
    return evaluated.to(device).eval(), base


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def score_loglik(samples: SampleBatch, model, base, score_with: str) -> torch.Tensor:
    """log-likelihood of every draw under the scoring model: [B, N] float32 on the CPU.

    The sampler's log-probs are reused only for exact draws scored by the model that drew them (SPEC 4.4);
    otherwise the draws are rescored teacher-forced (sharpening.logprobs.sample_logprobs).
    """
    if score_with == "self" and samples.exact_draws:
        token_logprobs = samples.logprobs
    elif score_with == "self":
        with torch.no_grad():
            token_logprobs = sample_logprobs(model, samples)
    else:
        with frozen_base(model, base) as scorer:
            token_logprobs = sample_logprobs(scorer, samples)
    return loglik_reward(token_logprobs, samples.response_mask).cpu()  # [B, N, T] -> [B, N]


def reduce_draws(samples: SampleBatch, loglik: torch.Tensor, tokenizer, extractor) -> SeedDraws:
    """What the protocol needs from a batch of draws: correctness, answer codes, scores, lengths, truncation."""
    answers = extract_answers(decode_responses(tokenizer, samples), extractor)
    correct = torch.tensor(
        [[answers_match(a, ref, extractor) for a in group] for group, ref in zip(answers, samples.prompts.answers)]
    )  # [B, N]
    return SeedDraws(correct, answer_codes(answers), loglik, samples.lengths.cpu(), samples.truncated.cpu())


@dataclass
class DrawContext:
    """Everything needed to draw, cache and score one batch of prompts."""

    model: torch.nn.Module
    base: torch.nn.Module | None
    tokenizer: object
    data: PromptDataModule
    protocol: ProtocolConfig
    score_with: str
    cache: DrawCache


def draw_batch(ctx: DrawContext, prompts, kind: str, seed: int) -> SeedDraws:
    """One prompt batch of one seed (kind=sample) or of the greedy run (kind=greedy), from the cache if there."""
    p = ctx.protocol
    greedy = kind == "greedy"
    cfg = SamplingConfig(1 if greedy else p.n_max, p.max_new_tokens, 0.0 if greedy else p.temperature)
    settings = {k: v for k, v in asdict(cfg).items() if k != "prompts_per_batch"}
    texts = [ctx.data.prompt_texts[i] for i in prompts.prompt_indices.tolist()]
    eos, pad = ctx.tokenizer.eos_token_id, ctx.tokenizer.pad_token_id
    path = ctx.cache.path(kind, seed, settings, prompts, texts)
    exact = not greedy and cfg.temperature == 1.0
    samples = ctx.cache.get_or_draw(path, prompts, exact, lambda: generate_samples(ctx.model, prompts, cfg, eos, pad, seed=seed))
    loglik = score_loglik(samples, ctx.model, ctx.base, ctx.score_with)
    return reduce_draws(samples, loglik, ctx.tokenizer, resolve_extractor(p.answer_extractor))


def collect_draws(ctx: DrawContext, device: torch.device, show_progress: bool = True) -> tuple[list[SeedDraws], SeedDraws]:
    """(one SeedDraws per seed [P, N_max], the greedy run [P, 1]), with a progress bar over batches."""
    from tqdm.auto import tqdm

    p = ctx.protocol
    batches = list(ctx.data.prompt_batches(p.prompts_per_batch, device=device))
    runs = [("greedy", 0)] + [("sample", p.seed + s) for s in range(p.seeds)]
    bar = tqdm(total=len(runs) * len(batches), desc=f"sampling N_max={p.n_max}", unit="batch", disable=not show_progress)
    out = []
    for kind, seed in runs:
        parts = []
        for prompts in batches:
            parts.append(draw_batch(ctx, prompts, kind, seed))
            bar.set_postfix_str(f"{kind} seed {seed}, {ctx.cache.reused} batch(es) from cache", refresh=False)
            bar.update()
        out.append(SeedDraws.concat(parts))
    bar.close()
    return out[1:], out[0]


# ---------------------------------------------------------------- the command


def measure(model_cfg: EvalModelConfig, protocol: ProtocolConfig, data_args: dict, cache_dir: str | None,
            show_progress: bool = True) -> dict:  # fmt: skip
    """Validate, load, draw (or reuse cached draws), score and compute the protocol's numbers."""
    problems = validate_model_config(model_cfg) + validate_protocol_config(protocol) + validate_data_args(data_args)
    raise_if_problems(problems)
    protocol = replace(protocol, n_values=sorted(set(protocol.n_values)))
    model_path, adapter = resolve_model_sources(model_cfg)
    data = PromptDataModule(**data_args)
    tokenizer = load_tokenizer_for(model_cfg, model_path, adapter)
    data.load_prompts(tokenizer)  # missing columns and empty files fail here, still before any weights load
    device = resolve_device(model_cfg.device)
    model, base = load_models(model_cfg, model_path, adapter, device)
    identity = model_identity(model_cfg, model_path, adapter, next(model.parameters()).dtype)
    cache = DrawCache(cache_dir, {"model": identity["fingerprint"], "adapter": identity["adapter_fingerprint"],
                                  "dtype": identity["dtype"]})  # fmt: skip
    ctx = DrawContext(model, base, tokenizer, data, protocol, model_cfg.score_with, cache)
    start = time.perf_counter()
    per_seed, greedy = collect_draws(ctx, device, show_progress)
    greedy_stats = {"accuracy": float(greedy.correct.float().mean()), "chosen_loglik": float(greedy.loglik.mean())}
    return {
        "table": protocol_table([seed_metrics(d, protocol.n_values, protocol.truncated) for d in per_seed], greedy_stats, protocol.n_values),
        "n_values": protocol.n_values,
        "samples_per_prompt": protocol.n_max,
        "seeds": [protocol.seed + s for s in range(protocol.seeds)],
        "prompts": {"count": len(data), "dataset": data_args["dataset"]},
        "loglik_histogram": loglik_histogram(per_seed),
        "draws": _draw_stats(per_seed, cache),
        "model": identity,
        "environment": {"device": str(device), "torch": torch.__version__, "sampling_seconds": time.perf_counter() - start},
    }


def model_identity(cfg: EvalModelConfig, model: str, adapter: str | None, dtype: torch.dtype) -> dict:
    """Paths/hub ids, fingerprints, dtype, and which model scored the draws."""
    base = model if adapter is not None else cfg.base_model_name_or_path
    return {
        "model_name_or_path": model,
        "revision": cfg.revision,
        "adapter_path": os.path.abspath(adapter) if adapter else None,
        "fingerprint": model_fingerprint(model, cfg.revision)["sha256"],
        "adapter_fingerprint": model_fingerprint(adapter)["sha256"] if adapter else None,
        "dtype": str(dtype).replace("torch.", ""),
        "score_with": cfg.score_with,
        "scored_by": "base" if cfg.score_with == "base" else "evaluated",
        "scoring_model": base if cfg.score_with == "base" else None,
    }


def _draw_stats(per_seed: list[SeedDraws], cache: DrawCache) -> dict:
    truncated = torch.cat([d.truncated.flatten() for d in per_seed]).float()
    lengths = torch.cat([d.lengths.flatten() for d in per_seed]).float()
    return {
        "truncated_fraction": float(truncated.mean()),
        "mean_response_tokens": float(lengths.mean()),
        "cache_dir": cache.directory,
        "batches_drawn": cache.drawn,
        "batches_reused": cache.reused,
    }


def build_parser():
    """The jsonargparse parser of `sharpen evaluate` (flags, or a YAML file via --config)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="sharpen evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(EvalModelConfig, "model")
    parser.add_class_arguments(PromptDataModule, "data")
    parser.set_defaults({"data.answer_column": "answer"})
    parser.add_class_arguments(ProtocolConfig, "protocol")
    parser.add_argument("--output_dir", type=str, required=True, help="Directory for results.json, results.csv and the plots.")
    parser.add_argument("--overwrite", type=bool, default=False, help="Replace the results in a non-empty output_dir.")
    parser.add_argument("--cache_dir", type=str | None, default=None, help="Where draws are cached (null = OUTPUT_DIR/cache).")
    parser.add_argument("--show_progress", type=bool, default=True, help="Show a progress bar while sampling.")
    parser.add_argument("--plots", type=bool, default=True, help="Write the PNG plots (needs matplotlib).")
    return parser


def run(argv: list[str]) -> dict:
    """Parse, measure, write results.json / results.csv / config.yaml / plots, print the table."""
    import yaml

    from sharpening.evaluate_report import format_table, write_plots, write_results

    parser = build_parser()
    ns = parser.parse_args(argv)
    raise_if_problems([p] if (p := output_dir_problem(ns.output_dir, ns.overwrite)) else [])
    config = yaml.safe_load(parser.dump(ns, skip_none=False))
    config.pop("config", None)
    model_cfg, protocol = EvalModelConfig(**ns.model.as_dict()), ProtocolConfig(**ns.protocol.as_dict())
    cache_dir = ns.cache_dir or os.path.join(ns.output_dir, "cache")
    results = {"config": config, **measure(model_cfg, protocol, ns.data.as_dict(), cache_dir, ns.show_progress)}
    os.makedirs(ns.output_dir, exist_ok=True)
    with open(os.path.join(ns.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    written = write_results(results, ns.output_dir)
    written += write_plots(results, ns.output_dir) if ns.plots else []
    print(format_table(results))
    print("wrote " + ", ".join(written))
    return results


def main(argv: list[str] | None = None) -> dict:
    """``sharpen evaluate [compare] ...``; the old flags (``--base ... --prompts ...``) still mean compare."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from sharpening.evaluate_compare import main as compare_main

        return compare_main(argv[1:])
    if any(a == "--base" or a.startswith("--base=") for a in argv):
        from sharpening.evaluate_compare import main as compare_main

        return compare_main(argv)
    return run(argv)


if __name__ == "__main__":
    main()
