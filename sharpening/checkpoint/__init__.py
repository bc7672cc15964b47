"""The checkpoint stage: what a run keeps on disk, and how a run comes back from it.

- ``files``: files written whole or not at all (``write_atomically``, every file the package writes), checkpoints
  with their SHA-256 (``AtomicCheckpointIO``), a full disk explained, the leftovers of killed writes cleared.
- ``state``: a checkpoint holds the trainable weights only (a LoRA checkpoint is the adapter, never the base).
- ``export``: the fitted policy as a plain Hugging Face / PEFT directory (``save_policy``).
- ``resume``: a run's checkpoints, ``--ckpt_path last``, and whether a checkpoint fits the configuration,
  checked before any weights load.
"""

from sharpening.checkpoint.export import save_policy
from sharpening.checkpoint.files import (
    CHECKSUM_SUFFIX,
    AtomicCheckpointIO,
    DiskFullError,
    checksum_problem,
    disk_full_explained,
    leftovers,
    pid_alive,
    remove_checksum,
    remove_leftovers,
    verify_checkpoint,
    write_atomically,
    write_checkpoint,
)
from sharpening.checkpoint.resume import last_checkpoint, resume_problems, run_checkpoints
from sharpening.checkpoint.state import load_trainable_state, only_trainable, trainable_names, trainable_state_dict

__all__ = [
    "CHECKSUM_SUFFIX",
    "AtomicCheckpointIO",
    "DiskFullError",
    "checksum_problem",
    "disk_full_explained",
    "last_checkpoint",
    "leftovers",
    "load_trainable_state",
    "only_trainable",
    "pid_alive",
    "remove_checksum",
    "remove_leftovers",
    "resume_problems",
    "run_checkpoints",
    "save_policy",
    "trainable_names",
    "trainable_state_dict",
    "verify_checkpoint",
    "write_atomically",
    "write_checkpoint",
]
