"""Peak memory of per-token log-prob scoring with a 150k vocabulary: chunked against full logits.

Compares ``sharpening.logprobs.response_logprobs`` (LM head + log-softmax on ``chunk_size`` response
positions at a time) with the two usual ways of getting the same numbers from full logits:

- ``plain``: ``model(...).logits -> log_softmax -> gather`` (HF's loss, most RL code);
- ``rowwise``: TRL's fp32 ``selective_log_softmax`` re-implemented (``logits_to_keep = T + 1``, then a
  gather and one ``logsumexp`` per row), which still holds the [B, T, V] logits.

Each configuration (path, chunk size, response length, ``score`` under no-grad or ``backward``) runs in a
fresh subprocess: build a random Llama from a config (nothing saved), build the inputs, warm up on a
one-row slice (in ``backward`` mode that allocates the parameter gradients, then zeroes them in place),
collect garbage and ``malloc_trim``, then measure ONE call. Two measures of the same call:

- RSS growth: ``VmHWM - VmRSS`` from /proc/self/status, with the high-water mark reset to the current
  RSS just before the call (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0). Unlike
  ``ru_maxrss - rss_before`` this cannot be hidden by an earlier, higher peak (model init, warm-up).
  It is what the OOM killer sees, non-tensor memory (oneDNN scratch, Python) included.
- torch peak: the highest ``total_allocated`` of the CPU allocator during the call, from
  ``torch.profiler`` with ``profile_memory=True``: exact tensor bytes, independent of glibc reuse and
  of which pages are touched. Uses a private profiler API; reported as null if it is unavailable.

Usage:
    python scripts/logprob_memory.py                                  # table
    python scripts/logprob_memory.py --response-tokens 256 512 --json # and one JSON line at the end
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

MIB = 2**20
PATHS = ("chunked", "plain", "rowwise")
MODES = ("score", "backward")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=151936, help="V (151936: Qwen2/2.5/3)")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size of the random Llama")
    parser.add_argument("--num-layers", type=int, default=2, help="decoder layers of the random Llama")
    parser.add_argument("--rows", type=int, default=4, help="B: sequences scored together")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="P: prompt length of every row")
    parser.add_argument("--response-tokens", type=int, nargs="+", default=[512], help="T values to run")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256, 1024], help="chunked path")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per subprocess")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every result")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    return parser.parse_args(argv)


# ---------------------------------------------------------------- memory probes (Linux /proc, profiler)


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_high_water_mark() -> bool:
    """Set VmHWM (and ru_maxrss) to the current RSS. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS, so reuse of them counts as growth."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _torch_peak_bytes(prof) -> int | None:
    """Highest total of live CPU-allocator bytes seen by the profiler (allocations since it started)."""
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        peak = 0
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation:
                peak = max(peak, node.extra_fields.total_allocated)
        return peak
    except (AttributeError, ImportError):
        return None


def measure_call(fn) -> dict:
    """Run fn() once; return its RSS growth, torch allocator peak and seconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    release_memory()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rss_before = _proc_status_bytes("VmRSS")
        reset = _reset_rss_high_water_mark()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        rss_peak = _proc_status_bytes("VmHWM")
    torch_peak = _torch_peak_bytes(prof)
    growth = rss_peak - rss_before if reset and rss_peak is not None and rss_before is not None else None
    return {
        "rss_growth_mib": None if growth is None else growth / MIB,
        "torch_peak_mib": None if torch_peak is None else torch_peak / MIB,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the model and the three paths


def build_model(vocab_size: int, hidden_size: int, num_layers: int, max_positions: int):
    """A random fp32 Llama with a Qwen-sized vocabulary; untied head, sdpa attention, nothing saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def plain_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """Full logits for every position, log_softmax over V, gather the targets. [R, T] float32."""
    import torch

    p = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [R, P+T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [R, P+T, V]
    logprobs = logits[:, p - 1 : -1].float().log_softmax(-1)  # [R, T, V]
    return logprobs.gather(-1, response_ids[..., None]).squeeze(-1) * response_mask


def rowwise_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """TRL's fp32 path: logits_to_keep = T + 1, gather, then one logsumexp per row. [R, T] float32."""
    import torch

    t = response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [R, P+T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=t + 1).logits
    logits = logits[:, :-1]  # [R, T+1, V] -> [R, T, V]
    selected = logits.gather(-1, response_ids[..., None]).squeeze(-1)  # [R, T]
    logsumexp = torch.stack([row.logsumexp(-1) for row in logits])  # [R, T]
    return (selected - logsumexp) * response_mask


def run_configuration(config: dict) -> dict:
    """Build everything for one configuration, warm up, and measure one call (in this process)."""
    import torch

    from sharpening.logprobs import response_logprobs

    torch.set_num_threads(config["threads"])
    b, p, t, v = config["rows"], config["prompt_tokens"], config["response_tokens"], config["vocab_size"]
    model = build_model(v, config["hidden_size"], config["num_layers"], p + t)
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, v, (b, p), generator=generator)
    response_ids = torch.randint(3, v, (b, t), generator=generator)
    prompt_mask = torch.ones(b, p, dtype=torch.bool)
    response_mask = torch.ones(b, t, dtype=torch.bool)  # no padding: B*T positions are scored
    if config["path"] == "chunked":
        score = lambda *a: response_logprobs(*a, chunk_size=config["chunk_size"])  # noqa: E731
    else:
        score = {"plain": plain_logprobs, "rowwise": rowwise_logprobs}[config["path"]]

    def call(prompts, prompt_masks, responses, response_masks):
        if config["mode"] == "score":
            with torch.no_grad():
                return score(model, prompts, prompt_masks, responses, response_masks)
        logprobs = score(model, prompts, prompt_masks, responses, response_masks)
        (-logprobs.sum() / response_masks.sum()).backward()

    call(prompt_ids[:1, -4:], prompt_mask[:1, -4:], response_ids[:1, :8], response_mask[:1, :8])  # warm-up
    model.zero_grad(set_to_none=False)  # backward mode: gradients stay allocated, as between training steps
    result = measure_call(lambda: call(prompt_ids, prompt_mask, response_ids, response_mask))
    return {**config, **result}


# ---------------------------------------------------------------- driver


def configurations(args: argparse.Namespace) -> list[dict]:
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "rows": args.rows,
        "prompt_tokens": args.prompt_tokens,
        "threads": args.threads,
    }
    out = []
    for t in args.response_tokens:
        for mode in args.modes:
            for path in args.paths:
                for chunk in args.chunk_sizes if path == "chunked" else [None]:
                    out.append({**common, "response_tokens": t, "mode": mode, "path": path, "chunk_size": chunk})
    return out


def run_in_subprocess(config: dict) -> dict:
    """One configuration in a fresh interpreter; returns its result dict (or the error)."""
    args = [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(config)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {**config, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    v = args.vocab_size
    print(
        f"vocab {v:,}, hidden {args.hidden_size}, {args.num_layers} layers, B = {args.rows} rows, "
        f"P = {args.prompt_tokens} prompt tokens, fp32, {args.threads} torch thread(s)"
    )
    for t in args.response_tokens:
        print(f"full logits B*T*V*4 at T = {t}: {args.rows * t * v * 4 / MIB:,.0f} MiB")
    for c in args.chunk_sizes:
        print(f"one chunk of logits chunk*V*4 at chunk {c}: {c * v * 4 / MIB:,.0f} MiB")
    print()
    print("|    T | mode     | path    | chunk | RSS growth MiB | torch peak MiB | growth / full logits | s     |")
    print("|-----:|----------|---------|------:|---------------:|---------------:|---------------------:|------:|")
    for r in results:
        full = args.rows * r["response_tokens"] * v * 4 / MIB
        growth = r.get("rss_growth_mib")
        ratio = None if growth is None else growth / full
        chunk = "-" if r["chunk_size"] is None else str(r["chunk_size"])
        if "error" in r:
            print(f"| {r['response_tokens']:>4} | {r['mode']:<8} | {r['path']:<7} | {chunk:>5} | error: {r['error']}")
            continue
        print(
            f"| {r['response_tokens']:>4} | {r['mode']:<8} | {r['path']:<7} | {chunk:>5} "
            f"| {_fmt(growth):>14} | {_fmt(r.get('torch_peak_mib')):>14} | {_fmt(ratio, 2):>20} "
            f"| {_fmt(r.get('seconds'), 1):>5} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(run_configuration(json.loads(args.measure))))
        return 0
    import torch
    import transformers

    started = time.time()
    results = []
    for config in configurations(args):
        results.append(run_in_subprocess(config))
        print(
            f"done: {config['path']} {config['mode']} T={config['response_tokens']} chunk={config['chunk_size']}",
            file=sys.stderr,
            flush=True,
        )
    print_table(results, args)
    print(f"\n{len(results)} configurations in {time.time() - started:.0f} s")
    if args.json:
        machine = {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        full = {t: args.rows * t * args.vocab_size * 4 / MIB for t in args.response_tokens}
        print(json.dumps({"machine": machine, "full_logits_mib": full, "results": results}))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
