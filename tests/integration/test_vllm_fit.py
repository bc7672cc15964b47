"""`sharpen fit` and `sharpen evaluate` with the vLLM engine on the demo task, end to end, against the hf engine.

The demo base is built once for the module with attention heads of 32 (vLLM's CPU attention has no kernel for
the demo's default 16), briefly trained: 800 steps of 64 sequences put ~25% on the right answer and leave best-of-8
right on ~85% of the prompts, the gap sharpening closes. Every run is in this process (sharpening.cli.main), and
vLLM runs in-process too, started once per fit or evaluation (its first draw).

Noise bounds. Accuracies are measured on the demo's 200 held-out prompts: a fit's model as scripts/demo.sh measures
it (`sharpen evaluate compare`, hf engine: vLLM is what is tested, not what measures), evaluate's tables by the
engine under test. Two runs that should agree are compared with a binomial bound: each accuracy is
treated as the mean of one Bernoulli outcome per prompt, standard error sqrt(p (1 - p) / P) with P = 200 prompts,
and two runs differ by at most 3 standard errors of their difference. Counting one outcome per prompt overstates
the evaluation's own noise (each figure averages 8 draws per prompt, or several seeds), which leaves room for
the noise the bound does not model: two fits train on different draws, so their sharpened models differ.
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

from sharpening.cli import main
from sharpening.tasks import demo
from tests.helpers import REPO_ROOT, verifier_callback

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = str(REPO_ROOT)
EVAL_PROMPTS = demo.EVAL_SIZE
SIGMAS = 3.0
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo's prompts and a briefly trained base with heads of 32 (module docstring)."""
    out = tmp_path_factory.mktemp("demo-vllm")
    demo.write_demo_data(out)
    demo.build_demo_base(out, steps=800, batch_size=64, head_dim=32)
    return out


def binomial_bound(p: float, q: float, prompts: int = EVAL_PROMPTS) -> float:
    """SIGMAS standard errors of the difference of two accuracies over ``prompts`` prompts (module docstring).
    The variance is floored at one prompt's worth, so one prompt flipping between runs is always within noise."""
    variance = max(p * (1 - p), 1 / prompts) + max(q * (1 - q), 1 / prompts)
    return SIGMAS * math.sqrt(variance / prompts)


def sft(demo_dir, root, engine: str, *extra):
    """configs/demo.yaml (the demo's SFT-sharpening as scripts/demo.sh runs it) on the module's base, drawing the
    round with ``engine``."""
    return main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            f"--model.init_args.policy.model_name_or_path={demo_dir}/base",
            f"--model.init_args.output_dir={root}/out",
            f"--data.dataset={demo_dir}/train.jsonl",
            f"--trainer.default_root_dir={root}",
            "--trainer.logger=false",
            "--verifier.show_progress=false",
            f"--verifier.sampling.engine={engine}",
            *QUIET,
            *extra,
        ]
    )


def compare_with_base(demo_dir, sharpened) -> dict:
    """The demo's measurement (scripts/demo.sh: `sharpen evaluate compare`, N = 8, hf engine)."""
    args = ["--base", f"{demo_dir}/base", "--sharpened", str(sharpened), "--prompts", f"{demo_dir}/eval.jsonl"]
    return main(["evaluate", "compare", *args, "--samples-per-prompt", "8", "--max-new-tokens", "8"])


def test_sft_with_vllm_amortizes_as_with_hf(demo_dir, tmp_path):
    fits = {engine: sft(demo_dir, tmp_path / engine, engine, "--trainer.enable_checkpointing=false") for engine in
            ("hf", "vllm")}  # fmt: skip
    metrics = verifier_callback(fits["vllm"].trainer).last_metrics
    assert metrics["engine/parity_max_abs_diff"] < 1e-4 and metrics["engine/rescored"] == 0.0  # vLLM drew the round
    assert "engine/parity_max_abs_diff" not in verifier_callback(fits["hf"].trainer).last_metrics
    hf, vllm = (compare_with_base(demo_dir, tmp_path / engine / "out") for engine in ("hf", "vllm"))
    base, hf_sample = hf["base_sample_accuracy"], hf["sharpened_sample_accuracy"]
    vllm_sample = vllm["sharpened_sample_accuracy"]
    assert abs(vllm_sample - hf_sample) <= binomial_bound(hf_sample, vllm_sample), (hf, vllm)
    assert vllm_sample - base > binomial_bound(base, vllm_sample) + 0.2, (base, vllm_sample)  # amortized: clearly
    assert base < hf["base_bon_accuracy"] - 0.3  # the gap the fit closes


def evaluate(demo_dir, out, engine: str) -> dict:
    """configs/evaluate/demo.yaml on the module's base with ``--protocol.engine``, N up to 8, 2 seeds."""
    return main(
        [
            "evaluate",
            "--config",
            os.path.join(ROOT, "configs", "evaluate", "demo.yaml"),
            f"--model.model_name_or_path={demo_dir}/base",
            f"--data.dataset={demo_dir}/eval.jsonl",
            "--protocol.n_values=[1,2,4,8]",
            "--protocol.seeds=2",
            f"--protocol.engine={engine}",
            f"--output_dir={out}",
            "--show_progress=false",
            "--plots=false",
        ]
    )


def test_evaluate_with_vllm_gives_the_hf_tables_within_noise(demo_dir, tmp_path):
    hf, vllm = (evaluate(demo_dir, tmp_path / engine, engine) for engine in ("hf", "vllm"))
    assert hf["draws"]["engine"] == "hf" and vllm["draws"]["engine"] == "vllm"
    assert hf["prompts"]["count"] == vllm["prompts"]["count"] == EVAL_PROMPTS
    keys = [(row["method"], row["n"]) for row in hf["table"]]
    assert keys == [(row["method"], row["n"]) for row in vllm["table"]]
    assert {"greedy", "sample", "bon_loglik", "maj", "pass"} <= {method for method, _ in keys}
    far = []
    for h, v in zip(hf["table"], vllm["table"]):
        bound = binomial_bound(h["accuracy"], v["accuracy"])
        if abs(h["accuracy"] - v["accuracy"]) > bound:
            far.append(f"{h['method']}@{h['n']}: hf {h['accuracy']:.3f}, vllm {v['accuracy']:.3f}, bound {bound:.3f}")
    assert not far, far
    bon = {engine: [row["accuracy"] for row in r["table"] if row["method"] == "bon_loglik"] for engine, r in
           (("hf", hf), ("vllm", vllm))}  # fmt: skip
    assert bon["vllm"][-1] > bon["vllm"][0] + 0.3  # best-of-8 by the model's own likelihood sharpens under vLLM too


def _checkpoint_each_epoch(root) -> str:
    """An extra config: a ModelCheckpoint at every epoch's end, kept (the stop point of a resume)."""
    path = os.path.join(root, "checkpoints.yaml")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write(
            "trainer:\n  callbacks:\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {root}/epochs, every_n_epochs: 1, save_top_k: -1, "
            "filename: 'end-{epoch}'}\n"
        )
    return path


def kept_ids(state: dict) -> list[tuple]:
    """(prompt index, sample index, prompt ids, response ids) of each kept example, in the buffer's order."""
    return [(e["prompt_index"], e["sample_index"], e["prompt_ids"], e["response_ids"]) for e in state["examples"]]


def test_resume_with_vllm_redraws_the_straight_runs_buffer(demo_dir, tmp_path):
    """Two rounds drawn from the policy: a run resumed after round 1 pushes the checkpoint's weights into a fresh
    vLLM, whose first draw (round 2) must be the straight run's second, kept examples and weights alike."""
    small = ["--data.max_prompts=32", "--model.init_args.batch_size=8", "--trainer.max_epochs=2"]
    small += ["--verifier.sample_from=policy", "--verifier.resample_every_epoch=true"]
    root = str(tmp_path / "straight")
    straight_cli = sft(demo_dir, root, "vllm", "--config", _checkpoint_each_epoch(root), *small)
    straight = verifier_callback(straight_cli.trainer)
    ckpt = os.path.join(root, "epochs", "end-epoch=0.ckpt")
    resumed_cli = sft(demo_dir, tmp_path / "resumed", "vllm", f"--ckpt_path={ckpt}", *small)
    resumed = verifier_callback(resumed_cli.trainer)
    assert straight.rounds_done == resumed.rounds_done == 2
    assert resumed.last_metrics["engine/parity_max_abs_diff"] < 1e-4  # vLLM served the restored policy
    kept, again = straight.buffer.state_dict(), resumed.buffer.state_dict()
    assert kept["epoch"] == again["epoch"] == 1 and len(kept["examples"]) == 32
    assert kept_ids(kept) == kept_ids(again)
    scores = [[e["score"] for e in state["examples"]] for state in (kept, again)]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=1e-5)
    for key, value in straight_cli.model.state_dict().items():
        torch.testing.assert_close(resumed_cli.model.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_online_rl_with_vllm_samples_the_current_policy_at_every_step(finetuning, demo_dir, tmp_path):
    """Online RL draws every step's rollouts from the policy the last step left: vLLM's log-probs of its draws must
    equal the in-memory policy's (the parity probe) at every step, so the weights reached vLLM each time."""
    steps = 3
    main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "rl.yaml"),
            f"--model.init_args.policy.model_name_or_path={demo_dir}/base",
            f"--model.init_args.policy.finetuning={finetuning}",
            "--model.init_args.policy.lora_r=4",
            f"--model.init_args.output_dir={tmp_path}/out",
            "--model.init_args.prompts_per_step=8",
            "--model.init_args.sampling.engine=vllm",
            f"--data.dataset={demo_dir}/train.jsonl",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.max_steps={steps}",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}/logs",
            *QUIET,
        ]
    )
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("engine/parity_max_abs_diff")]
    assert [int(r["step"]) for r in rows] == list(range(steps)), rows
    diffs = [float(r["engine/parity_max_abs_diff"]) for r in rows]
    assert max(diffs) < 1e-3, diffs
    assert all(float(r["engine/rescored"]) == 0.0 for r in rows)
