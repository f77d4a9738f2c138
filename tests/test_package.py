"""Packaging: s2h.kernels ships inside the distribution, no bare `kernels`, extension info."""

import os
import subprocess
import sys


def _run(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_kernels_ship_inside_s2h_and_no_bare_kernels_package(tmp_path):
    r = _run("import s2h.kernels, os; "
             "print(os.path.basename(os.path.dirname(s2h.kernels.__file__)))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kernels"
    r = _run("import kernels", tmp_path)
    assert r.returncode != 0 and "No module named 'kernels'" in r.stderr


def test_extension_reports_its_build(tmp_path):
    r = _run("import json, s2h.info as i; print(json.dumps(i.collect(), default=str))", tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    # one version string: s2h.__version__, read by pyproject (package metadata) and setup.py
    # (the extension's S2H_VERSION)
    from importlib.metadata import version

    assert info["s2h"] == version("s2h")
    from s2h import ops

    if ops.build_info()["loaded"]:
        assert ops.build_info()["version"] == version("s2h")
    assert "channel_ops" in info and "dual_kernels" in info


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "s2h")
    assert os.path.exists(exe), "pip install -e . creates the `s2h` console script"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "prune" in r.stdout
