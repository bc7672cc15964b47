"""`sharpen evaluate` refuses bad input before any weights load, with the option, the value, the rule and
the fix: prompts past the model's context, an adapter made for another base, directories that are not
models, and output or cache directories among a model's files."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from sharpening.cli import main
from sharpening.errors import ConfigError
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
REVERSAL = os.path.join(ROOT, "tests", "data", "reversal.jsonl")


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Every run here must stop at its checks: loading weights fails the test."""
    import sharpening.evaluate.command as evaluate_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the configuration was checked")

    monkeypatch.setattr(evaluate_module, "load_models", refuse)


def evaluate(model, out, *extra, dataset=REVERSAL):
    return main(["evaluate", f"--model.model_name_or_path={model}", f"--data.dataset={dataset}", "--model.device=cpu",
                 "--protocol.n_values=[1,2]", "--protocol.seeds=1", "--protocol.max_new_tokens=4",
                 f"--output_dir={out}", "--show_progress=false", "--plots=false", *extra])  # fmt: skip


def compare(*args):
    return main(["evaluate", "compare", "--samples-per-prompt", "2", "--max-new-tokens", "4", *args])


def _prompts(path, prompts: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts)
    return str(path)


def _adapter(base: str, out) -> str:
    """A LoRA adapter directory made on ``base`` (its adapter_config.json names it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------- prompts past the context


def test_prompts_longer_than_the_context_are_refused(tiny_model_path, tiny_tokenizer, tmp_path):
    """The tiny model has 64 positions: 2 of 5 prompts leave no room for the response."""
    long = ["abcd" * 12 + "=", "abcd" * 20 + "="]
    dataset = _prompts(tmp_path / "p.jsonl", ["ab=", long[0], "cd=", "ef=", long[1]])
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", "--protocol.max_new_tokens=20", dataset=dataset)
    (problem,) = err.value.problems
    longest = len(tiny_tokenizer(long[1]).input_ids)
    assert f"--data.dataset={dataset!r}: 2 of 5 prompt(s)" in problem and "max_position_embeddings=64" in problem
    assert "--protocol.max_new_tokens=20" in problem and f"prompt 4, has {longest} tokens" in problem
    assert "prompts [1, 4]" in problem and "longer context" in problem
    assert not (tmp_path / "out").exists()


def test_the_context_refusal_says_how_far_to_lower_max_new_tokens(tiny_model_path, tiny_tokenizer, tmp_path):
    prompt = "abcd" * 8 + "="
    dataset = _prompts(tmp_path / "p.jsonl", [prompt])
    room = 64 - len(tiny_tokenizer(prompt).input_ids)
    with pytest.raises(ConfigError, match=f"lower --protocol.max_new_tokens to {room} or less"):
        evaluate(tiny_model_path, tmp_path / "out", f"--protocol.max_new_tokens={room + 1}", dataset=dataset)
    with pytest.raises(AssertionError, match="weights were loaded"):  # one token less fits
        evaluate(tiny_model_path, tmp_path / "out", f"--protocol.max_new_tokens={room}", dataset=dataset)


def test_compare_refuses_prompts_past_the_context_in_its_own_flags(tiny_model_path, tmp_path):
    dataset = _prompts(tmp_path / "p.jsonl", ["abcd" * 20 + "="])
    with pytest.raises(ConfigError) as err:
        compare("--base", tiny_model_path, "--prompts", dataset)
    assert f"--prompts={dataset!r}: 1 of 1 prompt(s)" in str(err.value) and "--max-new-tokens=4" in str(err.value)


# ---------------------------------------------------------------- an adapter and the base under it


@pytest.fixture(scope="module")
def adapter_path(tiny_model_path, tmp_path_factory) -> str:
    return _adapter(tiny_model_path, tmp_path_factory.mktemp("adapter"))


@pytest.mark.slow
def test_an_adapter_made_for_other_shapes_is_refused_naming_both_models(tiny_model_path, tmp_path):
    from tests.helpers import build_tiny_model

    other = build_tiny_model(tmp_path / "narrow", hidden=32)
    adapter = _adapter(other, tmp_path / "adapter")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", f"--model.adapter_path={adapter}")
    (problem,) = err.value.problems
    assert f"--model.adapter_path={adapter!r} was trained on {other!r}" in problem
    assert f"--model.model_name_or_path={tiny_model_path!r}" in problem and "hidden_size=32 vs 64" in problem
    assert f"--model.model_name_or_path {other}" in problem  # the fix
    with pytest.raises(ConfigError, match="--sharpened=.* whose weight shapes differ from --base="):
        compare("--base", tiny_model_path, "--sharpened", adapter, "--prompts", REVERSAL)


def test_an_adapter_on_another_base_of_the_same_shapes_is_warned_about(adapter_path, tiny_model_path, tmp_path):
    from tests.helpers import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)  # the same shapes, other weights
    with pytest.warns(UserWarning, match=f"trained on {tiny_model_path!r} .*, not on --model.model_name_or_path"):
        with pytest.raises(AssertionError, match="weights were loaded"):
            evaluate(other, tmp_path / "out", f"--model.adapter_path={adapter_path}")


def test_an_adapter_on_a_copy_of_its_base_runs_without_a_warning(adapter_path, tiny_model_path, tmp_path, recwarn):
    copy = shutil.copytree(tiny_model_path, tmp_path / "copy")
    with pytest.raises(AssertionError, match="weights were loaded"):
        evaluate(copy, tmp_path / "out", f"--model.adapter_path={adapter_path}")
    assert not [w for w in recwarn if "was trained on" in str(w.message)]


def test_a_sharpened_adapter_in_compare_goes_on_base(adapter_path, tiny_model_path, tmp_path, monkeypatch):
    """The base under the sharpened adapter is --base (the two runs differ by the adapter alone), checked
    against the base its adapter_config.json names: here a path on the machine that trained it."""
    import sharpening.evaluate.command as evaluate_module

    adapter = shutil.copytree(adapter_path, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="/elsewhere/base")))
    loaded = []
    monkeypatch.setattr(evaluate_module, "load_models", lambda cfg, *sources: loaded.append(sources[:2]) or 1 / 0)
    with pytest.warns(
        UserWarning, match=f"--sharpened={str(adapter)!r} was trained on '/elsewhere/base'.*not on --base"
    ):
        with pytest.raises(ZeroDivisionError):  # the first model to load (the base) stops the run
            compare("--base", tiny_model_path, "--sharpened", str(adapter), "--prompts", REVERSAL)
    assert loaded == [(tiny_model_path, None)]
    from sharpening.evaluate.compare import build_parser, model_configs

    args = build_parser().parse_args(["--base", tiny_model_path, "--sharpened", str(adapter), "--prompts", REVERSAL])
    sharpened, _ = model_configs(args)["sharpened"]
    assert (sharpened.model_name_or_path, sharpened.adapter_path) == (tiny_model_path, str(adapter))


@pytest.mark.parametrize("damage", ["no weights", "not json"])
def test_a_damaged_adapter_directory_is_refused(damage, adapter_path, tiny_model_path, tmp_path):
    adapter = shutil.copytree(adapter_path, tmp_path / "adapter")
    if damage == "no weights":
        os.remove(adapter / "adapter_model.safetensors")
        fragment = "adapter_config.json but no adapter weights (adapter_model.safetensors or adapter_model.bin; found:"
    else:
        (adapter / "adapter_config.json").write_text("{not json")
        fragment = "its adapter_config.json is not a JSON object"
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", f"--model.adapter_path={adapter}")
    assert f"--model.adapter_path='{adapter}': {fragment}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        evaluate(str(adapter), tmp_path / "out")
    assert f"--model.model_name_or_path='{adapter}': {fragment}" in str(err.value)


def test_an_adapter_whose_recorded_base_is_missing_is_named_as_typed(adapter_path, tmp_path):
    adapter = shutil.copytree(adapter_path, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="./gone/base")))
    with pytest.raises(ConfigError) as err:
        evaluate(str(adapter), tmp_path / "out")
    assert f"--model.model_name_or_path={str(adapter)!r} is an adapter whose base './gone/base' cannot load" in str(
        err.value
    )


# ---------------------------------------------------------------- compare's directories and files


def test_compare_refuses_directories_that_are_not_models_and_a_missing_prompts_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("trainer: {}")
    (tmp_path / "empty").mkdir()
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as err:
        compare("--base", str(tmp_path / "empty"), "--sharpened", str(tmp_path / "run"), "--prompts", missing)
    problems = err.value.problems
    assert len(problems) == 3  # all at once
    assert any(p.startswith(f"--prompts={missing!r}: file not found") for p in problems)
    assert any(
        p.startswith(f"--base={str(tmp_path / 'empty')!r}: directory has no config.json (found: [])") for p in problems
    )
    assert any(f"--sharpened={str(tmp_path / 'run')!r}: directory has no config.json (found: ['config.yaml'])" in p
               for p in problems)  # fmt: skip


def test_compare_refuses_a_summary_it_could_not_write_before_measuring(tiny_model_path, tmp_path):
    (tmp_path / "file").write_text("mine")
    summary = str(tmp_path / "file" / "summary.json")
    with pytest.raises(ConfigError, match=f"--summary={summary!r}: its folder=.* is a file"):
        compare("--base", tiny_model_path, "--prompts", REVERSAL, "--summary", summary)
    assert (tmp_path / "file").read_text() == "mine"
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    with pytest.raises(ConfigError, match=f"--summary='{model / 's.json'}' lies inside the directory of --base="):
        compare("--base", str(model), "--prompts", REVERSAL, "--summary", str(model / "s.json"))
    assert not (model / "s.json").exists()


# ---------------------------------------------------------------- output and cache directories


def test_the_output_dir_may_not_be_the_model_directory_even_with_overwrite(tiny_model_path, tmp_path):
    before = sorted(os.listdir(tiny_model_path))
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tiny_model_path, "--overwrite=true")
    (problem,) = err.value.problems
    assert f"--output_dir={tiny_model_path!r} is the directory of --model.model_name_or_path" in problem
    assert f"--output_dir {tiny_model_path}-evaluate" in problem
    assert sorted(os.listdir(tiny_model_path)) == before


def test_the_output_dir_may_not_hold_the_adapter_nor_the_cache_lie_inside_it(adapter_path, tiny_model_path, tmp_path):
    run = tmp_path / "run"
    adapter = shutil.copytree(adapter_path, run / "adapter")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, run, "--overwrite=true", f"--model.adapter_path={adapter}",
                 f"--cache_dir={adapter / 'cache'}")  # fmt: skip
    output, cache = err.value.problems
    assert output.startswith(f"--output_dir={str(run)!r} holds the directory of --model.adapter_path")
    assert cache.startswith(f"--cache_dir={str(adapter / 'cache')!r} lies inside the directory of --model.adapter_path")
    assert sorted(os.listdir(run)) == ["adapter"] and not (adapter / "cache").exists()


# ---------------------------------------------------------------- prompts, template and tokenizer


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--data.prompt_template={", "--data.prompt_template='{': not a format string"),
        ("--data.prompt_template=Q {0}", "--data.prompt_template='Q {0}': {0} is a positional field; name a column"),
        ("--data.dataset=no-org/no-such-dataset", "--data.dataset='no-org/no-such-dataset': cannot be read"),
        # a value that does not parse: the option, the value and the rule, not a page of usage
        ("--protocol.temperature=nan", "--protocol.temperature='nan': must be a number (nan and inf are refused)"),
        ("--protocol.decode=fast", "--protocol.decode='fast': must be one of dynamic, static, compiled"),
        ("--protocol.n_values=abc", "--protocol.n_values='abc': must be a list"),
        ("--protocol.nvalues=[1]", "unknown option(s) --protocol.nvalues=[1]"),
    ],
)
def test_a_bad_value_template_or_unreadable_dataset_is_refused(override, fragment, tiny_model_path, tmp_path):
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", override)
    assert fragment in str(err.value)


def test_a_model_without_a_usable_tokenizer_is_refused_as_typed(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model_path, name), bare)
    with pytest.raises(ConfigError, match=f"--model.model_name_or_path='{bare}': no tokenizer files there"):
        evaluate(str(bare), tmp_path / "out")
    no_eos = shutil.copytree(tiny_model_path, tmp_path / "no-eos")
    tokenizer = AutoTokenizer.from_pretrained(no_eos)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_eos)
    with pytest.raises(ConfigError, match=f"--model.model_name_or_path='{no_eos}': the tokenizer has no EOS token"):
        evaluate(str(no_eos), tmp_path / "out")


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ({"config.json": "{not json"}, "its config.json is not valid JSON"),
        ({"tokenizer.json": "{broken"}, "its tokenizer cannot be read"),
        ({"config.json": "vocab_size=10"}, "but the model has an embedding for ids below vocab_size=10 only"),
    ],
)
def test_a_damaged_model_is_refused_as_typed_before_weights_load(damage, fragment, tiny_model_path, tmp_path):
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    for name, text in damage.items():
        if text.startswith("vocab_size="):
            config = json.loads((model / name).read_text())
            text = json.dumps(dict(config, vocab_size=int(text.split("=")[1])))
        (model / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        evaluate(str(model), tmp_path / "out")
    assert f"--model.model_name_or_path={str(model)!r}: " in str(err.value) and fragment in str(err.value)
    with pytest.raises(ConfigError, match=f"--base={str(model)!r}: "):
        compare("--base", str(model), "--prompts", REVERSAL)


def test_prompts_that_are_not_utf8_are_refused_with_the_line(tiny_model_path, tmp_path):
    dataset = tmp_path / "latin1.jsonl"
    dataset.write_bytes(b'{"prompt": "ab=", "answer": "x"}\n{"prompt": "ab\xe9=", "answer": "x"}\n')
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte e9 on line 2\)"):
        evaluate(tiny_model_path, tmp_path / "out", dataset=str(dataset))


def test_a_base_of_another_vocabulary_is_refused_before_drawing(tiny_model_path, tmp_path):
    """score_with=base scores the evaluated model's token ids under the base: the vocabularies must agree."""
    from tests.helpers import build_tiny_model

    larger = build_tiny_model(tmp_path / "larger", vocab_extra=8)
    with pytest.raises(ConfigError) as err:
        base_args = ["--model.score_with=base", f"--model.base_model_name_or_path={tiny_model_path}"]
        evaluate(larger, tmp_path / "out", *base_args)
    assert f"--model.base_model_name_or_path={tiny_model_path!r}: its vocab_size=" in str(err.value)
    assert "differs from the evaluated model's" in str(err.value)


def test_an_output_dir_another_evaluation_writes_to_is_refused_and_the_lock_is_released(tiny_model_path, tmp_path):
    """A second run that found output_dir empty while the first drew replaced the first's results at its end."""
    from sharpening.run_directories import output_lock_path, take_lock

    lock = output_lock_path(str(tmp_path / "out"))
    _, record = take_lock(lock, "the first run")  # held by this (live) process
    with pytest.raises(ConfigError, match=f"--output_dir={str(tmp_path / 'out')!r} is in use by another run"):
        evaluate(tiny_model_path, tmp_path / "out")
    with open(lock) as f:
        assert f.read() == record
    os.remove(lock)
    with pytest.raises(AssertionError, match="weights were loaded"):  # the run gets as far as loading
        evaluate(tiny_model_path, tmp_path / "out")
    assert not os.path.exists(lock)  # and releases its lock on the way out


def test_overwrite_never_replaces_the_config_or_prompts_the_run_reads(tiny_model_path, tmp_path):
    """--overwrite true replaces earlier results; a --config file or prompts named like a result file are inputs."""
    (tmp_path / "config.yaml").write_text("# mine\nplots: false\n")
    shutil.copy(REVERSAL, tmp_path / "results.json")
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path, "--overwrite=true", f"--config={tmp_path / 'config.yaml'}",
                 dataset=str(tmp_path / "results.json"))  # fmt: skip
    config_problem, data_problem = err.value.problems
    assert config_problem.startswith(
        f"--config='{tmp_path / 'config.yaml'}' is '{tmp_path / 'config.yaml'}', where the run"
    )
    assert (
        data_problem.startswith(f"--data.dataset='{tmp_path / 'results.json'}' is ")
        and "never what the run reads" in data_problem
    )
    assert (tmp_path / "config.yaml").read_text() == "# mine\nplots: false\n"
