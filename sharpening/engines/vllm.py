"""The ``vllm`` engine: vLLM draws the samples, colocated in this process, following the in-memory model.

vLLM starts at the first draw from the weights the run started from (``model_path``) and runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the policy's weights reach it by reference, never pickled. Before
every draw the engine makes vLLM serve exactly the model it is handed (``WeightSync``):

- a PEFT model with its adapter active: vLLM serves the adapter over the base it loaded (vLLM's LoRA). The
  adapter is written again, under a new LoRA id, whenever its weights changed, so a stale adapter is never served;
- a PEFT model with its adapter disabled (the frozen base of a LoRA run): the base vLLM loaded, no adapter;
- any other model (full fine-tuning, a frozen base copy, an evaluated model): its weights are pushed into the
  running engine when their checksum differs from what vLLM holds, and vLLM's prefix cache is reset.

Draws are exact in the sense of ``SamplingEngine``: prompts go in as token ids (the ones we score with), every
sample is its own request seeded by (seed, round, prompt index, sample index), so a prompt's samples do not depend
on the batch, and vLLM returns the raw (temperature-1, untruncated) log-prob of each drawn token. A parity probe
rescores a few responses per draw teacher-forced with our model; the largest difference of sequence log-probs is
``metrics()['engine/parity_max_abs_diff']``. Past ``parity_warn`` it warns once; past ``parity_refuse`` the
draw's log-probs are replaced by our teacher-forced ones (``engine/rescored`` = 1), so callers that reuse them
as scores stay exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from sharpening.engines.base import derive_seed
from sharpening.engines.config import SamplingConfig, VLLMConfig, is_exact_sampling
from sharpening.engines.vllm_sync import WeightSync
from sharpening.logprobs import sample_logprobs
from sharpening.types import PromptBatch, SampleBatch

log = logging.getLogger(__name__)


class _NoChatWarmup(logging.Filter):
    """vLLM warms up a chat template at start and logs a traceback when there is no tokenizer; the engine has
    none on purpose (token ids in and out), so that warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
# Started engines not yet closed, held strongly. vLLM keeps its parallel groups in process globals and any engine's
# shutdown destroys them, its finalizer's too when an engine is dropped unclosed (a run stopped by an error or a
# signal) and collected at some later moment, which would pull the groups from under the engine running then.
# So an engine is never dropped unclosed, and starting one closes the others first.
_STARTED: set[VLLMEngine] = set()


class VLLMEngine:
    """``SamplingEngine`` over vLLM, colocated (module docstring).

    Args:
        model_path: The weights the run started from (a directory or hub id); vLLM loads them once.
        cfg: ``VLLMConfig``.
        seed: vLLM's own seed (each request carries its own seed besides).
        lora_rank: The policy's LoRA rank when it trains an adapter; vLLM then serves adapters over the base.
    """

    def __init__(self, model_path: str, cfg: VLLMConfig, *, seed: int = 0, lora_rank: int | None = None):
        self.model_path, self.cfg, self.seed, self.lora_rank = model_path, cfg, seed, lora_rank
        self.llm = None
        self.sync: WeightSync | None = None
        self.sleeping = False
        self.on_cuda = False
        self.callers_group = False
        self._metrics: dict[str, float] = {}
        self._warned = False

    # -- starting ----------------------------------------------------------------------------------
    def start(self, model: torch.nn.Module) -> None:
        """Start vLLM on ``model``'s device type and dtype (the first draw calls this)."""
        for other in list(_STARTED):  # vLLM's parallel state is per process: one engine runs in it at a time
            if other is not self:
                log.info("closing an earlier vLLM engine (%s): one runs in a process at a time", other.model_path)
                other.close()
        param = next(model.parameters())
        on_cuda = param.device.type == "cuda"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in this process: weights pass by reference
        if not on_cuda:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.cpu_kv_cache_gb)
        from vllm import LLM

        logging.getLogger("vllm.renderers.base").addFilter(_NoChatWarmup())
        # Under DDP/FSDP vLLM joins the trainer's default process group instead of making one (every rank starts
        # its engine at the same draw, so its group calls line up); that group is not vLLM's to destroy
        self.callers_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        kwargs = {}
        if self.lora_rank is not None:
            rank = next((r for r in LORA_RANKS if r >= self.lora_rank), None)
            if rank is None:
                raise ValueError(f"LoRA rank {self.lora_rank}: vLLM serves ranks up to {LORA_RANKS[-1]}")
            kwargs |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        if on_cuda:
            kwargs |= {"gpu_memory_utilization": self.cfg.gpu_memory_utilization}
            kwargs |= {"enable_sleep_mode": self.cfg.sleep_while_training}
        eager = (not on_cuda) if self.cfg.enforce_eager is None else self.cfg.enforce_eager
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[param.dtype]
        with preserved_global_rng(), preserved_torch_threads():  # the trainer's RNG streams and threads stay its own
            self.llm = LLM(
                model=self.model_path,
                dtype=dtype,
                seed=self.seed,
                enforce_eager=eager,
                max_model_len=self.cfg.max_model_len,
                skip_tokenizer_init=True,  # prompts are token ids and responses are decoded by the caller
                logprobs_mode="raw_logprobs",  # the model's own log-probs, before temperature, top-k or top-p
                trust_remote_code=False,
                **kwargs,
            )
        self.sync = WeightSync(self.llm, self.lora_rank)
        _STARTED.add(self)

    # -- drawing -----------------------------------------------------------------------------------
    def generate(
        self,
        model: torch.nn.Module,
        prompts: PromptBatch,
        cfg: SamplingConfig,
        eos_token_id: int | list[int],
        pad_token_id: int,
        seed: int = 0,
        round_index: int = 0,
        stop_unselectable: int = 0,
    ) -> SampleBatch:
        """N draws per prompt from ``model`` (served by vLLM); ``stop_unselectable`` is ignored (vLLM draws
        every sample to its end, so ``pruned`` is None)."""
        if self.llm is None:
            self.start(model)
        elif self.sleeping:
            self.llm.wake_up()
            self.llm.reset_prefix_cache()  # the KV cache's contents were discarded by the sleep
            self.sleeping = False
        lora_request = self.sync.request_for(model)
        with preserved_global_rng():  # every request has its own seed; vLLM's batch draws touch the global RNG
            outputs = self.llm.generate(
                self._requests(prompts, cfg),
                self._params(prompts, cfg, eos_token_id, seed, round_index),
                use_tqdm=False,
                lora_request=lora_request,
            )
        samples = _sample_batch(prompts, outputs, cfg, eos_token_id, pad_token_id)
        self.on_cuda = samples.response_ids.device.type == "cuda"
        return self._probe(model, samples)

    def idle(self) -> None:
        """CUDA with ``sleep_while_training``: free the KV cache and offload vLLM's weights while the trainer
        steps (level 1: the weights come back at the next draw, then the sync brings them up to date)."""
        if self.llm is not None and self.on_cuda and self.cfg.sleep_while_training and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    @staticmethod
    def _requests(prompts: PromptBatch, cfg: SamplingConfig) -> list:
        from vllm.inputs import TokensPrompt

        ids = [row[mask].tolist() for row, mask in zip(prompts.prompt_ids.cpu(), prompts.prompt_mask.cpu())]
        return [TokensPrompt(prompt_token_ids=p) for p in ids for _ in range(cfg.samples_per_prompt)]

    @staticmethod
    def _params(prompts: PromptBatch, cfg: SamplingConfig, eos, seed: int, round_index: int) -> list:
        from vllm import SamplingParams

        stop = [eos] if isinstance(eos, int) else list(eos)
        return [
            SamplingParams(
                n=1,
                temperature=cfg.temperature,
                top_k=cfg.top_k if cfg.top_k > 0 else -1,
                top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens,
                logprobs=0,
                seed=derive_seed(seed, round_index, int(index), j),
                stop_token_ids=stop,
                ignore_eos=False,
                detokenize=False,
            )
            for index in prompts.prompt_indices.tolist()
            for j in range(cfg.samples_per_prompt)
        ]

    def _probe(self, model: torch.nn.Module, samples: SampleBatch) -> SampleBatch:
        """The parity probe (module docstring): compare vLLM's sequence log-probs with ours on a few responses."""
        k = min(self.cfg.parity_samples, samples.response_ids.shape[0] * samples.samples_per_prompt)
        if k == 0:
            self._metrics = {}
            return samples
        b, n, t = samples.response_ids.shape
        rows = torch.linspace(0, b * n - 1, k).round().long().unique()  # spread over prompts and samples
        probe = _rows(samples, rows)  # [k, 1, T]
        with torch.no_grad():
            ours = sample_logprobs(model, probe)  # [k, 1, T]
        theirs = probe.logprobs.to(ours.device)
        diff = ((ours - theirs) * probe.response_mask).sum(-1).abs().max().item()
        self._metrics = {"engine/parity_max_abs_diff": diff, "engine/rescored": 0.0}
        if diff > self.cfg.parity_warn and not self._warned:
            self._warned = True
            warnings.warn(
                f"vLLM's sequence log-probs differ from the model's own by up to {diff:.3g} nats "
                f"(sampling.vllm.parity_warn={self.cfg.parity_warn}); past parity_refuse={self.cfg.parity_refuse} "
                "draws are rescored teacher-forced. Logged as engine/parity_max_abs_diff.",
                stacklevel=2,
            )
        if diff <= self.cfg.parity_refuse:
            return samples
        self._metrics["engine/rescored"] = 1.0
        with torch.no_grad():
            logprobs = sample_logprobs(model, samples).to(samples.logprobs.device)  # [B, N, T]
        return SampleBatch(
            samples.prompts,
            samples.response_ids,
            samples.response_mask,
            logprobs,
            samples.truncated,
            samples.exact_draws,
            samples.pruned,
        )

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def close(self) -> None:
        """Shut vLLM down and remove the adapters it was served from (the engine's own temporary files). The
        process group of a DDP/FSDP run outlives the engine (``keep_callers_process_group``)."""
        if self.sync is not None:
            self.sync.close()
        if self.llm is not None:
            engine = getattr(self.llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                with keep_callers_process_group(self.callers_group):
                    shutdown()
            self.llm = None
            self.sync = None
        _STARTED.discard(self)


@contextlib.contextmanager
def preserved_global_rng():
    """Python's, NumPy's and torch's global RNG states (CPU and CUDA) as they were before the block: vLLM in this
    process reseeds them at start and draws from them, which would tie the trainer's dropout and shuffles to the
    engine (and make a resumed run, whose engine starts at another step, differ from the straight one)."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_torch_threads():
    """torch's intra-op thread count and ``torch.set_num_threads`` as they were: vLLM's CPU worker sets one thread
    for serving and replaces ``set_num_threads`` with a no-op for the rest of the process, which would leave the
    trainer, in the same process, on one core."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)


@contextlib.contextmanager
def keep_callers_process_group(callers: bool):
    """vLLM's shutdown destroys the default process group; when the caller made that group (a DDP/FSDP run), only
    vLLM's own subgroups go and the default group stays for the trainer."""
    if not callers:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_own_groups(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_own_groups
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def _sample_batch(prompts: PromptBatch, outputs, cfg: SamplingConfig, eos, pad_token_id: int) -> SampleBatch:
    """vLLM's outputs (one request per sample, prompt-major) as a ``SampleBatch`` [B, N, T]."""
    stop = {eos} if isinstance(eos, int) else set(eos)
    b, n = len(prompts), cfg.samples_per_prompt
    tokens = [list(o.outputs[0].token_ids) for o in outputs]  # [B*N][len]
    t = max(1, max(len(x) for x in tokens))
    ids = torch.full((b * n, t), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(b * n, t, dtype=torch.float32)
    lengths = torch.tensor([len(x) for x in tokens])
    for row, (out, toks) in enumerate(zip(outputs, tokens)):
        ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        sampled = out.outputs[0].logprobs  # per position: {token id: Logprob}
        logprobs[row, : len(toks)] = torch.tensor([pos[tok].logprob for pos, tok in zip(sampled, toks)])
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B*N, T]
    ended = torch.tensor([len(x) > 0 and x[-1] in stop for x in tokens])
    device = prompts.prompt_ids.device
    return SampleBatch(
        prompts,
        ids.view(b, n, t).to(device),  # [B*N, T] -> [B, N, T]
        mask.view(b, n, t).to(device),
        logprobs.view(b, n, t).to(device),
        (~ended).view(b, n).to(device),
        is_exact_sampling(cfg.temperature, cfg.top_k, cfg.top_p),
    )


def _rows(samples: SampleBatch, rows: torch.Tensor) -> SampleBatch:
    """Rows (flat indices into B*N) of ``samples`` as their own batch [k, 1, T], each with its prompt."""
    b, n, t = samples.response_ids.shape
    prompt_rows = rows // n
    device = samples.response_ids.device
    prompts = samples.prompts
    sub_prompts = PromptBatch(
        prompts.prompt_ids[prompt_rows.to(prompts.prompt_ids.device)],
        prompts.prompt_mask[prompt_rows.to(prompts.prompt_mask.device)],
        prompts.prompt_indices[prompt_rows.to(prompts.prompt_indices.device)],
        [prompts.answers[i] for i in prompt_rows.tolist()],
    )
    pick = rows.to(device)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b * n, *x.shape[2:])[pick].unsqueeze(1)  # [B, N, ...] -> [k, 1, ...]

    return SampleBatch(
        sub_prompts,
        flat(samples.response_ids),
        flat(samples.response_mask),
        flat(samples.logprobs),
        flat(samples.truncated),
        samples.exact_draws,
    )
