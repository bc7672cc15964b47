"""sharpening: self-improvement of language models with the model as its own verifier.

Huang et al., "Self-Improvement in Language Models: The Sharpening Mechanism", ICLR 2025.
"""

from sharpening.buffer import SampleBuffer
from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines import SamplingConfig
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig
from sharpening.prompts import PromptDataModule
from sharpening.rl import RLConfig, RLSharpeningModule
from sharpening.selection import SelectionConfig
from sharpening.sft import SFTSharpeningModule

__all__ = [
    "OptimizerConfig",
    "PolicyConfig",
    "PromptDataModule",
    "RLConfig",
    "RLSharpeningModule",
    "SFTSharpeningModule",
    "SampleBuffer",
    "SamplingConfig",
    "SelectionConfig",
    "SelfVerificationCallback",
]
__version__ = "0.1.0"
