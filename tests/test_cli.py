"""The main job end to end on small settings: outputs, resume, errors, info."""

import json
import os
import subprocess
import sys

import pytest
import torch

import s2h
from s2h.cli import main

SMALL = ["--dataset", "synthetic", "--model", "resnet20", "--batch-size", "16",
         "--steps-per-epoch", "3", "--eval-batches", "2", "--no-progress", "--target-flops", "0.5"]


@pytest.mark.slow
def test_prune_end_to_end_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch 2/2" in text and "test accuracy (%)" in text and "latency batch 1" in text
    assert "exported == hard network: True" in text
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "exported/model.safetensors",
                 "exported/architecture.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert rows["exported"]["flops"] / rows["dense"]["flops"] == pytest.approx(
        summary["hard_flops_ratio"], rel=0.01)
    assert summary["export_matches_hard_network"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickle of objects needed
    assert ckpt["epoch"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "epoch" for r in lines) == 2
    model = s2h.load_exported(str(out / "exported"))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_resume_continues_to_the_same_result(tmp_path, capsys, monkeypatch):
    from s2h import trainer

    args = [*SMALL, "--no-dense-baseline", "--no-latency", "--epochs", "2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["prune", *args, "--out", str(full)]) == 0

    orig = trainer._atomic_save

    def save_then_die(obj, path):
        orig(obj, path)
        raise KeyboardInterrupt  # the process is killed right after the epoch-1 checkpoint

    monkeypatch.setattr(trainer, "_atomic_save", save_then_die)
    assert main(["prune", *args, "--out", str(killed)]) == 130  # Ctrl-C: no traceback
    assert "resume with: s2h prune" in capsys.readouterr().err
    monkeypatch.setattr(trainer, "_atomic_save", orig)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    assert main(["prune", *args, "--out", str(killed), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(full / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    assert a["pruner"]["widths"] == b["pruner"]["widths"]
    for k in a["pruner"]["gates"]:
        assert torch.allclose(a["pruner"]["gates"][k]["logits"], b["pruner"]["gates"][k]["logits"],
                              atol=1e-6)


def test_missing_fashion_mnist_names_the_directory_and_the_fix(tmp_path, capsys):
    code = main(["prune", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nope") in err and "apt-get install dataset-fashion-mnist" in err


def test_bad_target_and_unreadable_checkpoint(tmp_path, capsys):
    assert main(["prune", *SMALL, "--target-flops", "1.5", "--out", str(tmp_path / "a")]) == 2
    assert "--target-flops must be in (0, 1]" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--out", str(tmp_path / "e")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    run = tmp_path / "r"
    os.makedirs(run)
    (run / "checkpoint.pt").write_bytes(b"\x00" * 10)
    assert main(["prune", *SMALL, "--epochs", "1", "--out", str(run), "--resume"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_info_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "s2h", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "torch:" in out and "channel_ops" in out


@pytest.mark.parametrize("world", ["1", "2"])
def test_module_entry_exits_with_mains_status_and_flushes_under_torchrun(tmp_path, world):
    """``python -m s2h`` under torchrun's ``WORLD_SIZE`` leaves by ``os._exit`` (no
    interpreter teardown, where gloo's threads could abort a finished run): its output is
    complete all the same, and a failing command still exits non-zero."""
    env = {**os.environ, "WORLD_SIZE": world}
    ok = subprocess.run([sys.executable, "-m", "s2h", "info"], capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0 and "torch:" in ok.stdout and "channel_ops" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "s2h", "export", str(tmp_path / "missing.pt"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "missing.pt" in bad.stderr


def test_bench_runs_a_script_or_says_where_the_scripts_are(tmp_path, monkeypatch, capsys):
    from s2h import cli

    # as installed: no bench/ next to the package nor in the working directory
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "s2h" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("S2H_BENCH_DIR", raising=False)
    assert main(["bench", "gather"]) == 2
    err = capsys.readouterr().err
    assert "source repository" in err and "S2H_BENCH_DIR" in err
    bench = tmp_path / "b"
    bench.mkdir()
    (bench / "echo_args.py").write_text(
        "import pathlib, sys\npathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))\n")
    monkeypatch.setenv("S2H_BENCH_DIR", str(bench))
    out = tmp_path / "args.txt"
    assert main(["bench", "echo-args", str(out), "--x", "1"]) == 0
    assert out.read_text() == "--x 1"  # the script ran, with the arguments after its name
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert str(bench) in err and "echo_args" in err


def _gz_idx(path, array):
    import gzip
    import struct

    import numpy as np

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, ">u1").tobytes()))


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar100", "imagefolder"])
def test_missing_dataset_fails_fast_with_the_path(tmp_path, capsys, dataset):
    """Through the CLI: exit code 2, the path looked at on stderr, nothing trained."""
    where = tmp_path / "absent"
    out = tmp_path / "o"
    code = main(["prune", "--dataset", dataset, "--data-dir", str(where), "--out", str(out),
                 "--no-progress"])
    cap = capsys.readouterr()
    assert code == 2
    assert cap.err.startswith("error: ") and str(where) in cap.err
    assert "epoch" not in cap.out and not (out / "checkpoint.pt").exists()


def test_malformed_datasets_fail_fast_naming_the_file(tmp_path, capsys):
    import numpy as np

    fm = tmp_path / "fm"
    fm.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("t10k", 16)):
        _gz_idx(fm / f"{split}-images-idx3-ubyte.gz",
                rng.integers(0, 255, (n, 28, 28)).astype(np.uint8))
        _gz_idx(fm / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    bad = fm / "train-labels-idx1-ubyte.gz"
    _gz_idx(bad, rng.integers(0, 10, 31).astype(np.uint8))  # one label short
    code = main(["prune", "--dataset", "fashion-mnist", "--data-dir", str(fm), "--out",
                 str(tmp_path / "o"), "--no-progress", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "31 labels for 32 images" in err

    cifar = tmp_path / "c" / "cifar-100-python"
    cifar.mkdir(parents=True)
    (cifar / "train").write_bytes(b"\x80\x04not a pickle at all")
    code = main(["prune", "--dataset", "cifar100", "--data-dir", str(tmp_path / "c"), "--out",
                 str(tmp_path / "o2"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(cifar / "train") in err
