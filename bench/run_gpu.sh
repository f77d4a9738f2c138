#!/usr/bin/env bash
# Everything that needs a GPU, in one call (issue 7): build, `pytest -m gpu`, every benchmark,
# rows appended to bench/results/<date>-<gpu>.jsonl, a short table at the end.
# Runs on the GPU host as it is (torch >= 2.11 preinstalled, no package registry):
#     bash bench/run_gpu.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
QUICK="${1:-}"
python -m pip install -e . --no-build-isolation --no-deps -q || { echo "build failed"; exit 1; }
python -m s2h info
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="bench/results/$(date +%F)-${gpu}.jsonl"
mkdir -p bench/results
echo "== pytest -m gpu"; python -m pytest -q -m gpu tests/ 2>&1 | tail -25
echo "== dual kernels on CUDA (full files)"; python -m pytest -q tests/test_functional.py tests/test_dual.py 2>&1 | tail -5
echo "== gather"; python bench/gather.py --out "$out"
if [ "$QUICK" = "--quick" ]; then compile=none; else compile=max-autotune; fi
echo "== dual_forward"; python bench/dual_forward.py --out "$out" --compile "$compile"
echo "== s2h_step"; python bench/s2h_step.py --out "$out"
if [ -f bench/export_latency.py ]; then echo "== export_latency"; python bench/export_latency.py --out "$out"; fi
echo "== rows in $out"
python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows[-60:]:
    extra = {k: r[k] for k in ("speedup", "copy_fraction", "ratio_to_dense", "peak_mem_ratio") if k in r}
    print(f"{r['bench']:15s} {str(r.get('case'))[:34]:34s} keep={r.get('keep')} ms={r.get('ms'):.3f} "
          + " ".join(f"{k}={v:.2f}" for k, v in extra.items() if isinstance(v, (int, float))))
PY
