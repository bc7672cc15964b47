"""How the vLLM engine keeps vLLM serving exactly the in-memory model it is handed (``WeightSync``): the LoRA
adapter under a new id when it changed, no adapter for a LoRA run's frozen base, or the full weights pushed into
the running engine when their checksum changed (with vLLM's prefix cache reset). Used by engines/vllm.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def served_name(name: str) -> str:
    """A parameter's checkpoint name with FSDP / activation-checkpointing / torch.compile wrappers removed.

    >>> served_name("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj.weight'
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def weights_checksum(tensors) -> tuple[float, ...]:
    """Two float64 statistics per tensor (sum, L2 norm): any optimizer update, load or copy changes them."""
    stats = []
    for t in tensors:
        t = t.detach()
        stats.append(t.sum(dtype=torch.float64))
        stats.append(torch.linalg.vector_norm(t, dtype=torch.float64))
    return tuple(torch.stack(stats).tolist()) if stats else ()


def _peft_model(model: torch.nn.Module):
    """``model`` when it is a PEFT model, else None (peft imported only to check)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return model if isinstance(model, PeftModel) else None


def adapter_active(peft_model) -> bool:
    """False inside ``peft_model.disable_adapter()`` (the frozen base of a LoRA run)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and not any(layer.disable_adapters for layer in layers)


def write_adapter(config, lora: dict[str, torch.Tensor], adapter_name: str, path: str) -> None:
    """A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) from the LoRA parameters as
    ``named_parameters`` names them: wrappers and the adapter's name removed, as PEFT saves them. Written from the
    parameters rather than ``save_pretrained`` so FSDP's state-dict hooks never run on gathered weights."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    tensors = {
        served_name(n).replace(f".{adapter_name}.", "."): p.detach().to("cpu").contiguous() for n, p in lora.items()
    }
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))


class WeightSync:
    """What vLLM serves, and how to make it serve a given in-memory model (module docstring)."""

    def __init__(self, llm, lora_rank: int | None):
        self.llm, self.lora_rank = llm, lora_rank
        self.held: tuple | None = None  # checksum of the weights pushed into vLLM; None: the ones it loaded
        self.adapter_checksum: tuple | None = None
        self.adapter_request = None
        self.adapter_count = 0
        self.adapter_root = tempfile.mkdtemp(prefix="sharpening-vllm-adapters-") if lora_rank else None
        self.pushes = 0

    def request_for(self, model: torch.nn.Module):
        """Make vLLM serve ``model``; returns the LoRA request to draw with (None: no adapter)."""
        peft = _peft_model(model)
        if peft is None:
            self._push_full(model)
            return None
        if self.held is not None:  # a LoRA run never pushes full weights; the base is what vLLM loaded
            raise RuntimeError("vLLM holds pushed full weights but is asked for a LoRA model")
        if not adapter_active(peft):
            return None
        if self.lora_rank is None:
            raise RuntimeError(
                "the model to sample from carries a LoRA adapter but the vLLM engine was made without lora_rank"
            )
        return self._adapter(peft)

    def _push_full(self, model: torch.nn.Module) -> None:
        if self.lora_rank is not None:
            raise RuntimeError("a LoRA run's vLLM engine serves adapters; it was handed a model without one")
        # parameters, not state_dict(): no FSDP state-dict hooks (the caller has gathered the weights), and tied
        # weights appear once (vLLM ties them itself)
        named = [(served_name(n), p.detach()) for n, p in model.named_parameters()]
        checksum = weights_checksum(p for _, p in named)
        if checksum == self.held:
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the weights just replaced
        self.held = checksum
        self.pushes += 1

    def _adapter(self, peft):
        from vllm.lora.request import LoRARequest

        name = peft.active_adapter
        lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
        checksum = weights_checksum(lora.values())
        if checksum != self.adapter_checksum or self.adapter_request is None:
            self.adapter_count += 1
            path = os.path.join(self.adapter_root, f"adapter-{self.adapter_count}")
            write_adapter(peft.peft_config[name], lora, name, path)
            previous = self.adapter_request
            # a new id: vLLM caches adapters by id, so the same id would serve the stale weights
            self.adapter_request = LoRARequest(f"policy-{self.adapter_count}", self.adapter_count, path)
            self.adapter_checksum = checksum
            if previous is not None:
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
                shutil.rmtree(previous.lora_path, ignore_errors=True)
            self.pushes += 1
        return self.adapter_request

    def close(self) -> None:
        if self.adapter_root:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
