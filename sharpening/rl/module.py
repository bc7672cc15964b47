"""RLSharpeningModule: maximise E_pi[log pi_base(y|x)] - beta KL(pi || pi_base) (SPEC 3.2).

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

Deviations from the paper: the online policy-gradient path is ours (the paper ran no RL experiment);
XPO refits for a fixed number of minibatch steps per round instead of to convergence.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from sharpening.buffer import SampleBuffer, epoch_sampler, no_round
from sharpening.errors import raise_if_problems
from sharpening.logprobs import response_logprobs, sample_logprobs
from sharpening.losses import (
    apply_truncated_policy,
    group_advantages,
    kl_regularized_rewards,
    pair_residuals,
    policy_gradient_loss,
    squared_pair_loss,
    xpo_loss,
)
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig, disable_dropout, eval_mode, stop_token_ids
from sharpening.policy_module import PolicyModule, config_from, plain_hparams
from sharpening.rl.config import RLConfig, validate_rl_config
from sharpening.rl.pairs import PairExample, collate_pairs, pairs_for_rank, pairs_from_buffer
from sharpening.sampler import (
    SamplingConfig,
    decode_device_problems,
    derive_seed,
    generate_samples,
)
from sharpening.types import PromptBatch, SampleBatch


class RLSharpeningModule(PolicyModule):
    """Sharpen by KL-regularized RL with the frozen base's log-likelihood as reward."""

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
            prompts_per_step: Prompts per training step (online: each gets G samples; xpo: one round).
            seed: Seed of the policy's draws (with the step and prompt index) and of each epoch's prompt order.
            output_dir: Where the fitted policy (full model or PEFT adapter) is written at the end; null = nowhere.
            overwrite_output_dir: Replace a non-empty output_dir (its old contents go once the new policy is written in full).
            logprob_chunk_size: Response positions per LM-head chunk (bounds logits memory).
        """
        optimizer = config_from(optimizer, OptimizerConfig) or OptimizerConfig(lr=1e-5, schedule="constant")
        rl, sampling = config_from(rl, RLConfig), config_from(sampling, SamplingConfig)  # (dicts: load_from_checkpoint)
        problems = validate_rl_config(rl, sampling)
        if prompts_per_step < 1:
            problems.append(f"--model.prompts_per_step={prompts_per_step}: must be >= 1")
        super().__init__(policy, optimizer, output_dir, overwrite_output_dir, logprob_chunk_size, problems)
        self.save_hyperparameters(plain_hparams(locals()))
        self.automatic_optimization = False  # several updates per generation (online, xpo)
        self.rl, self.sampling, self.prompts_per_step, self.seed = rl, sampling, prompts_per_step, seed
        self.xpo_pairs: list[PairExample] = []  # xpo: the growing dataset (checkpointed)
        # xpo: the best policy scored on the held-out prompts, the initial one (round 0) included (checkpointed)
        self.best: dict = {"j_beta": float("-inf"), "round": -1, "state": None}
        if rl.algorithm == "offline":
            self.buffer: SampleBuffer | None = None  # attached by SelfVerificationCallback.setup
            self.ensure_buffer = no_round  # replaced by SelfVerificationCallback.setup (a plain function: picklable)
        if rl.algorithm == "online" and rl.kl_estimator == "k3":
            rank_zero_warn(
                "--model.rl.kl_estimator=k3: GRPO's per-token k3 penalty does not optimise the paper's objective "
                "(its gradient is that of another KL; the optimum is not pi_base^(1+1/beta)); use sequence for that"
            )

    def configure_model(self) -> None:
        """The policy, with dropout off: log-probs for the gradient must be those of the policy that drew
        the samples (drawn in eval mode), as in GRPO trainers; gradient checkpointing still applies."""
        first = self.policy is None
        super().configure_model()
        if first:
            switched = disable_dropout(self.policy)
            if switched:
                rank_zero_info(f"RL-sharpening: dropout set to 0 in {switched} place(s) of the policy")
            self.keep_all_samples = True  # the callback keeps all N base samples to form pairs

    # -- data ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse FSDP before any weights load: every RL update runs inside the training step (manual
        optimization), and FSDP cannot run a backward pass inside its own forward. Also a decode loop the
        device cannot run (CUDA graphs off CUDA)."""
        problems = decode_device_problems(self.sampling, self.trainer.strategy.root_device, "--model.sampling")
        data = self.trainer.datamodule
        if self.rl.heldout_prompts and data is not None and getattr(data, "prompt_ids", None):
            if len(data) - self.rl.heldout_prompts < 1:
                problems.append(
                    f"--model.rl.heldout_prompts={self.rl.heldout_prompts}: leaves no training prompt of the "
                    f"{len(data)} read (--data.max_prompts={data.hparams.max_prompts}); hold out fewer or read more"
                )
        raise_if_problems(problems)
        if not self.sharded:
            return
        raise_if_problems([
            f"--trainer.strategy={type(self.trainer.strategy).__name__}: RL-sharpening does not run under FSDP "
            "(its updates are taken inside the training step, and FSDP allows no backward pass within its "
            "forward); use --trainer.strategy ddp, with --model.policy.finetuning lora or qlora to keep each "
            "rank's copy small. SFT-sharpening runs under FSDP (configs/fsdp.yaml)."
        ])

    def train_dataloader(self) -> DataLoader:
        if self.rl.algorithm == "offline":
            if self.buffer is None:
                raise RuntimeError("offline RL-sharpening needs the SelfVerificationCallback (the CLI's `verifier:`)")
            self.ensure_buffer(self.current_epoch)  # the self-verification round for this epoch, if due
            pairs = pairs_from_buffer(self.buffer.examples)
            collate = partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id)
            sampler = epoch_sampler(self._trainer, len(pairs), self.seed, self.rl.pairs_per_update)
            return DataLoader(pairs, self.rl.pairs_per_update, sampler=sampler, collate_fn=collate)
        data = self.trainer.datamodule
        count = len(data) - self.rl.heldout_prompts
        if count < 1:
            raise RuntimeError(f"--model.rl.heldout_prompts={self.rl.heldout_prompts} leaves no training prompt")
        sampler = epoch_sampler(self._trainer, count, self.seed, self.prompts_per_step)
        return DataLoader(range(count), self.prompts_per_step, sampler=sampler, collate_fn=data.batch)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.rl.algorithm == "online":
            return self.online_step(batch)
        if self.rl.algorithm == "offline":
            return self.pair_step(batch)
        return self.xpo_round(batch)

    def _draw(self, prompts: PromptBatch, source: str, samples_per_prompt: int, stream: int) -> SampleBatch:
        """Exact draws from ``source`` (policy or base); the seed depends on (seed, step, stream, prompt)."""
        cfg = dataclasses.replace(self.sampling, samples_per_prompt=samples_per_prompt)
        tok = self.tokenizer
        with eval_mode(self.policy), self.sampling_model(source) as model:
            return generate_samples(
                model, prompts, cfg, stop_token_ids(model, tok), tok.pad_token_id, self.seed,
                derive_seed(self.global_step, stream),
            )

    def online_step(self, prompts: PromptBatch) -> torch.Tensor:
        """One generation of G samples per prompt from the policy, then ``inner_updates`` updates."""
        rl, g = self.rl, self.sampling.samples_per_prompt
        samples = self._draw(prompts, "policy", g, stream=0)
        mask = samples.response_mask  # [B, G, T]
        with self.frozen_base() as base:
            base_lp = sample_logprobs(base, samples, self.logprob_chunk_size)  # ONE base pass: reward and KL
        base_seq = (base_lp * mask).sum(-1)  # [B, G]
        old_seq = (samples.logprobs * mask).sum(-1)  # sampler's log pi(y): exact draws, so free
        rewards = kl_regularized_rewards(base_seq, old_seq, rl.kl_coef) if rl.kl_estimator == "sequence" else base_seq
        # truncated responses: penalty on the reward after the KL is folded in; drop: in_loss [B, G], else None
        rewards, in_loss = apply_truncated_policy(rewards, samples.truncated, rl.truncated, rl.truncation_penalty)
        advantages = group_advantages(rewards, rl.baseline, rl.normalize_advantages, in_loss).flatten()  # [B*G]
        in_loss = None if in_loss is None else in_loss.flatten()  # [B, G] -> [B*G]
        mask = mask.flatten(0, 1)  # [B, G, T] -> [B*G, T]
        for _ in range(rl.inner_updates):  # each prompt runs once for its group (sample_logprobs)
            logprobs = sample_logprobs(self.policy, samples, self.logprob_chunk_size).flatten(0, 1)  # [B*G, T]
            # one update: the ratio is exactly 1 (no second policy forward); more: ratio to the sampler's
            old = logprobs.detach() if rl.inner_updates == 1 else samples.logprobs.flatten(0, 1)  # [B*G, T]
            k3 = rl.kl_coef if rl.kl_estimator == "k3" else 0.0
            loss = policy_gradient_loss(
                logprobs, old, advantages, mask, rl.clip_ratio, base_lp.flatten(0, 1), k3, in_loss
            )
            self._update(loss)  # also when nothing is in the loss: a zero loss, backward as on every rank
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(prompts), sync_dist=True)
        if in_loss is not None:
            dropped = 1.0 - in_loss.float().mean()
            self.log("train/dropped_fraction", dropped, batch_size=len(prompts), sync_dist=True)
        self._log_policy_estimates(base_seq, old_seq, samples)
        return loss.detach()

    def pair_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Offline: one update of the paper's squared loss on base-drawn pairs."""
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._estimate_on_policy(batch["prompt_indices"].unique()[:8].tolist())
        residuals = self._pair_residuals(batch)
        loss = squared_pair_loss(residuals)
        self._update(loss)
        size = batch["base_logprob"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/residual_rms", residuals.detach().pow(2).mean().sqrt(), batch_size=size, sync_dist=True)
        return loss.detach()

    @torch.no_grad()
    def _estimate_on_policy(self, prompt_indices: list[int]) -> None:
        """Offline pairs come from the base; reward, KL, J_beta and entropy need draws from the policy."""
        prompts = self.trainer.datamodule.batch(prompt_indices, self.device)
        samples = self._draw(prompts, "policy", 1, stream=4)
        with self.frozen_base() as base:
            base_seq = (sample_logprobs(base, samples, self.logprob_chunk_size) * samples.response_mask).sum(-1)
        self._log_policy_estimates(base_seq, (samples.logprobs * samples.response_mask).sum(-1), samples)

    def _pair_residuals(self, batch: dict[str, torch.Tensor], with_policy_y2: bool = False):
        logprobs = response_logprobs(
            self.policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"],
            chunk_size=self.logprob_chunk_size,
        )  # [2P, T]
        seq = (logprobs * batch["response_mask"]).sum(-1)  # [2P]
        policy_y, policy_y2 = seq.chunk(2)  # [2P] -> [P], [P]
        # xpo with penalize: the penalty lowers r(y), r(y'), not log pi_base in the KL terms (offline: always keep)
        policy, penalty = self.rl.truncated, self.rl.truncation_penalty
        reward_y, _ = apply_truncated_policy(batch["base_logprob"], batch["truncated"], policy, penalty)
        reward_y2, _ = apply_truncated_policy(batch["other_base_logprob"], batch["other_truncated"], policy, penalty)
        residuals = pair_residuals(
            policy_y, batch["base_logprob"], policy_y2, batch["other_base_logprob"], self.rl.kl_coef,
            reward_y, reward_y2,
        )
        return (residuals, policy_y2) if with_policy_y2 else residuals

    def xpo_round(self, prompts: PromptBatch) -> torch.Tensor:
        """XPO: grow the dataset with (x, y ~ policy, y' ~ base), refit on all of it, score the round."""
        if self.global_step == 0 and self.best["state"] is None:  # the paper's pi^(1) = pi_base is a candidate too
            self._score_round()
            if self.best["state"] is not None:
                rank_zero_info(f"XPO: the initial policy (pi_base) scores held-out J_beta {self.best['j_beta']:.4f}")
        self.xpo_pairs.extend(self._new_pairs(prompts))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.global_step, 1))
        collate = partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id)
        for _ in range(self.rl.xpo_updates_per_round):
            pick = torch.randint(len(self.xpo_pairs), (min(self.rl.pairs_per_update, len(self.xpo_pairs)),), generator=generator)
            batch = collate([self.xpo_pairs[i] for i in pick.tolist()])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            residuals, policy_y2 = self._pair_residuals(batch, with_policy_y2=True)
            loss = xpo_loss(residuals, policy_y2, self.rl.xpo_alpha)
            self._update(loss)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(prompts), sync_dist=True)
        self.log("train/xpo_pairs", float(len(self.xpo_pairs)), batch_size=len(prompts), sync_dist=True)
        self._score_round()
        return loss.detach()

    def _new_pairs(self, prompts: PromptBatch) -> list[PairExample]:
        """One pair per prompt: y from the policy, y' from the base, both scored by the base, truncation flagged."""
        y = self._draw(prompts, "policy", 1, stream=1)
        y2 = self._draw(prompts, "base", 1, stream=2)
        with self.frozen_base() as base:
            base_y = (sample_logprobs(base, y, self.logprob_chunk_size) * y.response_mask).sum(-1)  # [B, 1]
        base_y2 = (y2.logprobs * y2.response_mask).sum(-1)  # exact base draws: sampler log-probs ARE base scores
        self._log_policy_estimates(base_y, (y.logprobs * y.response_mask).sum(-1), y)
        pairs = []
        for b in range(len(prompts)):
            prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]].tolist()
            pairs.append(
                PairExample(
                    prompt,
                    y.response_ids[b, 0][y.response_mask[b, 0]].tolist(),
                    y2.response_ids[b, 0][y2.response_mask[b, 0]].tolist(),
                    float(base_y[b, 0]),
                    float(base_y2[b, 0]),
                    int(prompts.prompt_indices[b]),
                    bool(y.truncated[b, 0]),
                    bool(y2.truncated[b, 0]),
                )
            )
        return pairs

    def _score_round(self) -> None:
        """Estimate J_beta on the held-out prompts; keep the best round's trainable weights (round 0: the
        initial policy, pi_base, scored before the first refit)."""
        data, heldout = self.trainer.datamodule, self.rl.heldout_prompts
        if heldout == 0:
            return
        prompts = data.batch(range(len(data) - heldout, len(data)), self.device)
        samples = self._draw(prompts, "policy", self.sampling.samples_per_prompt, stream=3)
        with self.frozen_base() as base:
            base_seq = (sample_logprobs(base, samples, self.logprob_chunk_size) * samples.response_mask).sum(-1)
        signal = kl_regularized_rewards(base_seq, (samples.logprobs * samples.response_mask).sum(-1), self.rl.kl_coef)
        self.log("val/j_beta", float(signal.mean()), batch_size=heldout)  # the paper's J_beta
        if self.rl.truncated == "penalize":  # the round kept is the best for the objective trained
            signal, _ = apply_truncated_policy(signal, samples.truncated, "penalize", self.rl.truncation_penalty)
            self.log("val/j_beta_penalized", float(signal.mean()), batch_size=heldout)
        j_beta = float(signal.mean())
        if j_beta > self.best["j_beta"]:
            state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
            self.best = {"j_beta": j_beta, "round": int(self.global_step), "state": state}

    def _update(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``; its gradient is clipped in ``on_before_optimizer_step``."""
        optimizer = self.optimizers()
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradient to ``rl.max_grad_norm``. Here, inside ``optimizer.step()``, because under
        16-mixed the precision plugin has unscaled the gradient by now: clipped before, in ``_update``, the
        gradient would still carry the loss scale, and the update would be clipped to max_grad_norm / scale."""
        super().on_before_optimizer_step(optimizer)
        if self.rl.max_grad_norm:
            self.configure_gradient_clipping(optimizer, self.rl.max_grad_norm, "norm")

    def _log_policy_estimates(self, base_seq: torch.Tensor, policy_seq: torch.Tensor, samples: SampleBatch) -> None:
        """Reward, KL, J_beta and entropy estimated from draws of the CURRENT policy. [B, G] inputs."""
        size = base_seq.shape[0]
        metrics = {
            "train/reward": base_seq.mean(),  # E[log pi_base(y|x)]
            "train/kl": (policy_seq - base_seq).mean(),  # sequence KL(pi || pi_base), one-sample estimate
            "train/j_beta": kl_regularized_rewards(base_seq, policy_seq, self.rl.kl_coef).mean(),
            "train/entropy": -policy_seq.mean(),  # sequence entropy estimate E[-log pi(y|x)]
            "train/response_tokens": samples.lengths.float().mean(),
            "train/truncated_fraction": samples.truncated.float().mean(),
        }
        if base_seq.shape[-1] > 1:
            metrics["train/reward_best_minus_mean"] = (base_seq.max(-1).values - base_seq.mean(-1)).mean()
        self.log_dict(metrics, prog_bar=False, batch_size=size, sync_dist=True)  # means over ranks

    def updates_per_batch(self) -> int:
        """Optimizer steps per training batch (the LR schedule counts optimizer steps)."""
        return {"online": self.rl.inner_updates, "offline": 1, "xpo": self.rl.xpo_updates_per_round}[self.rl.algorithm]

    # -- checkpoint and output ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.rl.algorithm != "xpo":
            return
        pairs = [dataclasses.asdict(p) for p in self.xpo_pairs]
        pairs_by_rank = [pairs]
        if self.trainer.world_size > 1:  # each rank grew its own dataset; rank 0 alone writes the file
            pairs_by_rank = [None] * self.trainer.world_size
            # collective: Lightning builds the checkpoint dict (this hook) on every rank before rank 0 saves it
            torch.distributed.all_gather_object(pairs_by_rank, pairs)
        checkpoint["xpo"] = {
            "pairs_by_rank": pairs_by_rank,  # [world size][pairs]; before: "pairs", one list (rank 0's)
            # the same on every rank: DDP keeps the weights equal, and each rank scores the same held-out draws
            "best_j_beta": self.best["j_beta"],
            "best_round": self.best["round"],
            "best_state": self.best["state"],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("xpo")
        if not state:
            return
        world, rank = (self._trainer.world_size, self._trainer.global_rank) if self._trainer else (1, 0)
        pairs_by_rank = state.get("pairs_by_rank", [state.get("pairs", [])])  # older checkpoints: one list
        self.xpo_pairs = [PairExample(**p) for p in pairs_for_rank(pairs_by_rank, world, rank)]
        self.best = {"j_beta": state["best_j_beta"], "round": state["best_round"], "state": state["best_state"]}

    def on_train_end(self) -> None:
        self._keep_best_round()
        super().on_train_end()

    def on_fit_end(self) -> None:
        if not getattr(self, "_train_ended", False):  # resumed at the end: Lightning skipped on_train_end
            self._keep_best_round()
        super().on_fit_end()

    def _keep_best_round(self) -> None:
        """XPO: the policy of the round with the best held-out J_beta, not the last one."""
        if self.rl.algorithm == "xpo" and self.best["state"] is not None:
            self.load_state_dict({k: v.to(self.device) for k, v in self.best["state"].items()})
            step = self.best["round"]
            which = "the initial policy (pi_base)" if step == 0 else f"the policy after step {step}"
            rank_zero_info(f"XPO: keeping {which}, the best held-out J_beta ({self.best['j_beta']:.4f})")
