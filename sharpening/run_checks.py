"""Checks across the run's sections (model, data, verifier, trainer), gathered before any weights load.

Each section checks itself in its constructor; what needs two sections at once lives here, so the
callback and the modules never read each other's settings. ``sharpen fit`` calls ``run_problems`` once
the classes exist; the SelfVerificationCallback's ``setup`` calls it again for users of the Python API
(by then the prompts are read, so the context check runs too). A problem stops the run where it is found, so
it is reported once. ``run_warnings`` do not stop it: only the callback's ``setup``, which every path runs
once per fit, issues them, so each warning shows once.
"""

from __future__ import annotations

from sharpening.engines import SamplingConfig, decode_device_problems
from sharpening.engines.vllm_checks import vllm_problems
from sharpening.model_checks import token_ids_problem
from sharpening.module import PolicyModule
from sharpening.prompts import PromptDataModule
from sharpening.selection import SelectionConfig


def run_problems(module: PolicyModule, datamodule, trainer) -> list[str]:
    """Every cross-section problem of a run. ``trainer`` gives the device and the SelfVerificationCallback
    (none: only the module and data are checked)."""
    verifier, rl = _verifier_of(trainer), _rl_config_of(module)
    problems = []
    if verifier is not None:
        problems += verifier_problems(verifier, module, trainer, rl)
    read = isinstance(datamodule, PromptDataModule) and bool(datamodule.prompt_ids)  # not yet in the CLI
    longest = max(map(len, datamodule.prompt_ids)) if read else None
    problems += engine_problems(verifier, module, rl, trainer.strategy.root_device, longest)
    if read:
        keeps = module.trains_on != "prompts" or (rl is not None and rl.algorithm == "offline")
        round_draws = verifier is not None and keeps  # the round feeds the module
        max_new_tokens = max(verifier.max_new_tokens if round_draws else 0, module.sampling.max_new_tokens if rl else 0)
        problems += context_problems(module.policy_config, datamodule.prompt_ids, max_new_tokens, module.tokenizer)
    return problems


def run_warnings(module: PolicyModule, trainer) -> list[str]:
    """What the run does not refuse but the user should know: the verifier's settings set for an RL module
    that draws its own samples, and best-of-N's settings under power selection."""
    verifier, rl = _verifier_of(trainer), _rl_config_of(module)
    unused = verifier is not None and rl is not None and rl.algorithm != "offline"  # online, XPO: --model.sampling
    if unused:
        warnings = []
        if (verifier.sampling, verifier.selection) != (SamplingConfig(), SelectionConfig()):
            warnings.append(
                f"--verifier.sampling / --verifier.selection are set but not used: algorithm {rl.algorithm!r} draws "
                "its own samples with --model.sampling (the verifier's round feeds only offline RL and SFT)"
            )
        if verifier.log_token_entropy:
            warnings.append(
                f"--verifier.log_token_entropy=true is set but not used: algorithm {rl.algorithm!r} draws its own "
                "samples; --model.rl.log_token_entropy true logs train/token_entropy"
            )
        if verifier.select_by != "best_of_n":
            warnings.append(
                f"--verifier.select_by={verifier.select_by} is set but not used: algorithm {rl.algorithm!r} draws its "
                "own samples with --model.sampling (the verifier's round feeds only offline RL and SFT)"
            )
        return warnings
    if verifier is not None and verifier.select_by == "power":
        return _power_warnings(verifier)
    return []


def _power_warnings(verifier) -> list[str]:
    """Best-of-N settings that power selection leaves unused: it draws with --verifier.power and scores by base
    log-likelihood."""
    unused = []
    if verifier.sampling != SamplingConfig():
        unused.append("--verifier.sampling (power samples are drawn with --verifier.power)")
    if verifier.selection.reward != SelectionConfig().reward:
        unused.append(f"--verifier.selection.reward={verifier.selection.reward} (a power sample's score is its base "
                      "log-likelihood)")  # fmt: skip
    if verifier.selection.task_reward is not None:
        unused.append(f"--verifier.selection.task_reward={verifier.selection.task_reward} (a power sample's score is "
                      "its base log-likelihood)")  # fmt: skip
    if verifier.log_token_entropy:
        unused.append("--verifier.log_token_entropy (best-of-N rounds only)")
    if not unused:
        return []
    return ["--verifier.select_by=power leaves these set but unused: " + "; ".join(unused)]


def _verifier_of(trainer):
    """The trainer's SelfVerificationCallback, or None."""
    from sharpening.callbacks import SelfVerificationCallback  # callbacks.py calls this module

    return next((c for c in trainer.callbacks if isinstance(c, SelfVerificationCallback)), None)


def _rl_config_of(module: PolicyModule):
    """The RL config of an RLSharpeningModule, else None."""
    from sharpening.rl import RLSharpeningModule  # the RL package imports sharpening.module

    return module.rl if isinstance(module, RLSharpeningModule) else None


def verifier_problems(verifier, module: PolicyModule, trainer, rl) -> list[str]:
    """The verifier's decode loop on the run's device and offline RL's needs of its scores. ``rl``: the RL
    config or None."""
    from lightning.pytorch.strategies import FSDPStrategy

    sharded = isinstance(trainer.strategy, FSDPStrategy)
    problems = decode_device_problems(verifier.sampling, trainer.strategy.root_device, "--verifier.sampling", sharded)
    offline = rl is not None and rl.algorithm == "offline"
    if offline and verifier.select_by == "power":  # pairs need every sample's score; power keeps one per prompt
        problems.append(
            "--verifier.select_by=power: offline RL-sharpening forms pairs from all N samples of each prompt, and "
            "power selection draws one; use --verifier.select_by best_of_n, or SFT-sharpening "
            "(sharpening.SFTSharpeningModule) for power self-distillation"
        )
    if offline and verifier.selection.reward != "loglik":  # Eq. 8 reads each kept sample's score as its base loglik
        problems.append(
            f"--verifier.selection.reward={verifier.selection.reward}: offline RL-sharpening uses each sample's score "
            "as log pi_base(y|x) in its squared loss, so it needs --verifier.selection.reward loglik"
        )
    if offline and verifier.selection.task_reward is not None:  # the same: a task reward would enter log pi_base
        problems.append(
            f"--verifier.selection.task_reward={verifier.selection.task_reward}: offline RL-sharpening uses each "
            "sample's score as log pi_base(y|x) in its squared loss, so no task reward can be added to it; unset it, "
            "or use algorithm online with --model.rl.task_reward"
        )
    if offline and verifier.selection.truncated == "penalize":  # all N kept, pairs hold raw scores: penalty lost
        problems.append(
            "--verifier.selection.truncated=penalize: offline RL-sharpening keeps every sample and reads its raw "
            "score as log pi_base(y|x), so the penalty would not reach its loss (truncated samples would train as "
            "with keep); use drop (the default) or keep, or algorithm online or xpo with --model.rl.truncated penalize"
        )
    return problems


def engine_problems(verifier, module: PolicyModule, rl, device, longest_prompt: int | None) -> list[str]:
    """The vLLM engine's problems with the sampling the run draws with: the verifier's best-of-N round when it
    feeds the module (SFT, offline RL), online and XPO RL's own rollouts otherwise."""
    drawn = []
    if verifier is not None and verifier.select_by == "best_of_n" and module.trains_on != "prompts":
        drawn.append((verifier.sampling, "--verifier.sampling"))
    if rl is not None and rl.algorithm != "offline":
        drawn.append((module.sampling, "--model.sampling"))
    policy = module.policy_config
    model = {"lora": policy.finetuning != "full", "load_in_4bit": policy.finetuning == "qlora"}
    model |= {"revision": policy.revision, "load_in_4bit_option": "--model.policy.finetuning=qlora"}
    return [
        problem
        for sampling, option in drawn
        for problem in vllm_problems(
            sampling, option, policy.model_name_or_path, longest_prompt=longest_prompt, device=device, **model
        )
    ]


def rl_trainer_problems(rl, trainer, datamodule, sharded: bool) -> list[str]:
    """What RL-sharpening (``rl``: its RLConfig) cannot do with the trainer's settings and the prompts read:
    no training prompt left after the held-out ones, gradient accumulation (each training step IS one update
    of a rollout), and XPO's held-out pick of a round under FSDP (``sharded``)."""
    problems = []
    if rl.heldout_prompts and datamodule is not None and getattr(datamodule, "prompt_ids", None):
        if len(datamodule) - rl.heldout_prompts < 1:
            problems.append(
                f"--model.rl.heldout_prompts={rl.heldout_prompts}: leaves no training prompt of the "
                f"{len(datamodule)} read (--data.max_prompts={datamodule.hparams.max_prompts}); hold out fewer or "
                "read more"
            )
    if trainer.accumulate_grad_batches != 1:
        problems.append(
            f"--trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: RL-sharpening takes one update "
            "per training step (several per rollout with --model.rl.inner_updates); set it to 1 and raise "
            "--model.prompts_per_step for larger updates"
        )
    if sharded and rl.algorithm == "xpo" and rl.heldout_prompts:
        problems.append(
            f"--model.rl.heldout_prompts={rl.heldout_prompts}: under FSDP XPO cannot keep the best round's "
            "weights (each rank holds a shard of them); set it to 0 (the last round is written), or use DDP"
        )
    return problems


def context_problems(policy_config, prompt_ids: list[list[int]], max_new_tokens: int, tokenizer=None) -> list[str]:
    """Prompts that cannot fit the model's context with max_new_tokens more, and token ids of ``tokenizer`` past
    the model's vocabulary (reads config.json only)."""
    from transformers import AutoConfig

    name = policy_config.model_name_or_path
    trust, revision = policy_config.trust_remote_code, policy_config.revision
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust, revision=revision)
    problems = []
    vocab_size = getattr(config, "vocab_size", None)
    if tokenizer is not None and (problem := token_ids_problem(tokenizer, prompt_ids, vocab_size)):
        problems.append(f"--model.policy.model_name_or_path={name!r}: {problem}")
    context = getattr(config, "max_position_embeddings", None)
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    need = len(prompt_ids[longest]) + max_new_tokens
    if context is None or need <= context:
        return problems
    return problems + [
        f"--data.dataset: prompt {longest} has {len(prompt_ids[longest])} tokens; with "
        f"max_new_tokens={max_new_tokens} that is {need} > the model's context of {context}; "
        "shorten the prompts (few-shot prefix, template), lower max_new_tokens, or set --data.max_prompts"
    ]
