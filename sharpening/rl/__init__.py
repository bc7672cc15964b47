"""RL-sharpening: its configuration, the LightningModule, the rollout (draws, scores, advantages) and the
update maths, and the pair data of offline RL and XPO."""

from sharpening.rl.config import RLConfig, validate_rl_config
from sharpening.rl.module import RLSharpeningModule

__all__ = ["RLConfig", "RLSharpeningModule", "validate_rl_config"]
