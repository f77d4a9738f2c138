"""The training loop at scale: mid-epoch checkpoints and exact resume after SIGKILL, schedules,
variants, plots, RNG state, TensorBoard fallback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from s2h import trainer
from s2h.cli import main

from _runs import keep_checkpoints, same_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--model", "small_cnn", "--batch-size", "16",
        "--eval-batches", "2", "--no-progress", "--target-flops", "0.5",
        "--no-dense-baseline", "--no-latency", "--log-every", "1"]


def _steps(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    """A real SIGKILL of a training process after a mid-epoch checkpoint; --resume continues
    to the same weights, gates and metrics as a run that was never interrupted."""
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "8", "--ckpt-every", "3",
            "--no-plots"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["prune", *args, "--out", str(full)]) == 0

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "s2h", "prune", *args, "--out", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpt_path = killed / "checkpoint.pt"
    deadline = time.time() + 240
    try:
        # Kill as soon as a checkpoint from the middle of epoch 2 exists (step 9: batch 1 of 8;
        # the next epoch end is 7 steps away). Partial sums of epoch 2 must survive too.
        while time.time() < deadline and proc.poll() is None:
            if ckpt_path.exists():
                try:
                    ck = torch.load(ckpt_path, weights_only=True)
                except Exception:  # replaced while we read it: read again
                    continue
                if ck["epoch"] == 1 and ck["batch"] > 0:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    ck = trainer.load_checkpoint(str(ckpt_path))  # intact, whatever moment the kill hit
    assert ck["epoch"] == 1 and 0 < ck["batch"] < 8, (ck["epoch"], ck["batch"])
    assert not (killed / "summary.json").exists()

    capsys.readouterr()
    assert main(["prune", *args, "--out", str(killed), "--resume"]) == 0
    text = capsys.readouterr().out
    assert f"resumed from {ckpt_path} at epoch 2, batch {ck['batch']}" in text
    assert "epoch 1/2" not in text and "epoch 2/2" in text  # epoch 1 is not redone
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert (a["epoch"], a["batch"], b["epoch"], b["batch"]) == (2, 0, 2, 0)
    same_state(a, b)
    # metrics.jsonl: every step exactly once, same values; epoch rows equal (partial sums kept)
    ra, rb = _steps(full), _steps(killed)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    assert len(ra) == 16 + 2
    for x, y in zip(ra, rb, strict=True):
        if x["kind"] == "step":
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        else:
            assert x["test_hard_acc"] == y["test_hard_acc"]
            for k in x["train"]:
                assert x["train"][k] == pytest.approx(y["train"][k], abs=1e-5), k
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["rows"]["exported"]["accuracy"] == sb["rows"]["exported"]["accuracy"]


@pytest.mark.slow
def test_ckpt_every_is_atomic_and_mid_epoch(tmp_path, monkeypatch):
    """--ckpt-every N saves after steps N, 2N, ... inside the epoch (not at its last batch, which
    the epoch-end checkpoint covers); each save goes through a temp file and a rename."""
    saved = []
    orig = trainer._atomic_save

    def spy(obj, path):
        orig(obj, path)
        assert not os.path.exists(path + ".tmp")
        saved.append((obj["epoch"], obj["batch"], obj["step"]))

    monkeypatch.setattr(trainer, "_atomic_save", spy)
    run = tmp_path / "r"
    assert main(["prune", *TINY, "--epochs", "2", "--steps-per-epoch", "4", "--ckpt-every", "2",
                 "--no-plots", "--out", str(run)]) == 0
    assert saved == [(0, 2, 2), (1, 0, 4), (1, 2, 6), (2, 0, 8)]
    assert main(["prune", *TINY, "--ckpt-every", "0", "--out", str(run)]) == 2


@pytest.mark.slow
def test_variants_and_gate_schedule_reach_the_training(tmp_path):
    """--variant selects the pruner's loss; --gate-schedule cosine decays the gates' lr to 0 on
    the weights' warm-up + cosine curve, constant keeps it."""
    run = tmp_path / "nogap"
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "4", "--no-plots",
                 "--variant", "no_gap", "--gate-schedule", "cosine", "--gate-lr", "0.1",
                 "--warmup-steps", "2", "--out", str(run)]) == 0
    rows = [r for r in _steps(run) if r["kind"] == "step"]
    assert all(r["gap_weights"] == 0.0 and r["gap_gates"] == 0.0 for r in rows)
    f = trainer._lr_lambda(4, 2)  # the rate used by step s (0-based)
    assert [r["gate_lr"] for r in rows] == pytest.approx([0.05, 0.1, 0.1, 0.05])
    assert [r["gate_lr"] for r in rows] == pytest.approx([0.1 * f(s) for s in range(4)])
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 * f(s) for s in range(4)])
    assert json.loads((run / "summary.json").read_text())["variant"] == "no_gap"

    run = tmp_path / "direct"
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "3", "--no-plots",
                 "--variant", "direct_hard", "--gate-schedule", "constant",
                 "--out", str(run)]) == 0
    rows = [r for r in _steps(run) if r["kind"] == "step"]
    assert all(r["soft_acc"] == r["hard_acc"] for r in rows)  # one (hard) network only
    gate_lr = trainer.PruneConfig().gate_lr  # the default rate, held constant
    assert all(r["gate_lr"] == pytest.approx(gate_lr) for r in rows)
    # the default: the gates' lr follows the weights' warm-up + cosine schedule
    run = tmp_path / "default"
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "4", "--no-plots",
                 "--warmup-steps", "2", "--out", str(run)]) == 0
    rows = [r for r in _steps(run) if r["kind"] == "step"]
    assert [r["gate_lr"] for r in rows] == pytest.approx([gate_lr * f(s) for s in range(4)])
    with pytest.raises(SystemExit):
        main(["prune", *TINY, "--variant", "nope", "--out", str(run)])


def test_plots_are_written_and_readable(tmp_path):
    import matplotlib.image as mpimg

    run = tmp_path / "p"
    assert main(["prune", *TINY, "--epochs", "2", "--steps-per-epoch", "3",
                 "--out", str(run)]) == 0
    for name in ("training.png", "widths.png", "final_widths.png"):
        path = run / "plots" / name
        img = mpimg.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 500, name
        assert img[..., :3].std() > 0.05, name  # not a blank canvas
    from s2h.plots import main as plots_main

    assert plots_main([str(run)]) == 0  # redraw from the files alone


def test_rng_state_roundtrip_covers_every_generator():
    trainer.seed_everything(123)
    state = trainer.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(3))
    torch.rand(5), random.random(), np.random.rand(2)  # move every generator on
    blob = {"rng": state}
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rng-{os.getpid()}.pt")
    torch.save(blob, path)
    state = torch.load(path, weights_only=True)["rng"]  # checkpoints load without pickle
    os.remove(path)
    trainer.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_tensorboard_flag_logs_or_says_why_not(tmp_path, capsys):
    run = tmp_path / "tb"
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-plots",
                 "--tensorboard", "--out", str(run)]) == 0
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard package is not installed" in capsys.readouterr().out
    else:
        assert any((run / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_in_half_precision_and_checkpoints_the_scaler(tmp_path, amp):
    """--amp reaches the step: the first loss (same weights, same batch) is the fp32 run's to
    the half type's precision, and not bitwise equal to it. fp16: the GradScaler's state
    travels with the checkpoint; torch's GradScaler starts at 2**16 and grows only after 2000
    steps, so two finite steps leave it there with a growth tracker of 2."""
    args = [*TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-plots"]
    assert main(["prune", *args, "--out", str(tmp_path / "fp32")]) == 0
    run = tmp_path / amp
    assert main(["prune", *args, "--amp", amp, "--out", str(run)]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["config"]["amp"] == amp
    if amp == "fp16":
        assert ck["scaler"]["scale"] == 2.0**16 and ck["scaler"]["_growth_tracker"] == 2
    else:
        assert ck["scaler"] == {}
    rows = [r for r in _steps(run) if r["kind"] == "step"]
    ref = [r for r in _steps(tmp_path / "fp32") if r["kind"] == "step"]
    assert len(rows) == len(ref) == 2
    eps = {"bf16": 2.0**-8, "fp16": 2.0**-11}[amp]  # the half type's unit roundoff
    assert rows[0]["loss"] != ref[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(ref[0]["loss"], rel=8 * eps)


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_phases_and_resume_across_the_warmup_end_and_the_freeze(tmp_path, monkeypatch):
    """--gate-warmup-steps 2, --freeze-arch-at 0.625 of 8 steps (freeze at step 5): rows say
    their phase; the gates do not move in the warm-up nor after the freeze (no resource term
    there); the L1 order is re-taken at the end of the warm-up. A run stopped right after the
    checkpoint of step 2 (warm-up end) or step 4 (before the freeze) or step 6 (frozen) and
    resumed ends in the same state as the uninterrupted run."""
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "4", "--ckpt-every", "2",
            "--no-plots", "--gate-warmup-steps", "2", "--freeze-arch-at", "0.625",
            "--lr", "0.05", "--warmup-steps", "1"]  # a warm-up that re-ranks some channels
    full = tmp_path / "full"
    orig = trainer._atomic_save
    saved = keep_checkpoints(monkeypatch)
    assert main(["prune", *args, "--out", str(full)]) == 0
    rows = [r for r in _steps(full) if r["kind"] == "step"]
    assert [r["phase"] for r in rows] == ["warmup"] * 2 + ["s2h"] * 3 + ["frozen"] * 3
    assert all(r["resource"] == 0.0 and r["gap_gates"] == 0.0 for r in rows[:2])
    assert all(r["resource"] == 0.0 for r in rows[5:])
    logits = {s: saved[s]["pruner"]["gates"] for s in (2, 4, 6, 8)}
    from s2h.gates import ChannelGate

    reranked = 0
    for k in logits[2]:  # the gates did not move during the warm-up: still at their start
        c = saved[2]["pruner"]["groups"][k.replace("/", ".")]
        start = ChannelGate(c, 8).logits.detach()
        assert torch.allclose(logits[2][k]["logits"], start, atol=1e-6), k
        assert torch.equal(logits[6][k]["logits"], logits[8][k]["logits"]), k  # frozen
        # the L1 order taken at the end of the warm-up (step 2): by hand from those weights
        w = saved[2]["model"][k.replace("/", ".") + ".weight"]
        l1 = w.abs().flatten(1).sum(1)
        order = torch.sort(-l1, stable=True).indices
        assert torch.equal(saved[4]["pruner"]["gates"][k]["order"], order), k
        reranked += not torch.equal(saved[2]["pruner"]["gates"][k]["order"], order)
    assert reranked  # the order from the initial weights was not kept
    assert not saved[4]["pruner"]["arch_frozen"] and saved[6]["pruner"]["arch_frozen"]
    summary = json.loads((full / "summary.json").read_text())
    proj = summary["projection"]
    assert proj["at_step"] == 5 and proj["ratio_after"] <= 0.5
    assert summary["exported_flops_ratio"] == pytest.approx(proj["ratio_after"], abs=1e-6)
    assert summary["exported_flops_ratio"] <= 0.5 + 0.005
    assert summary["export_matches_hard_network"]

    for stop_at in (2, 4, 6):
        run = tmp_path / f"stop{stop_at}"

        def stopping(obj, path, stop_at=stop_at):
            orig(obj, path)
            if obj["step"] == stop_at:
                raise _Stop

        monkeypatch.setattr(trainer, "_atomic_save", stopping)
        with pytest.raises(_Stop):
            main(["prune", *args, "--out", str(run)])
        monkeypatch.setattr(trainer, "_atomic_save", orig)
        assert main(["prune", *args, "--out", str(run), "--resume"]) == 0
        a = torch.load(full / "checkpoint.pt", weights_only=True)
        b = torch.load(run / "checkpoint.pt", weights_only=True)
        same_state(a, b)
        for k in a["pruner"]["gates"]:
            assert torch.equal(a["pruner"]["gates"][k]["order"], b["pruner"]["gates"][k]["order"])
        assert b["pruner"]["projection"] == a["pruner"]["projection"]
        assert [r["phase"] for r in _steps(run) if r["kind"] == "step"] == \
            [r["phase"] for r in rows]


def test_resource_flags_reach_the_pruner_and_bad_phases_are_refused(tmp_path):
    run = tmp_path / "q"
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-plots",
                 "--resource-mode", "quadratic", "--resource-ratio", "3", "--resource-band",
                 "0.05", "--freeze-arch-at", "1", "--out", str(run)]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    cfg = ck["pruner"]["config"]
    assert (cfg["resource_mode"], cfg["resource_ratio"], cfg["resource_band"]) == \
        ("quadratic", 3.0, 0.05)
    assert not ck["pruner"]["arch_frozen"]  # frozen only at the end (after the last checkpoint)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["projection"]["at_step"] == 2
    assert summary["exported_flops_ratio"] <= 0.5 + 1e-9
    for bad in (["--freeze-arch-at", "0"], ["--freeze-arch-at", "1.5"],
                ["--gate-warmup-steps", "-1"]):
        assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-plots",
                     *bad, "--out", str(tmp_path / "bad")]) == 2


def test_importance_from_init_keeps_the_starting_order(tmp_path, monkeypatch):
    saved = keep_checkpoints(monkeypatch)
    args = [*TINY, "--epochs", "1", "--steps-per-epoch", "4", "--ckpt-every", "2", "--no-plots",
            "--gate-warmup-steps", "2", "--lr", "0.05", "--warmup-steps", "1"]
    assert main(["prune", *args, "--importance-from", "init", "--out",
                 str(tmp_path / "init")]) == 0
    init = {k: v["order"] for k, v in saved[4]["pruner"]["gates"].items()}
    assert all(torch.equal(saved[2]["pruner"]["gates"][k]["order"], o) for k, o in init.items())
    assert main(["prune", *args, "--out", str(tmp_path / "warm")]) == 0
    warm = {k: v["order"] for k, v in saved[4]["pruner"]["gates"].items()}
    assert any(not torch.equal(init[k], warm[k]) for k in init)  # the default re-ranks


def test_cpu_runs_flush_denormals_while_training_and_restore_after(tmp_path, monkeypatch):
    """A CPU run computes with float32 denormals flushed to zero (sharp gates otherwise drive
    the backward into denormals, measured 2x slower per step) and leaves the switch as it was.
    The reference: 1e-39 is a float32 denormal, which the CPU keeps unless flushing."""
    from s2h.pruner import S2HPruner

    tiny = torch.tensor([1e-39], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0  # denormals survive outside a run
    seen = []
    orig = S2HPruner.train_step

    def spy(self, *a, **k):
        seen.append((tiny * 1.0).item())
        return orig(self, *a, **k)

    monkeypatch.setattr(S2HPruner, "train_step", spy)
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2", "--no-plots",
                 "--out", str(tmp_path / "run")]) == 0
    assert seen == [0.0, 0.0]  # flushed during every step
    assert (tiny * 1.0).item() != 0.0  # and restored afterwards
