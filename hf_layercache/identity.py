"""Which model a warm cache belongs to: the identity saved in its header and compared on load.

A cache is only valid for the weights that filled it. The identity records the class, ``model_type``, layer count,
hidden size, dtype and a hash of the weights; :func:`identity_differences` names what differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

_SAMPLES_PER_TENSOR = 4096


def _named_weights(model: torch.nn.Module):
    """Parameters and buffers with their real values, also those accelerate offloaded to CPU or disk (meta)."""
    for module_name, module in model.named_modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor.device.type == "meta" and weights_map is not None and name in weights_map:
                tensor = weights_map[name]
            yield f"{module_name}.{name}" if module_name else name, tensor


def weights_hash(model: torch.nn.Module) -> str:
    """A blake2b over every weight's name, shape, dtype and an evenly strided sample of its values.

    Sampling keeps this to milliseconds for large models while any fine-tune, merge or re-quantisation (which
    changes most elements of the tensors it touches) changes the hash. Offloaded weights are read where they live.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(_named_weights(model), key=lambda item: item[0]):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def model_identity(model: torch.nn.Module, num_layers: int) -> dict[str, Any]:
    from .models import model_spec  # imports torch

    config = getattr(model, "config", None)
    dtype = getattr(model, "dtype", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": num_layers,
        "hidden_size": model_spec(model).hidden_size,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "weights_hash": weights_hash(model),
    }


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences that make a saved cache unusable for the current model."""
    keys = ("model_type", "num_layers", "hidden_size", "dtype", "weights_hash")
    return [
        f"{k}: cache has {saved.get(k)!r}, model has {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
