"""A new user's first hour (issue 16): Ctrl-C, metrics as they are logged, `s2h export` equal to
the run's exported/, file modes, --help defaults agreeing with the README, start-up imports,
error messages."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from s2h import trainer
from s2h.cli import main

from _runs import same_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
TINY = ["--dataset", "synthetic", "--model", "small_cnn", "--batch-size", "16",
        "--eval-batches", "2", "--no-progress", "--target-flops", "0.5",
        "--no-dense-baseline", "--no-latency", "--log-every", "1"]


def _rows(run) -> list[dict]:
    return trainer.read_metrics(str(run / "metrics.jsonl"))


@pytest.mark.slow
def test_sigint_mid_first_epoch_saves_resumes_and_plots_a_running_job(tmp_path, capsys):
    """A real SIGINT to a training process in the middle of its first epoch (no checkpoint
    exists yet): it finishes the step, saves a checkpoint, exits 130 with the resume command
    on one line; metrics.jsonl had every row as it was logged, and the plots could be drawn
    from it while the job ran; --resume reaches the uninterrupted run's weights and rows."""
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "100", "--no-plots"]
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(["prune", *args, "--out", str(full)]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "s2h", "prune", *args, "--out", str(run)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    stopped = False
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(r.get("step", 0) >= 3 for r in _rows(run)):
                os.kill(proc.pid, signal.SIGSTOP)  # hold the job mid-epoch while we look
                stopped = True
                break
            time.sleep(0.005)
        assert stopped, "the job ended or logged nothing before the deadline"
        # a running job: rows are on disk before any checkpoint exists
        rows = _rows(run)
        assert rows and all(r["kind"] == "step" for r in rows)
        assert not (run / "checkpoint.pt").exists()
        from s2h.plots import main as plots_main

        assert plots_main([str(run)]) == 0
        assert (run / "plots" / "training.png").exists() and (run / "plots" / "widths.png").exists()
        os.kill(proc.pid, signal.SIGINT)  # delivered when the job continues
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err
    resume_lines = [x for x in err.splitlines() if "resume with:" in x]
    assert len(resume_lines) == 1 and resume_lines[0].rstrip().endswith("--resume")
    assert f"--out {run}" in resume_lines[0]
    ck = trainer.load_checkpoint(str(run / "checkpoint.pt"))
    assert ck["epoch"] == 0 and 3 <= ck["batch"] < 100, (ck["epoch"], ck["batch"])
    rows = _rows(run)
    assert rows[-1]["step"] == ck["step"] == ck["batch"]  # every row flushed, none ahead

    capsys.readouterr()
    assert main(["prune", *args, "--out", str(run), "--resume"]) == 0
    assert f"at epoch 1, batch {ck['batch']}" in capsys.readouterr().out
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    same_state(a, b)
    ra, rb = _rows(full), _rows(run)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        if x["kind"] == "step":
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        else:
            assert x["test_hard_acc"] == y["test_hard_acc"]


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


@pytest.mark.slow
def test_export_command_equals_the_runs_exported(tmp_path, capsys):
    """`s2h export CHECKPOINT` recalibrates BatchNorm on the run's batches: every tensor and the
    outputs equal the run's exported/; with --no-recalibrate they differ (and it says so)."""
    import s2h

    run = tmp_path / "run"
    assert main(["prune", *TINY, "--epochs", "2", "--steps-per-epoch", "5", "--no-plots",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run / "checkpoint.pt"), "--out", str(tmp_path / "e")]) == 0
    assert "same 20 training batches as the run's exported/" in capsys.readouterr().out
    ref, got = _tensors(run / "exported"), _tensors(tmp_path / "e")
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    arch = [json.loads((d / "architecture.json").read_text())
            for d in (run / "exported", tmp_path / "e")]
    assert arch[0] == arch[1]
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ya = s2h.load_exported(str(run / "exported"))(x)
        yb = s2h.load_exported(str(tmp_path / "e"))(x)
    assert torch.equal(ya, yb)

    assert main(["export", str(run / "checkpoint.pt"), "--out", str(tmp_path / "n"),
                 "--no-recalibrate"]) == 0
    assert "NOT recalibrated" in capsys.readouterr().out
    raw = _tensors(tmp_path / "n")
    differ = [k for k in ref if not torch.equal(ref[k], raw[k])]
    assert differ and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var",
                                                  "num_batches_tracked") for k in differ), differ


def test_written_files_are_0644_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2",
                     "--out", str(run)]) == 0
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_missing_checkpoint_is_reported_as_missing(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "truncated" not in err


def test_unknown_model_suggests_close_names(tmp_path, capsys):
    code = main(["prune", *TINY, "--model", "resnet-20", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "did you mean 'resnet20'" in err


@pytest.mark.slow
def test_progress_bar_shows_the_epoch_lines_flops(tmp_path, capsys, monkeypatch):
    """The bar's last hard-FLOPs value is the number the epoch line prints."""
    bars = []

    class Bar:
        def __init__(self, iterable, total, desc, enabled):
            self.iterable, self.postfix = iterable, {}
            bars.append(self)

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def close(self):
            pass

    monkeypatch.setattr(trainer, "_progress", Bar)
    run = tmp_path / "run"
    assert main(["prune", *TINY, "--epochs", "2", "--steps-per-epoch", "7", "--no-plots",
                 "--out", str(run)]) == 0
    text = capsys.readouterr().out
    lines = re.findall(r"hard FLOPs (\d\.\d+)", text)
    assert len(lines) == 2
    assert [b.postfix["hard_flops"] for b in bars[:2]] == lines
    # the budget: measured time per step, in summary.json and in the final table
    summary = json.loads((run / "summary.json").read_text())
    epochs = [r for r in _rows(run) if r["kind"] == "epoch"]
    assert [r["train_steps"] for r in epochs] == [7, 7]
    assert 0 < summary["seconds_per_step"]["s2h"] == pytest.approx(
        sum(r["train_seconds"] for r in epochs) / 14)
    assert summary["seconds_per_step"]["dense"] is None  # --no-dense-baseline
    assert f"time per training step: S2H {summary['seconds_per_step']['s2h']:.2f} s (14 steps" \
        in text


def test_help_shows_defaults_and_the_readme_synopsis_agrees(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    defaults = trainer.PruneConfig()
    assert f"(default: {defaults.epochs})" in re.sub(r"\s+", " ", text)
    import argparse

    from s2h.cli import _add_prune_args

    p = argparse.ArgumentParser()
    _add_prune_args(p)
    dest = {a.option_strings[0]: a.default for a in p._actions if a.option_strings}
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = readme.split("## Command line", 1)[1].split("```", 2)[1]
    block = block.split("\ntorchrun", 1)[0]  # the `s2h prune` synopsis only
    assert block.lstrip().startswith("s2h prune")
    checked = 0
    for flag, value in re.findall(r"(--[a-z][a-z0-9-]*) ([^\s\[\]-][^\s\[\]]*)", block):
        if flag not in dest or re.fullmatch(r"[A-Z]", value):
            continue  # another command's option, or a metavariable (N, K, D)
        shown = value.split("|")[0]  # alternatives: the first one is the default
        default = dest[flag]
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert float(shown) == pytest.approx(float(default)), flag
        else:
            assert shown == str(default), flag
        checked += 1
    assert checked >= 10, checked


def test_help_does_not_import_torch_but_import_s2h_gives_the_whole_api():
    """``s2h --help`` (python -m s2h) starts without torch (checked with -X importtime), while a
    plain ``import s2h`` imports s2h.functional and s2h.ops and registers torch.ops.s2h.*."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "s2h", "--help"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: s2h" in r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")]
    assert "s2h.cli" in imported and "torch" not in imported, imported
    code = ("import s2h, sys, torch\n"
            "print(s2h.functional.__name__, s2h.ops.__name__, 'torch' in sys.modules)\n"
            "x = torch.arange(12.).view(3, 4)\n"
            "y = torch.ops.s2h.gather_channels(x, torch.tensor([2, 0]), 1)\n"
            "print(torch.equal(y, x[:, [2, 0]]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["s2h.functional", "s2h.ops", "True", "True"]


@pytest.mark.parametrize("groups", [12, 50])
def test_widths_plot_is_a_heatmap_showing_every_groups_final_width(tmp_path, groups):
    """widths.png at 12 and 50 groups: one row per group; a vertical line through the last
    logged steps crosses the viridis colour of every final kept fraction."""
    import matplotlib
    import matplotlib.image as mpimg

    from s2h.plots import plot_run

    fracs = [1.0, 0.75, 0.5, 0.25, 0.125]
    names = [f"layer{i // 8}.{i % 8}.conv1" for i in range(groups)]
    final = {k: int(64 * fracs[i % len(fracs)]) for i, k in enumerate(names)}
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for s in range(10, 310, 10):
            w = {k: 64 if s < 100 else final[k] for k in names}
            f.write(json.dumps({"kind": "step", "step": s, "hard_flops_ratio": 0.5,
                                "soft_acc": 0.5, "hard_acc": 0.5, "widths": w}) + "\n")
    plot_run(str(path), str(tmp_path / "plots"),
             summary={"config": {}, "group_channels": {k: 64 for k in names}})
    img = mpimg.imread(tmp_path / "plots" / "widths.png")[..., :3]
    h, w = img.shape[:2]
    assert h >= 20 * groups * 0.9 or h > 1200  # rows stay a readable height
    column = img[int(0.05 * h):int(0.95 * h), int(0.7 * w)]
    cmap = matplotlib.colormaps["viridis"]
    for frac in fracs:
        want = np.array(cmap(frac)[:3])
        hits = (np.abs(column - want).max(axis=1) < 0.02).sum()
        # each fraction's rows: at least ~10 pixel rows each
        assert hits >= 10 * (groups // len(fracs)), (frac, hits)


@pytest.mark.slow
def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path, monkeypatch, capsys):
    """Rows are flushed as they are logged, so a killed run leaves rows past its checkpoint
    (and maybe a torn last line): --resume drops them and logs those steps again, once."""
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "6", "--ckpt-every", "4",
            "--no-plots"]
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(["prune", *args, "--out", str(full)]) == 0
    orig = trainer._atomic_save

    def die_at_step_4(obj, path):
        orig(obj, path)
        if obj["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_atomic_save", die_at_step_4)
    assert main(["prune", *args, "--out", str(run)]) == 130
    monkeypatch.setattr(trainer, "_atomic_save", orig)
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    later = [r for r in _rows(full) if r["step"] > 4][:3]  # what a killed run had flushed
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in later)
        f.write('{"kind": "step", "step": 8, "lo')  # torn by the kill
    assert main(["prune", *args, "--out", str(run), "--resume"]) == 0
    ra, rb = _rows(full), _rows(run)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        if x["kind"] == "step":
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
