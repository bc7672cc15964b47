"""FSDP on CUDA: configs/fsdp.yaml on a tiny model, generation under sharded parameters. Skipped without CUDA."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # FSDP runs in a subprocess
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA"),
]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_fsdp_config_fits_and_generates_on_cuda(finetuning, tiny_model_path, prompts_file, tmp_path):
    devices = min(2, torch.cuda.device_count())
    args = [
        sys.executable,
        "-m",
        "sharpening",
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "fsdp.yaml"),
        f"--model.policy.model_name_or_path={tiny_model_path}",
        f"--model.policy.finetuning={finetuning}",
        "--model.policy.dtype=float32",
        "--model.policy.gradient_checkpointing=false",
        "--model.batch_size=2",
        f"--model.output_dir={tmp_path}/out",
        f"--data.dataset={prompts_file}",
        "--data.subset=null",
        "--data.prompt_column=prompt",
        "--data.prompt_template={prompt}",
        "--data.use_chat_template=false",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.selection.truncated=keep",
        "--verifier.selection.answer_extractor=strip",
        "--trainer.precision=32-true",
        f"--trainer.devices={devices}",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert glob.glob(os.path.join(tmp_path, "checkpoints", "*.ckpt"))
    assert os.path.isdir(os.path.join(tmp_path, "out"))
