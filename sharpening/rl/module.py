"""RLSharpeningModule: maximise E_pi[log pi_base(y|x)] - beta KL(pi || pi_base) (method.md §3.2).

The optimum is pi*_beta proportional to pi_base^(1 + 1/beta). Three algorithms:

- ``online`` (default): each step samples G responses per prompt from the current policy, computes the
  reward log pi_base(y|x) AND the KL from ONE frozen-base pass over the group, uses a group baseline,
  and takes ``inner_updates`` clipped importance-weighted steps. With one update the ratio is 1 and no
  second policy forward is made. Base and policy passes run each prompt once for its group
  (``sample_logprobs``: the prompt's KV cache is shared by the G responses).
- ``offline``: the paper's Eq. 8 squared regression on pairs (y, y') both drawn from the base by the
  SelfVerificationCallback (which keeps all N samples for this module).
- ``xpo``: paper Algorithm 1. Each step is a round: y ~ policy and y' ~ base per prompt are appended to
  a growing dataset (kept in the checkpoint), the policy is refitted on all of it with
  alpha * log pi(y') + residual^2 (the PLUS sign of the proof), and the best policy on held-out prompts'
  J_beta is the one written out: the initial one (pi^(1) = pi_base, scored before the first refit) or a round's.

Each optimizer update is an ordinary (automatic) training step on a mini-batch of one rollout: the rollout is
drawn in ``on_train_batch_start`` at its first update (outside the training forward, so FSDP, gradient clipping
and the precision plugins handle the updates as any other step), kept on the module, and in the checkpoint
while its updates last (``rl.data``, ``rl.rollout``).

Deviations from the paper: the online policy-gradient path is ours (the paper ran no RL experiment);
XPO refits for a fixed number of minibatch steps per round instead of to convergence.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from sharpening.engines import SamplingConfig, decode_device_problems, decode_responses
from sharpening.errors import raise_if_problems
from sharpening.losses import apply_truncated_policy, kl_regularized_rewards, squared_pair_loss, xpo_loss
from sharpening.module import PolicyModule, TrainsOn, config_from, plain_hparams
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig, disable_dropout, eval_mode, stop_token_ids
from sharpening.prompts import epoch_sampler
from sharpening.rewards import REWARDS, extract_answers, resolve_reward
from sharpening.rl.config import RLConfig, validate_rl_config, with_both_coefficients
from sharpening.rl.data import update_loader, whole_rollout_steps
from sharpening.rl.pairs import PairExample, collate_pairs, pairs_from_buffer
from sharpening.rl.rollout import (
    Rollout,
    SeedStream,
    answer_metrics,
    base_sequence_logprobs,
    build_rollout,
    draw_samples,
    entropy_band_prompts,
    online_loss,
    pair_residuals_of,
    pairs_of,
    policy_estimates,
    policy_token_entropy,
    rollout_self_rewards,
    sequence_logprobs,
    xpo_minibatches,
)
from sharpening.rl.state import RLTrainingState, load_rl_state, save_rl_state
from sharpening.run_checks import rl_trainer_problems
from sharpening.tasks.extractors import resolve_extractor
from sharpening.types import PromptBatch, SampleBatch


class RLSharpeningModule(PolicyModule):
    """Sharpen by KL-regularized RL with the frozen base's log-likelihood as reward (online: or another self-reward
    of the registry, ``--model.rl.reward``, scored when the rollout is drawn)."""

    lazy_frozen_base = False  # the base is scored against every step: hold the frozen copy from the start

    def __init__(
        self,
        policy: PolicyConfig,
        rl: RLConfig = RLConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        optimizer: OptimizerConfig | None = None,
        prompts_per_step: int = 8,
        seed: int = 0,
        output_dir: str | None = None,
        overwrite_output_dir: bool = False,
        logprob_chunk_size: int = 256,
    ) -> None:
        """
        Args:
            policy: The model to sharpen and how it trains (full, lora, qlora).
            rl: Algorithm (online, offline, xpo), beta and their knobs.
            sampling: Group sampling for online and xpo (samples_per_prompt is the group size G).
            optimizer: AdamW settings and learning-rate schedule (null: lr 1e-5, constant).
            prompts_per_step: Prompts per rollout (online: each gets G samples; xpo: one round).
            seed: Seed of the policy's draws (with the step and prompt index) and of each epoch's prompt order.
            output_dir: Where the fitted policy (full model or PEFT adapter) is written at the end; null = nowhere.
            overwrite_output_dir: Replace a non-empty output_dir (its contents go once the fitted policy is written
                in full).
            logprob_chunk_size: Response positions per LM-head chunk (bounds logits memory).
        """
        optimizer = config_from(optimizer, OptimizerConfig) or OptimizerConfig(lr=1e-5, schedule="constant")
        rl = with_both_coefficients(config_from(rl, RLConfig))  # (dicts: load_from_checkpoint); hparams show both
        sampling = config_from(sampling, SamplingConfig)
        problems = validate_rl_config(rl, sampling)
        if prompts_per_step < 1:
            problems.append(f"--model.prompts_per_step={prompts_per_step}: must be >= 1")
        super().__init__(policy, optimizer, output_dir, overwrite_output_dir, logprob_chunk_size, problems)
        self.save_hyperparameters(plain_hparams(locals()))
        self.rl, self.sampling, self.prompts_per_step, self.seed = rl, sampling, prompts_per_step, seed
        self.rollout: Rollout | None = None  # online: the rollout the current updates train on (checkpointed)
        self.xpo_pairs: list[PairExample] = []  # xpo: the growing dataset (checkpointed)
        self.xpo_minibatches: list[list[int]] = []  # xpo: the pairs of each update of the current round (checkpointed)
        # xpo: the best policy scored on the held-out prompts, the initial one (round 0) included (checkpointed)
        self.best: dict = {"j_beta": float("-inf"), "round": -1, "state": None}
        self._last_update = False  # this step is the last update of its rollout (xpo scores the round after it)
        if rl.algorithm == "online" and rl.kl_estimator == "k3":
            rank_zero_warn(
                "--model.rl.kl_estimator=k3: GRPO's per-token k3 penalty does not optimise the paper's objective "
                "(its gradient is that of another KL; the optimum is not pi_base^(1+1/beta)); use sequence for that"
            )

    @property
    def trains_on(self) -> TrainsOn:
        """offline: pairs of all N base samples of each prompt (the verifier keeps them all); else own prompts."""
        return "all_samples" if self.rl.algorithm == "offline" else "prompts"

    def updates_per_rollout(self) -> int:
        """Optimizer updates (training steps) on one rollout: online's inner updates, an XPO round's refits."""
        return {"online": self.rl.inner_updates, "offline": 1, "xpo": self.rl.xpo_updates_per_round}[self.rl.algorithm]

    def configure_model(self) -> None:
        """The policy, with dropout off: log-probs for the gradient must be those of the policy that drew
        the samples (drawn in eval mode), as in GRPO trainers; gradient checkpointing still applies."""
        first = self.policy is None
        super().configure_model()
        if first:
            switched = disable_dropout(self.policy)
            if switched:
                rank_zero_info(f"RL-sharpening: dropout set to 0 in {switched} place(s) of the policy")

    # -- data ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse, before any weights load, what cannot run (``run_checks.rl_trainer_problems``) and what FSDP
        cannot shard. Then round ``--trainer.max_steps`` up to whole rollouts: a rollout's updates are one unit,
        so the last rollout drawn runs all its updates and the learning-rate schedule (which counts optimizer
        steps) ends with it. Lightning keeps its step limit in ``fit_loop.epoch_loop.max_steps`` alone (the
        Trainer's ``max_steps`` is a read-only view of it), and both its stop check and
        ``estimated_stepping_batches`` (the schedule's length) read it there, so setting it once here, before the
        optimizers are built, makes both count whole rollouts on the CLI and Python-API paths alike."""
        super().setup(stage)
        trainer = self.trainer
        problems = decode_device_problems(self.sampling, trainer.strategy.root_device, "--model.sampling")
        raise_if_problems(problems + rl_trainer_problems(self.rl, trainer, trainer.datamodule, self.sharded))
        max_steps = whole_rollout_steps(trainer.max_steps, self.updates_per_rollout())
        if max_steps != trainer.max_steps:
            trainer.fit_loop.epoch_loop.max_steps = max_steps

    def train_dataloader(self) -> DataLoader:
        if self.rl.algorithm == "offline":
            pairs = pairs_from_buffer(self.round_examples())  # the self-verification round for this epoch, if due
            collate = partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id)
            sampler = epoch_sampler(self._trainer, len(pairs), self.seed, self.rl.pairs_per_update)
            return DataLoader(pairs, self.rl.pairs_per_update, sampler=sampler, collate_fn=collate)
        data = self.trainer.datamodule
        count = len(data) - self.rl.heldout_prompts
        if count < 1:
            raise RuntimeError(f"--model.rl.heldout_prompts={self.rl.heldout_prompts} leaves no training prompt")
        updates = self.updates_per_rollout()
        return update_loader(self._trainer, count, self.seed, self.prompts_per_step, updates, data.batch)

    # -- rollouts: drawn before the step that first trains on them -------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Draw what the step trains on, outside the training forward (FSDP: every rank gathers the weights)."""
        step = self.trainer.global_step
        if self.rl.algorithm == "offline":
            if step % max(1, self.trainer.log_every_n_steps) == 0:
                self._estimate_on_policy(batch["prompt_indices"].unique()[:8].tolist(), step)
            return
        self._last_update = batch.update == self.updates_per_rollout() - 1
        first = step - batch.update  # the optimizer step the rollout starts at: its draws' seed
        if self.rl.algorithm == "online" and (batch.update == 0 or self.rollout is None):
            self.rollout = self._draw_rollout(batch.prompts, first)
        elif self.rl.algorithm == "xpo" and (batch.update == 0 or not self.xpo_minibatches):
            self._start_xpo_round(batch.prompts, first, add_pairs=batch.update == 0)
        self.sampling_engine(self.sampling).idle()  # the trainer has the device until the next rollout

    def _draw(self, prompts: PromptBatch, source: str, count: int, step: int, stream: SeedStream) -> SampleBatch:
        """Exact draws from ``source`` (policy or base) by the run's engine (``--model.sampling.engine``, one for
        every draw: it follows whichever model it is given); the seed depends on (seed, step, stream, prompt).
        What the engine measured of the draw is logged, the largest over ranks."""
        engine = self.sampling_engine(self.sampling)
        with self.gathered_for_generation(), eval_mode(self.policy), self.sampling_model(source) as model:
            stop_ids = stop_token_ids(model, self.tokenizer)
            args = (self.tokenizer, prompts, self.sampling, count, self.seed, step, stream, stop_ids)
            samples = draw_samples(engine, model, *args)
        if metrics := engine.metrics():
            self.log_dict(metrics, reduce_fx="max", batch_size=len(prompts), sync_dist=True)
        return samples

    def _base_pass(self, samples: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_base of the samples per token [B, N, T] and per sequence [B, N] (one frozen-base pass)."""
        with self.gathered_for_generation():
            return base_sequence_logprobs(self.frozen_base, samples, self.logprob_chunk_size)

    def _draw_rollout(self, prompts: PromptBatch, step: int) -> Rollout:
        """G samples per prompt from the policy, ONE base pass for reward and KL, advantages; logged. The
        answers are extracted once (text only) for the reward, the entropy band and the answer metrics."""
        samples = self._draw(prompts, "policy", self.sampling.samples_per_prompt, step, SeedStream.POLICY_ROLLOUT)
        base_logprobs, _ = self._base_pass(samples)
        extractor = resolve_extractor(self.rl.answer_extractor)
        answers = extract_answers(decode_responses(self.tokenizer, samples), extractor)  # [B][G]
        self_rewards = self._self_rewards(samples, base_logprobs, answers)
        band_mask = entropy_band_prompts(answers, self.rl.answer_entropy_band)  # [B] bool or None
        rollout = build_rollout(samples, base_logprobs, self.rl, self.tokenizer, self_rewards, band_mask)
        size = len(prompts)
        if rollout.in_loss is not None:
            dropped = 1.0 - rollout.in_loss.float().mean()
            self.log("train/dropped_fraction", dropped, batch_size=size, sync_dist=True)
        if band_mask is not None:
            self.log("train/band_skipped_fraction", 1.0 - band_mask.float().mean(), batch_size=size, sync_dist=True)
        self.log_dict(answer_metrics(answers, prompts.answers, extractor), batch_size=size, sync_dist=True)
        if self.rl.log_token_entropy:
            with self.gathered_for_generation(), eval_mode(self.policy):
                entropy = policy_token_entropy(partial(self.sampling_model, "policy"), samples, self.logprob_chunk_size)
            self.log("train/token_entropy", entropy, batch_size=size, sync_dist=True)
        self._log_policy_estimates(rollout.base_seq, rollout.sampler_seq, samples)
        return rollout

    def _self_rewards(
        self, samples: SampleBatch, base_logprobs: torch.Tensor, answers: list[list[str | None]]
    ) -> torch.Tensor | None:
        """``rl.reward`` of the rollout [B, G], scored now, by the weights that just drew it (policy-scored) or
        the frozen base; None for loglik, which ``build_rollout`` reads from the base pass. Logged as
        ``train/self_reward``."""
        reward = resolve_reward(self.rl.reward, "--model.rl.reward")
        if reward is REWARDS["loglik"]:
            return None
        policy = partial(self.sampling_model, "policy")
        with self.gathered_for_generation(), eval_mode(self.policy):
            scores = rollout_self_rewards(
                reward, samples, base_logprobs, self.frozen_base, policy, self.logprob_chunk_size, answers
            )  # [B, G]
        self.log("train/self_reward", scores.mean(), batch_size=scores.shape[0], sync_dist=True)
        return scores

    @torch.no_grad()
    def _estimate_on_policy(self, prompt_indices: list[int], step: int) -> None:
        """Offline pairs come from the base; reward, KL, J_beta and entropy need draws from the policy."""
        prompts = self.trainer.datamodule.batch(prompt_indices, self.device)
        samples = self._draw(prompts, "policy", 1, step, SeedStream.ON_POLICY_ESTIMATE)
        _, base_seq = self._base_pass(samples)
        self._log_policy_estimates(base_seq, sequence_logprobs(samples.logprobs, samples.response_mask), samples)

    def _start_xpo_round(self, prompts: PromptBatch, step: int, add_pairs: bool) -> None:
        """XPO: score pi^(1) = pi_base first (a candidate too), grow the dataset with (x, y ~ policy, y' ~ base),
        and fix the round's minibatches."""
        if step == 0 and self.best["state"] is None:
            self._score_round(0)
            if self.best["state"] is not None:
                rank_zero_info(f"XPO: the initial policy (pi_base) scores held-out J_beta {self.best['j_beta']:.4f}")
        if add_pairs:
            self.xpo_pairs.extend(self._new_pairs(prompts, step))
        self.xpo_minibatches = xpo_minibatches(len(self.xpo_pairs), self.rl, self.seed, step)
        self.log("train/xpo_pairs", float(len(self.xpo_pairs)), batch_size=len(prompts), sync_dist=True)

    def _new_pairs(self, prompts: PromptBatch, step: int) -> list[PairExample]:
        """One pair per prompt: y from the policy, y' from the base, both scored by the base, truncation flagged."""
        y = self._draw(prompts, "policy", 1, step, SeedStream.XPO_POLICY)
        y2 = self._draw(prompts, "base", 1, step, SeedStream.XPO_BASE)
        _, base_y = self._base_pass(y)  # [B, 1]
        base_y2 = sequence_logprobs(y2.logprobs, y2.response_mask)  # exact base draws: their log-probs ARE base scores
        self._log_policy_estimates(base_y, sequence_logprobs(y.logprobs, y.response_mask), y)
        return pairs_of(prompts, y, y2, base_y, base_y2)

    # -- updates: one per training step ----------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """The loss of one update: on the current rollout (online), a pair batch (offline), or a minibatch of
        the XPO dataset. Lightning takes the backward pass, clipping and the optimizer and scheduler steps."""
        rl = self.rl
        if rl.algorithm == "online":
            loss, size = online_loss(self.policy, self.rollout, rl, self.logprob_chunk_size), len(batch.prompts)
        elif rl.algorithm == "offline":
            residuals, _ = pair_residuals_of(self.policy, batch, rl, self.logprob_chunk_size)
            loss, size = squared_pair_loss(residuals), batch["base_logprob"].shape[0]
            self.log("train/residual_rms", residuals.detach().pow(2).mean().sqrt(), batch_size=size, sync_dist=True)
        else:
            picked = [self.xpo_pairs[i] for i in self.xpo_minibatches[batch.update]]
            pairs = {k: v.to(self.device) for k, v in collate_pairs(picked, self.tokenizer.pad_token_id).items()}
            residuals, policy_y2 = pair_residuals_of(self.policy, pairs, rl, self.logprob_chunk_size)
            loss, size = xpo_loss(residuals, policy_y2, rl.xpo_alpha), len(batch.prompts)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradient to ``rl.max_grad_norm``. Here, inside ``optimizer.step()``, because under
        16-mixed the precision plugin has unscaled the gradient by now (under FSDP the root clips: the norm is
        reduced over every rank's shard, ``PolicyModule.configure_gradient_clipping``)."""
        super().on_before_optimizer_step(optimizer)
        if self.rl.max_grad_norm:
            self.configure_gradient_clipping(optimizer, self.rl.max_grad_norm, "norm")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The update; after an XPO round's last one, the round is scored on the held-out prompts. Here, not at
        batch end, because checkpoint callbacks save at batch end before the module's hook runs, and the round's
        score belongs in the checkpoint of its step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.rl.algorithm == "xpo" and self._last_update:
            self._score_round(self.trainer.global_step + 1)  # Lightning counts this step once the hook returns

    def _score_round(self, step: int) -> None:
        """Estimate J_beta on the held-out prompts; keep the best round's trainable weights (round 0: the
        initial policy, pi_base, scored before the first refit)."""
        data, heldout = self.trainer.datamodule, self.rl.heldout_prompts
        if heldout == 0:
            return
        prompts = data.batch(range(len(data) - heldout, len(data)), self.device)
        samples = self._draw(prompts, "policy", self.sampling.samples_per_prompt, step, SeedStream.HELDOUT)
        _, base_seq = self._base_pass(samples)
        policy_seq = sequence_logprobs(samples.logprobs, samples.response_mask)  # [B, N]
        signal = kl_regularized_rewards(base_seq, policy_seq, self.rl.kl_coef)
        self.log("val/j_beta", float(signal.mean()), batch_size=heldout)  # the paper's J_beta
        if self.rl.truncated == "penalize":  # the round kept is the best for the objective trained
            signal, _ = apply_truncated_policy(signal, samples.truncated, "penalize", self.rl.truncation_penalty)
            self.log("val/j_beta_penalized", float(signal.mean()), batch_size=heldout)
        j_beta = float(signal.mean())
        if j_beta > self.best["j_beta"]:
            state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
            self.best = {"j_beta": j_beta, "round": int(step), "state": state}

    def _log_policy_estimates(self, base_seq: torch.Tensor, policy_seq: torch.Tensor, samples: SampleBatch) -> None:
        """Reward, KL, J_beta and entropy estimated from draws of the CURRENT policy, means over ranks."""
        metrics = policy_estimates(base_seq, policy_seq, samples, self.rl.kl_coef)
        self.log_dict(metrics, prog_bar=False, batch_size=base_seq.shape[0], sync_dist=True)

    # -- checkpoint and output: the RL state beside the weights (``rl.state``) --------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = RLTrainingState(self.rollout, self.xpo_pairs, self.xpo_minibatches, self.best)
        save_rl_state(checkpoint, self.rl.algorithm, state, self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        world, rank = (self._trainer.world_size, self._trainer.global_rank) if self._trainer else (1, 0)
        state = load_rl_state(checkpoint, world, rank)
        if state.rollout is not None:  # else drawn again at the next step
            self.rollout = state.rollout
        if state.best is not None:
            self.xpo_pairs, self.xpo_minibatches, self.best = state.xpo_pairs, state.xpo_minibatches, state.best

    def on_train_start(self) -> None:
        if self.rollout is not None:  # restored from a checkpoint on the CPU
            self.rollout = self.rollout.to(self.device)

    def on_train_end(self) -> None:
        self._keep_best_round()
        super().on_train_end()

    def on_fit_end(self) -> None:
        if not self._train_ended:  # resumed at the end: Lightning skipped on_train_end
            self._keep_best_round()
        super().on_fit_end()

    def _keep_best_round(self) -> None:
        """XPO: the policy of the round with the best held-out J_beta, not the last one."""
        if self.rl.algorithm == "xpo" and self.best["state"] is not None:
            self.load_state_dict({k: v.to(self.device) for k, v in self.best["state"].items()})
            step = self.best["round"]
            which = "the initial policy (pi_base)" if step == 0 else f"the policy after step {step}"
            rank_zero_info(f"XPO: keeping {which}, the best held-out J_beta ({self.best['j_beta']:.4f})")
