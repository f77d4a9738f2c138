"""Side-by-side latency with a noise check (``s2h prune``'s table, ``bench/export_latency.py``).

The models are timed alternating within every round, so load that drifts hits them alike; the
rounds are split into ``repeats`` blocks and each block's median is taken per model. The
*spread* of a model is ``(max - min) / median`` of its block medians: on a quiet machine it is a
few percent; when it exceeds ``limit`` (default :data:`NOISE_LIMIT`) the machine's load, not
the model, decides the numbers, and :meth:`Latency.ratio` returns ``None`` (tables print
"noisy machine" instead of a speed-up).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

__all__ = ["NOISE_LIMIT", "Latency", "time_side_by_side"]

#: largest relative spread of a model's block medians for a latency to be trusted
NOISE_LIMIT = 0.10

_timer = time.perf_counter  # replaced by tests (a mocked clock)


class Latency(dict):
    """``{model name: median ms}`` plus ``spread`` (same keys), ``limit`` and ``noisy``."""

    def __init__(self, ms: dict[str, float], spread: dict[str, float], limit: float) -> None:
        super().__init__(ms)
        self.spread = dict(spread)
        self.limit = float(limit)

    @property
    def noisy(self) -> bool:
        return any(s > self.limit for s in self.spread.values())

    def ratio(self, num: str, den: str) -> float | None:
        """``self[num] / self[den]`` (a speed-up when ``num`` is the slower model), or None on a
        noisy machine."""
        return None if self.noisy else self[num] / self[den]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_side_by_side(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int,
                      warmup: int = 2, repeats: int = 3, limit: float = NOISE_LIMIT) -> Latency:
    """Median ms per forward of each model on ``x``, the models alternating within every round;
    ``rounds`` in all (at least one per block), split into ``repeats`` blocks for the spread."""
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            m(x)
    _sync(x.device)
    per_block = max(1, math.ceil(rounds / repeats))
    times: dict[str, list[float]] = {k: [] for k in models}
    medians: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        block: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(per_block):
            for k, m in models.items():
                _sync(x.device)
                t = _timer()
                m(x)
                _sync(x.device)
                block[k].append((_timer() - t) * 1e3)
        for k, v in block.items():
            medians[k].append(statistics.median(v))
            times[k] += v
    ms = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / max(statistics.median(v), 1e-12)
              for k, v in medians.items()}
    return Latency(ms, spread, limit)
