"""Preemption with the vLLM engine: SIGTERM during a round abandons it between prompt batches (vLLM, running in
this process, leaves the signal to the trainer), and the resumed run redraws that round identically."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from sharpening.cli import main
from sharpening.engines.vllm import VLLMEngine
from sharpening.safety import PREEMPTED_CHECKPOINT
from tests.helpers import build_tiny_model
from tests.integration.test_preemption import _adapter, _args, _verifier

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = ["--verifier.sampling.engine=vllm", "--verifier.sampling.vllm.max_model_len=64"]


def test_sigterm_during_a_vllm_round_resumes_to_the_same_weights(prompts_file, tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "tiny", hidden=128)  # head size 32: vLLM's CPU attention has a kernel
    full = main(_args(model, prompts_file, tmp_path / "full", *VLLM))
    real = VLLMEngine.generate

    def sigterm_in_second_round(self, *args, **kwargs):
        if kwargs.get("round_index") == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "generate", sigterm_in_second_round)
    stopped = main(_args(model, prompts_file, tmp_path / "run", *VLLM))
    assert stopped.trainer.global_step == 2 and _verifier(stopped).buffer.epoch == 0  # round 1 abandoned
    assert (tmp_path / "run" / "checkpoints" / PREEMPTED_CHECKPOINT).is_file()
    monkeypatch.undo()
    resumed = main(_args(model, prompts_file, tmp_path / "run", *VLLM, "--ckpt_path=last"))
    assert _verifier(resumed).buffer.state_dict() == _verifier(full).buffer.state_dict()
    assert _verifier(resumed).last_metrics["engine/parity_max_abs_diff"] < 1e-4
    for key, value in _adapter(full).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=0, atol=0)  # bitwise on CPU
