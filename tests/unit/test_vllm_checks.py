"""The vLLM engine's checks before any weights load: each problem for its bad input and none for a good one.
vLLM itself is needed only by the last test (vllm marker); the others stand in for it by patching the lookups."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace

import pytest

from sharpening.engines import SamplingConfig, VLLMConfig, vllm_checks
from sharpening.engines.vllm_checks import CPU_HEAD_SIZES, vllm_problems
from tests.helpers import REPO_ROOT, build_tiny_model

OPTION = "--verifier.sampling"
VLLM = SamplingConfig(engine="vllm", max_new_tokens=8)


@pytest.fixture
def with_vllm(monkeypatch):
    """vLLM 'installed', registering Llama only, with the CPU head sizes of vLLM 0.32."""
    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_checks, "vllm_architectures", lambda: {"LlamaForCausalLM"})
    monkeypatch.setattr(vllm_checks, "cpu_head_sizes", lambda: CPU_HEAD_SIZES)


@pytest.fixture(scope="module")
def head32_model(tmp_path_factory) -> str:
    """A tiny Llama with heads of 32 (hidden 128, 4 heads): vLLM's CPU attention has a kernel for it; context 64."""
    return build_tiny_model(tmp_path_factory.mktemp("head32") / "model", hidden=128)


def problems(model: str, cfg: SamplingConfig = VLLM, **kwargs) -> list[str]:
    settings = {"lora": False, "load_in_4bit": False, "longest_prompt": None, "device": "cpu"} | kwargs
    return vllm_problems(cfg, OPTION, model, **settings)


def with_architecture(model: str, tmp_path, architecture: str) -> str:
    """A copy of ``model``'s config.json naming another architecture (config only: no weights are read)."""
    config = json.loads(open(os.path.join(model, "config.json")).read())
    (tmp_path / "config.json").write_text(json.dumps(config | {"architectures": [architecture]}))
    return str(tmp_path)


def test_the_hf_engine_is_never_checked(tiny_model_path, monkeypatch):
    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)
    hf = replace(VLLM, engine="hf", vllm=VLLMConfig(max_model_len=10_000))
    assert problems(tiny_model_path, hf, load_in_4bit=True, longest_prompt=1_000) == []


def test_a_good_configuration_has_no_problem(head32_model, with_vllm):
    cfg = replace(VLLM, vllm=VLLMConfig(max_model_len=64))
    assert problems(head32_model, cfg, lora=True, longest_prompt=56) == []


def test_vllm_missing_says_how_to_install_it_or_use_hf(head32_model, monkeypatch):
    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)
    (problem,) = problems(head32_model)
    assert problem.startswith(f"{OPTION}.engine=vllm: vLLM is not installed")
    for fix in ("SHARPENING_VLLM=1 ./scripts/setup.sh", ".venv-vllm", "pip install 'sharpening[vllm]'", "engine=hf"):
        assert fix in problem, fix


def test_an_architecture_vllm_does_not_serve_is_refused(head32_model, tmp_path, with_vllm):
    custom = with_architecture(head32_model, tmp_path, "MyOwnForCausalLM")  # in neither vLLM nor transformers
    (problem,) = problems(custom)
    assert problem.startswith(f"{OPTION}.engine=vllm: {custom!r} is a MyOwnForCausalLM"), problem
    assert f"{OPTION}.engine=hf" in problem


def test_an_architecture_served_through_vllms_transformers_backend_passes(head32_model, monkeypatch, with_vllm):
    monkeypatch.setattr(vllm_checks, "vllm_architectures", lambda: {"Qwen2ForCausalLM"})  # Llama not registered
    assert problems(head32_model) == []


def test_max_model_len_beyond_the_models_context_is_refused(head32_model, with_vllm):
    (problem,) = problems(head32_model, replace(VLLM, vllm=VLLMConfig(max_model_len=65)))
    assert problem.startswith(f"{OPTION}.vllm.max_model_len=65: beyond the model's context of 64"), problem
    assert problems(head32_model, replace(VLLM, vllm=VLLMConfig(max_model_len=64))) == []


def test_a_prompt_and_its_response_longer_than_max_model_len_are_refused(head32_model, with_vllm):
    cfg = replace(VLLM, vllm=VLLMConfig(max_model_len=40))  # max_new_tokens 8: prompts up to 32 tokens fit
    assert problems(head32_model, cfg, longest_prompt=32) == []
    (problem,) = problems(head32_model, cfg, longest_prompt=33)
    assert problem.startswith(f"{OPTION}.vllm.max_model_len=40: the longest prompt has 33 tokens"), problem
    assert "needs 41" in problem and f"{OPTION}.max_new_tokens=8" in problem
    assert problems(head32_model, cfg) == []  # prompts not read yet: nothing to compare


def test_qlora_is_refused_saying_why_and_what_to_use(head32_model, with_vllm):
    (problem,) = problems(head32_model, lora=True, load_in_4bit=True)
    assert problem.startswith(f"--model.load_in_4bit=true with {OPTION}.engine=vllm: not supported"), problem
    assert "unquantized base" in problem and "LoRA on the full-precision base" in problem
    assert f"{OPTION}.engine=hf for QLoRA" in problem


def test_a_head_size_without_a_cpu_kernel_is_refused_on_cpu_only(tiny_model_path, head32_model, with_vllm):
    (problem,) = problems(tiny_model_path)  # hidden 64 / 4 heads: 16
    assert problem.startswith(f"{OPTION}.engine=vllm on CPU: {tiny_model_path!r} has attention heads of size 16")
    assert "32, 64, 80" in problem
    assert problems(tiny_model_path, device="cuda") == []
    assert problems(head32_model) == []


def test_problems_that_need_no_vllm_are_reported_with_the_install_one(tiny_model_path, monkeypatch):
    """One error lists every fix, not one fix-and-rerun each (the CPU head sizes fall back to vLLM 0.32's)."""
    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)
    cfg = replace(VLLM, vllm=VLLMConfig(max_model_len=100))
    found = problems(tiny_model_path, cfg, load_in_4bit=True)
    assert [p.split(":")[0] for p in found] == [
        f"{OPTION}.engine=vllm",
        f"--model.load_in_4bit=true with {OPTION}.engine=vllm",
        f"{OPTION}.vllm.max_model_len=100",
        f"{OPTION}.engine=vllm on CPU",
    ]


def test_sharpen_fit_with_engine_vllm_and_no_vllm_stops_before_weights_load(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    from sharpening.cli import main
    from sharpening.errors import ConfigError

    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)  # as in the main venv, even inside .venv-vllm
    monkeypatch.setattr("sharpening.module.load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", str(REPO_ROOT / "configs" / "demo.yaml"),
              f"--model.init_args.policy.model_name_or_path={tiny_model_path}", f"--data.dataset={prompts_file}",
              f"--trainer.default_root_dir={tmp_path / 'run'}", f"--model.init_args.output_dir={tmp_path / 'out'}",
              "--trainer.logger=false", "--verifier.sampling.engine=vllm"])  # fmt: skip
    assert any(p.startswith("--verifier.sampling.engine=vllm: vLLM is not installed") for p in err.value.problems)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="--model.load_in_4bit needs bitsandbytes")
def test_sharpen_evaluate_with_engine_vllm_is_checked_before_weights_load(tiny_model_path, tmp_path, monkeypatch):
    """The protocol's options, the prompts read and the model: a max_model_len too short for the prompts, QLoRA
    and the head size, with the install problem, in one error."""
    from sharpening.cli import main
    from sharpening.errors import ConfigError

    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)
    monkeypatch.setattr("sharpening.evaluate.command.load_models", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError) as err:
        main(["evaluate", f"--model.model_name_or_path={tiny_model_path}", "--model.device=cpu",
              f"--data.dataset={REPO_ROOT / 'tests' / 'data' / 'reversal.jsonl'}", "--protocol.n_values=[1,2]",
              "--protocol.seeds=1", "--protocol.max_new_tokens=4", "--model.load_in_4bit=true",
              "--protocol.engine=vllm", "--protocol.vllm.max_model_len=5", f"--output_dir={tmp_path}/out"])  # fmt: skip
    assert [p.split(":")[0] for p in err.value.problems if "engine=vllm" in p or "vllm." in p] == [
        "--protocol.engine=vllm",
        "--model.load_in_4bit=true with --protocol.engine=vllm",
        "--protocol.vllm.max_model_len=5",
        "--protocol.engine=vllm on CPU",
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("trains_on", "algorithm", "select_by", "checked"),
    [
        ("selected", None, "best_of_n", "--verifier.sampling"),  # SFT: the round's draws
        ("all_samples", "offline", "best_of_n", "--verifier.sampling"),
        ("selected", None, "power", None),  # power samples come from our own loop
        ("prompts", "online", "best_of_n", "--model.sampling"),  # RL's own rollouts; the verifier's are unused
        ("prompts", "xpo", "best_of_n", "--model.sampling"),
    ],
)
def test_fit_checks_the_sampling_it_draws_with(trains_on, algorithm, select_by, checked, tiny_model_path, monkeypatch):
    from types import SimpleNamespace

    from sharpening.policy import PolicyConfig
    from sharpening.run_checks import engine_problems

    monkeypatch.setattr(vllm_checks, "vllm_installed", lambda: False)
    policy = PolicyConfig(model_name_or_path=tiny_model_path, finetuning="qlora")
    module = SimpleNamespace(trains_on=trains_on, sampling=VLLM, policy_config=policy)
    verifier = SimpleNamespace(select_by=select_by, sampling=VLLM)
    rl = SimpleNamespace(algorithm=algorithm) if algorithm else None
    found = engine_problems(verifier, module, rl, "cuda", None)
    if checked is None:
        assert found == []
        return
    assert [p.split(":")[0] for p in found] == [
        f"{checked}.engine=vllm",
        f"--model.policy.finetuning=qlora with {checked}.engine=vllm",
    ]


@pytest.mark.vllm
@pytest.mark.slow  # imports vLLM (seconds)
def test_the_installed_vllm_agrees_with_the_checks(tiny_model_path, head32_model, tmp_path):
    """The fallback head sizes are the installed vLLM's, it serves Llama, and the tiny model's 16 is refused."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES
    assert problems(head32_model, lora=True) == []
    (problem,) = problems(tiny_model_path)
    assert "heads of size 16" in problem
    custom = with_architecture(head32_model, tmp_path, "MyOwnForCausalLM")
    assert problems(custom)[0].startswith(f"{OPTION}.engine=vllm: {custom!r} is a MyOwnForCausalLM")
