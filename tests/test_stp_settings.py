"""STP's settings from the command line / PruneConfig to STPPruner (issue 13 item 5), and the
Fashion-MNIST bench's ``--stp-set`` (recorded in the results, checked by ``--merge``)."""

import argparse
import importlib.util
import json
import os

import pytest
import torch

from s2h.cli import _add_prune_args, _config
from s2h.prune_config import PruneConfig, validate_config
from s2h.trainer import build_model, build_pruner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli_config(*flags):
    p = argparse.ArgumentParser()
    _add_prune_args(p)
    return _config(p.parse_args(["--method", "stp", *flags]))


def _resnet20_pruner(cfg):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    return model, build_pruner(cfg, model, torch.randn(1, 1, 28, 28), warn=False)


def test_cli_stp_flags_reach_the_pruner():
    cfg = _cli_config("--stp-expand-prob", "0.25", "--no-stp-depth", "--stp-kd-weight", "2",
                      "--stp-rank", "kd_per_flop", "--stp-label-weight", "0.5",
                      "--stp-full-weight-after", "0.25")
    assert cfg.stp_label_weight == 0.5 and cfg.stp_full_weight_after == 0.25
    assert (cfg.stp_expand_prob, cfg.stp_depth, cfg.stp_kd_weight, cfg.stp_rank) == (
        0.25, False, 2.0, "kd_per_flop")
    _, p = _resnet20_pruner(cfg)
    assert p.expand_prob == 0.25 and p.kd_weight == 2.0 and p.rank == "kd_per_flop"
    assert p.label_weight == 0.5 and p.full_weight_after == 0.25
    assert p.blocks == {}  # width only: no block is ever a candidate
    assert all(kind == "width" for kind, _ in p.candidates(p.full))

    # the defaults: depth on. ResNet-20 has 3 stages of 3 blocks; every block but a stage's
    # first (which changes the shape or starts the stage) can be dropped
    d = _cli_config()
    assert (d.stp_expand_prob, d.stp_depth, d.stp_kd_weight) == (
        PruneConfig.stp_expand_prob, PruneConfig.stp_depth, PruneConfig.stp_kd_weight)
    _, p = _resnet20_pruner(d)
    assert sorted(p.blocks) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (1, 2)]
    assert p.expand_prob == d.stp_expand_prob and p.rank == d.stp_rank
    assert p.label_weight == d.stp_label_weight
    assert p.full_weight_after == d.stp_full_weight_after == 0.5


def test_kd_weight_and_expand_prob_shape_the_training_loss():
    # expand_prob 0: never a second sub-network; the loss is perf + kd_weight * kd
    cfg = PruneConfig(method="stp", target_flops=0.5, stp_expand_prob=0.0, stp_kd_weight=3.0,
                      stp_label_weight=0.0)
    model, p = _resnet20_pruner(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        out = p.train_step(x, y, opt)
        assert "expand_kd" not in out
        assert out["loss"] == pytest.approx(out["perf"] + 3.0 * out["kd"], rel=1e-5)
    # expand_prob 1: once the base is below the full network, every step adds the expansion
    cfg = PruneConfig(method="stp", target_flops=0.5, stp_expand_prob=1.0, stp_kd_weight=1.0,
                      stp_label_weight=0.0)
    model, p = _resnet20_pruner(cfg)
    p.base = p.apply(p.full, ("depth", "layer2.1"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        out = p.train_step(x, y, opt)
        assert out["loss"] == pytest.approx(out["perf"] + out["kd"] + out["expand_kd"], rel=1e-5)


def test_label_weight_adds_the_subnetwork_task_loss():
    cfg = PruneConfig(method="stp", target_flops=0.5, stp_expand_prob=0.0, stp_kd_weight=1.0,
                      stp_label_weight=0.5)
    model, p = _resnet20_pruner(cfg)
    assert p.label_weight == 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    p._ensure_round()
    arch = p.apply(p.base, p._round[0])  # the first step trains the round's first candidate
    with torch.no_grad():  # train mode: BatchNorm on the batch's statistics, as in the step
        ref = torch.nn.functional.cross_entropy(p._run(arch, (x,)).double(), y)
    out = p.train_step(x, y, opt)
    assert out["sub_flops_ratio"] == p.ratio(arch)
    assert out["sub_perf"] == pytest.approx(float(ref), rel=1e-4)
    assert out["loss"] == pytest.approx(out["perf"] + out["kd"] + 0.5 * out["sub_perf"], rel=1e-5)


def test_bad_stp_settings_are_refused():
    for kw, msg in (({"stp_expand_prob": 1.5}, "probability"),
                    ({"stp_kd_weight": -1.0}, "stp-kd-weight"),
                    ({"stp_label_weight": -1.0}, "stp-label-weight"),
                    ({"stp_full_weight_after": -1.0}, "stp-full-weight-after")):
        with pytest.raises(ValueError, match=msg):
            validate_config(PruneConfig(method="stp", **kw))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_fashion_mnist", os.path.join(ROOT, "bench", "fashion_mnist.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_stp_set_is_typed_and_reaches_the_stp_row_config():
    bench = _bench()
    p = argparse.ArgumentParser()
    got = bench._settings(p, ["stp_depth=false", "stp_expand_prob=1", "stp_width_step=2"],
                          "--stp-set")
    assert got == {"stp_depth": False, "stp_expand_prob": 1.0, "stp_width_step": 2}
    assert type(got["stp_expand_prob"]) is float and type(got["stp_width_step"]) is int
    args = argparse.Namespace(data_dir=None, batch_size=64, device="cpu", eval_batches=None,
                              workers=0, split="test", holdout=5000)
    cfg = bench._cfg(args, 0, method="stp", **got)
    assert (cfg.stp_depth, cfg.stp_expand_prob, cfg.stp_width_step) == (False, 1.0, 2)
    with pytest.raises(SystemExit):  # only stp_* keys
        bench.main(["--stp-set", "gate_lr=0.1", "--merge", "x.json"])


def _result(tmp_path, name, seed, stp_set, label_weight=1.0):
    res = {"steps": 300, "batch_size": 64, "split": "val", "eval": "v", "s2h_set": {},
           "minutes": 1.0, "started": 0.0, "command": f"run {name}", "date": "d",
           "rows": [{"method": "stp", "target": 0.35, "seed": seed, "steps": 300,
                     "exported": 80.0 + seed, "flops_ratio": 0.34, "params": 1000}]}
    if stp_set is not None:  # a run from before --stp-set records neither
        res["stp_set"] = stp_set
        res["stp_config"] = {"stp_depth": stp_set.get("stp_depth", True),
                             "stp_label_weight": label_weight}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(res))
    return str(path)


def test_bench_merge_refuses_different_stp_settings(tmp_path):
    bench = _bench()
    a = _result(tmp_path, "a", 0, {"stp_depth": False})
    b = _result(tmp_path, "b", 1, {"stp_depth": True})
    with pytest.raises(SystemExit, match="stp_set differs"):
        bench.merge([a, b])
    c = _result(tmp_path, "c", 1, {"stp_depth": False})
    merged = bench.merge([a, c])
    assert merged["stp_set"] == {"stp_depth": False} and merged["seeds"] == [0, 1]
    assert merged["stp_config"] == {"stp_depth": False, "stp_label_weight": 1.0}
    assert merged["summary"][0]["exported"] == pytest.approx(80.5)
    # the same --stp-set (none) under different STP defaults (another commit): refused
    d = _result(tmp_path, "d", 0, {})
    e = _result(tmp_path, "e", 1, {}, label_weight=0.0)
    with pytest.raises(SystemExit, match="different STP settings"):
        bench.merge([d, e])
    # a run from before --stp-set / stp_config merges only with such runs
    old = _result(tmp_path, "old", 2, None)
    old2 = _result(tmp_path, "old2", 1, None)
    assert bench.merge([old, old2])["seeds"] == [1, 2]
    with pytest.raises(SystemExit, match="different STP settings"):
        bench.merge([old, d])
    with pytest.raises(SystemExit, match="stp_set differs"):
        bench.merge([old, a])


def test_kd_per_flop_ranks_by_kd_added_per_flops_saved():
    from test_stp_budget import _resnet, _torch_flops

    _, dense, p, x = _resnet(target=0.2, scoring="probe", rank="kd_per_flop")
    _, _, q, _ = _resnet(target=0.2, scoring="probe", rank="kd")
    dense_flops = _torch_flops(dense, x[:2])

    def saved(pruner, cand):  # FLOPs fraction a candidate saves, by torch's counter
        base = pruner.base
        r0 = _torch_flops(pruner.export(), x[:2])
        pruner.base = pruner.apply(base, cand)
        r1 = _torch_flops(pruner.export(), x[:2])
        pruner.base = base
        return (r0 - r1) / dense_flops

    wide, deep = ("width", "stage.0.conv1"), ("depth", "stage.1")
    s_wide, s_deep = saved(p, wide), saved(p, deep)
    assert s_deep > 2 * s_wide > 0  # dropping a block saves far more than one width step
    # the width step adds less KD (0.10 vs 0.15) but per FLOP saved the block drop is cheaper
    base_kd, kd_wide, kd_deep = 0.05, 0.10, 0.15
    assert (kd_deep - base_kd) / s_deep < (kd_wide - base_kd) / s_wide
    for pr in (p, q):
        pr._ensure_round()
        pr._round = [wide, deep]
        pr._scores = {wide: [kd_wide], deep: [kd_deep]}
        if pr.rank == "kd_per_flop":
            pr._scores[("base", "")] = [base_kd]
    assert q.commit() == wide and q.base.dropped == frozenset()
    assert p.commit() == deep and p.base.dropped == {"stage.1"}
    assert p.commits[-1]["kd"] == kd_deep  # the commit log keeps the raw KD loss
    assert p._last_scores[deep] == pytest.approx((kd_deep - base_kd) / s_deep, rel=1e-6)
    with pytest.raises(ValueError, match="needs scoring='probe'"):
        _resnet(scoring="trial", rank="kd_per_flop")


def test_kd_per_flop_probes_the_base_and_lands_on_the_budget():
    from test_stp_budget import _exported_ratio, _resnet, _run_exploration

    p, dense, x, steps = _run_exploration(0.35, rank="kd_per_flop", commits_per_round=3,
                                          width_step=2)
    assert p.explore_done, f"exploration still running after {steps} steps"
    r = _exported_ratio(p, dense, x[:2])
    assert 0.35 - 0.03 <= r <= 0.35 + 0.005, (r, p.commits, p.projection)
    # every round scored the base too: it never shows up as a candidate or a commit
    assert all(c["kind"] in ("width", "depth") for c in p.commits)
    assert ("base", "") not in p._last_scores
    # mid-round (trials 2, one step done) the round's scores hold the base's probe KD, and a
    # resumed pruner continues the round with them
    _, _, q, x = _resnet(target=0.35, divisor=2, trials=2, rank="kd_per_flop")
    opt = torch.optim.SGD(q.weight_parameters(), lr=0.01)
    q.train_step(x, torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1)), opt)
    assert len(q._scores[("base", "")]) == 1 and len(q._scores) == len(q._round) + 1
    _, _, r2, _ = _resnet(target=0.35, divisor=2, trials=2, rank="kd_per_flop")
    r2.load_state_dict(q.state_dict())
    assert r2._scores == q._scores and r2._round == q._round
