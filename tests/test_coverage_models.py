"""bench/coverage.py's runner: one row per model whatever happens to it."""

import importlib.util
import os

import pytest

pytest.importorskip("torchvision")
_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "coverage.py")


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("s2h_bench_coverage", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_model_that_fails_shows_the_error_in_its_row(coverage):
    row = coverage.check("torchvision.no_such_model", 32, {})
    assert (row["groups"], row["flops"], row["train"], row["export"]) == ("-",) * 4
    assert "ValueError" in row["note"] and "no_such_model" in row["note"]


def test_a_model_past_the_time_limit_shows_it_and_the_run_goes_on(coverage):
    row = coverage.check("torchvision.resnet18", 32, {}, time_limit=0.05)
    assert "over the time limit" in row["note"] and row["export"] == "-"
    assert row["time_s"] < 30


def test_torchvision_rows_are_listed_with_inputs_their_models_accept(coverage):
    rows = {name: size for name, size, _ in coverage.MODELS if name.startswith("torchvision.")}
    assert {"torchvision.vit_b_16", "torchvision.swin_t", "torchvision.maxvit_t",
            "torchvision.inception_v3", "torchvision.densenet121"} <= set(rows)
    assert rows["torchvision.inception_v3"] >= 75 and rows["torchvision.maxvit_t"] % 224 == 0
