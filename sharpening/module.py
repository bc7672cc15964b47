"""PolicyModule: what the SFT and RL LightningModules share.

It loads the policy in ``configure_model`` (idempotent), exposes the frozen base as a context, keeps
checkpoints to the trainable weights (a LoRA checkpoint holds the adapter, never the base), and writes
a standard Hugging Face / PEFT directory at the end of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_type_hints

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sharpening.checkpoint import (
    load_trainable_state,
    only_trainable,
    save_policy,
    trainable_state_dict,
    verify_checkpoint,
)
from sharpening.engines import SamplingConfig, SamplingEngine, make_engine
from sharpening.errors import raise_if_problems, unwritable_directory_problem
from sharpening.optim import (
    OptimizerConfig,
    build_optimizer,
    schedule_change_warning,
    schedule_plan,
    validate_optimizer_config,
)
from sharpening.policy import (
    PolicyConfig,
    eval_mode,
    frozen_base,
    load_frozen_base,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    validate_policy_config,
)
from sharpening.run_directories import output_dir_problems

if TYPE_CHECKING:
    from sharpening.buffer import BufferExample

TrainsOn = Literal["selected", "all_samples", "prompts"]
"""What a module trains on: the round's kept samples (``selected``), all N samples of every prompt
(``all_samples``), or prompts it draws from itself (``prompts``: no round)."""


class PolicyModule(L.LightningModule):
    """Base class: a policy, its tokenizer and its frozen base. Subclasses define the loss."""

    lazy_frozen_base = True
    """Full fine-tuning: hold no frozen copy while the policy still IS the base (a single SFT round needs none)."""

    _fixed_examples: list[BufferExample] | None = None  # set by train_on_examples: no round

    seed: int = 0
    """Seed of the module's own draws; a module that draws none keeps 0 (the sampling engine is made with it)."""

    _engines: dict[str, SamplingEngine] | None = None  # SamplingConfig.engine -> the engine, made at first use

    @property
    def trains_on(self) -> TrainsOn:
        """What this module trains on; the SelfVerificationCallback reads it to decide whether and what to keep."""
        return "prompts"

    def train_on_examples(self, examples: list[BufferExample]) -> None:
        """Train on ``examples`` in every epoch instead of a SelfVerificationCallback's round (hand-made data)."""
        self._fixed_examples = list(examples)

    def round_examples(self) -> list[BufferExample]:
        """The examples this epoch trains on: the SelfVerificationCallback's kept samples (it runs the round
        when one is due), or those given to ``train_on_examples``."""
        if self._fixed_examples is not None:
            return self._fixed_examples
        from sharpening.callbacks import SelfVerificationCallback  # callbacks.py imports this module

        trainer = self._trainer
        verifiers = [c for c in trainer.callbacks if isinstance(c, SelfVerificationCallback)] if trainer else []
        if not verifiers:
            raise RuntimeError(
                f"{type(self).__name__} trains on samples selected by a SelfVerificationCallback; add one to the "
                "Trainer's callbacks (the `sharpen` CLI adds it as `verifier:`), or give the examples to "
                "train_on_examples(examples)"
            )
        return verifiers[0].examples_for_epoch(trainer, self, self.current_epoch)

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        output_dir: str | None = None,
        overwrite_output_dir: bool = False,
        logprob_chunk_size: int = 256,
        extra_problems: list[str] | None = None,
    ) -> None:
        super().__init__()
        policy, optimizer = config_from(policy, PolicyConfig), config_from(optimizer, OptimizerConfig)
        self.policy_config = policy
        self.optimizer_config = optimizer or OptimizerConfig()
        self.output_dir = output_dir
        self.logprob_chunk_size = logprob_chunk_size
        problems = validate_policy_config(policy, "--model.policy")
        problems += validate_optimizer_config(self.optimizer_config, "--model.optimizer")
        if logprob_chunk_size < 1:
            problems.append(f"--model.logprob_chunk_size={logprob_chunk_size}: must be >= 1 (e.g. 256)")
        unwritable = unwritable_directory_problem("--model.output_dir", output_dir) if output_dir else None
        if output_dir is not None and not output_dir.strip():  # "" would write nothing, silently
            problems.append(
                f"--model.output_dir={output_dir!r}: empty; name a directory for the sharpened policy, or leave it "
                "unset (null) to keep only the checkpoints"
            )
        elif unwritable:
            problems.append(unwritable)
        elif output_dir and os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite_output_dir:
            problems.append(
                f"--model.output_dir={output_dir!r}: already holds files ({sorted(os.listdir(output_dir))[:5]}); "
                "choose a new directory or set --model.overwrite_output_dir true"
            )
        if output_dir and os.path.isdir(os.path.expanduser(policy.model_name_or_path)):
            base = ("the base model", policy.model_name_or_path, "--model.policy.model_name_or_path", False)
            problems += output_dir_problems(output_dir, [base])
        raise_if_problems(problems + list(extra_problems or []))
        self.policy: torch.nn.Module | None = None
        self.frozen_copy: torch.nn.Module | None = None
        self._policy_is_base = False  # True from loading until the first optimizer step or checkpoint load
        self._tokenizer = None
        self._schedule_plan: dict | None = None  # the LR schedule's length and limits in use (checkpointed)
        self._train_ended = False  # on_train_end ran: the policy is written there, not in on_fit_end

    @property
    def tokenizer(self):
        """The policy's tokenizer (loaded on first use; no weights involved)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.policy_config)
        return self._tokenizer

    @property
    def sharded(self) -> bool:
        """True under Lightning's FSDP strategy (parameters sharded across ranks)."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def setup(self, stage: str) -> None:
        """Refuse, before any weights load, what FSDP cannot shard."""
        if self.sharded:
            raise_if_problems(fsdp_problems(self.policy_config, self.trainer.strategy.root_device))

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        sharded = self.sharded
        lazy = self.lazy_frozen_base and not sharded  # under FSDP the copy is made now, so it is sharded too
        # FSDP loads a full checkpoint itself, through the root's load_state_dict, which expects every key;
        # ours hold trainable weights only (on_save_checkpoint), so the frozen ones are absent on purpose
        self.strict_loading = not sharded
        self.policy, self.frozen_copy = load_policy(self.policy_config, device=device, frozen_copy=not lazy)
        self._rest_in_train_mode(self.frozen_copy)
        self._policy_is_base = self.policy_config.finetuning == "full" and self.frozen_copy is None

    @staticmethod
    def _rest_in_train_mode(frozen: torch.nn.Module | None) -> torch.nn.Module | None:
        """The frozen copy follows the module's mode between uses, like any submodule: ``frozen_base()``
        switches it to eval (no dropout) for every use and back. (Left in eval mode, it made Lightning
        warn at every fit start that modules were in eval mode.) Its weights stay frozen either way."""
        if frozen is not None:
            frozen.train()
        return frozen

    @contextlib.contextmanager
    def frozen_base(self) -> Iterator[torch.nn.Module]:
        """The verifier: the frozen base model (adapter off, or the frozen copy), gradients off.

        Full fine-tuning holds no copy until one is needed: before the first optimizer step the policy is
        the base itself; after it, the base is loaded again from the model path (once)."""
        if self.policy_config.finetuning == "full" and self.frozen_copy is None:
            if self._policy_is_base and (self._trainer is None or self.trainer.global_step == 0):
                with torch.no_grad(), eval_mode(self.policy):
                    yield self.policy
                return
            device = next(self.policy.parameters()).device
            self.frozen_copy = self._rest_in_train_mode(load_frozen_base(self.policy_config, device=device))
            rank_zero_info("loaded the frozen base again from the model path (the policy has been updated)")
        with frozen_base(self.policy, self.frozen_copy) as base:
            yield base

    def on_fit_start(self) -> None:
        if not self.output_dir:
            rank_zero_warn(
                "--model.output_dir is not set: the fitted policy will be in the checkpoints only; set it to get a "
                "plain Hugging Face model (or PEFT adapter) directory at the end"
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        self._policy_is_base = False  # the policy leaves the base with this step

    @contextlib.contextmanager
    def gathered_for_generation(self) -> Iterator[None]:
        """Under FSDP, generating outside the training forward (the self-verification round) or writing the
        policy needs whole weights on every rank: gather them read-only for the duration. A no-op for other
        strategies. Collective: every rank must enter it."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(self.trainer.model, writeback=False, recurse=True):
            yield

    @contextlib.contextmanager
    def sampling_model(self, source: str) -> Iterator[torch.nn.Module]:
        """The model to sample from: ``base`` (the frozen base) or ``policy`` (the current policy)."""
        if source == "base":
            with self.frozen_base() as base:
                yield base
        else:
            with torch.no_grad():
                yield self.policy

    def sampling_engine(self, sampling: SamplingConfig) -> SamplingEngine:
        """The engine ``sampling.engine`` names, made at first use and kept for the run (a vLLM engine takes
        seconds to start and holds memory while it lives): the rounds and rollouts all draw through it. Asking for
        another kind closes the one held first. vLLM loads the weights from the policy's model path, then follows
        the in-memory model each draw is given (LoRA: the adapter of rank ``lora_r``). One engine per kind: a run
        whose round and rollouts name different engines (offline RL) keeps both rather than restarting vLLM."""
        engines = self._engines if self._engines is not None else {}
        self._engines = engines
        if sampling.engine not in engines:
            cfg = self.policy_config
            lora_rank = cfg.lora_r if cfg.finetuning in ("lora", "qlora") else None
            path = cfg.model_name_or_path
            engines[sampling.engine] = make_engine(sampling, model_path=path, seed=self.seed, lora_rank=lora_rank)
        return engines[sampling.engine]

    def close_sampling_engine(self) -> None:
        """Free the sampling engines held (a vLLM engine's memory), if any."""
        engines, self._engines = self._engines or {}, None
        for engine in engines.values():
            engine.close()

    def teardown(self, stage: str) -> None:
        """The run is over (finished, stopped or failed): the engine's memory goes back."""
        self.close_sampling_engine()
        super().teardown(stage)

    def configure_optimizers(self):
        def total() -> float:  # called lazily, once training data exists
            plan = schedule_plan(self.trainer)
            # the checkpoint's plan at the first decaying step of a resume, else this run's (the same limits)
            previous, self._schedule_plan = self._schedule_plan, plan
            warning = previous is not None and schedule_change_warning(self.optimizer_config.schedule, previous, plan)
            if warning:
                rank_zero_warn(warning)
            return plan["total_steps"]

        from lightning.pytorch.plugins.precision import MixedPrecision

        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)  # its clipping refuses a fused step
        return build_optimizer(self.trainer.model.parameters(), self.optimizer_config, total, fused=not mixed)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Trainable parameters only (``checkpoint.state``). Under FSDP the full module state dict is returned:
        FSDP's state-dict hooks gather and rename every parameter and fail on a missing one.
        on_save_checkpoint then keeps the trainable ones."""
        if self.sharded:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return trainable_state_dict(self, destination, prefix, keep_vars)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._schedule_plan:  # the length in use (asking Lightning here could load data)
            checkpoint["lr_schedule"] = self._schedule_plan
        if self.sharded:  # the gathered full state dict (on rank 0) -> trainable weights only, as without FSDP
            checkpoint["state_dict"] = only_trainable(checkpoint["state_dict"], self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep the schedule length (and limits) the checkpoint was written with: the first step that needs this
        run's length compares the two (``configure_optimizers``)."""
        self._schedule_plan = checkpoint.get("lr_schedule")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping under FSDP goes through the root's ``clip_grad_norm_``, which reduces the norm over
        every rank's shard (Lightning's FSDP precision plugin refuses norm clipping)."""
        if gradient_clip_val and self.sharded and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy the checkpoint's trainable weights into place, module load hooks bypassed (``checkpoint.state``)."""
        if self.policy is None:
            self.configure_model()
        self._policy_is_base = False  # the weights are a checkpoint's from here on
        cfg = self.policy_config
        model = f"model.policy.model_name_or_path={cfg.model_name_or_path!r}, finetuning={cfg.finetuning}"
        return load_trainable_state(self, state_dict, strict, model)

    def configure_callbacks(self):
        """Always on: checkpoint-and-stop on SIGTERM, and no update from a non-finite gradient."""
        from sharpening.safety import NonFiniteGuardCallback, PreemptionCallback

        return [PreemptionCallback(), NonFiniteGuardCallback()]

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, weights_only: bool = True, **kwargs
    ):
        """The module of a checkpoint, its policy loaded (base weights from ``policy.model_name_or_path``, then
        the checkpoint's trainable weights). Read with ``weights_only=True``. ``output_dir`` defaults to None:
        loading never writes and is not refused for the run's existing output; pass ``output_dir=`` (and any
        other constructor argument) to override what the checkpoint holds."""
        kwargs.setdefault("output_dir", None)
        verify_checkpoint(checkpoint_path, "checkpoint_path")
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

    def on_train_end(self) -> None:
        """Write the fitted policy as a plain Hugging Face (full) or PEFT adapter (LoRA) directory. A
        preempted run never gets here (``safety.preempt`` ends fit), so this is always a finished run."""
        self._train_ended = True
        if not self.output_dir:
            return
        with self.gathered_for_generation():  # FSDP: whole weights (every rank joins the gather), rank 0 writes
            self._write_policy("sharpened policy written")

    def on_fit_end(self) -> None:
        """A run resumed from a checkpoint taken at the end of training has nothing left to train, and
        Lightning then skips the training loop and ``on_train_end`` with it: write the policy here."""
        if self._train_ended or not self.output_dir:
            return
        if self.sharded:  # the strategy is torn down by now: no gather of the sharded weights
            rank_zero_warn(
                f"training had already finished in the checkpoint, and under FSDP the policy cannot be gathered "
                f"after fit: it was not written to --model.output_dir={self.output_dir!r}. Resume with "
                "--trainer.strategy ddp (or on one device) to write it"
            )
            return
        self._write_policy("training had already finished in the checkpoint; policy written")

    def _write_policy(self, what: str) -> None:
        """Rank 0 writes the policy to output_dir (``save_policy``) and says so."""
        if self.trainer.is_global_zero:
            save_policy(self.policy, self.tokenizer, self.output_dir)
        rank_zero_info(f"{what} to {self.output_dir}")


def fsdp_problems(cfg: PolicyConfig, device: torch.device) -> list[str]:
    """FSDP flattens each unit's parameters into one tensor of one dtype: LoRA adapters (kept in float32)
    next to a bfloat16 base cannot be flattened, nor can bitsandbytes' packed 4-bit weights."""
    o = "--model.policy"
    if cfg.finetuning == "qlora":
        return [
            f"{o}.finetuning=qlora: QLoRA does not run under FSDP (4-bit weights are not sharded); "
            "use --trainer.strategy ddp with qlora, or finetuning lora or full under FSDP"
        ]
    if cfg.finetuning == "lora" and resolve_dtype(cfg.dtype, device) != torch.float32:
        return [
            f"{o}.dtype={cfg.dtype}: LoRA under FSDP needs float32 weights (FSDP flattens the base and the "
            "float32 adapters into one tensor of one dtype); set --model.policy.dtype float32 and keep "
            "--trainer.precision bf16-mixed for bfloat16 compute"
        ]
    return []


def config_from(value, cls):
    """A config dataclass, given as itself or as the plain dict a checkpoint's hyper-parameters hold
    (``plain_hparams``): ``Module.load_from_checkpoint`` passes those dicts back to the constructor. A field that
    is itself a config (``SamplingConfig.vllm``) comes back as its dataclass too."""
    if not isinstance(value, dict):
        return value
    hints = get_type_hints(cls)
    nested = {
        name: config_from(field, hints[name])
        for name, field in value.items()
        if isinstance(field, dict) and dataclasses.is_dataclass(hints.get(name))
    }
    return cls(**(value | nested))


def plain_hparams(arguments: dict) -> dict:
    """Constructor arguments as plain Python values (dataclasses -> dicts), so checkpoints load with
    ``torch.load(weights_only=True)``."""
    plain = {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        for k, v in arguments.items()
        if k not in ("self", "__class__", "problems")
    }
    module = arguments.get("self")
    if module is not None:  # which module wrote a checkpoint: resume checks compare it
        plain["module_class"] = f"{type(module).__module__}.{type(module).__name__}"
    return plain
