"""Tensor helpers shared by the model tests: the bytes a module really holds, and a fixed input for a transformer."""

from __future__ import annotations

from typing import Any

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantised tensor subclass holds its inner tensors (data, scales, zero points)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def allocated_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each counted once (tied weights share one tensor)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(tensor_bytes(t) for t in tensors.values())


def transformer_inputs(transformer: Any) -> dict[str, torch.Tensor]:
    """A fixed, seeded input for a FluxTransformer2DModel: 64 image tokens, 16 text tokens."""
    generator = torch.Generator().manual_seed(3)
    config = transformer.config
    tokens, text = 64, 16
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
    }
