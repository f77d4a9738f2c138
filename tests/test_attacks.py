"""Attacks on s2h (issue #12): graph patterns that used to export silently wrong models,
aliased modules, tampered export folders and checkpoints, NaN gradients, concurrent writers,
bad flags and data. Each test failed before its fix; keep them so no change can reopen a hole."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import s2h
from s2h import S2HPruner
from s2h.pruner import ExportMismatchWarning, NonFiniteGradientError, export_difference


# ----------------------------------------------------------------------------- graph patterns
class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def head(self, x):
        return self.fc(self.b(x).mean((2, 3)))


class WeightRead(_Base):  # a pruned layer's weight used directly, outside its call
    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.head(y) + F.conv2d(x, self.a.weight, padding=1).mean()


class WidthRead(_Base):  # a pruned width read by Python
    def forward(self, x):
        return self.head(torch.relu(self.a(x)) / self.a.out_channels ** 0.5)


class NormWidthRead(_Base):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        y = self.bn(self.a(x))
        if self.bn.num_features == 16:
            y = y * 2
        return self.head(y)


class Strided(_Base):  # an explicit-stride view
    def forward(self, x):
        y = torch.relu(self.a(x))
        n, _, h, w = y.shape
        y = y.as_strided((n, 16, h, w), (16 * h * w, h * w, w, 1))
        return self.head(y)


class ToBatch(nn.Module):  # channels swapped into the batch dim of the next conv
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x)).transpose(0, 1)
        return self.fc(self.b(y).mean((0, 2, 3))).expand(x.shape[0], -1) + x.mean()


class LogSoftmaxOverChannels(_Base):
    def forward(self, x):
        return self.head(F.log_softmax(self.a(x), dim=1))


class SoftmaxOverChannels(_Base):
    def forward(self, x):
        return self.head(torch.softmax(self.a(x), dim=1))


def _build(cls, divisor=4):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pruner = S2HPruner(model, (x,), 0.5, divisor=divisor)
    return model, pruner, x, [str(w.message) for w in rec]


@pytest.mark.parametrize("cls,why", [
    (WeightRead, "'a.weight' is used by aten.convolution"),
    (WidthRead, "a.out_channels is read"),
    (NormWidthRead, "bn.num_features is read"),
    (Strided, "aten.as_strided"),
    (ToBatch, "not in its channel dim"),
    (LogSoftmaxOverChannels, "_log_softmax over the channel dim"),
    (SoftmaxOverChannels, "_softmax over the channel dim"),
])
def test_graph_patterns_keep_the_group_whole_by_name(cls, why):
    """Each pattern used to prune group 'a' (silently: wrong export, a crash, or soft != hard);
    now 'a' is kept whole with a warning naming it and the reason, the other groups still
    prune, and the export computes what the hard network computes."""
    model, pruner, x, msgs = _build(cls)
    assert "a" not in [g.name for g in pruner.groups]
    assert [g.name for g in pruner.groups] == ["b"]
    assert any(m.startswith("group 'a' (16 channels) is left unpruned") and why in m
               for m in msgs), msgs
    pruner.set_widths({"b": 8})
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportMismatchWarning)
        exported = pruner.export()
    assert exported.b.out_channels == 8 and exported.a.out_channels == 16
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        torch.testing.assert_close(exported(x), hard, rtol=0, atol=1e-5)
        # 'a' untouched: with b at full width the hard network is the dense model
        pruner.set_widths({"b": 16})
        ref = cls.forward(_dense_copy(model), x)
        torch.testing.assert_close(pruner.hard_forward(x), ref, rtol=0, atol=1e-5)


def _dense_copy(model):
    """The same weights in a fresh plain model of the same class (an independent reference)."""
    fresh = type(model)()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "hard_" not in k})
    return fresh.eval()


def test_softmax_over_other_dims_stays_prunable():
    class M(_Base):
        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = torch.softmax(y.flatten(2), dim=-1).view(n, c, h, w)  # over space: channel-wise
            return self.head(y)

    _, pruner, _, msgs = _build(M)
    assert sorted(g.name for g in pruner.groups) == ["a", "b"], msgs


def test_export_compares_outputs_with_the_hard_network(monkeypatch):
    """export() runs both on the example inputs: a wrong export is a loud warning, not a
    silent 'True' (here a layer exported with a perturbed bias stands in for any such bug)."""
    from s2h.nn import MaskedConv2d

    model, pruner, x, _ = _build(WidthRead)
    pruner.set_widths({"b": 8})
    model.eval()
    orig = MaskedConv2d.s2h_export

    def bad(m, *a, **k):
        new = orig(m, *a, **k)
        if new.out_channels == 8:
            with torch.no_grad():
                new.bias.add_(0.01)
        return new

    monkeypatch.setattr(MaskedConv2d, "s2h_export", bad)
    with pytest.warns(ExportMismatchWarning, match="differs from the hard network"):
        exported = pruner.export()
    diff, tol = export_difference(pruner.hard_forward, model, exported, x)
    assert diff > 1e-3 > tol


# ----------------------------------------------------------------------------- aliasing
class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = self.c  # one module, two names
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.c(x))
        return self.fc(self.c2(x).mean((2, 3)))


def test_module_registered_under_two_names_exports_and_loads(tmp_path):
    model, pruner, x, _ = _build(Aliased)
    pruner.set_widths(0.5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportMismatchWarning)
        exported = pruner.export()
    assert exported.c is exported.c2 and exported.c.in_channels < 16
    with torch.no_grad():
        hard = pruner.hard_forward(x)
        torch.testing.assert_close(exported(x), hard, rtol=0, atol=1e-5)
        # independent reference: the same computation written out with the kept channels
        keep = pruner.gates["a"].keep_index()
        e = exported
        ref_a = torch.relu(F.conv2d(x, model.a.weight[keep], model.a.bias[keep], padding=1))
        ref = torch.relu(F.conv2d(ref_a, e.c.weight, e.c.bias, padding=1))
        ref = e.fc(F.conv2d(ref, e.c.weight, e.c.bias, padding=1).mean((2, 3)))
        torch.testing.assert_close(hard, ref, rtol=0, atol=1e-5)
    d = s2h.save_exported(exported, str(tmp_path / "m"), builder={"kind": "custom", "name": "x"})
    loaded = s2h.load_exported(d, model_fn=Aliased)
    assert loaded.c is loaded.c2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hard, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- export folders
def _saved_mlp(tmp_path, name="m"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return model, s2h.save_exported(model, str(tmp_path / name))


def _edit_arch(d, fn):
    path = os.path.join(d, "architecture.json")
    with open(path) as f:
        arch = fn(json.load(f))
    with open(path, "w") as f:
        json.dump(arch, f)


def _maxrss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("where", ["layers", "tree"])
def test_memory_bomb_in_architecture_json_is_refused_before_allocating(tmp_path, where):
    """40,000,000 channels in a 2 KB JSON: refused from the safetensors header, on the meta
    device, before any memory is used (it used to allocate GBs and take half a minute)."""
    import time

    _, d = _saved_mlp(tmp_path)
    big = 40_000_000

    def bomb(arch):
        if where == "layers":
            arch["layers"]["0"]["args"]["out_features"] = big
            arch["layers"]["2"]["args"]["in_features"] = big
        else:  # the dense tree, whose layers architecture.json then replaces
            arch["builder"]["tree"]["children"][0][1]["args"]["out_features"] = big
            arch["builder"]["tree"]["children"][2][1]["args"]["in_features"] = big
        return arch

    _edit_arch(d, bomb)
    assert os.path.getsize(os.path.join(d, "architecture.json")) < 4096
    rss, t = _maxrss_mb(), time.perf_counter()
    with pytest.raises(ValueError, match="40000000|elements"):
        s2h.load_exported(d)
    assert time.perf_counter() - t < 5
    assert _maxrss_mb() - rss < 300  # a real build would be 40M x 8 x 2 x 4 bytes = 2.5 GB


def test_load_exported_refuses_non_float_tensors(tmp_path):
    model, d = _saved_mlp(tmp_path)
    w = os.path.join(d, "model.safetensors")
    for dtype in (torch.int64, torch.bool):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["0.weight"] = (state["0.weight"] * 100).to(dtype)
        save_file(state, w, metadata={"format": "s2h-exported"})
        with pytest.raises(ValueError, match="'0.weight' is (I64|BOOL).*floating point"):
            s2h.load_exported(d)
    save_file({k: v.double() for k, v in model.state_dict().items()}, w)
    loaded = s2h.load_exported(d)  # another float dtype is fine: cast to the model's
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("content", [
    "[]", "null", '"s2h-exported"', '{"format": "s2h-exported", "version": 1}',
    '{"format": "s2h-exported", "builder": null}',
    '{"format": "s2h-exported", "builder": {"kind": "structure"}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": []}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Linear", '
    '"args": {"in_features": "x"}}}}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Sequential"}},'
    ' "layers": [1]}',
    '{"format": "s2h-exported", "builder": {"kind": "structure", "tree": {"type": "Sequential"}},'
    ' "layers": {"0": 7}}',
    '{"format": "s2h-exported", "builder": {"kind": "s2h.models"}}',
    "[" * 100_000 + "]" * 100_000,
    '{"format": "s2h-exported", "builder": ' + '{"kind": "structure", "tree": {"type": '
    '"Sequential", "children": [["0", ' * 3000 + '{"type": "ReLU"}' + "]]}}" * 3000 + "}",
])
def test_malformed_architecture_json_is_a_clear_value_error(tmp_path, content):
    _, d = _saved_mlp(tmp_path)
    with open(os.path.join(d, "architecture.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError) as exc:
        s2h.load_exported(d)
    assert "architecture.json" in str(exc.value) or "unexpected" in str(exc.value) \
        or "builder" in str(exc.value), str(exc.value)


def test_checkpoint_with_only_some_gates_is_refused():
    _, pruner, _, _ = _build(WidthRead)
    _, other, _, _ = _build(_PlainTwo)
    state = other.state_dict()
    assert len(state["gates"]) == 2
    other.load_state_dict(state)  # complete: fine
    partial = dict(state, gates={k: v for k, v in list(state["gates"].items())[:1]})
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(partial)
    bad = dict(state, gates={k: dict(v, logits=v["logits"] * float("nan"))
                             for k, v in state["gates"].items()})
    with pytest.raises(ValueError, match="not finite"):
        other.load_state_dict(bad)


class _PlainTwo(_Base):
    def forward(self, x):
        return self.head(torch.relu(self.a(x)))


# ----------------------------------------------------------------------------- training runs
from s2h import trainer  # noqa: E402
from s2h.cli import main  # noqa: E402

TINY = ["--dataset", "synthetic", "--model", "small_cnn", "--batch-size", "16",
        "--eval-batches", "2", "--no-progress", "--target-flops", "0.5",
        "--no-dense-baseline", "--no-latency", "--log-every", "1", "--no-plots"]


def _ckpt(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _finite(ck) -> bool:
    return all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point()) \
        and all(torch.isfinite(g["logits"]).all() for g in ck["pruner"]["gates"].values())


def test_nan_gradient_with_finite_loss_is_refused_before_the_step():
    """A NaN in one gradient (every loss term finite) used to be applied silently."""
    _, pruner, x, _ = _build(_PlainTwo)
    opt = torch.optim.SGD([*pruner.weight_parameters(), *pruner.gate_parameters()], lr=0.1)
    pruner.model.b.weight.register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in pruner.model.state_dict().items() if "running" not in k}
    with pytest.raises(NonFiniteGradientError, match="gradient of 'b.weight' is nan"):
        pruner.train_step(x, torch.tensor([0, 1]), opt)
    after = pruner.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing was updated


def _inject(monkeypatch, at_step, how):
    """Corrupt the run at S2H step ``at_step`` (1-based): ``how(pruner)`` after its backward."""
    orig = S2HPruner.backward

    def backward(self, terms, *args, **kwargs):
        orig(self, terms, *args, **kwargs)
        if self.step_count + 1 == at_step:
            how(self)

    monkeypatch.setattr(S2HPruner, "backward", backward)


def test_nan_gradient_stops_the_run_naming_the_parameter_and_resume_with_lower_lr_works(
        tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    args = [*TINY, "--epochs", "1", "--steps-per-epoch", "6", "--ckpt-every", "2",
            "--out", str(run)]
    _inject(monkeypatch, 3, lambda p: p.model.get_submodule("fc").weight.grad.fill_(float("inf")))
    assert main(["prune", *args]) == 3
    err = capsys.readouterr().err
    assert "the gradient of 'fc.weight' is inf" in err and "step 2" in err, err
    ck = _ckpt(run)
    assert ck["step"] == 2 and _finite(ck)
    # the advice of the message: lower the learning rate and resume
    monkeypatch.undo()
    assert main(["prune", *args, "--resume", "--lr", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "--resume: applying changed settings: lr 0.002 -> 0.0001" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-4
    assert summary["resume_changes"] == [{"step": 2, "changes": {"lr": [0.002, 0.0001]}}]
    rows = [r for r in trainer.read_metrics(str(run / "metrics.jsonl")) if r["kind"] == "step"]
    f = trainer._lr_lambda(6, 50)
    assert [r["lr"] for r in rows] == pytest.approx(
        [0.002 * f(0), 0.002 * f(1)] + [1e-4 * f(s) for s in range(2, 6)])


def test_non_finite_state_never_overwrites_the_last_good_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
    """inf BatchNorm statistics / weights after a step (finite loss and gradients) used to be
    written over the good checkpoint; now the write is refused and the old file kept."""
    run = tmp_path / "r"
    orig = S2HPruner.train_step

    def step(self, *a, **k):
        m = orig(self, *a, **k)
        if self.step_count == 4:
            with torch.no_grad():
                next(p for n, p in self.model.named_parameters() if n.endswith("weight")).fill_(
                    float("inf"))
        return m

    monkeypatch.setattr(S2HPruner, "train_step", step)
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "6", "--ckpt-every", "2",
                 "--out", str(run)]) == 3
    err = capsys.readouterr().err
    assert "non-finite value" in err and "was not written" in err and "weight" in err, err
    ck = _ckpt(run)
    assert ck["step"] == 2 and _finite(ck)
    assert not list(run.glob("*.tmp"))


def test_non_finite_batchnorm_statistics_stop_the_step(tmp_path):
    class BN(_Base):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.a(x))))

    _, pruner, x, _ = _build(BN)
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1)
    with torch.no_grad():
        x = x.clone()
        x[0, 0, 0, 0] = float("inf")  # the loss stays finite only through the BN: not checked
    pruner.model.bn.running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteGradientError, match="'bn.running_var'"):
        pruner.train_step(x[1:], torch.tensor([1]), opt)


@pytest.mark.parametrize("flag,value,shown", [
    ("--batch-size", "8", "--batch-size 16 (checkpoint) vs 8 (now)"),
    ("--seed", "1", "--seed 0 (checkpoint) vs 1 (now)"),
    ("--model", "resnet20", "--model 'small_cnn' (checkpoint) vs 'resnet20' (now)"),
    ("--dataset", "fashion-mnist", "--dataset 'synthetic'"),
])
def test_resume_refuses_a_changed_setting_with_the_differences(tmp_path, capsys, flag, value,
                                                                shown):
    run = tmp_path / "r"
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "2", "--out", str(run)]
    assert main(["prune", *args[:-2], "--epochs", "1", "--out", str(run)]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    i = args.index(flag) if flag in args else None
    changed = list(args)
    if i is None:
        changed += [flag, value]
    else:
        changed[i + 1] = value
    assert main(["prune", *changed, "--resume"]) == 2
    cap = capsys.readouterr()
    assert shown in cap.err and "cannot change in the middle of a run" in cap.err, cap.err
    assert "epoch 2/2" not in cap.out
    assert (run / "checkpoint.pt").read_bytes() == before
    # the same settings (and a changed --epochs) resume
    assert main(["prune", *args, "--resume"]) == 0
    assert "applying changed settings: epochs 1 -> 2" in capsys.readouterr().out


def test_second_writer_on_one_out_is_refused(tmp_path, capsys):
    import fcntl
    import subprocess
    import sys

    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242'); f.flush(); print('ok', flush=True);"
         " time.sleep(60)", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2",
                     "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"--out {run} is in use by another s2h run (pid 4242)" in err, err
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # released with its process: the run goes through, and holds the lock while it runs
    seen = []
    orig = trainer._atomic_save

    def spy(obj, path):
        with open(run / ".lock") as f, pytest.raises(OSError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(path)
        orig(obj, path)

    trainer._atomic_save, saved = spy, trainer._atomic_save
    try:
        assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2",
                     "--out", str(run)]) == 0
    finally:
        trainer._atomic_save = saved
    assert seen


def test_atomic_writes_use_unique_temp_names(tmp_path):
    """Concurrent writers of one file (threads here) never share a temp file: every read sees a
    complete file (a fixed 'checkpoint.pt.tmp' let one writer rename another's torn file)."""
    import threading

    path = str(tmp_path / "c.pt")
    trainer._atomic_save({"v": torch.zeros(1)}, path)
    errors = []

    def writer(k):
        for i in range(15):
            try:
                trainer._atomic_save({"v": torch.full((200_000,), float(k * 100 + i))}, path)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        v = torch.load(path, weights_only=True)["v"]
        assert (v == v[0]).all()
        reads += 1
    for t in threads:
        t.join()
    assert not errors and reads
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                       monkeypatch):
    import errno

    run = tmp_path / "r"
    calls = []
    real_save = torch.save

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(trainer.torch, "save", save)
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "6", "--ckpt-every", "2",
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: no space left on the device" in err and "is intact" in err, err
    monkeypatch.undo()
    ck = trainer.load_checkpoint(str(run / "checkpoint.pt"))
    assert ck["step"] == 2
    assert not list(run.glob("*.tmp"))


def test_unwritable_out_is_a_clear_error(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", *TINY, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to --out {blocker / 'run'}"), err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trainer.os, "makedirs", denied)
    assert main(["prune", *TINY, "--epochs", "1", "--out", str(tmp_path / "ro")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--steps-per-epoch", "-1"], "--steps-per-epoch must be >= 1"),
    (["--steps-per-epoch", "0"], "--steps-per-epoch must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--gate-lr", "-0.1"], "--gate-lr must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "hf-hub:timm/resnet18.a1_in1k"], "names a hub model"),
    (["--model", "timm/resnet18.a1_in1k"], "names a hub model"),
])
def test_cli_rejects_meaningless_settings(tmp_path, capsys, monkeypatch, flags, msg):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("reached timm"))
    out = tmp_path / "o"
    assert main(["prune", *TINY, *flags, "--out", str(out)]) == 2
    assert msg in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_target_flops_types():
    model = _PlainTwo()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="target_flops"):
        S2HPruner(model, (x,), True)
    p = S2HPruner(_PlainTwo(), (x,), np.float32(0.5))
    assert p.target_flops == 0.5
    S2HPruner(_PlainTwo(), (x,), np.float64(0.75))


def test_empty_example_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one sample"):
        S2HPruner(_PlainTwo(), (torch.randn(0, 3, 8, 8),), 0.5)
    with pytest.raises(ValueError, match="at least one sample"):
        S2HPruner(_PlainTwo(), (), 0.5)


def test_corrupt_image_in_imagefolder_fails_before_training_naming_it(tmp_path, capsys,
                                                                      monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    # truncated: PIL opens it (the header is whole), decoding fails. In the test split, read
    # only after the first epoch: it used to cost a whole epoch, then a traceback
    bad = tmp_path / "data" / "val" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:-200])
    with Image.open(bad):
        pass
    steps = []
    monkeypatch.setattr(S2HPruner, "train_step", lambda *a, **k: steps.append(1) or {})
    out = tmp_path / "o"
    code = main(["prune", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--model", "small_cnn", "--batch-size", "4", "--epochs", "1", "--no-progress",
                 "--no-dense-baseline", "--no-latency", "--no-plots", "--out", str(out)])
    cap = capsys.readouterr()
    assert not steps and not (out / "checkpoint.pt").exists()  # validated before training
    assert code == 2 and str(bad) in cap.err and "not a readable image" in cap.err, cap.err


def test_without_matplotlib_the_run_finishes_and_says_how_to_get_plots(tmp_path, capsys,
                                                                       monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "s2h.plots", raising=False)
    run = tmp_path / "r"
    args = [a for a in TINY if a != "--no-plots"]
    assert main(["prune", *args, "--epochs", "1", "--steps-per-epoch", "2",
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "plots skipped: matplotlib is not installed (pip install matplotlib" in out
    assert (run / "summary.json").exists() and not (run / "plots").exists()


def test_trainer_reports_output_difference_of_export(tmp_path, capsys, monkeypatch):
    """The final line compares outputs, not accuracies: an export that differs says False."""
    run = tmp_path / "r"
    real = S2HPruner.export

    def bad_export(self, check=True):
        e = real(self, check=False)
        with torch.no_grad():
            next(m for m in e.modules() if isinstance(m, nn.Linear)).bias.add_(1e-3)
        return e

    monkeypatch.setattr(S2HPruner, "export", bad_export)
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2",
                 "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "exported == hard network: False;" in out and "max |difference| 0.001" in out, out
    s = json.loads((run / "summary.json").read_text())
    assert s["export_matches_hard_network"] is False
    assert s["export_max_abs_difference"] == pytest.approx(1e-3, rel=1e-3)
    monkeypatch.undo()
    assert main(["prune", *TINY, "--epochs", "1", "--steps-per-epoch", "2",
                 "--out", str(tmp_path / "ok")]) == 0
    assert "exported == hard network: True" in capsys.readouterr().out


@pytest.mark.parametrize("tamper,msg", [
    (lambda ck: ck["model"].pop(next(iter(ck["model"]))), "does not fit this run"),
    (lambda ck: ck["pruner"]["gates"].pop(next(iter(ck["pruner"]["gates"]))), "missing"),
    (lambda ck: next(v for v in ck["model"].values() if v.is_floating_point()).fill_(
        float("nan")), "non-finite value"),
])
def test_tampered_checkpoint_is_refused_on_resume(tmp_path, capsys, tamper, msg):
    run = tmp_path / "r"
    args = [*TINY, "--epochs", "2", "--steps-per-epoch", "2", "--out", str(run)]
    assert main(["prune", *args[:-2], "--epochs", "1", "--out", str(run)]) == 0
    ck = _ckpt(run)
    tamper(ck)
    torch.save(ck, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["prune", *args, "--resume"]) == 2
    cap = capsys.readouterr()
    assert msg in cap.err and "epoch 2/2" not in cap.out, cap.err


def test_concurrent_save_exported_to_one_folder_never_tears(tmp_path):
    import threading

    models = [nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
              for _ in range(3)]
    d = str(tmp_path / "m")
    errors = []

    def writer(m):
        for _ in range(10):
            try:
                s2h.save_exported(m, d)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    loaded = s2h.load_exported(d)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert any(torch.equal(loaded(x), m(x)) for m in models)
