"""Helpers shared by the tests that run the trainer and compare runs."""

from __future__ import annotations

import torch

from s2h import trainer


def same_state(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Two checkpoints hold the same model, gate logits, widths and step count."""
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=atol), k
    for k in a["pruner"]["gates"]:
        assert torch.allclose(a["pruner"]["gates"][k]["logits"],
                              b["pruner"]["gates"][k]["logits"], atol=atol), k
    assert a["pruner"]["widths"] == b["pruner"]["widths"]
    assert a["pruner"]["step_count"] == b["pruner"]["step_count"]


def keep_checkpoints(monkeypatch) -> dict:
    """Every checkpoint the trainer writes, kept by step (``{step: state}``)."""
    saved: dict = {}
    orig = trainer._atomic_save

    def keep(obj, path):
        orig(obj, path)
        saved[obj["step"]] = torch.load(path, weights_only=True)

    monkeypatch.setattr(trainer, "_atomic_save", keep)
    return saved
