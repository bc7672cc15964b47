"""The `sharpen` command: LightningCLI with the self-verification callback built in.

    sharpen fit --config configs/demo.yaml
    sharpen fit --config configs/lora.yaml --trainer.max_epochs 3 --verifier.sampling.samples_per_prompt 16
    sharpen evaluate --config configs/evaluate/demo.yaml    (inference-time best-of-N, no training)

``main(args)`` takes the argument list, so tests call ``main(["fit", "--config", path, ...])``.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys
import warnings

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sharpening.callbacks import SelfVerificationCallback
from sharpening.checkpoint import DiskFullError, last_checkpoint, resume_problems, run_checkpoints
from sharpening.errors import ConfigError, RunStoppedError, collect_problems, parse_error_problem, raise_if_problems
from sharpening.module import PolicyModule
from sharpening.prompts import PromptDataModule
from sharpening.run_checks import run_problems
from sharpening.run_directories import (
    holding_run_directories,
    is_launching_process,
    run_checkpoint_dirs,
    run_directory_problems,
    saved_config_problem,
)
from sharpening.safety import NonFiniteError
from sharpening.trainer_settings import lightning_refusal_problem, trainer_problems


class SharpeningCLI(LightningCLI):
    """LightningCLI whose `verifier:` section configures the SelfVerificationCallback."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``fit``: the modules train and have no validation, test or predict step (evaluation is
        ``sharpen evaluate``, dispatched before LightningCLI)."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(SelfVerificationCallback, "verifier")
        parser.add_argument(
            "--overwrite_run",
            type=bool,
            default=False,
            help="Start a new run in a default_root_dir whose checkpoints/ already holds another run's checkpoints.",
        )

    def parse_arguments(self, parser, args) -> None:
        """A value that does not parse is our one error naming the option, the value and the rule, not
        jsonargparse's page of usage and, for --model.*, its report of every union member it tried."""
        from jsonargparse import ArgumentError

        try:  # the parsers raise instead of exiting: exit_on_error=False in _run_cli's parser_kwargs
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            message = str(err)
            if "subcommand" in message:
                first = message.strip().splitlines()[0].rstrip(".")
                problem = f"{first}; run `sharpen fit --config FILE` to train, or `sharpen evaluate ...`"
            else:
                problem = parse_error_problem(message, "sharpen fit")
            raise ConfigError([problem]) from None

    def _run_subcommand(self, subcommand: str) -> None:
        """After SIGTERM Lightning ends the epoch with SIGTERMException; by then PreemptionCallback has
        written a resumable checkpoint, so that is a clean stop, not a crash."""
        self.preempted = False
        directories = self.trainer.default_root_dir, self.model.output_dir, run_checkpoint_dirs(self.trainer)
        with holding_run_directories(*directories):  # a second run into them is refused; released at the end
            raise_if_problems(self._saved_config_problems())
            try:
                super()._run_subcommand(subcommand)
            except SIGTERMException:
                self.preempted = True
                rank_zero_info("stopped after SIGTERM; resume with --ckpt_path last")

    def instantiate_classes(self) -> None:
        """Show a configuration problem as our one error, not buried in jsonargparse's union report, and
        every section's problems (model, data, verifier, the run directory) in that one error."""
        try:
            with collect_problems(getattr(self, "pending_problems", None)):
                super().instantiate_classes()
                self._check_run_directories()
                raise_if_problems(run_problems(self.model, self.datamodule, self.trainer))  # across the sections
        except (ValueError, TypeError) as err:
            cause = err
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs):
        """Trainer settings that would train nothing, train in reverse or crash once the weights are loaded are
        refused here, and so is what Lightning's Trainer refuses itself (an unknown strategy, devices=0, ...):
        named as typed, with the other sections' problems, not as its traceback."""
        subcommand = self.config.get("subcommand")
        resuming = bool((self.config[subcommand] if subcommand else self.config).get("ckpt_path"))
        settings = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        problems = trainer_problems(settings, resuming)
        if problems:  # raised, not recorded: the Trainer would refuse some of them again in its own words
            raise ConfigError(problems)
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError([lightning_refusal_problem(str(err), settings)]) from err

    def _set_seed(self) -> None:
        """A seed outside numpy's range is refused as typed (Lightning raises a bare ValueError)."""
        try:
            super()._set_seed()
        except ValueError as err:
            seed = self._get(self.config, "seed_everything")
            raise ConfigError([
                f"--seed_everything={seed}: {err}; give a seed in that range, or true for a random one"
            ]) from None  # fmt: skip

    def _check_run_directories(self) -> None:
        """An unwritable run directory, or an output_dir that would replace the prompts, the run's directory,
        checkpoints or logs: refused before fit, whatever --model.overwrite_output_dir says."""
        subcommand = self.config.get("subcommand")
        ckpt_path = (self.config[subcommand] if subcommand else self.config).get("ckpt_path")
        dataset = self.datamodule.hparams.get("dataset")
        base = self.model.policy_config.model_name_or_path
        raise_if_problems(run_directory_problems(self.trainer, self.model.output_dir, dataset, ckpt_path, base))

    def _saved_config_problems(self) -> list[str]:
        """A file where Lightning writes the run's configuration at fit start that must not be replaced (it
        would raise a traceback, or with overwrite replace the user's own YAML). Checked under the run's lock,
        so a run still going there is reported as such, not by the configuration it wrote. Only the launching
        process checks: the others may start after it wrote the file (Lightning's DDP launcher starts them in fit)."""
        if not is_launching_process() or not self.save_config_callback or self.trainer.fast_dev_run:
            return []
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        path = os.path.join(self.trainer.log_dir or "", self.save_config_kwargs.get("config_filename", "config.yaml"))
        overwrite = bool(self.save_config_kwargs.get("overwrite"))
        problem = saved_config_problem(path, overwrite, [os.fspath(f) for f in config.get("config") or []])
        return [problem] if problem else []

    def before_instantiate_classes(self) -> None:
        """Refuse a model section that names no algorithm (the base class has no training step), and a fresh run
        on top of another run's checkpoints (they would be overwritten)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        class_path = (config.get("model") or {}).get("class_path")
        if subcommand == "fit" and (class_path or "PolicyModule").rsplit(".", 1)[-1] == "PolicyModule":
            named = f"--model.class_path={class_path}" if class_path else "--model.class_path is not set"
            self.pending_problems = [  # reported with the other sections' problems (instantiate_classes)
                f"{named}: PolicyModule is the algorithms' base class, with no training step; name an algorithm, "
                "--model.class_path sharpening.SFTSharpeningModule or sharpening.RLSharpeningModule, or start from a "
                "config (--config configs/demo.yaml)"
            ]
        if subcommand != "fit" or config.get("ckpt_path"):
            return
        if config.get("overwrite_run"):  # asked for: the new run's config.yaml replaces the old run's
            self.save_config_kwargs.update(overwrite=True)
            return
        root = config["trainer"].get("default_root_dir") or os.getcwd()
        existing = run_checkpoints(root)
        if existing:  # reported with the other sections' problems (instantiate_classes)
            self.pending_problems = [
                f"--trainer.default_root_dir={root!r} holds another run's checkpoints "
                f"({os.path.relpath(existing[-1], root)}, ...): resume it with --ckpt_path last (or a path), "
                "choose a new directory, or pass --overwrite_run true",
                *getattr(self, "pending_problems", []),
            ]

    def _parse_ckpt_path(self) -> None:
        """Resume with the configuration given NOW, after checking the checkpoint fits it (before any
        weights load). Lightning's CLI would instead replace the model's arguments with the checkpoint's,
        so output_dir could not change and a finished run could not be continued."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if path == "last":  # left as given when the run directory holds none: Lightning then starts afresh
            path = config["ckpt_path"] = last_checkpoint(config["trainer"].get("default_root_dir")) or path
        if path == "best" or (path is not None and not str(path).strip()):  # Lightning: a ValueError in fit
            raise_if_problems([
                f"--ckpt_path={path!r}: " + ("a new `sharpen fit` has no best checkpoint (Lightning tracks one only "
                "within the run that saved it); give that checkpoint's path" if path == "best" else "empty; give a "
                "checkpoint's path") + ", or last (the newest under --trainer.default_root_dir), or leave --ckpt_path "
                "out to start a new run"
            ])  # fmt: skip
        root = config["trainer"].get("default_root_dir") or os.getcwd()
        if path == "hpc" and not glob.glob(os.path.join(root, "hpc_ckpt_*.ckpt")):  # what SLURM's requeue saves
            raise_if_problems([
                "--ckpt_path=hpc: no SLURM requeue checkpoint (hpc_ckpt_*.ckpt) in "
                f"--trainer.default_root_dir={root!r}; give a checkpoint's path, or last"
            ])  # fmt: skip
        registry = str(path or "").startswith("registry") and importlib.util.find_spec("litmodels") is not None
        if path and path not in ("last", "hpc") and not registry:
            raise_if_problems(resume_problems(str(path), config["model"]))
        if path:  # keep the original run's config.yaml; record the resumed run's beside it
            self.save_config_kwargs.update(config_filename="config-resumed.yaml", overwrite=True)


def main(args: list[str] | None = None):
    """Run the CLI; returns it so callers (tests) can inspect the trainer and model.

    ``sharpen evaluate ...`` is inference-time sharpening (no training): see sharpening.evaluate.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Lightning 2.6 builds torch's deprecated LeafSpec on every batch; the warning is theirs, not the user's
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*deprecated")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["evaluate"]:
        from sharpening.evaluate import dispatch

        target = functools.partial(dispatch, argv[1:])
    else:  # LightningCLI reads sys.argv itself when given None
        target = functools.partial(_run_cli, None if args is None else argv)
    if args is not None:
        return target()
    program = "sharpen evaluate" if argv[:1] == ["evaluate"] else "sharpen"
    try:  # from the shell: a configuration problem is a message, not a traceback
        return target()
    except ConfigError as err:
        print(f"{program}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteError, DiskFullError, RunStoppedError) as err:
        print(f"{program}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's own handling (evaluate; fit before training starts)
        kept = (
            "the draws made so far are cached: rerun the same command with --overwrite true to go on from them"
            if program == "sharpen evaluate"
            else "resume from the last checkpoint written with --ckpt_path last"
        )
        print(f"{program}: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        sizes = (
            "--protocol.prompts_per_batch, the largest N (--protocol.n_values, samples_per_prompt) or "
            "--protocol.max_new_tokens"
            if program == "sharpen evaluate"
            else "--verifier.sampling.prompts_per_batch, "
            "samples_per_prompt or max_new_tokens, --model.batch_size or pack_length (RL: --model.prompts_per_step)"
        )
        print(f"{program}: out of memory ({text[:300]}); lower {sizes}", file=sys.stderr)
        raise SystemExit(1) from None


def config_file_problems(argv: list[str]) -> list[str]:
    """Problems with the YAML files given to ``--config`` (``-c``): one that does not parse (its line and
    column), an empty one, or one whose top level is not a mapping of sections, which jsonargparse reports
    as "Unexpected config" without naming the file."""
    import yaml

    paths = [value for flag, value in zip(argv, argv[1:]) if flag in ("-c", "--config")]
    paths += [word.split("=", 1)[1] for word in argv if word.startswith("--config=")]
    problems = []
    for path in (p for p in paths if os.path.isfile(p)):  # a value that is no file is read as inline YAML
        try:
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            near = f" ({err.context} at line {err.context_mark.line + 1})" if err.context_mark else ""
            problems.append(f"--config={path!r}: not valid YAML{at}: {err.problem}{near}; fix the YAML there")
            continue
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problems.append(f"--config={path!r}: not a YAML text file ({type(err).__name__}); give a YAML config")
            continue
        if content is None:
            problems.append(
                f"--config={path!r}: the file is empty (or only comments); give a config with trainer:, model:, data: "
                "and verifier: sections (see configs/demo.yaml), or leave --config out"
            )
        elif not isinstance(content, dict):
            problems.append(
                f"--config={path!r}: the top level is a {type(content).__name__}, but a config is a mapping of "
                "sections (trainer:, model:, data:, verifier:); write each section as `name:` at the start of a line"
            )
    return problems


def _run_cli(argv: list[str] | None) -> SharpeningCLI:
    from jsonargparse import set_parsing_settings

    words = sys.argv[1:] if argv is None else argv
    raise_if_problems(config_file_problems(words))
    helping = any(a in ("-h", "--help") or a.startswith("--print_config") for a in words)
    set_parsing_settings(docstring_parse_attribute_docstrings=helping)  # config fields' docs in --help (slower)
    try:
        return SharpeningCLI(
            model_class=PolicyModule,
            subclass_mode_model=True,
            datamodule_class=PromptDataModule,
            args=argv,
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": "sharpen",
                "exit_on_error": False,
                "description": "Sharpening: train a model with itself as the verifier (`sharpen fit`); "
                "`sharpen evaluate` runs best-of-N evaluation (see its --help).",
            },
        )
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)


def console_main() -> int:
    """The `sharpen` console script: exit status 0 on success (``main`` returns objects for tests)."""
    main()
    return 0


if __name__ == "__main__":
    main()
