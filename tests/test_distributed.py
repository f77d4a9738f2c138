"""`torchrun --nproc_per_node 2 -m s2h prune` on CPU (gloo): the two-backward S2H step under
data parallelism, against a single process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from s2h.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An MLP (no BatchNorm): per-rank batch statistics would make the two runs differ by design;
# with gradient averaging everything else is the same computation up to float rounding.
ARGS = ["prune", "--dataset", "synthetic", "--model", "mlp", "--batch-size", "32",
        "--epochs", "2", "--steps-per-epoch", "3", "--eval-batches", "2", "--no-progress",
        "--target-flops", "0.4", "--divisor", "16", "--no-latency", "--log-every", "1",
        "--ckpt-every", "2", "--device", "cpu", "--no-plots"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, capsys):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*ARGS, "--out", str(single)]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}

    def torchrun():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "s2h", *ARGS, "--out", str(ddp)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    res = torchrun()
    if res.returncode != 0 and "terminate called without an active exception" in res.stderr \
            and "exported == hard network" in res.stdout:
        # Seen once in ~25 runs: a rank aborts in torch's gloo teardown *after* the run has
        # finished and written everything (known, not yet root-caused: see the session notes).
        # Run once more from scratch; a second failure, or any other failure, fails the test.
        shutil.rmtree(ddp)
        res = torchrun()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    # rank 0 alone reports and writes: one header, one table, each metrics row once
    assert out.count("s2h prune: mlp") == 1 and "2 processes x batch 16" in out
    assert out.count("test accuracy (%)") == 1 and out.count("epoch 2/2") == 1
    rows = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == list(range(1, 7))
    for name in ("checkpoint.pt", "summary.json", "exported/model.safetensors"):
        assert (ddp / name).exists(), name
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2

    a = torch.load(single / "checkpoint.pt", weights_only=True)
    b = torch.load(ddp / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k
    for k in a["pruner"]["gates"]:
        assert torch.allclose(a["pruner"]["gates"][k]["logits"], b["pruner"]["gates"][k]["logits"],
                              atol=1e-5, rtol=1e-4), k
    assert a["pruner"]["widths"] == b["pruner"]["widths"]
    # the gates did move from their initial logits (else equality says little about their
    # gradients); logits are kept centred during training, so compare centred
    from s2h.gates import ChannelGate

    moved = []
    for v in b["pruner"]["gates"].values():
        init = ChannelGate(16 * v["logits"].numel(), 16).logits.detach()
        moved.append(not torch.allclose(v["logits"], init - init.mean(), atol=1e-3))
    assert any(moved)
    ra = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rows, strict=True):
        if x["kind"] == "epoch":
            assert x["test_soft_acc"] == y["test_soft_acc"]
            assert x["test_hard_acc"] == y["test_hard_acc"]


@pytest.mark.parametrize("batch", ["33"])
def test_global_batch_must_split_over_the_processes(tmp_path, capsys, monkeypatch, batch):
    """The world size comes from torchrun's variables; a global batch that does not divide
    is refused before any process group is needed (checked here with a fake world of 2)."""
    from s2h import distributed

    monkeypatch.setattr(distributed, "init_from_env",
                        lambda device_type: distributed.DistInfo(0, 2, 0))
    code = main([*ARGS, "--batch-size", batch, "--out", str(tmp_path / "x")])
    assert code == 2 and "not divisible by the 2 processes" in capsys.readouterr().err
