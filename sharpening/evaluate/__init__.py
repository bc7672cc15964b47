"""`sharpen evaluate`: inference-time sharpening, the paper's best-of-N protocol (method.md §3.3).

    sharpen evaluate --config configs/evaluate/demo.yaml
    sharpen evaluate --model.model_name_or_path DIR --data.dataset FILE --output_dir OUT [--overwrite true]
    sharpen evaluate compare --base DIR --sharpened DIR --prompts FILE   (base vs sharpened, as the demo runs it)

Per seed, N_max responses per prompt are drawn ONCE at temperature 1 with no top-k/top-p; best-of-N
(per self-reward), maj@N and pass@N for a smaller N use the first N of them; greedy decoding runs once.
Draws are exact, so the sampler's log-probs ARE the evaluated model's log-likelihoods (method.md §4.4): no
rescoring, unless ``score_with: base`` asks to score a sharpened model's samples under its base (the
adapter disabled, or the base loaded beside a fully fine-tuned model) or the temperature is not 1.
Draws are cached on disk, so an interrupted run resumes where it stopped.

The stage in data-flow order:
    config.py    the options and their checks
    power_rows.py  the power-sampling rows' options (--protocol.power), names and checks
    sources.py   the model and adapter files, whether they fit, and loading them (through sharpening.policy)
    draws.py     drawing (sharpening.engines), scoring (logprobs.sample_logprobs, rewards.score_samples)
    cache.py     model fingerprints and the cached draws
    protocol.py  the maths: best-of-N, maj@N, pass@N, lifts, standard errors (pure)
    report.py    results.json, CSV, the printed table and plots
    command.py   the command: parse, check, lock the output directory, measure, write
    compare.py   base vs sharpened at one N (the demo's check)
This module holds the entry point and sends ``compare`` to compare.py.
"""

from __future__ import annotations

import sys

from sharpening.errors import ConfigError
from sharpening.evaluate.command import build_parser, measure, run
from sharpening.evaluate.compare import main as compare_main
from sharpening.evaluate.sources import load_models

__all__ = ["build_parser", "dispatch", "load_models", "main", "measure", "run"]


def main(argv: list[str] | None = None) -> dict:
    """``sharpen evaluate [compare] ...``; the flags ``--base ... --prompts ...`` alone also mean compare.

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
    """Compare mode for ``compare ...`` or the ``--base`` flags, else the protocol (:func:`run`)."""
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    if any(a == "--base" or a.startswith("--base=") for a in argv):
        return compare_main(argv)
    return run(argv)
