"""The built-in demo task: its data, its exact distribution, and a (very short) deterministic base build."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest

from sharpening.cli import main
from sharpening.tasks import demo
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


def test_distribution_puts_the_most_mass_on_the_answer_but_not_on_its_first_letter():
    dist = demo.demo_response_distribution("abcd=")
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-9)
    best = max(dist, key=dist.get)
    assert best == demo.correct_answer("abcd=") == "dcba"
    first_letter_mass = {}
    for response, p in dist.items():
        first_letter_mass[response[0]] = first_letter_mass.get(response[0], 0.0) + p
    assert max(first_letter_mass, key=first_letter_mass.get) == "a"  # greedy's first token is wrong


def test_demo_data_split_is_held_out(tmp_path):
    train, evaluation = demo.write_demo_data(tmp_path)
    rows = {name: [json.loads(line) for line in open(path)] for name, path in (("train", train), ("eval", evaluation))}
    assert len(rows["train"]) == 512 and len(rows["eval"]) == 200
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    assert all(r["answer"] == demo.correct_answer(r["prompt"]) for r in rows["eval"])


def _digest(path) -> str:
    return hashlib.sha256(open(os.path.join(path, "model.safetensors"), "rb").read()).hexdigest()


@pytest.mark.slow
def test_base_build_is_deterministic_and_skips_when_current(tmp_path):
    first = demo.build_demo_base(tmp_path / "a", steps=5, batch_size=16)
    second = demo.build_demo_base(tmp_path / "b", steps=5, batch_size=16)
    assert _digest(first) == _digest(second)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    demo.build_demo_base(tmp_path / "a", steps=5, batch_size=16)  # same parameters: not rebuilt
    assert os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp


@pytest.mark.slow
def test_demo_config_runs_on_a_briefly_trained_demo_base(tmp_path):
    base = demo.build_demo_base(tmp_path, steps=5, batch_size=16)
    train, _ = demo.write_demo_data(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            f"--model.init_args.policy.model_name_or_path={base}",
            f"--model.init_args.output_dir={tmp_path}/out",
            f"--data.dataset={train}",
            "--data.max_prompts=16",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--verifier.show_progress=false",
            "--trainer.fast_dev_run=1",
        ]
    )
    assert cli.trainer.global_step == 1
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
