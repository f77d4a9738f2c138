"""Small helpers shared by the pruners: positional inputs, memory format, module surgery."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: positional inputs of a model: one tensor, or a tuple of them (and other arguments)
Inputs = Any

__all__ = ["Inputs", "as_tuple", "channels_last_inputs", "set_submodule", "use_channels_last"]


def as_tuple(inputs: Inputs) -> tuple:
    """``inputs`` as a tuple of positional arguments (a single tensor becomes a 1-tuple)."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def use_channels_last(model: nn.Module, device: torch.device | str) -> bool:
    """Convert a conv model to channels-last when it runs on CUDA; returns whether it did.

    The fused conv kernels (and cuDNN in bf16/fp16) are fast in channels-last (NHWC): their
    loads are contiguous over channels, which is also where the kept-channel gathers act. On
    the CPU the layout is left as it is.
    """
    if torch.device(device).type != "cuda" or not any(
        isinstance(m, nn.Conv2d) for m in model.modules()
    ):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def channels_last_inputs(inputs: tuple) -> tuple:
    """4-D floating tensors of ``inputs`` in channels-last memory format (others unchanged)."""
    return tuple(
        t.contiguous(memory_format=torch.channels_last)
        if isinstance(t, torch.Tensor) and t.dim() == 4 and torch.is_floating_point(t) else t
        for t in inputs
    )


@torch.no_grad()
def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at ``name`` -- and at every other name of the same module object
    (``self.c2 = self.c`` registers one module twice: both names must see the replacement)."""
    old = root.get_submodule(name) if name else root
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for n in names:
        parent_name, _, attr = n.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, module)
