#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build, `pytest -m gpu`, the benchmarks, a short
# table last. Runs on the GPU host as it is (torch >= 2.11 preinstalled, no package registry):
#
#     bash bench/run_gpu.sh [--quick]
#
# --quick (issue 14: <= 8 minutes on an H100/H200, build included): the build for this GPU's
# arch only; kernels run their first kept config (S2H_AUTOTUNE=0: no autotuning, rows say
# "autotune": false); the benchmarks at p ~ 0.15 only, on the issue's shapes. Each stage has its
# own time limit, so one that hangs or compiles for too long cannot take the later ones with it.
#
# Rows go to $OUT/rows.jsonl when $OUT is set (the device tool's folder), else to
# bench/results/gpu-<date>/; logs beside them (run.log, failures.txt: each failing test's report
# as it happens). S2H_BENCH_COMMIT names the commit when the copy has no .git.
# S2H_GPU_STAGES: a comma list of the stages to run (default all: build, segv, s2h_step,
# profile, export_latency, dual_forward, gather, wgrad_check, pytest); S2H_GPU_DEADLINE: seconds
# from the start after which no stage runs on (each stage's limit is cut to what is left).
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
QUICK="${1:-}"
PY="${PYTHON:-python3}"
START=$(date +%s)
if [ -n "${OUT:-}" ]; then dir="$OUT"; else dir="bench/results/gpu-$(date +%F-%H%M)"; fi
mkdir -p "$dir"
rows="$dir/rows.jsonl"
: > "$dir/summary.txt"

STAGES=",${S2H_GPU_STAGES:-build,segv,s2h_step,profile,export_latency,dual_forward,gather,wgrad_check,pytest},"
DEADLINE=$(( START + ${S2H_GPU_DEADLINE:-100000} ))
want() { [[ "$STAGES" == *",$1,"* ]]; }

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, full output to $dir/run.log
    local name=$1 limit=$2 t0 rc left
    shift 2
    want "$name" || return 0
    t0=$(date +%s)
    left=$(( DEADLINE - t0 - 5 ))
    if [ "$left" -lt 10 ]; then echo "$name skipped: deadline" | tee -a "$dir/summary.txt"; return 0; fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit}s, at +$((t0 - START))s)" | tee -a "$dir/run.log"
    timeout -k 10 "$limit" "$@" >> "$dir/run.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$dir/summary.txt" "$dir/run.log"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv > "$dir/nvidia-smi.txt" 2>&1
cat "$dir/nvidia-smi.txt"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if [ "$QUICK" = "--quick" ]; then
    export TORCH_CUDA_ARCH_LIST="$arch" S2H_AUTOTUNE=0
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stage build 240 "$PY" -m pip install -e . --no-build-isolation --no-deps -q || {
    tail -40 "$dir/run.log"; echo "build failed"; exit 1; }
"$PY" -m s2h info 2>&1 | tee -a "$dir/run.log" | grep -E "torch:|triton:|cuda_archs|loaded"
export S2H_FAILURE_LOG="$dir/failures.txt"

# A native backtrace of the CUDA channel op's crash on an out-of-range index (seen once: a
# segfault instead of the IndexError its test expects).
if command -v cuda-gdb > /dev/null; then
    stage segv 60 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary s2h" --args "$PY" -c \
        "import torch, s2h.ops as o; x = torch.randn(2, 8, 4, device='cuda'); \
o.gather_channels(x, torch.tensor([0, 8], device='cuda'), 1)"
fi

xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
if [ "$QUICK" = "--quick" ]; then
    # correctness first, then speed
    stage wgrad_check 150 "$PY" bench/wgrad_check.py --dtypes bf16,fp16 --repeats 5 --out "$rows"
    stage pytest 400 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu \
        "${xdist[@]}" tests/ -rfE --tb=short --timeout 150
    stage s2h_step 150 "$PY" bench/s2h_step.py --keep 0.15 --reps 10 --out "$rows"
    stage profile 120 "$PY" bench/profile_step.py --model resnet50 --img 32 --batch 256 \
        --keep 0.15 --fused false,true --out "$rows"
    stage export_latency 60 "$PY" bench/export_latency.py --no-cpu --keeps 0.15 \
        --models resnet50,vit_small_patch16_224 --gpu-batches 256 --out "$rows"
    stage dual_forward 60 "$PY" bench/dual_forward.py --compile none --keep 0.15 \
        --cases r50.l1.conv3x3_64_64 r50.l1.conv1x1_256_64 vit.qkv vit.fc1 --out "$rows"
    stage gather 40 "$PY" bench/gather.py --keep 0.15,0.35 --reps 20 --out "$rows"
else
    stage pytest 600 "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark -m gpu \
        "${xdist[@]}" tests/ -rfE --tb=short
    stage kernel_tests 900 "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
        tests/test_functional.py tests/test_dual.py tests/test_ops.py
    stage gather 300 "$PY" bench/gather.py --out "$rows"
    stage dual_forward 1800 "$PY" bench/dual_forward.py --compile max-autotune --out "$rows"
    stage s2h_step 1200 "$PY" bench/s2h_step.py --out "$rows"
    stage export_latency 600 "$PY" bench/export_latency.py --no-cpu --out "$rows"
fi

echo "== failures and errors (pytest)"
grep -E "^(FAILED|ERROR)|^=== " "$dir/run.log" "$dir/failures.txt" 2>/dev/null | cut -c1-200 | head -30
grep -E "^E  |Error|error:|warn" "$dir/run.log" "$dir/failures.txt" 2>/dev/null \
    | grep -v "^FAILED\|^ERROR" | cut -c1-220 | sort | uniq -c | sort -rn | head -20
echo "== segv backtrace"; grep -E "^#[0-9]+ " "$dir/run.log" | cut -c1-200 | head -14
echo "== wgrad_check"; grep -E "^config |wgrad_check:|Error" "$dir/run.log" | cut -c1-300 | head -12
echo "== profile"; sed -n '/S2H step profile/,/^== /p' "$dir/run.log" | head -40
echo "== stages"; cat "$dir/summary.txt"
echo "== rows in $rows"
[ -f "$rows" ] && "$PY" - "$rows" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows[-60:]:
    extra = {k: r[k] for k in ("speedup", "copy_fraction", "ratio_to_dense", "floor",
                               "peak_mem_ratio", "reference_ms", "dense_ms")
             if isinstance(r.get(k), (int, float))}
    print(f"{r['bench'][:12]:12s} {str(r.get('case'))[:26]:26s} {str(r.get('impl', ''))[:6]:6s}"
          f"{str(r.get('mode', ''))[:7]:7s} b={r.get('batch')} keep={r.get('keep')} "
          f"ms={r.get('ms', float('nan')):.3f} "
          + " ".join(f"{k}={v:.3g}" for k, v in extra.items())
          + ("" if r.get("lockstep", True) else " LOCKSTEP=False"))
PY
echo "total $(( $(date +%s) - START ))s"
