"""The engine switch: the round, online RL's rollouts and `sharpen evaluate` draw through the engine the run makes
(``SamplingConfig.engine``), which the module makes once and closes at the end, and its metrics are logged.

A recording engine stands in for vLLM: it delegates to ``HFEngine`` (so the draws are hf's) and reports a parity
metric, as the vLLM engine does."""

from __future__ import annotations

import contextlib
import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

import sharpening.engines.hf as hf_engine
import sharpening.module as module_file
from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines import HFEngine, SamplingConfig, derive_seed, make_engine
from sharpening.evaluate.cache import DrawCache
from sharpening.evaluate.config import ProtocolConfig, validate_protocol_config
from sharpening.evaluate.draws import DrawContext, draw_batch
from sharpening.policy import PolicyConfig
from sharpening.prompts import PromptDataModule, pad_prompts
from sharpening.rl import RLConfig, RLSharpeningModule
from sharpening.rl.rollout import SeedStream
from sharpening.selection import SelectionConfig
from sharpening.sft import SFTSharpeningModule
from sharpening.tasks.extractors import resolve_extractor
from sharpening.verifier import RoundModels, RoundSettings, run_round

PARITY = {"engine/parity_max_abs_diff": 0.5}


class RecordingEngine:
    """A ``SamplingEngine`` that records each draw's arguments and draws with ``HFEngine``."""

    def __init__(self, kind: str = "recording") -> None:
        self.kind, self.calls, self.closed, self.inner = kind, [], False, HFEngine()
        self.idle_after = []  # draws made before each idle() call: the trainer got the device after them

    def generate(self, model, prompts, cfg, eos_token_id, pad_token_id, seed=0, round_index=0, stop_unselectable=0):
        assert not self.closed, "a closed engine drew"
        self.calls.append({"model": model, "cfg": cfg, "seed": seed, "round_index": round_index,
                           "prompt_indices": prompts.prompt_indices.tolist()})  # fmt: skip
        return self.inner.generate(
            model, prompts, cfg, eos_token_id, pad_token_id, seed, round_index, stop_unselectable=stop_unselectable
        )

    def metrics(self) -> dict[str, float]:
        return dict(PARITY)

    def idle(self) -> None:
        self.idle_after.append(len(self.calls))

    def close(self) -> None:
        self.closed = True


class MetricsLogger(Logger):
    """Every ``log_metrics`` call, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict] = []

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))


@pytest.fixture
def made(monkeypatch) -> list:
    """The module's make_engine replaced: each call records its arguments and returns a new RecordingEngine."""
    calls = []

    def fake_make_engine(sampling, model_path=None, *, seed=0, lora_rank=None):
        engine = RecordingEngine(sampling.engine)
        calls.append({"engine": engine, "model_path": model_path, "seed": seed, "lora_rank": lora_rank})
        return engine

    monkeypatch.setattr(module_file, "make_engine", fake_make_engine)
    return calls


def _counted_hf_draws(monkeypatch) -> list:
    """Each call of the hf decode loop (``generate_samples``), whoever makes it."""
    seen = []
    real = hf_engine.generate_samples
    monkeypatch.setattr(hf_engine, "generate_samples", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    return seen


# ---- (a) the round ---------------------------------------------------------------------------------------------


def test_a_round_draws_its_samples_and_greedy_runs_through_its_engine_only(tiny_model, tiny_tokenizer, monkeypatch):
    words = ["abcd=", "ab=", "hgf="]
    ids = [tiny_tokenizer(w).input_ids for w in words]
    prompts = pad_prompts(ids, [0, 1, 2], [w[:-1][::-1] for w in words], tiny_tokenizer.pad_token_id)
    settings = RoundSettings(
        SamplingConfig(samples_per_prompt=3, max_new_tokens=4),
        SelectionConfig(truncated="keep"),
        resolve_extractor("strip"),
        seed=5,
    )
    context = lambda: contextlib.nullcontext(tiny_model)  # noqa: E731
    want = run_round(RoundModels(context, context, tiny_tokenizer, 4), [prompts], settings, epoch=2)  # hf default
    hf_draws = _counted_hf_draws(monkeypatch)
    engine = RecordingEngine()
    got = run_round(RoundModels(context, context, tiny_tokenizer, 4, engine), [prompts], settings, epoch=2)
    assert len(hf_draws) == len(engine.calls) == 2  # no draw went around the engine
    sampled, greedy = engine.calls
    assert (sampled["cfg"].samples_per_prompt, sampled["cfg"].temperature) == (3, 1.0)
    assert (sampled["seed"], sampled["round_index"]) == (5, 2) and sampled["model"] is tiny_model
    assert (greedy["cfg"].samples_per_prompt, greedy["cfg"].temperature) == (1, 0.0)
    assert got.examples == want.examples  # the same draws as the default hf engine
    assert got.metric.compute().keys() == want.metric.compute().keys()
    for name, value in want.metric.compute().items():
        torch.testing.assert_close(got.metric.compute()[name], value, equal_nan=True)


# ---- (b) the callback's round in a fit -------------------------------------------------------------------------


def test_the_callbacks_round_draws_through_the_modules_engine_and_logs_its_metrics(tiny_model_path, prompts_file, made):
    module = SFTSharpeningModule(
        PolicyConfig(model_name_or_path=tiny_model_path, finetuning="lora", dtype="float32", lora_r=4), batch_size=2
    )
    verifier = SelfVerificationCallback(
        sampling=SamplingConfig(samples_per_prompt=2, max_new_tokens=4, prompts_per_batch=6), show_progress=False
    )
    logger = MetricsLogger()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=logger, callbacks=[verifier], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=PromptDataModule(prompts_file, answer_column="answer"))
    assert len(made) == 1  # one engine for the run
    engine = made[0]["engine"]
    assert made[0]["model_path"] == tiny_model_path and made[0]["lora_rank"] == 4 and made[0]["seed"] == 0
    temperatures = sorted(call["cfg"].temperature for call in engine.calls)
    assert temperatures == [0.0, 1.0]  # the round's draw and its greedy run, one batch of 6 prompts
    assert verifier.last_metrics["engine/parity_max_abs_diff"] == 0.5
    round_logged = [m for m in logger.logged if "sample/buffer_size" in m]
    assert round_logged and round_logged[0]["engine/parity_max_abs_diff"] == 0.5
    assert engine.idle_after == [2]  # idle once the round had drawn, before the trainer stepped
    assert engine.closed  # teardown gave it back


def test_the_rounds_engine_metrics_are_the_largest_over_the_ranks(monkeypatch):
    """Each rank's engine measured its own draws: the logged parity gap is the worst rank's, and a rank whose
    shard drew nothing (no metric) does not hide another's."""
    import sharpening.callbacks as callbacks

    ranks = [{"engine/parity_max_abs_diff": 0.1}, {}, {"engine/parity_max_abs_diff": 0.7, "engine/other": 2.0}]
    monkeypatch.setattr(callbacks.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(callbacks.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), ranks))
    assert callbacks._max_over_ranks(ranks[0], 3) == {"engine/parity_max_abs_diff": 0.7, "engine/other": 2.0}
    assert callbacks._max_over_ranks({"engine/x": 1.0}, 1) == {"engine/x": 1.0}  # one process: no collective


# ---- (c) online RL's rollouts ----------------------------------------------------------------------------------


def test_online_rollouts_draw_from_the_policy_through_the_modules_engine(tiny_model_path, prompts_file, made):
    module = RLSharpeningModule(
        PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="float32"),
        rl=RLConfig(),
        sampling=SamplingConfig(samples_per_prompt=2, max_new_tokens=4),
        prompts_per_step=2,
        seed=7,
    )
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=PromptDataModule(prompts_file, answer_column="answer"))
    assert len(made) == 1 and (made[0]["seed"], made[0]["lora_rank"]) == (7, None)
    (call,) = made[0]["engine"].calls
    assert call["model"] is module.policy and call["cfg"].samples_per_prompt == 2
    assert (call["seed"], call["round_index"]) == (7, derive_seed(0, SeedStream.POLICY_ROLLOUT))
    assert module.rollout.samples.response_ids.shape[:2] == (2, 2)
    assert float(trainer.callback_metrics["engine/parity_max_abs_diff"]) == 0.5
    assert made[0]["engine"].idle_after == [1]  # idle after the rollout's draw, before the update
    assert made[0]["engine"].closed


# ---- (d) evaluate ----------------------------------------------------------------------------------------------


def _draw_context(tiny_model_path, prompts_file, tmp_path, **protocol) -> tuple[DrawContext, RecordingEngine]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = PromptDataModule(prompts_file, answer_column="answer")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    data.load_prompts(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    engine = RecordingEngine()
    cfg = ProtocolConfig(n_values=[2], seeds=1, max_new_tokens=4, prompts_per_batch=3, **protocol)
    cache = DrawCache(str(tmp_path), {"model": "tiny"})
    return DrawContext(model, None, tokenizer, data, cfg, "self", cache, engine), engine


def test_evaluate_draws_through_its_engine_and_keys_the_cache_by_a_non_hf_engine(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    hf_ctx, hf_engine_used = _draw_context(tiny_model_path, prompts_file, tmp_path)
    prompts = next(iter(hf_ctx.data.prompt_batches(3)))
    hf_draws = _counted_hf_draws(monkeypatch)
    sampled, greedy = draw_batch(hf_ctx, prompts, "sample", 0), draw_batch(hf_ctx, prompts, "greedy", 0)
    assert len(hf_draws) == len(hf_engine_used.calls) == 2
    assert [c["cfg"].temperature for c in hf_engine_used.calls] == [1.0, 0.0]
    assert sampled.correct.shape == (3, 2) and greedy.correct.shape == (3, 1)
    # hf's key is the settings that decide the draws, as caches written before the engine switch hold them
    texts = [hf_ctx.data.prompt_texts[i] for i in prompts.prompt_indices.tolist()]
    settings = {"samples_per_prompt": 2, "max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert hf_ctx.cache.path("sample", 0, settings, prompts, texts) in [str(p) for p in tmp_path.iterdir()]

    draw_batch(hf_ctx, prompts, "sample", 0)  # served by the cache
    assert len(hf_engine_used.calls) == 2
    vllm_ctx, vllm_engine_used = _draw_context(tiny_model_path, prompts_file, tmp_path, engine="vllm")
    draw_batch(vllm_ctx, prompts, "sample", 0)  # hf's cached draws are not vLLM's
    assert len(vllm_engine_used.calls) == 1
    assert len(list(tmp_path.iterdir())) == 3  # hf sample, hf greedy, vllm sample


def test_evaluate_closes_its_engine_and_records_its_name(tiny_model_path, tmp_path, monkeypatch):
    import sharpening.evaluate.command as command
    from sharpening.cli import main
    from tests.integration.test_evaluate_cli import tiny_overrides

    made = []
    monkeypatch.setattr(command, "make_engine", lambda sampling, **kw: made.append(RecordingEngine()) or made[-1])
    results = main(["evaluate", *tiny_overrides(tiny_model_path, str(tmp_path / "out")), "--protocol.seeds=1"])
    assert results["draws"]["engine"] == "hf" and made[0].calls and made[0].closed

    def broken(*args, **kwargs):
        raise RuntimeError("the engine failed mid-draw")

    monkeypatch.setattr(RecordingEngine, "generate", broken)
    with pytest.raises(RuntimeError, match="mid-draw"):
        main(["evaluate", *tiny_overrides(tiny_model_path, str(tmp_path / "again")), "--cache_dir=null"])
    assert made[1].closed  # given back when a draw fails too


def test_evaluate_serves_an_adapter_on_its_base_at_the_adapters_rank(tmp_path, monkeypatch):
    import json

    import sharpening.evaluate.command as command

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": "org/base"}))
    seen = []
    monkeypatch.setattr(command, "make_engine", lambda sampling, **kw: seen.append((sampling, kw)))
    protocol = ProtocolConfig(engine="vllm", vllm={"max_model_len": 32})
    command.evaluation_engine(protocol, "org/base", str(tmp_path))
    command.evaluation_engine(protocol, "org/full", None)
    (with_adapter, kw_adapter), (_, kw_full) = seen
    assert with_adapter.engine == "vllm" and with_adapter.vllm.max_model_len == 32
    assert kw_adapter == {"model_path": "org/base", "lora_rank": 4}
    assert kw_full == {"model_path": "org/full", "lora_rank": None}


def test_the_protocols_engine_is_checked_with_the_sampling_rules():
    assert validate_protocol_config(ProtocolConfig(engine="vllm")) == []
    problems = validate_protocol_config(ProtocolConfig(engine="vllm", decode="static"))
    assert any("--protocol.decode='static'" in p and "engine=vllm" in p for p in problems)
    problems = validate_protocol_config(ProtocolConfig(engine="vllm", vllm={"parity_samples": -1}))
    assert any("--protocol.vllm.parity_samples=-1" in p for p in problems)


# ---- (e) making and keeping the engine -------------------------------------------------------------------------


def test_a_checkpoints_sampling_hyperparameters_come_back_with_their_vllm_options():
    from sharpening.engines import VLLMConfig
    from sharpening.module import config_from

    sampling = SamplingConfig(samples_per_prompt=3, engine="vllm", vllm=VLLMConfig(max_model_len=32))
    assert config_from(dataclasses.asdict(sampling), SamplingConfig) == sampling
    assert config_from(sampling, SamplingConfig) is sampling


def test_make_engine_hf_is_our_decode_loop():
    assert isinstance(make_engine(SamplingConfig()), HFEngine)


def test_the_module_keeps_one_engine_per_kind_and_closes_them_in_teardown(tiny_model_path, made):
    module = SFTSharpeningModule(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full"))
    first = module.sampling_engine(SamplingConfig())
    assert module.sampling_engine(SamplingConfig(samples_per_prompt=3)) is first and len(made) == 1
    assert made[0]["lora_rank"] is None and made[0]["model_path"] == tiny_model_path
    other = module.sampling_engine(dataclasses.replace(SamplingConfig(), engine="vllm"))
    assert other is not first and not first.closed and len(made) == 2
    # a round on one engine and rollouts on the other alternate without restarting either
    assert module.sampling_engine(SamplingConfig()) is first and len(made) == 2
    module.teardown("fit")
    assert other.closed and first.closed
    assert module.sampling_engine(SamplingConfig()) is not first  # made again after teardown
