#!/usr/bin/env python
"""Benchmark: the sampling engines (hf: our decode loop; vllm: vLLM, colocated) on the same model, in one run.

    .venv-vllm/bin/python scripts/bench_engines.py --shape 0.5b --prompts 8 --samples 8 --max-new-tokens 64 --json
    python scripts/bench.py --engine hf vllm --shape 0.5b --json          # the same, through bench.py
    python scripts/bench_engines.py --engine hf --shape tiny               # hf only: runs in either venv

The model is Qwen2 built from a config with random weights (speed needs no trained weights) in the shape
``--shape`` names, with a character tokenizer that covers its whole vocabulary, saved to a temporary directory
that both engines load by path. Measured, per engine:

- generate: N responses per prompt for every prompt at once, through ``make_engine(...).generate`` as the
  library draws. vLLM's start-up (``VLLMEngine.start``) is timed on its own; then a cold draw and a warm one
  (other seeds), whose response tokens/s is reported: tokens actually drawn (EOS is one id in 151,936 under
  random weights, so nearly every response runs to --max-new-tokens on both engines), against the decode
  bound of memory bandwidth (every matmul weight read once per step for all sequences in flight).
- sft_round / rl_step: one self-verification round with its training epoch, and one online RL step, through
  the library's Lightning modules (scripts/bench_engines_train.py); the second (warm) one of each is timed.

With ``--compare trl`` the SFT round and RL step also run as TRL with vLLM colocated (``use_vllm=True,
vllm_mode="colocate"``; scripts/bench_engines_trl.py) on the same model, prompts, N, lengths, dtype and device,
reported beside the engines as ``trl_vllm``, with ``trl_vllm_over_ours`` = its warm seconds over our vllm
engine's. TRL is not in the venvs: ``PYTHONPATH`` to a ``pip install --no-deps --target`` of it. On CPU only the
SFT round compares (TRL's weight push into vLLM needs CUDA: the argument check says why).

    PYTHONPATH=/tmp/trlpkgs .venv-vllm/bin/python scripts/bench_engines.py --engine vllm --compare trl \\
        --device cuda --dtype bfloat16 --shape 1.5b --tasks sft_round rl_step --json

Each engine's task runs in its own Python process on the saved model (``run_in_child``): vLLM binds its
process's compute threads and memory when it starts and keeps memory after it is closed.

With --json the last line printed is one JSON object. vLLM lives in its own venv (.venv-vllm).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from bench_common import Workload, matmul_peak_gflops, memory_bandwidth_gbs, release_memory, synchronize
from bench_engines_workload import (
    DTYPES,
    SHAPES,
    bound_tokens_per_s,
    build_model,
    write_prompts,
)

ENGINES = ("hf", "vllm")
TRL_SIDE = "trl_vllm"  # TRL with vLLM colocated: its results sit beside the engines' under this name
TASKS = ("generate", "sft_round", "rl_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", nargs="+", choices=ENGINES, default=list(ENGINES), help="engines to measure")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to measure")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="0.5b", help="the Qwen2 shape (random weights)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and compute")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both engines run")
    parser.add_argument("--prompts", type=int, default=8, help="generate: prompts drawn together")
    parser.add_argument("--samples", type=int, default=8, help="generate: responses per prompt (N)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generate: most tokens per response")
    parser.add_argument("--train-prompts", type=int, default=4, help="sft_round / rl_step: prompts per round/step")
    parser.add_argument("--train-samples", type=int, default=4, help="sft_round / rl_step: N per prompt (G in RL)")
    parser.add_argument("--train-max-new-tokens", type=int, default=32, help="sft_round / rl_step: tokens/response")
    parser.add_argument("--max-positions", type=int, default=512, help="the model's max_position_embeddings")
    parser.add_argument("--kv-cache-gb", type=int, default=1, help="vllm on CPU: GiB of KV cache (whole GiB)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vllm on CUDA: its memory share")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    parser.add_argument(
        "--compare",
        choices=("none", "trl"),
        default="none",
        help="sft_round / rl_step: also run TRL with vLLM colocated on the same model (scripts/bench_engines_trl.py)",
    )
    parser.add_argument("--side", choices=("ours", "trl"), default="ours", help=argparse.SUPPRESS)  # a child's side
    parser.add_argument(
        "--model-dir", help="run one --engine and one --tasks on this saved model (how each measurement runs alone)"
    )
    args = parser.parse_args(argv)
    problems = argument_problems(args)
    if problems:
        parser.error("; ".join(problems))
    return args


def argument_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the arguments, before any model is built."""
    problems = []
    for name in ("prompts", "samples", "max_new_tokens", "train_prompts", "train_samples", "train_max_new_tokens"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    longest = max(args.max_new_tokens, args.train_max_new_tokens) + 8  # BOS and a prompt such as "12+34="
    if args.max_positions < longest:
        problems.append(
            f"--max-positions={args.max_positions}: must hold a prompt (about 8 tokens) and its response "
            f"({longest - 8} tokens); raise it to {longest} or more"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device=cuda: torch sees no CUDA device here; run on a GPU machine or use --device=cpu")
    if "vllm" in args.engine and importlib.util.find_spec("vllm") is None:
        problems.append(
            "--engine vllm: vLLM is not importable in this Python; run with .venv-vllm/bin/python "
            "(./scripts/setup.sh --vllm makes it), or measure --engine hf alone"
        )
    if args.model_dir and (len(args.engine) != 1 or len(args.tasks) != 1):
        problems.append(
            f"--model-dir: measures one engine and one task; got --engine {args.engine} --tasks {args.tasks}"
        )
    if args.compare == "trl":
        problems += compare_problems(args)
    if args.kv_cache_gb < 1:
        problems.append(f"--kv-cache-gb={args.kv_cache_gb}: must be >= 1 (vLLM reads whole GiB)")
    return problems


def compare_problems(args: argparse.Namespace) -> list[str]:
    """What stops ``--compare trl``: TRL's side runs only the training tasks, with TRL and vLLM importable."""
    from bench_engines_trl import trl_problems

    problems = trl_problems()
    if not {"sft_round", "rl_step"} & set(args.tasks):
        problems.append(f"--compare trl: compares sft_round and rl_step; got --tasks {' '.join(args.tasks)}")
    if args.device == "cpu" and "rl_step" in args.tasks:
        problems.append(
            "--compare trl --tasks rl_step --device cpu: TRL's GRPOTrainer pushes each update into colocated vLLM "
            "through the model's load_weights and each parameter's weight_loader, which vLLM's CPU backend drops "
            "when it repacks linear weights (AttributeError: 'Parameter' object has no attribute 'weight_loader'); "
            "TRL's RL step needs vLLM on CUDA: use --device cuda, or compare --tasks sft_round on CPU"
        )
    return problems


def engine_sampling(args: argparse.Namespace, engine: str, prompts: int, samples: int, max_new_tokens: int):
    """The library's SamplingConfig for ``engine``: exact draws (temperature 1, no top-k/top-p), all prompts at
    once, vLLM's KV cache / memory share from the arguments."""
    from sharpening.engines import SamplingConfig, VLLMConfig

    vllm = VLLMConfig(cpu_kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization)
    return SamplingConfig(samples, max_new_tokens, 1.0, 0, 1.0, prompts, engine=engine, vllm=vllm)


def measure_generation(args: argparse.Namespace, engine_name: str, model, tokenizer, w: Workload) -> dict:
    """Start-up (vLLM), a cold draw and a warm draw of N per prompt for every prompt by ``engine_name``."""
    from sharpening.engines import make_engine
    from sharpening.policy import stop_token_ids
    from sharpening.prompts import pad_prompts

    sampling = engine_sampling(args, engine_name, args.prompts, args.samples, args.max_new_tokens)
    rows = [tokenizer(t)["input_ids"] for t in w.prompt_texts]
    prompts = pad_prompts(rows, list(range(len(rows))), [None] * len(rows), tokenizer.pad_token_id)
    prompts = dataclasses.replace(
        prompts, prompt_ids=prompts.prompt_ids.to(args.device), prompt_mask=prompts.prompt_mask.to(args.device)
    )
    eos = stop_token_ids(model, tokenizer)
    engine = make_engine(sampling, w.model_path, seed=0)
    result = {"torch_threads": torch.get_num_threads(), "startup_seconds": 0.0}
    try:
        if engine_name == "vllm":
            result["startup_seconds"] = timed(lambda: engine.start(model))[0]
        for name, round_index in (("cold", 0), ("warm", 1)):
            seconds, samples = timed(
                lambda r=round_index: engine.generate(model, prompts, sampling, eos, tokenizer.pad_token_id, 0, r)
            )
            tokens = int(samples.response_mask.sum())
            result[f"{name}_seconds"], result[f"{name}_response_tokens"] = seconds, tokens
        result["completions"] = samples.response_ids.shape[0] * samples.response_ids.shape[1]
        result["tokens_per_s"] = result["warm_response_tokens"] / result["warm_seconds"]
        result["engine_metrics"] = engine.metrics()
    finally:
        engine.close()
    return result


def timed(fn) -> tuple[float, object]:
    """(wall seconds, result) of ``fn()``, with queued CUDA work inside the time, under no_grad."""
    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    synchronize()
    return time.perf_counter() - start, out


def run_generation(args: argparse.Namespace, engine: str, w: Workload) -> dict:
    """``measure_generation`` for ``engine`` on the model as the library's inference loader loads it."""
    from sharpening.policy import PolicyConfig, load_for_inference, load_tokenizer

    cfg = PolicyConfig(model_name_or_path=w.model_path, finetuning="full", dtype=args.dtype, attn_implementation="sdpa")
    model = load_for_inference(cfg, torch.device(args.device), "--shape")
    result = measure_generation(args, engine, model, load_tokenizer(cfg), w)
    del model
    release_memory()
    return result


def run_engine(args: argparse.Namespace, engine: str, gen: Workload, train: Workload) -> dict:
    """Every task of ``args.tasks`` with ``engine``: {task: result}. The training tasks are in
    scripts/bench_engines_train.py."""
    import bench_engines_train

    if args.side == "trl":
        return run_trl(args, train)
    results = {}
    if "generate" in args.tasks:
        results["generate"] = run_generation(args, engine, gen)
        report_progress(engine, "generate", results["generate"], results["generate"]["warm_seconds"])
    for task in ("sft_round", "rl_step"):
        if task in args.tasks:
            sampling = engine_sampling(args, engine, args.train_prompts, args.train_samples, args.train_max_new_tokens)
            results[task] = getattr(bench_engines_train, task)(train, sampling, args.dtype)
            release_memory()
            report_progress(engine, task, results[task], results[task]["seconds"]["total"])
    return results


def run_trl(args: argparse.Namespace, train: Workload) -> dict:
    """TRL with vLLM colocated on the training tasks of ``args.tasks`` (scripts/bench_engines_trl.py)."""
    import bench_engines_trl

    results = {}
    for task in ("sft_round", "rl_step"):
        if task in args.tasks:
            run = getattr(bench_engines_trl, task)
            results[task] = run(train, args.dtype, args.gpu_memory_utilization, args.kv_cache_gb)
            release_memory()
            report_progress(TRL_SIDE, task, results[task], results[task]["seconds"]["total"])
    return results


def report_progress(engine: str, task: str, result: dict, warm_seconds: float) -> None:
    """One line per finished task on stderr, with its result as JSON: what a run cut short still leaves."""
    line = json.dumps({"engine": engine, "task": task, "result": result}, default=float)
    print(f"  {task} {engine} warm {warm_seconds:.2f} s {line}", file=sys.stderr, flush=True)


def print_tables(report: dict) -> None:
    """Markdown tables: generation, then the SFT round and RL step per phase."""
    gen, bound = report["results"].get("generate", {}), report["bound_tokens_per_s"]
    compute = report["compute_bound_tokens_per_s"]
    if gen:
        print(
            "\n| engine | start-up s | cold draw s | warm draw s | tokens drawn | tokens/s | % of bandwidth bound"
            " | % of compute bound |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for engine, g in gen.items():
            of_compute = f"{100 * g['tokens_per_s'] / compute:.1f}" if compute else "-"
            print(
                f"| {engine} | {g['startup_seconds']:.1f} | {g['cold_seconds']:.2f} | {g['warm_seconds']:.2f} |"
                f" {g['warm_response_tokens']} | {g['tokens_per_s']:.1f} | {100 * g['tokens_per_s'] / bound:.1f} |"
                f" {of_compute} |"
            )
        print(f"\nbandwidth {report['machine']['bandwidth_gbs']:.1f} GB/s; bound {bound:,.0f} tokens/s")
        if compute:
            peak = report["machine"]["matmul_peak_gflops"]
            print(f"fp32 matmul peak {peak:.0f} GFLOP/s; compute bound {compute:,.0f} tokens/s")
    for task in ("sft_round", "rl_step"):
        if task not in report["results"]:
            continue
        print(
            f"\n| {task} | start-up s | cold s | warm s | generate s | score s | train s | tokens drawn"
            " | tokens/s drawing |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for engine, m in report["results"][task].items():
            s = m["seconds"]
            rate = m["response_tokens"] / s["generate"] if s["generate"] > 0 else 0.0
            print(
                f"| {engine} | {m.get('startup_seconds', 0.0):.1f} | {m['cold_seconds']:.2f} | {s['total']:.2f} |"
                f" {s['generate']:.2f} | {s['score']:.2f} | {s['train']:.2f} | {m['response_tokens']} | {rate:.1f} |"
            )
    if any(TRL_SIDE in report["results"].get(task, {}) for task in ("sft_round", "rl_step")):
        print(
            f"\nstart-up: ours' vLLM start is inside its cold round/step; {TRL_SIDE}'s (models loaded, vLLM started,"
            " trainer built) is before it"
        )


def machine_info(args: argparse.Namespace) -> dict:
    """What the numbers depend on: the processor or card, cores, threads, versions, load."""
    import platform

    info = {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }
    for package in ("transformers", "lightning", "vllm"):
        info[package] = __import__(package).__version__ if importlib.util.find_spec(package) else None
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model_name() -> str:
    """lscpu's model name, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def workloads(args: argparse.Namespace, path: str, root: str) -> tuple[Workload, Workload]:
    """What the generate task and the training tasks run: the same model and (seeded) prompts in every process."""
    texts, prompts_file = write_prompts(root, max(args.prompts, 2 * args.train_prompts))
    gen = Workload(path, texts[: args.prompts], prompts_file, device=args.device)
    train = Workload(
        path,
        texts,
        prompts_file,
        args.train_samples,
        args.train_max_new_tokens,
        args.train_prompts,
        args.train_prompts,
        device=args.device,
    )
    return gen, train


def run_in_child(argv: list[str], engine: str, task: str, path: str, side: str = "ours") -> dict:
    """One engine's task in its own Python process on the saved model: vLLM binds the process's threads and
    memory when it starts and does not give all of it back when closed, so no measurement follows another
    engine's in the same process. Its progress goes to our stderr; its last stdout line is the result."""
    import subprocess

    child = [*argv, "--engine", engine, "--tasks", task, "--model-dir", path, "--side", side, "--json"]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *child], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        who = "TRL with vLLM colocated" if side == "trl" else f"the {engine} engine"
        raise RuntimeError(f"{who}: {task} failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])[task]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import bench

    bench.quiet()
    if args.model_dir:  # one engine and task, for run_in_child
        with tempfile.TemporaryDirectory() as root:
            result = run_engine(args, args.engine[0], *workloads(args, args.model_dir, root))
        print(json.dumps(result, default=float))
        return result
    info, started = machine_info(args), time.perf_counter()
    info["bandwidth_gbs"] = memory_bandwidth_gbs(args.device)
    info["matmul_peak_gflops"] = matmul_peak_gflops(device=args.device) if args.dtype == "float32" else None
    base = [a for a in argv if a != "--json"]  # --engine / --tasks given last win in argparse
    with tempfile.TemporaryDirectory() as root:
        path, matmul = build_model(args.shape, args.dtype, args.max_positions, root)
        results = {
            task: {engine: run_in_child(base, engine, task, path) for engine in args.engine}
            for task in TASKS
            if task in args.tasks
        }
        for task in ("sft_round", "rl_step"):
            if args.compare == "trl" and task in args.tasks:
                results[task][TRL_SIDE] = run_in_child(base, "vllm", task, path, side="trl")
    info["load_average_end"] = os.getloadavg()
    sequences = args.prompts * args.samples  # the generate task draws them all together
    report = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "matmul_params": matmul,
        "bound_tokens_per_s": bound_tokens_per_s(info["bandwidth_gbs"], matmul, args.dtype, sequences),
        "compute_bound_tokens_per_s": compute_bound(info["matmul_peak_gflops"], matmul),
        "wall_seconds": time.perf_counter() - started,
        "results": results,
        "vllm_over_hf": ratios(results),
        "trl_vllm_over_ours": trl_ratios(results),
    }
    print(
        f"\n{info['cpu']} ({info['cpu_count']} cores, {args.threads} threads) {info.get('gpu', '')}; {args.shape}"
        f" {args.dtype} on {args.device}; load {info['load_average_start']} -> {info['load_average_end']}"
    )
    print_tables(report)
    if args.json:
        print(json.dumps(report, default=float))
    return report


def compute_bound(peak_gflops: float | None, matmul_params: int) -> float | None:
    """Response tokens/s if the float32 matmul peak were the only limit (2 FLOPs per matmul weight per token, in
    any batch): on a CPU, where 64 sequences in flight make decoding compute-bound before it is bandwidth-bound.
    None for bfloat16 (the peak measured is float32's)."""
    return None if peak_gflops is None else peak_gflops * 1e9 / (2 * matmul_params)


def ratios(results: dict) -> dict:
    """vLLM against hf where both ran: generation tokens/s (vllm / hf) and warm seconds (hf / vllm): > 1 is vLLM
    faster."""
    out = {}
    gen = results.get("generate", {})
    if {"hf", "vllm"} <= set(gen):
        out["generate_tokens_per_s"] = gen["vllm"]["tokens_per_s"] / gen["hf"]["tokens_per_s"]
    for task in ("sft_round", "rl_step"):
        runs = results.get(task, {})
        if {"hf", "vllm"} <= set(runs):
            out[f"{task}_speedup"] = runs["hf"]["seconds"]["total"] / runs["vllm"]["seconds"]["total"]
    return out


def trl_ratios(results: dict) -> dict:
    """TRL with vLLM colocated against our vllm engine where both ran: warm seconds TRL / ours (> 1: ours faster)."""
    out = {}
    for task in ("sft_round", "rl_step"):
        runs = results.get(task, {})
        if {TRL_SIDE, "vllm"} <= set(runs):
            out[task] = runs[TRL_SIDE]["seconds"]["total"] / runs["vllm"]["seconds"]["total"]
    return out


if __name__ == "__main__":
    main()
