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


def _torchrun(args: list[str], out) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m s2h <args> --out <out>`` (gloo, one thread each)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}

    def once():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "s2h", *args, "--out", str(out)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    res = once()
    if res.returncode != 0 and "terminate called without an active exception" in res.stderr \
            and "exported == hard network" in res.stdout:
        # Seen once in ~25 runs before `python -m s2h` skipped the interpreter's teardown under
        # torchrun (s2h/__main__.py): a rank aborted in gloo's teardown *after* the run had
        # finished and written everything. Kept as a guard: run once more from scratch; a
        # second failure, or any other failure, fails the test.
        shutil.rmtree(out)
        res = once()
    return res


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, capsys):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*ARGS, "--out", str(single)]) == 0
    capsys.readouterr()
    res = _torchrun(ARGS, ddp)
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


# --------------------------------------------------------------------------- STP (issue 13)
class _ResMLP(torch.nn.Module):
    """A residual MLP (no BatchNorm: per-sample ops only, so 2 processes x 8 samples compute
    what one process computes on the 16): width groups and two droppable blocks."""

    def __init__(self) -> None:
        super().__init__()
        from torch import nn

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

            def forward(self, x):
                return x + self.fc2(torch.relu(self.fc1(x)))

        self.stem = nn.Linear(12, 16)
        self.stage = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))


def _stp_worker(rank: int, world: int, port: int, out: str, scoring: str = "probe",
                steps: int = 16) -> None:
    """STP on the global batch of 16 split over ``world`` processes (gloo), gradients averaged
    as the trainer does; writes what decides the architecture to ``out``."""
    import torch.distributed as dist

    from s2h import distributed
    from s2h.stp import STPPruner

    torch.set_num_threads(1)
    info = distributed.DistInfo(rank, world, rank)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    torch.manual_seed(0)
    model = _ResMLP()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    n = 16 // world
    xl, yl = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    # probe scoring: probe_size is per process; the 16 samples in all, as in one process
    p = STPPruner(model, x[:2], 0.3, divisor=4, trials=1, expand_prob=0.5, scoring=scoring,
                  probe_size=n, warn=False)
    params = list(p.weight_parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        p.train_step(xl, yl, opt, grad_hook=lambda: distributed.average_gradients(params, info))
    state = p.state_dict()
    with open(out, "w") as f:
        json.dump({"commits": p.commits, "widths": p.widths(), "dropped": sorted(p.base.dropped),
                   "last_scores": state["last_scores"], "round": state["round"]}, f)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("scoring", ["probe", "trial"])
def test_stp_two_gloo_processes_commit_what_one_process_commits(tmp_path, scoring):
    """Every rank commits the same architecture, the one-process run's on the same global
    batch; the per-candidate KD losses (all-reduced over the ranks) match it to float rounding."""
    _stp_worker(0, 1, 0, str(tmp_path / "single.json"), scoring)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1"}
    # os._exit once the worker has written its result and destroyed its process group: it
    # skips interpreter finalization, where torch's gloo teardown aborts now and then
    # ("terminate called without an active exception", SIGABRT; in CI on 2026-11-29 after a
    # finished run). This test is about what STP commits; the product's own exit path is
    # tested under torchrun (test_two_gloo_processes_match_one_process).
    procs = [subprocess.Popen(
        [sys.executable, "-c", "import os, sys, test_distributed as t; "
         "t._stp_worker(int(sys.argv[1]), 2, int(sys.argv[2]), sys.argv[3], sys.argv[4]); "
         "sys.stdout.flush(); os._exit(0)",
         str(r), str(port), str(tmp_path / f"rank{r}.json"), scoring], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
    one = json.loads((tmp_path / "single.json").read_text())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(one["commits"]) >= 2  # the exploration did decide something
    for got in ranks:
        assert got["widths"] == one["widths"] and got["dropped"] == one["dropped"]
        assert [(c["kind"], c["name"]) for c in got["commits"]] == \
            [(c["kind"], c["name"]) for c in one["commits"]]
        for a, b in zip(got["commits"], one["commits"], strict=True):
            assert a["kd"] == pytest.approx(b["kd"], rel=1e-5, abs=1e-7)
        assert [s[:2] for s in got["last_scores"]] == [s[:2] for s in one["last_scores"]]
        for a, b in zip(got["last_scores"], one["last_scores"], strict=True):
            assert a[2] == pytest.approx(b[2], rel=1e-5, abs=1e-7)
    assert ranks[0] == ranks[1]  # bit-identical on the two ranks


@pytest.mark.slow  # two CLI runs (one of them two processes): about half a minute
def test_stp_torchrun_matches_one_process(tmp_path, capsys):
    """``torchrun -m s2h prune --method stp``: rank 0's checkpoint holds the one-process run's
    commits (same candidates, same all-reduced KD losses) and architecture."""
    args = [*ARGS, "--method", "stp", "--stp-trials", "1", "--target-flops", "0.2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*args, "--out", str(single)]) == 0
    capsys.readouterr()
    res = _torchrun(args, ddp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "method stp" in res.stdout and "2 processes x batch 16" in res.stdout
    a = torch.load(single / "checkpoint.pt", weights_only=True)["pruner"]
    b = torch.load(ddp / "checkpoint.pt", weights_only=True)["pruner"]
    assert len(a["commits"]) >= 2
    assert [(c["kind"], c["name"]) for c in a["commits"]] == \
        [(c["kind"], c["name"]) for c in b["commits"]]
    for x, y in zip(a["commits"], b["commits"], strict=True):
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-4, abs=1e-7)
    assert a["base_widths"] == b["base_widths"] and a["dropped"] == b["dropped"]
