"""CollapseGuardCallback on a tiny LightningModule that logs a scripted metric: it stops after ``patience``
declines from the best, the kept checkpoint is the state at the best value, the module ends with its
weights, and noise within ``min_delta`` never stops a run."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from sharpening.checkpoint import CHECKSUM_SUFFIX
from sharpening.guards import BEST_CHECKPOINT, CollapseGuardCallback


class ScriptedMetricModule(L.LightningModule):
    """One parameter that each step moves by SGD; logs ``values[epoch]`` as ``val/score`` at the epoch's steps."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.weights_at_epoch_end: list[float] = []

    def training_step(self, batch, batch_idx):
        self.log("val/score", self.values[self.current_epoch], on_step=False, on_epoch=True)
        return (self.weight - 100.0).pow(2).sum()  # the weight changes at every step

    def on_train_epoch_end(self) -> None:
        self.weights_at_epoch_end.append(float(self.weight))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)  # 2 steps per epoch

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, values, guard: CollapseGuardCallback) -> tuple[ScriptedMetricModule, L.Trainer]:
    module = ScriptedMetricModule(values)
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=len(values), callbacks=[guard], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    return module, trainer


def test_guard_stops_after_patience_declines_and_keeps_the_best(tmp_path):
    values = [0.1, 0.3, 0.5, 0.45, 0.4, 0.35, 0.6, 0.7]  # rises to epoch 2, then falls
    guard = CollapseGuardCallback("val/score", mode="max", patience=3, min_delta=0.01)
    module, trainer = _fit(tmp_path, values, guard)
    assert trainer.current_epoch == 6  # epochs 3, 4, 5 declined: stopped after epoch 5 (the 0.6 never ran)
    assert guard.best == 0.5 and guard.best_step == 6 and guard.stopped_step == 12
    path = os.path.join(tmp_path, "checkpoints", BEST_CHECKPOINT)
    assert os.path.isfile(path) and os.path.isfile(path + CHECKSUM_SUFFIX)  # the atomic writer's checksum
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 6
    best_weight = module.weights_at_epoch_end[2]
    assert kept["state_dict"]["weight"].item() == pytest.approx(best_weight)
    assert module.weights_at_epoch_end[-1] != pytest.approx(best_weight)
    assert float(module.weight) == pytest.approx(best_weight)  # the module ends with the best weights


def test_guard_min_mode_watches_a_metric_that_should_stay_low(tmp_path):
    values = [0.5, 0.2, 0.3, 0.4, 0.1]  # lowest at epoch 1, then two rises
    guard = CollapseGuardCallback("val/score", mode="min", patience=2)
    _, trainer = _fit(tmp_path, values, guard)
    assert trainer.current_epoch == 4 and guard.best == pytest.approx(0.2) and guard.best_step == 4


def test_noise_within_min_delta_never_stops(tmp_path):
    values = [0.1, 0.5, 0.48, 0.47, 0.49, 0.46, 0.48, 0.47]  # after the rise, at most 0.04 under the best
    guard = CollapseGuardCallback("val/score", mode="max", patience=2, min_delta=0.05)
    module, trainer = _fit(tmp_path, values, guard)
    assert guard.stopped_step is None and trainer.current_epoch == len(values)
    assert float(module.weight) == pytest.approx(module.weights_at_epoch_end[-1])  # the last policy stays


def test_declines_must_be_consecutive():
    guard = CollapseGuardCallback("m", patience=2, min_delta=0.1)
    outcomes = [guard.observe(v) for v in (1.0, 0.5, 0.95, 0.5, 1.2, float("nan"), 0.0)]
    assert outcomes == ["best", "decline", "noise", "decline", "best", "decline", "decline"]
    assert guard.declines == 2 and guard.best == 1.2


def test_missing_metric_names_what_was_logged(tmp_path):
    guard = CollapseGuardCallback("sample/accuracy", patience=1)
    with pytest.raises(RuntimeError, match=r"sample/accuracy.*val/score"):
        _fit(tmp_path, [0.1, 0.2], guard)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "up"}, "mode='up'"), ({"patience": 0}, "patience=0"), ({"min_delta": -1.0}, "min_delta=-1.0")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(Exception, match=message):
        CollapseGuardCallback("m", **kwargs)


# ---------------------------------------------------------------- the guard from the command line, tiny model


def _guard_cli(tmp_path, tiny_model_path, prompts_file, config: str, monitor: str, *extra: str):
    from sharpening.cli import main
    from tests.helpers import REPO_ROOT
    from tests.integration.test_cli import tiny_overrides

    rl = config == "rl.yaml"
    guard = ["--trainer.callbacks+=sharpening.guards.CollapseGuardCallback", f"--trainer.callbacks.monitor={monitor}",
             "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=5"]  # fmt: skip
    overrides = tiny_overrides(tiny_model_path, prompts_file, str(tmp_path), rl)
    return main(["fit", "--config", str(REPO_ROOT / "configs" / config), *overrides, *guard, *extra])


def test_guard_from_the_cli_watches_a_rounds_accuracy_and_keeps_its_best(tiny_model_path, prompts_file, tmp_path):
    cli = _guard_cli(tmp_path, tiny_model_path, prompts_file, "demo.yaml", "sample/accuracy",
                     "--trainer.max_epochs=2", "--verifier.resample_every_epoch=true",
                     "--verifier.log_token_entropy=true", "--verifier.stop_unselectable=false")  # fmt: skip
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, CollapseGuardCallback))
    per_epoch = cli.trainer.global_step // 2
    assert guard.best is not None and guard.best_step in (per_epoch, 2 * per_epoch)  # at an epoch's end
    assert guard.stopped_step is None  # patience 5: two evaluations never stop the run
    assert float(cli.trainer.callback_metrics["sample/token_entropy"]) > 0.0
    kept = torch.load(CollapseGuardCallback.best_path(cli.trainer), weights_only=True)
    assert kept["global_step"] == guard.best_step


def test_guard_from_the_cli_watches_an_rl_step_metric_with_the_band_on(tiny_model_path, prompts_file, tmp_path):
    cli = _guard_cli(tmp_path, tiny_model_path, prompts_file, "rl.yaml", "train/majority_share",
                     "--trainer.max_steps=3", "--trainer.callbacks.every_n_steps=1",
                     "--model.init_args.rl.answer_entropy_band=[0.0, 10.0]",
                     "--model.init_args.rl.log_token_entropy=true")  # fmt: skip
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, CollapseGuardCallback))
    logged = cli.trainer.callback_metrics
    for key in ("train/majority_share", "train/accuracy", "train/token_entropy", "train/band_skipped_fraction"):
        assert key in logged, key
    assert float(logged["train/band_skipped_fraction"]) == 0.0  # every entropy lies in [0, 10]
    assert 0.0 < float(logged["train/token_entropy"]) < math.log(cli.model.policy.config.vocab_size) + 1e-4
    kept = torch.load(CollapseGuardCallback.best_path(cli.trainer), weights_only=True)
    assert guard.best_step >= 1 and kept["global_step"] == guard.best_step
