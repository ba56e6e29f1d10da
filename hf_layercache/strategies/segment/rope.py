"""Moving stored keys to new positions: rotary position embeddings compose, so a key rotated for position ``a`` is
rotated for ``b`` by one more rotation of ``b - a`` (the values carry no position)."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class Rerotation:
    """Rotates the keys of every layer by a position offset, with each layer's own rotary frequencies (Gemma 3's
    local and global layers differ), in the half-split convention the supported models use."""

    def __init__(self, base_model: nn.Module):
        self.rotary = base_model.rotary_emb
        config = base_model.config
        typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        types = getattr(config, "layer_types", None) if typed else None
        self.layer_types: list[str | None] = list(types) if types else [None] * config.num_hidden_layers

    def rotate(self, keys: torch.Tensor, offset: int) -> torch.Tensor:
        """``keys`` (layers, heads, tokens, dim) rotated by ``offset`` positions (a copy; the stored keys stay)."""
        if offset == 0:
            return keys
        out = keys.clone()
        for layer_type in dict.fromkeys(self.layer_types):
            layers = [i for i, t in enumerate(self.layer_types) if t == layer_type]
            cos, sin = self._cos_sin(keys, offset, layer_type)
            width = cos.shape[-1]  # partial rotary (Phi-3 variants): the first ``width`` dims rotate
            part = keys[layers, ..., :width]
            out[layers, ..., :width] = part * cos + _rotate_half(part) * sin
        return out

    def _cos_sin(self, keys: torch.Tensor, offset: int, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        position = torch.tensor([[offset]], device=keys.device)
        probe = keys.new_zeros(1)
        if layer_type is None:
            cos, sin = self.rotary(probe, position)
            scaling = getattr(self.rotary, "attention_scaling", 1.0)
        else:
            cos, sin = self.rotary(probe, position, layer_type)
            scaling = getattr(self.rotary, f"{layer_type}_attention_scaling", 1.0)
        # the embedding scales cos and sin (YaRN); a rotation must not, or the keys would be scaled once more
        return (cos[0, 0] / scaling).to(keys.dtype), (sin[0, 0] / scaling).to(keys.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
