"""FLOPs, counted one way: by ``torch.utils.flop_counter.FlopCounterMode``.

Every FLOP figure of s2h comes from torch's counter: the dense model's total and each layer's
share are taken during the graph analysis's one run (:class:`FlopCounter`, which also records
what every module call cost), and the exported model is measured with :func:`count_flops`.
The pruner's ratios (:mod:`s2h.pruner`) scale each layer's counted FLOPs by the kept fractions
of the groups they depend on (the layer handlers of :mod:`s2h.registry` say which), so the
hard network's ratio equals what the counter reports on the export.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCounter", "count_flops"]


class FlopCounter:
    """``FlopCounterMode`` plus the FLOPs of each module call (its children included).

    Use as a context manager around a forward pass, and call :meth:`enter` / :meth:`exit` from
    the module pre- / post-forward hooks of the modules of interest; :meth:`of` then gives a
    module's FLOPs summed over its calls.
    """

    def __init__(self) -> None:
        self.mode = FlopCounterMode(display=False)
        self._by_module: dict[int, int] = {}
        self._starts: list[int] = []

    def __enter__(self) -> FlopCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.mode.__exit__(exc_type, exc, tb)

    def total(self) -> int:
        """FLOPs counted so far."""
        return int(self.mode.get_total_flops())

    def enter(self, module: nn.Module) -> None:
        self._starts.append(self.total())

    def exit(self, module: nn.Module) -> None:
        start = self._starts.pop()
        self._by_module[id(module)] = self._by_module.get(id(module), 0) + self.total() - start

    def of(self, module: nn.Module) -> int:
        """FLOPs of every call of ``module`` seen so far (0 if it never ran)."""
        return self._by_module.get(id(module), 0)


@torch.no_grad()
def count_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` as torch's counter counts them (eval
    mode for the count; the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(*inputs)
    finally:
        model.train(was)
    return int(fc.get_total_flops())
