"""Model identity and the on-disk cache of draws that lets a long `sharpen evaluate` run resume.

A model's fingerprint hashes its config files and its weight files (small files in full; for large ones
the size plus 1 MiB at the start, middle and end, which differ between fine-tuned versions of the same
architecture). Draws are cached one safetensors file per (kind, seed, prompt batch); the file name holds a
hash of everything that decides the draws: model and adapter fingerprints, dtype, sampling settings,
seed, and the exact prompt text and token ids. A rerun finds the file and draws nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch

from sharpening.checkpoint import write_atomically
from sharpening.types import PromptBatch, SampleBatch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json")
CACHE_FORMAT = 2  # part of every key: bumped whenever the draws for a given seed change (the sampler's race)


def file_digest(path: str, chunk_bytes: int = 1 << 20, full_below_bytes: int = 16 << 20) -> str:
    """sha256 of a file's size and content: all of it when small, else 1 MiB at start, middle and end."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= full_below_bytes:
            digest.update(f.read())
        else:
            for offset in (0, size // 2, size - chunk_bytes):
                f.seek(offset)
                digest.update(f.read(chunk_bytes))
    return digest.hexdigest()


def resolve_model_directory(name_or_path: str, revision: str | None = None) -> str | None:
    """The local directory holding a model: the path itself, or the hub cache snapshot (None if absent)."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # not in the hub cache (or not a hub id): no directory to fingerprint
        return None


def model_fingerprint(name_or_path: str, revision: str | None = None) -> dict:
    """{'source', 'directory', 'files': {name: {'bytes', 'sha256'}}, 'sha256'} of a model or adapter."""
    directory = resolve_model_directory(name_or_path, revision)
    files: dict[str, dict] = {}
    if directory is not None:
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and (name in CONFIG_FILES or name.endswith(WEIGHT_SUFFIXES)):
                files[name] = {"bytes": os.path.getsize(path), "sha256": file_digest(path)}
    # A moved or copied directory with the same files is the same model; without files, the name is all we know.
    summary = json.dumps(files if files else {"source": name_or_path, "revision": revision}, sort_keys=True)
    digest = hashlib.sha256(summary.encode()).hexdigest()
    return {"source": name_or_path, "directory": directory, "files": files, "sha256": digest}


def _prompt_digest(prompts: PromptBatch, texts: list[str]) -> str:
    """sha256 over each prompt's dataset index, exact text and unpadded token ids."""
    digest = hashlib.sha256()
    for i, text, ids, mask in zip(prompts.prompt_indices.tolist(), texts, prompts.prompt_ids, prompts.prompt_mask):
        digest.update(json.dumps([i, text, ids[mask].tolist()]).encode())
    return digest.hexdigest()


class DrawCache:
    """Draws on disk, one safetensors file per (kind, seed, prompt batch); ``directory=None`` disables it."""

    FIELDS = ("response_ids", "response_mask", "logprobs", "truncated")

    def __init__(self, directory: str | None, identity: dict) -> None:
        """``identity``: what decides the draws besides kind, seed, settings and prompts (model fingerprints, dtype)."""
        self.directory = directory
        self.identity = identity
        self.drawn = 0
        self.reused = 0

    def path(self, kind: str, seed: int, settings: dict, prompts: PromptBatch, texts: list[str]) -> str | None:
        """The file for one batch of draws; its name carries a hash of everything that decides them."""
        if self.directory is None:
            return None
        key = {"format": CACHE_FORMAT, "kind": kind, "seed": seed, "settings": settings, **self.identity}
        key["prompts"] = _prompt_digest(prompts, texts)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        first = int(prompts.prompt_indices[0])
        return os.path.join(self.directory, f"{kind}-seed{seed}-p{first:06d}-{digest}.safetensors")

    def get_or_draw(
        self, path: str | None, prompts: PromptBatch, exact: bool, draw: Callable[[], SampleBatch]
    ) -> SampleBatch:
        """The cached draws at ``path`` (tensors moved to the prompts' device), else ``draw()`` saved there."""
        tensors = self.load_or_draw(path, str(prompts.prompt_ids.device), lambda: sample_tensors(draw()))
        return SampleBatch(prompts, *(tensors[f] for f in self.FIELDS), exact_draws=exact)

    def load_or_draw(
        self, path: str | None, device: str, draw: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The tensors cached at ``path`` (on ``device``), else those ``draw()`` returns, saved there: the draws'
        FIELDS and whatever else a kind of draw needs on a resumed run (a power sampler's token counts)."""
        from safetensors.torch import load_file, save

        if path is not None and os.path.isfile(path):
            self.reused += 1
            return load_file(path, device=device)
        tensors = draw()
        self.drawn += 1
        if path is not None:  # whole or not at all: an interrupted run never leaves half a file under ``path``
            saved = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
            write_atomically(path, lambda file: file.write(save(saved)), binary=True, what="caching draws")
        return tensors


def sample_tensors(samples: SampleBatch) -> dict[str, torch.Tensor]:
    """The tensors of ``samples`` a cache file holds (DrawCache.FIELDS), by name."""
    return {f: getattr(samples, f) for f in DrawCache.FIELDS}


def cached_files(directory: str) -> list[str]:
    """Cache files under ``directory``, sorted (for inspection and tests)."""
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def load_cached(path: str) -> dict[str, torch.Tensor]:
    """One cache file's tensors: response_ids, response_mask, logprobs [B, N, T] and truncated [B, N]."""
    from safetensors.torch import load_file

    return load_file(path)
