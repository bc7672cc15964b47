"""`sharpen evaluate`: inference-time sharpening, the paper's best-of-N protocol (SPEC 3.3).

    sharpen evaluate --config configs/evaluate/demo.yaml
    sharpen evaluate --model.model_name_or_path DIR --data.dataset FILE --output_dir OUT [--overwrite true]
    sharpen evaluate compare --base DIR --sharpened DIR --prompts FILE   (base vs sharpened, as the demo runs it)

Per seed, N_max responses per prompt are drawn ONCE at temperature 1 with no top-k/top-p; best-of-N
(per self-reward), maj@N and pass@N for a smaller N use the first N of them; greedy decoding runs once.
Draws are exact, so the sampler's log-probs ARE the evaluated model's log-likelihoods (SPEC 4.4): no
rescoring, unless ``score_with: base`` asks to score a sharpened model's samples under its base (the
adapter disabled, or the base loaded beside a fully fine-tuned model) or the temperature is not 1.
Draws are cached on disk, so an interrupted run resumes where it stopped.

Files: evaluate_config.py (options and their checks), evaluate_sources.py (the model and adapter files and
whether they fit), evaluate_protocol.py (the maths, pure), evaluate_cache.py (model fingerprints, cached draws),
evaluate_report.py (results.json, CSV, plots), evaluate_compare.py (base vs sharpened, the demo's check); this module loads, draws, scores and runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from sharpening.cpu_linear import packed_linear_weights
from sharpening.errors import ConfigError, parse_error_problem, raise_if_problems, unwritable_directory_problem
from sharpening.evaluate_cache import DrawCache, model_fingerprint
from sharpening.evaluate_config import (
    EvalModelConfig,
    ProtocolConfig,
    model_context,
    output_dir_problem,
    overlap_problem,
    prompt_context_problems,
    read_directories,
    validate_data_args,
    validate_model_config,
    validate_protocol_config,
)
from sharpening.evaluate_sources import (
    adapter_base_check, resolve_model_sources, tokenizer_vocabulary_problem,
)
from sharpening.evaluate_protocol import SeedDraws, answer_codes, loglik_histogram, protocol_table, seed_metrics
from sharpening.logprobs import sample_logprobs
from sharpening.model_checks import flash_attn_installed
from sharpening.policy import (
    frozen_base, nf4_config, raise_if_logit_head_differs, resolve_dtype, select_attn_implementation, set_cpu_linear, stop_token_ids,
)
from sharpening.prompts import PromptDataModule
from sharpening.rewards import extract_answers, loglik_reward
from sharpening.run_directories import holding_lock, output_lock_path
from sharpening.sampler import SamplingConfig, decode_device_problems, decode_responses, generate_samples
from sharpening.tasks.extractors import answers_match, resolve_extractor
from sharpening.types import SampleBatch


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
    try:
        return load_tokenizer(PolicyConfig(model_name_or_path=source, trust_remote_code=cfg.trust_remote_code,
                                           revision=None if source == adapter else cfg.revision))  # fmt: skip
    except ConfigError as err:  # named for training's option; here the tokenizer is the model's or adapter's
        option = "--model.adapter_path" if source == adapter else "--model.model_name_or_path"
        raise ConfigError([p.replace("--model.policy.model_name_or_path", option) for p in err.problems]) from None


def read_prompts(data: PromptDataModule, tokenizer) -> None:
    """Read and tokenize the prompts (bad data is a ConfigError from ``load_prompts``)."""
    data.load_prompts(tokenizer)


def load_models(cfg: EvalModelConfig, model: str, adapter: str | None, device: torch.device):
    """(evaluated model, separate frozen base or None), in eval mode on ``device``.

    The separate base is loaded only for score_with=base without an adapter; with an adapter the base is
    the same weights with the adapter disabled (no second copy, SPEC 4.3).
    """
    from transformers import AutoModelForCausalLM

    attn = select_attn_implementation(cfg.attn_implementation, torch.cuda.is_available(), flash_attn_installed())
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    if cfg.load_in_4bit:  # as a QLoRA run holds its base; placed on the device while loading (no .to for 4-bit)
        kwargs.update(quantization_config=nf4_config(dtype), device_map={"": device})
    evaluated = AutoModelForCausalLM.from_pretrained(model, revision=cfg.revision, **kwargs)
    if cfg.load_in_4bit:  # the rest in float32, as QLoRA training prepares its base (policy._add_lora)
        from peft import prepare_model_for_kbit_training

        evaluated = prepare_model_for_kbit_training(evaluated, use_gradient_checkpointing=False)
    raise_if_logit_head_differs(evaluated, "--model.model_name_or_path", model)
    if adapter is not None:
        from peft import PeftModel

        evaluated = PeftModel.from_pretrained(evaluated, adapter)
    base = None
    if cfg.score_with == "base" and adapter is None:
        base = AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path, **kwargs)
        raise_if_logit_head_differs(base, "--model.base_model_name_or_path", cfg.base_model_name_or_path)
        base = _placed(set_cpu_linear(base, cfg.cpu_linear, device), device, cfg.load_in_4bit)
    return _placed(set_cpu_linear(evaluated, cfg.cpu_linear, device), device, cfg.load_in_4bit), base


def _placed(model, device: torch.device, loaded_in_4bit: bool):
    """In eval mode on ``device`` (a 4-bit model was placed while loading and refuses ``.to``)."""
    return (model if loaded_in_4bit else model.to(device)).eval()


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
    cfg = SamplingConfig(1 if greedy else p.n_max, p.max_new_tokens, 0.0 if greedy else p.temperature, decode=p.decode)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompts_per_batch", "decode")}  # same draws
    texts = [ctx.data.prompt_texts[i] for i in prompts.prompt_indices.tolist()]
    eos, pad = stop_token_ids(ctx.model, ctx.tokenizer), ctx.tokenizer.pad_token_id
    if len(eos) > 1:  # draws stop on each of these (a single EOS keeps the key of earlier caches)
        settings["stop_token_ids"] = eos
    path = ctx.cache.path(kind, seed, settings, prompts, texts)
    exact = not greedy and cfg.temperature == 1.0
    draw = functools.partial(generate_samples, ctx.model, prompts, cfg, eos, pad, seed=seed)
    samples = ctx.cache.get_or_draw(path, prompts, exact, draw)
    loglik = score_loglik(samples, ctx.model, ctx.base, ctx.score_with)
    return reduce_draws(samples, loglik, ctx.tokenizer, resolve_extractor(p.answer_extractor))


def collect_draws(
    ctx: DrawContext, device: torch.device, show_progress: bool = True
) -> tuple[list[SeedDraws], SeedDraws]:
    """(one SeedDraws per seed [P, N_max], the greedy run [P, 1]), with a progress bar over batches."""
    from tqdm.auto import tqdm

    p = ctx.protocol
    batches = list(ctx.data.prompt_batches(p.prompts_per_batch, device=device))
    runs = [("greedy", 0)] + [("sample", p.seed + s) for s in range(p.seeds)]
    total = len(runs) * len(batches)
    bar = tqdm(total=total, desc=f"sampling N_max={p.n_max}", unit="batch", disable=not show_progress)
    out = []
    models = torch.nn.ModuleList([m for m in (ctx.model, ctx.base) if m is not None])
    with packed_linear_weights(models):  # oneDNN's weight layout made once for all batches (cpu_linear.py)
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
            show_progress: bool = True, problems: list[str] | None = None) -> dict:  # fmt: skip
    """Validate (adding to ``problems`` found by the caller), load, draw or reuse cached draws, score, and
    compute the protocol's numbers."""
    problems = list(problems or [])
    problems += validate_model_config(model_cfg) + validate_protocol_config(protocol) + validate_data_args(data_args)
    raise_if_problems(problems)
    protocol = replace(protocol, n_values=sorted(set(protocol.n_values)))
    model_path, adapter = resolve_model_sources(model_cfg)
    data = PromptDataModule(**data_args)
    tokenizer = load_tokenizer_for(model_cfg, model_path, adapter)
    read_prompts(data, tokenizer)  # missing columns and empty files fail here, still before any weights load
    device = resolve_device(model_cfg.device)
    sampling = SamplingConfig(decode=protocol.decode)
    problems = decode_device_problems(sampling, device, "--protocol", gpu_option="--model.device cuda")
    raise_if_problems(problems + context_problems(model_cfg, model_path, data, protocol.max_new_tokens))
    model, base = load_models(model_cfg, model_path, adapter, device)
    identity = model_identity(model_cfg, model_path, adapter, next(model.parameters()).dtype)
    cache_identity = {"model": identity["fingerprint"], "adapter": identity["adapter_fingerprint"], "dtype": identity["dtype"]}
    if model_cfg.load_in_4bit:  # other weights, other draws (the key of full-precision caches is unchanged)
        cache_identity["load_in_4bit"] = True
    cache = DrawCache(cache_dir, cache_identity)
    ctx = DrawContext(model, base, tokenizer, data, protocol, model_cfg.score_with, cache)
    start = time.perf_counter()
    per_seed, greedy = collect_draws(ctx, device, show_progress)
    seconds = time.perf_counter() - start
    greedy_stats = {"accuracy": float(greedy.correct.float().mean()), "chosen_loglik": float(greedy.loglik.mean())}
    metrics = [seed_metrics(d, protocol.n_values, protocol.truncated) for d in per_seed]
    return {
        "table": protocol_table(metrics, greedy_stats, protocol.n_values),
        "n_values": protocol.n_values,
        "samples_per_prompt": protocol.n_max,
        "seeds": [protocol.seed + s for s in range(protocol.seeds)],
        "prompts": {"count": len(data), "dataset": data_args["dataset"]},
        "loglik_histogram": loglik_histogram(per_seed),
        "draws": _draw_stats(per_seed, cache),
        "model": identity,
        "environment": {"device": str(device), "torch": torch.__version__, "sampling_seconds": seconds},
    }


def context_problems(cfg: EvalModelConfig, model: str, data: PromptDataModule, max_new_tokens: int) -> list[str]:
    """Prompts too long for the evaluated model's context, or for the base that rescores its draws, and token ids
    past the evaluated model's vocabulary."""
    scorers = [(model, cfg.revision)]
    if cfg.score_with == "base" and cfg.base_model_name_or_path:
        scorers.append((cfg.base_model_name_or_path, None))
    problems = []
    if vocabulary := tokenizer_vocabulary_problem(model, cfg.revision, data.tokenizer, data.prompt_ids):
        problems.append(f"--model.model_name_or_path={model!r}: {vocabulary}")
    return problems + [
        problem
        for name, revision in scorers
        for problem in prompt_context_problems(data.prompt_ids, max_new_tokens, data.hparams.dataset, name,
                                               model_context(name, revision, cfg.trust_remote_code))  # fmt: skip
    ]


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
        "load_in_4bit": cfg.load_in_4bit,
        "score_with": cfg.score_with,
        "scored_by": "base" if cfg.score_with == "base" else "evaluated",
        "scoring_model": base if cfg.score_with == "base" else None,
        "scoring_model_fingerprint": model_fingerprint(base)["sha256"] if cfg.score_with == "base" and base else None,
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


def build_parser(with_docs: bool = False):
    """The jsonargparse parser of `sharpen evaluate` (flags, or a YAML file via --config).

    ``with_docs`` reads the config fields' docstrings into the help (slower; for --help only).
    """
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=with_docs)
    parser = ArgumentParser(prog="sharpen evaluate", description=__doc__.split("\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(EvalModelConfig, "model")
    parser.add_class_arguments(PromptDataModule, "data")
    parser.set_defaults({"data.answer_column": "answer"})
    parser.add_class_arguments(ProtocolConfig, "protocol")
    parser.add_argument("--output_dir", type=str, required=True, help="Directory for results.json, .csv and plots.")
    parser.add_argument("--overwrite", type=bool, default=False, help="Replace the results in a non-empty output_dir.")
    parser.add_argument("--cache_dir", type=str | None, default=None, help="Draws cache (null = OUTPUT_DIR/cache).")
    parser.add_argument("--show_progress", type=bool, default=True, help="Show a progress bar while sampling.")
    parser.add_argument("--plots", type=bool, default=True, help="Write the PNG plots (needs matplotlib).")
    set_parsing_settings(docstring_parse_attribute_docstrings=False)  # jsonargparse's default, for other parsers
    return parser


def run(argv: list[str]) -> dict:
    """Parse, measure, write results.json / results.csv / config.yaml / plots, print the table."""
    import yaml
    from jsonargparse import ArgumentError

    from sharpening.evaluate_report import (
        format_table, remove_plots, replaced_input_problems, write_atomically, write_plots, write_results,
    )

    parser = build_parser(with_docs=any(a in ("-h", "--help") for a in argv))
    try:  # a value that does not parse: one problem naming the option, not a page of usage
        ns = parser.parse_args(argv)
    except ArgumentError as err:
        raise ConfigError([parse_error_problem(str(err), "sharpen evaluate")]) from None
    model_cfg, protocol = EvalModelConfig(**ns.model.as_dict()), ProtocolConfig(**ns.protocol.as_dict())
    read = read_directories(model_cfg)
    output = output_dir_problem(ns.output_dir, ns.overwrite, read)
    # One run at a time per output_dir: a second one started while the first draws found it empty and later
    # replaced the first's results without --overwrite. Checked again under the lock (a run may have ended there).
    lock = output_lock_path(ns.output_dir)
    with contextlib.nullcontext() if output else holding_lock(lock, f"--output_dir={ns.output_dir!r}"):
        output_problems = [output or output_dir_problem(ns.output_dir, ns.overwrite, read)]
        if ns.cache_dir:
            output_problems.append(unwritable_directory_problem("--cache_dir", ns.cache_dir))
            output_problems.append(overlap_problem("--cache_dir", ns.cache_dir, read))
        config = ns.as_dict()  # every option, None included: the exact configuration
        config_files = [str(f) for f in config.pop("config", None) or []]
        inputs = {f"--config={f!r}": f for f in config_files} | {f"--data.dataset={ns.data.dataset!r}": ns.data.dataset}
        output_problems += replaced_input_problems(ns.output_dir, inputs)
        output_problems = [p for p in output_problems if p]
        cache_dir = ns.cache_dir or os.path.join(ns.output_dir, "cache")
        for warning in adapter_base_check(model_cfg)[1]:  # a base other than the adapter's own, of the same shapes
            warnings.warn(warning, stacklevel=2)
        numbers = measure(model_cfg, protocol, ns.data.as_dict(), cache_dir, ns.show_progress, output_problems)
        results = {"config": config, "config_files": config_files, **numbers}
        os.makedirs(ns.output_dir, exist_ok=True)
        write_atomically(os.path.join(ns.output_dir, "config.yaml"), lambda f: yaml.safe_dump(config, f, sort_keys=False))
        written = write_results(results, ns.output_dir)
        stale = remove_plots(ns.output_dir)  # an earlier run's: new ones replace them, or none are wanted
        written += write_plots(results, ns.output_dir) if ns.plots else []
    if stale and not ns.plots:
        print("removed the earlier run's plots (--plots false): " + ", ".join(stale))
    print(format_table(results))
    print("wrote " + ", ".join(written))
    return results


def main(argv: list[str] | None = None) -> dict:
    """``sharpen evaluate [compare] ...``; the old flags (``--base ... --prompts ...``) still mean compare.

    From the shell (``argv`` None) a configuration problem is a message and exit status 2, not a traceback.
    """
    if argv is None:
        try:
            return dispatch(sys.argv[1:])
        except ConfigError as err:
            print(f"sharpen evaluate: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return dispatch(list(argv))


def dispatch(argv: list[str]) -> dict:
    """Compare mode for ``compare ...`` or the old ``--base`` flags, else the protocol (:func:`run`)."""
    if argv[:1] == ["compare"]:
        from sharpening.evaluate_compare import main as compare_main

        return compare_main(argv[1:])
    if any(a == "--base" or a.startswith("--base=") for a in argv):
        from sharpening.evaluate_compare import main as compare_main

        return compare_main(argv)
    return run(argv)


if __name__ == "__main__":
    main()
