"""Latency with a noise check, on a mocked clock: the models advance a fake timer by scripted
amounts, so what the table prints is known exactly."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from s2h import latency, trainer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Scripted(nn.Module):
    """A model whose forward takes ``ms(call_index)`` milliseconds on the fake clock."""

    def __init__(self, clock: Clock, ms):
        super().__init__()
        self.clock, self.ms, self.calls = clock, ms, 0

    def forward(self, x):
        self.clock.t += self.ms(self.calls) / 1e3
        self.calls += 1
        return x


def _summary(lat, noisy_key: bool) -> dict:
    rows = {"dense": {"accuracy": 90.0, "flops": 100e6, "params": 1e6},
            "exported": {"accuracy": 89.0, "flops": 35e6, "params": 0.5e6}}
    for name in ("dense", "exported"):
        rows[name]["latency_ms_b1"] = lat[name]
        rows[name]["latency_spread_b1"] = lat.spread[name]
    return {"rows": rows, "config": {"out": "o", "method": "s2h"}, "device": "cpu",
            "latency_noisy": {"latency_ms_b1": noisy_key},
            "export_matches_hard_network": True}


def test_quiet_machine_gives_the_ratio(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(latency, "_timer", clock)
    jitter = [0.0, 0.02, -0.01, 0.01]
    pair = {"dense": Scripted(clock, lambda i: 3.0 + jitter[i % 4]),
            "exported": Scripted(clock, lambda i: 1.5 + jitter[(i + 1) % 4])}
    lat = trainer.compare_latency(pair, (1, 3, 4, 4), torch.device("cpu"), rounds=30, warmup=3)
    assert pair["dense"].calls == 3 + 30  # warm-up, then 3 blocks of 10 rounds
    dense = statistics.median(3.0 + jitter[i % 4] for i in range(3, 33))
    small = statistics.median(1.5 + jitter[(i + 1) % 4] for i in range(3, 33))
    assert lat["dense"] == pytest.approx(dense, abs=1e-9)
    assert lat["exported"] == pytest.approx(small, abs=1e-9)
    assert not lat.noisy and max(lat.spread.values()) < 0.02
    assert lat.ratio("dense", "exported") == pytest.approx(dense / small)
    table = trainer.format_table(_summary(lat, lat.noisy))
    line = next(x for x in table.splitlines() if "latency batch 1" in x)
    assert line.rstrip().endswith(f"{dense / small:.2f}x") and "noisy" not in line


def test_load_changing_between_blocks_says_noisy_machine(monkeypatch):
    """Batch 1 slower than it should be in the second block only (load came and went): the
    block medians disagree by far more than the limit, so no ratio is printed."""
    clock = Clock()
    monkeypatch.setattr(latency, "_timer", clock)
    warm = 2

    def loaded(base):
        return lambda i: base * (2.5 if warm + 10 <= i < warm + 20 else 1.0)

    pair = {"dense": Scripted(clock, loaded(2.0)), "exported": Scripted(clock, loaded(1.0))}
    lat = latency.time_side_by_side(pair, torch.zeros(1), rounds=30, warmup=warm)
    assert lat.spread["dense"] == pytest.approx((5.0 - 2.0) / 2.0)  # block medians 2, 5, 2
    assert lat.noisy and lat.ratio("dense", "exported") is None
    table = trainer.format_table(_summary(lat, lat.noisy))
    line = next(x for x in table.splitlines() if "latency batch 1" in x)
    assert "noisy machine (medians spread 150%)" in line and not line.rstrip().endswith("x")
    # the same numbers under a looser limit are trusted
    loose = latency.Latency(dict(lat), lat.spread, limit=2.0)
    assert not loose.noisy and loose.ratio("dense", "exported") == pytest.approx(2.0)
