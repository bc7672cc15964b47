"""`sharpen evaluate --protocol.rewards`: best-of-N rows by any registered self-reward, end to end on the tiny model,
with the default evaluation's rows and cache untouched; a bad reward is refused before weights load."""

from __future__ import annotations

import pytest

from sharpening.errors import ConfigError
from sharpening.evaluate.cache import cached_files
from sharpening.evaluate.report import find_row, format_table
from tests.integration.test_evaluate_cli import evaluate


def test_reward_rows_are_added_and_the_default_cache_is_reused(tiny_model_path, tmp_path, monkeypatch):
    default = evaluate(tiny_model_path, tmp_path / "default", f"--cache_dir={tmp_path / 'cache'}")
    files = cached_files(str(tmp_path / "cache"))
    rows = ["--protocol.rewards=[loglik,self_certainty,majority_binary]", f"--cache_dir={tmp_path / 'cache'}"]

    import sharpening.engines.hf as hf_engine

    monkeypatch.setattr(hf_engine, "generate_samples", lambda *a, **k: pytest.fail("the cache should serve"))
    custom = evaluate(tiny_model_path, tmp_path / "custom", *rows)
    assert cached_files(str(tmp_path / "cache")) == files  # same draws, same cache files
    methods = [r["method"] for r in custom["table"] if r["n"] == 2]
    assert methods == ["bon_loglik", "bon_self_certainty", "bon_majority_binary", "maj", "pass"]
    assert [r["method"] for r in default["table"] if r["n"] == 2] == ["bon_loglik", "bon_loglik_norm", "maj", "pass"]
    assert find_row(custom, "bon_loglik", 2) == find_row(default, "bon_loglik", 2)  # a row is its reward's alone
    single = find_row(custom, "bon_self_certainty", 2)["tokens"]
    assert single == pytest.approx(2 * find_row(custom, "maj", 2)["tokens"])  # statistics: one rescoring pass
    assert "BoN self_certainty" in format_table(custom)


def test_an_unknown_reward_is_refused_before_weights_load(tiny_model_path, tmp_path, monkeypatch):
    import sharpening.evaluate.command as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_models", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError) as err:
        evaluate(tiny_model_path, tmp_path / "out", "--protocol.rewards=[loglik,bleu]")
    assert err.value.problems[0].startswith("--protocol.rewards[1]='bleu': unknown self-reward")
