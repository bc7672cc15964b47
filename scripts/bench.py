#!/usr/bin/env python
"""Benchmark: the same SFT round and RL step in `sharpening` and in TRL, in one process, alternating sides.

    python scripts/bench.py --compare trl --models tiny small --repeats 3 --json
    python scripts/bench.py --quick --compare none --json      # smoke test, ours only, no TRL needed
    python scripts/bench.py --engine hf vllm --shape 0.5b --json   # sampling engines: scripts/bench_engines.py

Each repetition runs, per model, the SFT round and the RL step on both sides; the side that goes first
alternates between repetitions. Reported: medians over repetitions per phase (generate, score, train)
and end to end, completions/s, response tokens/s, peak RSS, the fraction of this CPU's fp32 matmul peak
(measured in the same run), and per-repetition ratios TRL time / our time. With --json the last line
printed is one JSON object (``sft_round_speedup`` and ``rl_step_speedup`` are on the small model, or the
last model given). The measuring code lives in scripts/bench_*.py, not in the library: it imports TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from bench_common import Measurement, Workload, build_workload, copy_bandwidth_gbs, matmul_peak_gflops

TASKS = ("sft_round", "rl_step")
PHASES = ("generate", "score", "train", "total")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "small"), default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per model (medians are reported)")
    parser.add_argument("--compare", choices=("none", "trl"), default="trl", help="also run TRL (needs trl installed)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the SFT round (RL steps use 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--fixed-length", action="store_true", help="suppress EOS: every response is 32 tokens")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each side")
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 prompts, 1 repeat (smoke test)")
    parser.add_argument(
        "--complete-all-samples",
        action="store_true",
        help="ours: draw every SFT sample to its end (turn off stopping samples that cannot be kept)",
    )
    parser.add_argument(
        "--few-shot",
        type=int,
        default=0,
        metavar="K",
        help="prefix every prompt with the same K worked sums (about 9 tokens each): long shared prompts",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run")
    parser.add_argument(
        "--decode",
        choices=("dynamic", "static", "compiled"),
        default="dynamic",
        help="ours: the sampler's decode loop (SamplingConfig.decode; compiled = CUDA graphs, CUDA only)",
    )
    parser.add_argument(
        "--cpu-linear",
        choices=("auto", "onednn", "torch"),
        default="auto",
        help="ours: the CPU kernel of linear layers (PolicyConfig.cpu_linear; torch = nn.Linear's, as TRL runs)",
    )
    parser.add_argument(
        "--warm-rl-steps",
        type=int,
        default=0,
        metavar="K",
        help="also time K RL steps that follow a first, untimed step in the same trainer (task rl_warm_step, "
        "per-step means; needs --prompts >= 8 * (K + 1)): a training run's steady state, without the first "
        "step's page faults and copy-on-write of the loaded weights",
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object, last line")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: torch sees no CUDA device here; run on a GPU machine or use --device=cpu")
    if args.decode == "compiled" and args.device != "cuda":
        parser.error(
            f"--decode=compiled needs --device=cuda (got --device={args.device}); use --decode=static or dynamic"
        )
    if args.quick:
        args.models, args.prompts, args.repeats = ["tiny"], 8 * (1 + max(args.warm_rl_steps, 0)), 1
    if args.few_shot < 0:
        parser.error(f"--few-shot={args.few_shot}: must be >= 0 (0 = the plain 'a+b=' prompts)")
    if args.repeats < 1 or args.prompts < 8:
        parser.error(f"--repeats={args.repeats} must be >= 1 and --prompts={args.prompts} >= 8 (an RL step uses 8)")
    if args.warm_rl_steps < 0 or args.prompts < 8 * (1 + args.warm_rl_steps):
        parser.error(
            f"--warm-rl-steps={args.warm_rl_steps}: must be >= 0, with --prompts >= 8 x (K + 1) (each RL step takes "
            f"8 new prompts; got --prompts={args.prompts}); lower K or raise --prompts"
        )
    return args


def tasks(args: argparse.Namespace) -> tuple[str, ...]:
    """The tasks each side runs: TASKS, and rl_warm_step with --warm-rl-steps."""
    return TASKS + (("rl_warm_step",) if args.warm_rl_steps else ())


def load_sides(compare: str) -> dict:
    """{"ours": module, "trl": module}; TRL only when asked for, with a clear error when it is missing."""
    import bench_ours

    sides = {"ours": bench_ours}
    if compare == "trl":
        try:
            import bench_trl
            import trl  # noqa: F401
        except ImportError as err:
            sys.exit(f"--compare trl needs TRL ({err}); install it with: pip install 'sharpening[bench]'")
        sides["trl"] = bench_trl
    return sides


def quiet() -> None:
    """Progress bars and library chatter off: they would interleave with the table."""
    import logging

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "trl", "lightning", "lightning.pytorch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


def run_model(name: str, sides: dict, args: argparse.Namespace, root: str) -> tuple[dict, Workload]:
    """All repetitions for one model: ({task: {side: [Measurement per repetition]}}, workload), sides alternating."""
    workload = build_workload(name, root, args.prompts, args.fixed_length, few_shot=args.few_shot)
    workload.complete_all_samples, workload.device, workload.decode = (
        args.complete_all_samples,
        args.device,
        args.decode,
    )
    workload.cpu_linear, workload.warm_rl_steps = args.cpu_linear, args.warm_rl_steps
    results = {task: {side: [] for side in sides} for task in tasks(args)}
    order = list(sides)
    for rep in range(args.repeats):
        for task in tasks(args):
            for side in order if rep % 2 == 0 else order[::-1]:
                m = getattr(sides[side], task)(workload, rep)
                results[task][side].append(m)
                print(
                    f"  {name} rep {rep} {task:9s} {side:4s} {m.seconds['total']:7.2f} s", file=sys.stderr, flush=True
                )
    return results, workload


def bandwidth_bounds(w: Workload, bandwidth_gbs: float | None) -> dict[str, float | None]:
    """Per task, the response tokens/s that decoding could reach if memory bandwidth were the only limit:
    each decode step reads every matmul weight once (fp32) and gives one token to each of the rows decoded
    together (prompts per batch x N). KV-cache reads, prefill and kernel launches are not counted: a bound."""
    if bandwidth_gbs is None:
        return dict.fromkeys(TASKS)
    weight_bytes = 4 * w.matmul_params
    rl_rows = w.rl_prompts * w.samples_per_prompt
    rows = {"sft_round": w.prompts_per_batch * w.samples_per_prompt, "rl_step": rl_rows, "rl_warm_step": rl_rows}
    return {task: rows[task] * bandwidth_gbs * 1e9 / weight_bytes for task in rows}


def warm_up(sides: dict, args: argparse.Namespace, root: str) -> None:
    """One untimed run of every side and task on a tiny workload: lazy imports and first-call costs."""
    workload = build_workload("tiny", os.path.join(root, "warmup"), 8)
    workload.device, workload.decode, workload.cpu_linear = args.device, args.decode, args.cpu_linear
    for side in sides.values():
        for task in TASKS:
            getattr(side, task)(workload, 0)


def phase_stats(runs: list[Measurement], phase: str, peak_gflops: float) -> dict[str, float | None]:
    """Medians over repetitions of one phase: seconds, completions/s, response tokens/s, fraction of peak.

    For ``total`` (end to end) the counts are the completions and tokens generated and the FLOPs are
    those of every phase together."""
    if phase == "total":
        completions, tokens = (lambda r: r.completions["generate"]), (lambda r: r.response_tokens["generate"])
        flops = lambda r: sum(r.useful_flops.values())  # noqa: E731
    else:
        completions, tokens = (lambda r: r.completions[phase]), (lambda r: r.response_tokens[phase])
        flops = lambda r: r.useful_flops[phase]  # noqa: E731

    def rate(count) -> float | None:
        values = [count(r) / r.seconds[phase] for r in runs if r.seconds[phase] > 0]
        return statistics.median(values) if values else None

    needs_flops = all(flops(r) > 0 for r in runs)
    return {
        "seconds": statistics.median(r.seconds[phase] for r in runs),
        "completions_per_s": rate(completions),
        "tokens_per_s": rate(tokens),
        "fraction_of_peak": rate(flops) / (peak_gflops * 1e9) if needs_flops else None,
    }


def summarize(results: dict, peak_gflops: float, bounds: dict | None = None) -> dict:
    """{model: {task: {side: stats, "ratios": TRL time / our time}}} from the raw measurements; with
    ``bounds`` ({model: {task: tokens/s}}, on CUDA) each side's generate phase also gets its fraction of it."""
    out = {}
    for model, tasks in results.items():
        out[model] = {}
        for task, sides in tasks.items():
            entry = {}
            for side, runs in sides.items():
                entry[side] = {
                    "phases": {p: phase_stats(runs, p, peak_gflops) for p in PHASES},
                    "seconds_per_repeat": [round(r.seconds["total"], 3) for r in runs],
                    "setup_seconds": statistics.median(r.setup_seconds for r in runs),
                    "peak_rss_mib": max(r.peak_rss_mib for r in runs),
                    "peak_gpu_mib": max(r.peak_gpu_mib for r in runs),
                    "rss_growth_mib": statistics.median(r.rss_growth_mib for r in runs),
                    "mean_response_tokens": statistics.median(
                        r.response_tokens["generate"] / max(r.completions["generate"], 1) for r in runs
                    ),
                }
                bound = (bounds or {}).get(model, {}).get(task)
                if bound:
                    generate = entry[side]["phases"]["generate"]
                    generate["fraction_of_bandwidth_bound"] = (generate["tokens_per_s"] or 0.0) / bound
            if "trl" in sides:
                entry["ratios"] = ratios(sides["ours"], sides["trl"])
            if (bounds or {}).get(model, {}).get(task):
                entry["generate_bandwidth_bound_tokens_per_s"] = bounds[model][task]
            out[model][task] = entry
    return out


def ratios(ours: list[Measurement], theirs: list[Measurement]) -> dict:
    """TRL seconds / our seconds, per repetition (paired) and their median, end to end and per phase."""
    per_repeat = [t.seconds["total"] / o.seconds["total"] for o, t in zip(ours, theirs)]
    phases = {
        p: statistics.median(
            t.seconds[p] / o.seconds[p] if o.seconds[p] > 0 else float("inf") for o, t in zip(ours, theirs)
        )
        for p in PHASES
    }
    return {"per_repeat": [round(r, 3) for r in per_repeat], "median": statistics.median(per_repeat), "phases": phases}


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_tables(summary: dict) -> None:
    """Markdown tables: per phase, then end to end with memory and ratios."""
    print("\n| model | task | phase | side | median s | completions/s | tokens/s | % of fp32 peak | TRL/ours |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for model, tasks in summary.items():
        for task, entry in tasks.items():
            for phase in PHASES:
                for side in ("ours", "trl"):
                    if side not in entry:
                        continue
                    s = entry[side]["phases"][phase]
                    ratio = _fmt(entry["ratios"]["phases"][phase]) if side == "trl" else ""
                    print(
                        f"| {model} | {task} | {phase} | {side} | {s['seconds']:.3f}"
                        f" | {_fmt(s['completions_per_s'], digits=1)}"
                        f" | {_fmt(s['tokens_per_s'], digits=0)} | {_fmt(s['fraction_of_peak'], 100, 1)} | {ratio} |"
                    )
    print(
        "\n| model | task | side | total s per repeat | setup s | peak RSS MiB | RSS growth MiB | peak GPU MiB"
        " | mean tokens/response | TRL/ours per repeat (median) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for model, tasks in summary.items():
        for task, entry in tasks.items():
            for side in ("ours", "trl"):
                if side not in entry:
                    continue
                e = entry[side]
                ratio = ""
                if side == "trl":
                    r = entry["ratios"]
                    ratio = f"{', '.join(f'{x:.2f}' for x in r['per_repeat'])} ({r['median']:.2f})"
                print(
                    f"| {model} | {task} | {side} | {', '.join(f'{x:.2f}' for x in e['seconds_per_repeat'])} |"
                    f" {e['setup_seconds']:.2f} | {e['peak_rss_mib']:.0f} | {e['rss_growth_mib']:.0f} |"
                    f" {e['peak_gpu_mib']:.0f} |"
                    f" {e['mean_response_tokens']:.1f} | {ratio} |"
                )


def machine_info(threads: int) -> dict:
    """What the numbers depend on: cores, threads, versions, load."""
    import platform

    info = {
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }
    for package in ("transformers", "lightning", "trl"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def speedups(summary: dict) -> dict:
    """The headline ratios, on the small model when it ran (else the last model)."""
    model = "small" if "small" in summary else list(summary)[-1]
    tasks = summary[model]
    pick = lambda task: tasks[task]["ratios"]["median"] if "ratios" in tasks.get(task, {}) else None  # noqa: E731
    out = {"speedup_model": model, "sft_round_speedup": pick("sft_round"), "rl_step_speedup": pick("rl_step")}
    if "rl_warm_step" in tasks:
        out["rl_warm_step_speedup"] = pick("rl_warm_step")
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--engine" or a.startswith("--engine=") for a in argv):  # the engines' benchmark, its own options
        import bench_engines

        return bench_engines.main(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    sides = load_sides(args.compare)
    info = machine_info(args.threads)
    started = time.perf_counter()
    peak_start = matmul_peak_gflops(device=args.device)
    bandwidth = copy_bandwidth_gbs(args.device)
    results, bounds = {}, {}
    with tempfile.TemporaryDirectory() as root:
        if not (args.no_warmup or args.quick):
            warm_up(sides, args, root)
        for name in args.models:
            results[name], workload = run_model(name, sides, args, root)
            bounds[name] = bandwidth_bounds(workload, bandwidth)
    peak_end = matmul_peak_gflops(device=args.device)
    peak = max(peak_start, peak_end)
    info.update(matmul_peak_gflops_start=peak_start, matmul_peak_gflops_end=peak_end, load_average_end=os.getloadavg())
    info.update(device=args.device, copy_bandwidth_gbs=bandwidth)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    summary = summarize(results, peak, bounds)
    print(
        f"\nfp32 matmul peak {peak:.0f} GFLOP/s (start {peak_start:.0f}, end {peak_end:.0f}) on {args.device};"
        f" {args.threads} threads; load average {info['load_average_start']} -> {info['load_average_end']}"
    )
    if bandwidth is not None:
        print(
            f"{info['gpu']}: copy bandwidth {bandwidth:.0f} GB/s; decode bound on response tokens/s (weights read"
            " once per step): " + "; ".join(f"{m} {t} {b:,.0f}" for m, tb in bounds.items() for t, b in tb.items())
        )
        for model, tasks in summary.items():
            for task, entry in tasks.items():
                for side in ("ours", "trl"):
                    if side in entry:
                        f = entry[side]["phases"]["generate"]["fraction_of_bandwidth_bound"]
                        print(f"  {model} {task} {side}: generate at {100 * f:.1f}% of that bound")
    print_tables(summary)
    report = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "wall_seconds": time.perf_counter() - started,
        "results": summary,
        **speedups(summary),
    }
    if args.json:
        print(json.dumps(report, default=float))
    return report


if __name__ == "__main__":
    main()
