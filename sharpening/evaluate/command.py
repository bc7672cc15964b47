"""`sharpen evaluate`: inference-time sharpening, the paper's best-of-N protocol (method.md §3.3).

The command itself: its options (:func:`build_parser`), the checks of what it reads and writes, the output
directory's lock, measuring (:func:`measure`: load, draw, score, compute the protocol's numbers) and the files it
writes. Drawing and scoring live in draws.py, the numbers in protocol.py, the files' contents in report.py.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import asdict, replace

import torch

from sharpening.checkpoint import write_atomically
from sharpening.engines import SamplingConfig, SamplingEngine, decode_device_problems, make_engine
from sharpening.engines.vllm_checks import vllm_problems
from sharpening.errors import ConfigError, parse_error_problem, raise_if_problems, unwritable_directory_problem
from sharpening.evaluate.cache import DrawCache, model_fingerprint
from sharpening.evaluate.config import (
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
from sharpening.evaluate.draws import DrawContext, EvalDraws, collect_draws, rescored_rewards
from sharpening.evaluate.power_rows import power_row_name, power_sampling_config
from sharpening.evaluate.protocol import SeedDraws, loglik_histogram, power_metrics, protocol_table, seed_metrics
from sharpening.evaluate.report import format_table, remove_plots, replaced_input_problems, write_plots, write_results
from sharpening.evaluate.sources import (
    adapter_base_check,
    load_models,
    load_tokenizer_for,
    read_adapter_config,
    resolve_device,
    resolve_model_sources,
    tokenizer_vocabulary_problem,
)
from sharpening.prompts import PromptDataModule
from sharpening.run_directories import holding_lock, output_lock_path


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
    data.load_prompts(tokenizer)  # missing columns and empty files fail here, still before any weights load
    device = resolve_device(model_cfg.device)
    sampling = SamplingConfig(max_new_tokens=protocol.max_new_tokens, decode=protocol.decode, engine=protocol.engine,
                              vllm=protocol.vllm)  # fmt: skip
    problems = decode_device_problems(sampling, device, "--protocol", gpu_option="--model.device cuda")
    source = {"lora": adapter is not None, "load_in_4bit": model_cfg.load_in_4bit, "revision": model_cfg.revision}
    longest = max(map(len, data.prompt_ids), default=None)
    problems += vllm_problems(sampling, "--protocol", model_path, longest_prompt=longest, device=device, **source)
    raise_if_problems(problems + context_problems(model_cfg, model_path, data, protocol.max_new_tokens))
    model, base = load_models(model_cfg, model_path, adapter, device)
    identity = model_identity(model_cfg, model_path, adapter, next(model.parameters()).dtype)
    cache_identity = {
        "model": identity["fingerprint"],
        "adapter": identity["adapter_fingerprint"],
        "dtype": identity["dtype"],
    }
    if model_cfg.load_in_4bit:  # other weights, other draws (the key of full-precision caches is unchanged)
        cache_identity["load_in_4bit"] = True
    cache = DrawCache(cache_dir, cache_identity)
    engine = evaluation_engine(protocol, model_path, adapter)
    ctx = DrawContext(model, base, tokenizer, data, protocol, model_cfg.score_with, cache, engine)
    start = time.perf_counter()
    try:
        draws = collect_draws(ctx, device, show_progress)
    finally:  # a vLLM engine's memory goes back whether the draws finished or not
        engine.close()
    seconds = time.perf_counter() - start
    per_seed, rescored = draws.per_seed, rescored_rewards(protocol, model_cfg.score_with)
    power = {power_row_name(row): asdict(power_sampling_config(protocol, i)) for i, row in enumerate(protocol.power)}
    return {
        "table": measured_table(draws, protocol, rescored),
        "n_values": protocol.n_values,
        "samples_per_prompt": protocol.n_max,
        "seeds": [protocol.seed + s for s in range(protocol.seeds)],
        "prompts": {"count": len(data), "dataset": data_args["dataset"]},
        "loglik_histogram": loglik_histogram(per_seed),
        "draws": _draw_stats(per_seed, cache) | {"best_of_n_rescored": bool(rescored), "engine": protocol.engine},
        **({"power": power} if power else {}),  # each power row's sampler settings, by its method name
        "model": identity,
        "environment": {"device": str(device), "torch": torch.__version__, "sampling_seconds": seconds},
    }


def evaluation_engine(protocol: ProtocolConfig, model_path: str, adapter: str | None) -> SamplingEngine:
    """The engine ``--protocol.engine`` names. vLLM loads the weights from the model's path (an adapter's base) and
    serves the adapter on it at the adapter's LoRA rank."""
    lora_rank = read_adapter_config(adapter).get("r") if adapter is not None else None
    sampling = SamplingConfig(engine=protocol.engine, vllm=protocol.vllm)
    return make_engine(sampling, model_path=model_path, lora_rank=lora_rank)


def measured_table(draws: EvalDraws, protocol: ProtocolConfig, rescored: bool | list[str]) -> list[dict]:
    """The protocol's rows from the reduced draws; ``rescored``: the rewards whose best-of-N scores took a
    teacher-forced pass (True: all)."""
    greedy = draws.greedy
    greedy_stats = {
        "accuracy": float(greedy.correct.float().mean()),
        "chosen_loglik": float(greedy.loglik.mean()),
        "tokens": float(greedy.lengths.float().mean()),
    }
    metrics = [
        seed_metrics(d, protocol.n_values, protocol.truncated, rescored, protocol.rewards) for d in draws.per_seed
    ]
    power = {name: [power_metrics(d) for d in seeds] for name, seeds in draws.power.items()}
    return protocol_table(metrics, greedy_stats, protocol.n_values, power)


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
        for problem in prompt_context_problems(
            data.prompt_ids,
            max_new_tokens,
            data.hparams.dataset,
            name,
            model_context(name, revision, cfg.trust_remote_code),
        )  # fmt: skip
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
        write_atomically(
            os.path.join(ns.output_dir, "config.yaml"), lambda f: yaml.safe_dump(config, f, sort_keys=False)
        )
        written = write_results(results, ns.output_dir)
        stale = remove_plots(ns.output_dir)  # an earlier run's: new ones replace them, or none are wanted
        written += write_plots(results, ns.output_dir) if ns.plots else []
    if stale and not ns.plots:
        print("removed the earlier run's plots (--plots false): " + ", ".join(stale))
    print(format_table(results))
    print("wrote " + ", ".join(written))
    return results
