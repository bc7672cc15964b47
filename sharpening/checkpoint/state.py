"""A checkpoint holds the trainable weights only: a LoRA checkpoint is the adapter, never the base, and
the frozen copy of full fine-tuning is reloaded from the model path, never saved.

Parameters are read and written directly, never through module state-dict hooks: bitsandbytes' 4-bit
serializer mutates the packed weights in place on CPU, and its load hooks re-quantize them, either of
which would perturb a QLoRA run's frozen base. ``PolicyModule``'s ``state_dict`` / ``load_state_dict`` /
``on_save_checkpoint`` call these.
"""

from __future__ import annotations

import collections

import torch


def trainable_names(module: torch.nn.Module) -> set[str]:
    """Names of the parameters that train (``requires_grad``): the ones a checkpoint holds."""
    return {name for name, param in module.named_parameters() if param.requires_grad}


def trainable_state_dict(
    module: torch.nn.Module, destination: dict | None = None, prefix: str = "", keep_vars: bool = False
) -> dict[str, torch.Tensor]:
    """``module``'s trainable parameters under ``prefix + name``, detached unless ``keep_vars``, added to
    ``destination`` (a new ordered dict by default), as ``nn.Module.state_dict`` would."""
    out = collections.OrderedDict() if destination is None else destination
    for name, param in module.named_parameters():
        if param.requires_grad:
            out[prefix + name] = param if keep_vars else param.detach()
    return out


def only_trainable(state_dict: dict, module: torch.nn.Module) -> dict:
    """The entries of a full state dict that train in ``module`` (FSDP gathers every parameter, frozen ones too)."""
    trainable = trainable_names(module)
    return {name: value for name, value in state_dict.items() if name in trainable}


def load_trainable_state(
    module: torch.nn.Module, state_dict: dict, strict: bool, model: str
) -> torch.nn.modules.module._IncompatibleKeys:
    """Copy a checkpoint's trainable weights into ``module``'s parameters in place; other entries are
    ignored. ``strict``: a missing trainable weight or an entry that is none raises, naming ``model``
    (how the run's model and finetuning mode were given), since the checkpoint came from another model."""
    params = dict(module.named_parameters())
    trainable = trainable_names(module)
    missing = sorted(trainable - set(state_dict))
    unexpected = sorted(name for name in state_dict if name not in trainable)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"checkpoint does not fit this model ({model}): missing {missing[:4]}, unexpected {unexpected[:4]}. "
            "Resume with the model and finetuning mode that wrote the checkpoint."
        )
    with torch.no_grad():
        for name, value in state_dict.items():
            if name in trainable:
                params[name].copy_(value)
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)
