"""`sharpen evaluate` end to end on a tiny model: every evaluation config, numbers recomputed by hand from
the cached draws, scoring under the base, resume from the cache, refusals, and the demo's compare mode."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from sharpening.cli import main
from sharpening.errors import ConfigError
from sharpening.evaluate.cache import cached_files, load_cached
from sharpening.evaluate.report import find_row, read_results
from sharpening.logprobs import response_logprobs
from sharpening.tasks.extractors import EXTRACTORS
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
EVAL_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "evaluate", "*.yaml")))
REVERSAL = os.path.join(ROOT, "tests", "data", "reversal.jsonl")
ROWS = [json.loads(line) for line in open(REVERSAL)]
N_VALUES = [1, 2, 4]


def letter_class(text: str) -> str | None:
    """A coarse answer (does it start with a-d?), so a random tiny model is right on a fair share of draws."""
    text = text.strip()
    return None if not text else ("early" if text[0] in "abcd" else "late")


@pytest.fixture
def letter_class_extractor(monkeypatch):
    monkeypatch.setitem(EXTRACTORS, "letter_class", letter_class)
    return "letter_class"


def tiny_overrides(model_path: str, out: str) -> list[str]:
    """Swap a config's model and prompts for the tiny ones and shrink the work to a second."""
    return [
        f"--model.model_name_or_path={model_path}",
        "--model.dtype=float32",
        "--model.device=cpu",
        f"--data.dataset={REVERSAL}",
        "--data.subset=null",
        "--data.split=train",
        "--data.prompt_column=prompt",
        "--data.answer_column=answer",
        "--data.prompt_template={prompt}",
        "--data.few_shot_prefix=",
        "--data.use_chat_template=false",
        "--data.max_prompts=4",
        f"--protocol.n_values=[{','.join(map(str, N_VALUES))}]",
        "--protocol.samples_per_prompt=null",
        "--protocol.seeds=2",
        "--protocol.max_new_tokens=4",
        "--protocol.prompts_per_batch=3",
        f"--output_dir={out}",
        "--show_progress=false",
        "--plots=false",
    ]


def evaluate(model_path, out, *extra):
    return main(["evaluate", *tiny_overrides(model_path, str(out)), *extra])


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=os.path.basename)
def test_every_evaluation_config_runs_on_a_tiny_model(config, tiny_model_path, tmp_path):
    out = tmp_path / "out"
    results = main(["evaluate", "--config", config, *tiny_overrides(tiny_model_path, str(out)), "--protocol.seeds=1",
                    "--plots=true"])  # fmt: skip
    assert read_results(str(out)) == results  # results.json round-trips
    assert results["config"]["protocol"]["seeds"] == 1 and results["prompts"]["count"] == 4
    for name in ("results.csv", "config.yaml", "accuracy_vs_n.png", "lift_vs_n.png", "loglik_histogram.png",
                 "accuracy_vs_tokens.png"):  # fmt: skip
        assert (out / name).is_file(), name
    power = results["config"]["protocol"]["power"]
    assert len([r for r in results["table"] if r["method"].startswith("power_")]) == len(power)
    assert results["model"]["fingerprint"] and results["model"]["model_name_or_path"] == tiny_model_path


def _self_loglik(cached: dict, prompt_ids: torch.Tensor, base) -> torch.Tensor:
    return (cached["logprobs"] * cached["response_mask"]).sum(-1)  # [B, N, T] -> [B, N]


def _base_loglik(cached: dict, prompt_ids: torch.Tensor, base) -> torch.Tensor:
    """Teacher-forced log-likelihood of every cached draw under ``base``: [B, N]."""
    b, n, t = cached["response_ids"].shape
    ids = prompt_ids.repeat_interleave(n, 0)  # [B, P] -> [B*N, P]
    with torch.no_grad():
        token_logprobs = response_logprobs(
            base, ids, torch.ones_like(ids, dtype=torch.bool),
            cached["response_ids"].view(b * n, t), cached["response_mask"].view(b * n, t),
        )  # fmt: skip
    return token_logprobs.view(b, n, t).sum(-1)  # [B*N, T] -> [B, N]


def hand_best_of_n(out, seed: int, tokenizer, loglik_fn, base=None) -> dict[int, tuple[float, float]]:
    """{N: (accuracy, mean chosen log-likelihood)} of best-of-N by log-likelihood, truncated draws dropped,
    recomputed from the cached draws of one seed without any of the tool's code but its file format."""
    correct, loglik, truncated = [], [], []
    for path in cached_files(os.path.join(out, "cache")):
        if not os.path.basename(path).startswith(f"sample-seed{seed}-"):
            continue
        cached = load_cached(path)
        first = int(os.path.basename(path).split("-p")[1][:6])
        b, n, _ = cached["response_ids"].shape
        prompt_ids = torch.tensor([tokenizer(ROWS[first + i]["prompt"]).input_ids for i in range(b)])
        loglik.append(loglik_fn(cached, prompt_ids, base))
        truncated.append(cached["truncated"])
        for i in range(b):
            texts = tokenizer.batch_decode(cached["response_ids"][i].tolist(), skip_special_tokens=True)
            reference = letter_class(ROWS[first + i]["answer"])
            correct.append([letter_class(t) is not None and letter_class(t) == reference for t in texts])
    loglik, truncated = torch.cat(loglik), torch.cat(truncated)
    assert loglik.shape == (4, max(N_VALUES))
    out_numbers = {}
    for n in N_VALUES:
        chosen = []
        for p in range(4):
            eligible = [j for j in range(n) if not truncated[p, j]] or [0]
            chosen.append(max(eligible, key=lambda j: (float(loglik[p, j]), -j)))
        accuracy = sum(correct[p][j] for p, j in enumerate(chosen)) / 4
        out_numbers[n] = (accuracy, sum(float(loglik[p, j]) for p, j in enumerate(chosen)) / 4)
    return out_numbers


def test_best_of_n_equals_a_hand_computation_from_the_cached_draws(
    tiny_model_path, tiny_tokenizer, tmp_path, letter_class_extractor
):
    results = evaluate(tiny_model_path, tmp_path, f"--protocol.answer_extractor={letter_class_extractor}")
    accuracies = []
    for k, seed in enumerate(results["seeds"]):
        for n, (accuracy, _chosen) in hand_best_of_n(str(tmp_path), seed, tiny_tokenizer, _self_loglik).items():
            row = find_row(results, "bon_loglik", n)
            assert row["accuracy_per_seed"][k] == pytest.approx(accuracy)
            accuracies.append(accuracy)
    assert 0 < sum(accuracies) < len(accuracies)  # some right, some wrong: the check is not vacuous
    for n in N_VALUES:  # per-prompt bounds hold on average too, and pass@N never decreases
        passed = find_row(results, "pass", n)["accuracy"]
        assert passed >= find_row(results, "bon_loglik", n)["accuracy"]
        assert passed >= find_row(results, "maj", n)["accuracy"]
    pass_curve = [find_row(results, "pass", n)["accuracy"] for n in N_VALUES]
    assert pass_curve == sorted(pass_curve)


def _lora_adapter(model_path: str, out) -> str:
    """A LoRA adapter with random (non-zero) weights on the tiny model, saved as a PEFT directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(base, lora).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_score_with_base_rescores_under_the_base(
    kind, tiny_model_path, tiny_tokenizer, tmp_path, letter_class_extractor
):
    from transformers import AutoModelForCausalLM

    from tests.helpers import build_tiny_model

    if kind == "adapter":
        model_args = [f"--model.adapter_path={_lora_adapter(tiny_model_path, tmp_path / 'adapter')}"]
        evaluated = tiny_model_path
    else:  # a "fully fine-tuned" model: another tiny model, scored by the tiny base
        evaluated = build_tiny_model(tmp_path / "full", seed=1)
        model_args = [f"--model.base_model_name_or_path={tiny_model_path}"]
    out = tmp_path / "out"
    extractor = f"--protocol.answer_extractor={letter_class_extractor}"
    results = evaluate(evaluated, out, *model_args, "--model.score_with=base", extractor)
    assert results["model"]["scored_by"] == "base"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    for k, seed in enumerate(results["seeds"]):
        by_base = hand_best_of_n(str(out), seed, tiny_tokenizer, _base_loglik, base)
        by_self = hand_best_of_n(str(out), seed, tiny_tokenizer, _self_loglik)
        for n in N_VALUES:
            row = find_row(results, "bon_loglik", n)
            assert row["accuracy_per_seed"][k] == pytest.approx(by_base[n][0])
            assert find_row(results, "bon_loglik", n)["chosen_loglik"] is not None
        assert by_base[1][1] != pytest.approx(by_self[1][1], abs=1e-3)  # the evaluated model differs from its base
        assert find_row(results, "bon_loglik", 1)["accuracy_per_seed"][k] == pytest.approx(by_base[1][0])


def test_a_rerun_draws_nothing_new(tiny_model_path, tmp_path, monkeypatch):
    import sharpening.engines.hf as hf_engine

    calls = []
    real = hf_engine.generate_samples
    monkeypatch.setattr(hf_engine, "generate_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = evaluate(tiny_model_path, tmp_path)
    assert len(calls) == (2 + 1) * 2  # (2 seeds + greedy) x 2 prompt batches
    calls.clear()
    second = evaluate(tiny_model_path, tmp_path, "--overwrite=true")
    assert calls == []
    assert second["draws"]["batches_reused"] == 6 and second["draws"]["batches_drawn"] == 0
    assert second["table"] == first["table"] and second["loglik_histogram"] == first["loglik_histogram"]
    calls.clear()
    evaluate(tiny_model_path, tmp_path, "--overwrite=true", "--protocol.seeds=3")  # one more seed: only it is drawn
    assert len(calls) == 2


POWER = "--protocol.power=[{method: mcmc, alpha: 4.0, block_tokens: 2, mcmc_steps: 1}, {method: smc, particles: 3}]"


def test_power_rows_are_measured_and_a_rerun_reuses_their_draws(tiny_model_path, tmp_path, monkeypatch):
    """Power rows beside the protocol's: one cached file per (setting, seed, batch) holding the sample and its token
    counts; their numbers recomputed from those files; a rerun draws nothing (power_sample would fail)."""
    import sharpening.evaluate.draws as draws_module

    first = evaluate(tiny_model_path, tmp_path, POWER)
    mcmc, smc = "power_mcmc_alpha4_block2_steps1", "power_smc_alpha4_particles3_ess0.5"
    assert set(first["power"]) == {mcmc, smc} and first["power"][smc]["max_new_tokens"] == 4
    files = [f for f in cached_files(os.path.join(tmp_path, "cache")) if os.path.basename(f).startswith("power-")]
    assert len(files) == 2 * 2 * 2  # 2 settings x 2 seeds x 2 prompt batches
    tokens = sorted(float(load_cached(f)["tokens_spent"].float().mean()) for f in files)
    assert tokens[0] >= 1 and "acceptance_rate" in {k for f in files for k in load_cached(f)}
    for method in (mcmc, smc):
        row = find_row(first, method)
        assert len(row["accuracy_per_seed"]) == 2 and row["tokens"] > 0 and row["chosen_loglik"] < 0
    greedy_row, bon = find_row(first, "greedy"), find_row(first, "bon_loglik", 4)
    assert greedy_row["tokens"] <= 4 and bon["tokens"] == pytest.approx(4 * find_row(first, "sample")["tokens"])
    by_file = {}  # the smc row's tokens per seed, from the cache files alone
    for f in files:
        cached = load_cached(f)
        if "acceptance_rate" not in cached:
            by_file.setdefault(os.path.basename(f).split("-")[1], []).append(cached["tokens_spent"])
    want = [float(torch.cat(parts).float().mean()) for _, parts in sorted(by_file.items())]
    assert find_row(first, smc)["tokens"] == pytest.approx(sum(want) / 2)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached power draw was drawn again")

    monkeypatch.setattr(draws_module, "power_sample", refuse)
    second = evaluate(tiny_model_path, tmp_path, POWER, "--overwrite=true")
    assert second["draws"]["batches_drawn"] == 0 and second["table"] == first["table"]


def test_power_draws_of_another_sampler_version_are_drawn_again(tiny_model_path, tmp_path, monkeypatch):
    """The power cache key holds POWER_FORMAT: draws made by a sampler whose output for a seed differs are not
    reused (a rerun with a bumped format draws every power batch again, and only those)."""
    import sharpening.evaluate.draws as draws_module

    one = "--protocol.power=[{method: smc, particles: 3}]"
    evaluate(tiny_model_path, tmp_path, one)
    monkeypatch.setattr(draws_module, "POWER_FORMAT", draws_module.POWER_FORMAT + 1)
    again = evaluate(tiny_model_path, tmp_path, one, "--overwrite=true")
    assert again["draws"]["batches_drawn"] == 2 * 2  # 2 seeds x 2 prompt batches of the power row


def test_the_static_decode_loop_gives_the_same_evaluation(tiny_model_path, tmp_path):
    """--protocol.decode only changes how the draws are computed: the same draws, so the same accuracies;
    log-likelihoods agree to float rounding (the static loop attends through a longer, masked cache)."""
    dynamic = evaluate(tiny_model_path, tmp_path / "dynamic")
    static = evaluate(tiny_model_path, tmp_path / "static", "--protocol.decode=static")
    assert static["loglik_histogram"] == dynamic["loglik_histogram"]
    assert [row.keys() for row in static["table"]] == [row.keys() for row in dynamic["table"]]
    for got, want in zip(static["table"], dynamic["table"]):
        for key, value in want.items():
            loglik = "loglik" in key and value is not None
            assert got[key] == (pytest.approx(value, rel=1e-5, abs=1e-5) if loglik else value), (got["method"], key)


def _no_weights(monkeypatch):
    import sharpening.evaluate.command as evaluate_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the configuration was checked")

    monkeypatch.setattr(evaluate_module, "load_models", refuse)


def test_a_non_empty_output_dir_is_refused(tiny_model_path, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path)
    text = str(err.value)
    assert "--overwrite=false" in text and str(tmp_path) in text and "--overwrite true" in text
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--protocol.n_values=[0,2]", "--protocol.n_values=[0, 2]"),
        ("--protocol.samples_per_prompt=2", "--protocol.samples_per_prompt=2: N_max"),
        ("--protocol.seeds=0", "--protocol.seeds=0"),
        ("--protocol.max_new_tokens=0", "--protocol.max_new_tokens=0"),
        ("--data.dataset=./missing.jsonl", "file not found"),
        ("--data.prompt_column=question", "no such column"),
        ("--model.model_name_or_path=./no/such/model", "no such directory"),
        ("--model.score_with=base", "--model.score_with=base: no base"),
        ("--protocol.decode=compiled", "--protocol.decode=compiled: CUDA graphs need a CUDA device"),
        ("--model.device=gpu", "--model.device='gpu': must be auto, cpu, cuda or cuda:N"),
        ("--protocol.power=[{method: smc, particles: 0}]", "--protocol.power[0].particles=0: must be >= 1"),
        ("--protocol.power=[{method: beam}]", "--protocol.power"),
    ],
)
def test_bad_input_fails_before_weights_load(override, fragment, tiny_model_path, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", override)
    assert fragment in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_output_or_cache_dir_that_cannot_be_written_is_refused_before_drawing(
    tiny_model_path, tmp_path, monkeypatch
):
    _no_weights(monkeypatch)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "file" / "out", f"--cache_dir={tmp_path / 'file' / 'cache'}")
    assert len(err.value.problems) == 2
    assert "--output_dir=" in err.value.problems[0] and "--cache_dir=" in err.value.problems[1]
    assert all("is a file, so the directory cannot be made" in p for p in err.value.problems)
    assert (tmp_path / "file").read_text() == "mine"


def test_every_problem_is_reported_at_once(tiny_model_path, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    (tmp_path / "old.txt").write_text("an earlier run")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path, "--protocol.seeds=0", "--protocol.max_new_tokens=0", "--data.max_prompts=0")
    assert len(err.value.problems) == 4 and "--overwrite=false" in err.value.problems[0]


@pytest.mark.parametrize("spelling", [["compare"], []], ids=["compare", "flags-only"])
def test_compare_mode_keeps_the_demo_summary(spelling, tiny_model_path, tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    summary = main(["evaluate", *spelling, "--base", tiny_model_path, "--sharpened", tiny_model_path,
                    "--prompts", REVERSAL, "--samples-per-prompt", "4", "--max-new-tokens", "4", "--max-prompts", "4",
                    "--demo-checks", "--summary", str(summary_path)])  # fmt: skip
    keys = ("base_sample_accuracy", "base_greedy_accuracy", "base_bon_accuracy", "sharpened_sample_accuracy",
            "sharpened_greedy_accuracy", "samples_per_prompt", "gap_closed")  # fmt: skip
    assert all(k in summary for k in keys)
    assert json.loads(summary_path.read_text()) == summary
    assert summary["base_bon_accuracy"] == summary["sharpened_bon_accuracy"]  # the same model, the same draws
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"summary: {summary_path}"


def test_compare_names_its_own_flags_and_never_overwrites_a_summary(tiny_model_path, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    (tmp_path / "summary.json").write_text("mine")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "ab", "answer": "ba"}) + "\n")
    with pytest.raises(ConfigError) as err:
        main(["evaluate", "compare", "--base", tiny_model_path, "--prompts", REVERSAL, "--samples-per-prompt", "0",
              "--max-new-tokens", "0", "--summary", str(tmp_path / "summary.json")])  # fmt: skip
    text = str(err.value)
    assert "--samples-per-prompt=0: must be >= 1" in text and "--max-new-tokens=0" in text
    assert "--summary=" in text and "already exists" in text and "--protocol." not in text
    assert (tmp_path / "summary.json").read_text() == "mine"
    with pytest.raises(ConfigError, match="--prompt-column='prompt': no such column"):
        main(["evaluate", "compare", "--base", tiny_model_path, "--prompts", str(tmp_path / "q.jsonl")])
    with pytest.raises(AssertionError, match="weights were loaded"):  # the column flag reads it: on to loading
        main(["evaluate", "compare", "--base", tiny_model_path, "--prompts", str(tmp_path / "q.jsonl"),
              "--prompt-column", "question", "--max-new-tokens", "8"])  # fmt: skip


def test_a_rerun_without_plots_leaves_no_stale_plots_and_no_partial_files(tiny_model_path, tmp_path):
    evaluate(tiny_model_path, tmp_path, "--plots=true")
    assert (tmp_path / "accuracy_vs_n.png").is_file()
    evaluate(tiny_model_path, tmp_path, "--overwrite=true", "--plots=false")
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.endswith((".png", ".partial"))], names
    assert {"results.json", "results.csv", "config.yaml"} <= set(names)


def test_load_in_4bit_evaluates_on_the_4bit_base_a_qlora_run_trains_on(tiny_model_path, tmp_path):
    """--model.load_in_4bit: the evaluated base is the NF4 base QLoRA training holds (same logits), not the
    full-precision one; the run records it, and its draws are cached apart from full-precision draws."""
    from bitsandbytes.nn import Linear4bit

    from sharpening.evaluate.config import EvalModelConfig
    from sharpening.evaluate.sources import load_models
    from sharpening.policy import PolicyConfig, load_policy

    adapter = _lora_adapter(tiny_model_path, tmp_path / "adapter")

    def dtypes(model) -> dict:  # of the weights that are not 4-bit, by their name in the base model
        return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.dtype
                for n, p in model.named_parameters()
                if "lora_" not in n and type(p).__name__ != "Params4bit"}  # fmt: skip

    bf16 = EvalModelConfig(tiny_model_path, adapter_path=adapter, dtype="bfloat16", device="cpu", load_in_4bit=True)
    trained_bf16, _ = load_policy(PolicyConfig(tiny_model_path, finetuning="qlora", dtype="bfloat16", lora_r=4))
    assert dtypes(load_models(bf16, tiny_model_path, adapter, torch.device("cpu"))[0]) == dtypes(trained_bf16)
    cfg = EvalModelConfig(tiny_model_path, adapter_path=adapter, dtype="float32", device="cpu", load_in_4bit=True)
    evaluated, _ = load_models(cfg, tiny_model_path, adapter, torch.device("cpu"))
    assert any(isinstance(m, Linear4bit) for m in evaluated.modules())
    trained, _ = load_policy(PolicyConfig(tiny_model_path, finetuning="qlora", dtype="float32", lora_r=4))
    full, _ = load_models(EvalModelConfig(tiny_model_path, adapter_path=adapter, dtype="float32", device="cpu"),
                          tiny_model_path, adapter, torch.device("cpu"))  # fmt: skip
    ids = torch.tensor([[1, 5, 8, 9]])
    with torch.no_grad(), evaluated.disable_adapter(), full.disable_adapter(), trained.disable_adapter():
        four_bit, qlora_base, full_base = evaluated(ids).logits, trained.eval()(ids).logits, full(ids).logits
    # the same NF4 weights; bitsandbytes' CPU kernels take another path once a 4-bit layer has run before PEFT
    # wraps it (the load-time head check), about 1e-3 here, while quantization itself moves logits by about 4e-2
    gap = float((four_bit - qlora_base).abs().max())
    assert gap < 3e-3 and float((full_base - qlora_base).abs().max()) > 10 * gap
    out = tmp_path / "out"
    results = evaluate(tiny_model_path, out, f"--model.adapter_path={adapter}", "--model.load_in_4bit=true")
    assert results["model"]["load_in_4bit"] is True
    again = evaluate(tiny_model_path, tmp_path / "again", f"--model.adapter_path={adapter}",
                     f"--cache_dir={out}/cache")  # fmt: skip
    assert again["draws"]["batches_reused"] == 0 and again["draws"]["batches_drawn"] > 0  # not the 4-bit draws
