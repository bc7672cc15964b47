"""The `sharpen` command: LightningCLI with the self-verification callback built in.

    sharpen fit --config configs/demo.yaml
    sharpen fit --config configs/lora.yaml --trainer.max_epochs 3 --verifier.sampling.samples_per_prompt 16
    sharpen evaluate --base MODEL --prompts FILE ...      (inference-time best-of-N, no training)

``main(args)`` takes the argument list, so tests call ``main(["fit", "--config", path, ...])``.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from sharpening.callbacks import SelfVerificationCallback
from sharpening.policy_module import PolicyModule
from sharpening.prompts import PromptDataModule


class SharpeningCLI(LightningCLI):
    """LightningCLI whose `verifier:` section configures the SelfVerificationCallback."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SelfVerificationCallback, "verifier")

    def _parse_ckpt_path(self) -> None:
        """Resume with the configuration given NOW. (Lightning's CLI would replace the model's arguments
        with the checkpoint's, so output_dir could not change and a finished run could not be continued.)
        The checkpoint must still fit the model: PolicyModule.load_state_dict refuses one that does not."""
        return


def main(args: list[str] | None = None):
    """Run the CLI; returns it so callers (tests) can inspect the trainer and model.

    ``sharpen evaluate ...`` is inference-time sharpening (no training): see sharpening.evaluate.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "evaluate":
        from sharpening.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    return SharpeningCLI(
        model_class=PolicyModule,
        subclass_mode_model=True,
        datamodule_class=PromptDataModule,
        args=argv,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
