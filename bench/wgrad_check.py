"""Where is the fused linear weight gradient wrong? (GPU diagnostic, H200 2026-11-29 finding)

`pytest -m gpu` found the weight gradient of `s2h_kernels::dual_linear_wgrad` off by 13-17
(PyTorch's own same-dtype error: 0.2-2.3) at 4 of the 8 ViT-B/16 linear cases. This script
calls the op directly at those shapes against a float64 reference and separates the suspects:

* soft path only / hard path only / both (which problem's tiles are wrong);
* repeats (a race moves; a logic error does not);
* every wgrad candidate config on its own (a config-specific miscompile or tiling bug);
* the hard path's scatter (`index_put(accumulate=True)` of the compact gradient) against a
  plain indexed add;
* the location of the wrong entries, in units of the config's tile, and whether the error
  is the contribution of whole row blocks (rows missed or counted twice by the row splits).

    python bench/wgrad_check.py [--cases qkv,proj,fc1,fc2] [--dtypes bf16,fp16,fp32]
                                [--out rows.jsonl]

Prints one line per (case, dtype, config, path, repeat) and writes rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

VIT_B16 = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROWS = 16 * 197


def _commit() -> str:
    if os.environ.get("S2H_BENCH_COMMIT"):
        return os.environ["S2H_BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def make_case(n_in: int, n_out: int, seed: int, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)
    k_h, n_h = round(0.6 * n_in), round(0.6 * n_out)
    in_keep = torch.randperm(n_in, generator=g)[:k_h].sort().values
    out_keep = torch.randperm(n_out, generator=g)[:n_h]  # unsorted, as the test's
    hm = 1.0 + 0.2 * (torch.rand(k_h, generator=g) - 0.5)
    hm[1::4] = 0.0
    return {
        "xs": torch.randn(ROWS, n_in, generator=g, dtype=torch.float64).to(dev),
        "xh": torch.randn(ROWS, k_h, generator=g, dtype=torch.float64).to(dev),
        "dys": torch.randn(ROWS, n_out, generator=g, dtype=torch.float64).to(dev),
        "dyh": torch.randn(ROWS, n_h, generator=g, dtype=torch.float64).to(dev),
        "ms": torch.rand(n_in, generator=g, dtype=torch.float64).to(dev),
        "mh": hm.double().to(dev),
        "in_keep": in_keep.to(dev),
        "out_keep": out_keep.to(dev),
        "shape": (n_out, n_in),
    }


def reference(c: dict, soft: bool, hard: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """dW in float64 from inputs rounded to ``dtype`` (None: exact float64 inputs); with a
    dtype, also computed in that dtype by torch (its own error, for the 2x rule)."""
    n_out, n_in = c["shape"]
    if dtype is None:
        dw = torch.zeros(n_out, n_in, dtype=torch.float64, device=c["xs"].device)
        if soft:
            dw += c["dys"].t() @ (c["xs"] * c["ms"])
        if hard:
            part = c["dyh"].t() @ (c["xh"] * c["mh"])
            dw[c["out_keep"][:, None], c["in_keep"][None, :]] += part
        return dw
    r = {k: c[k].to(dtype) for k in ("xs", "xh", "dys", "dyh")}
    dw = torch.zeros(n_out, n_in, dtype=dtype, device=c["xs"].device)
    if soft:
        dw += r["dys"].t() @ (r["xs"] * c["ms"].to(dtype))
    if hard:
        part = r["dyh"].t() @ (r["xh"] * c["mh"].to(dtype))
        dw[c["out_keep"][:, None], c["in_keep"][None, :]] += part
    return dw.double()


def locate(err: torch.Tensor, thresh: float, bn: int, bk: int) -> dict:
    bad = err > thresh
    if not bad.any():
        return {"bad": 0}
    idx = bad.nonzero()
    tiles = sorted({(int(n) // bn, int(k) // bk) for n, k in idx.tolist()})
    return {
        "bad": int(bad.sum()),
        "bad_frac": float(bad.float().mean()),
        "rows_n": [int(idx[:, 0].min()), int(idx[:, 0].max())],
        "cols_k": [int(idx[:, 1].min()), int(idx[:, 1].max())],
        "tiles": tiles[:12],
        "n_tiles": len(tiles),
    }


def row_blocks(c: dict, diff: torch.Tensor, soft: bool, block: int = 32) -> list:
    """Row blocks whose (soft or hard) contribution explains the error: least-squares
    coefficient of each block's contribution against the error (1 = counted twice, -1 =
    missed)."""
    x, dy, m = (c["xs"], c["dys"], c["ms"]) if soft else (c["xh"], c["dyh"], c["mh"])
    if not soft:
        diff = diff[c["out_keep"][:, None], c["in_keep"][None, :]]
    out = []
    for r0 in range(0, x.shape[0], block):
        contrib = dy[r0:r0 + block].t() @ (x[r0:r0 + block] * m)
        coef = float((contrib * diff).sum() / (contrib * contrib).sum().clamp_min(1e-30))
        if abs(coef) > 0.3:
            out.append((r0, round(coef, 2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="qkv,proj,fc1,fc2")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    args = ap.parse_args()
    global ROWS
    if args.small:  # a smoke test of this script (CPU: TRITON_INTERPRET=1)
        ROWS = 150
        for k, (a, b) in VIT_B16.items():
            VIT_B16[k] = (a // 24, b // 24)
    elif not torch.cuda.is_available():
        sys.exit("wgrad_check: needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    from s2h.kernels import _common
    from s2h.kernels import dual_linear as kdl

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tuner = kdl._dual_linear_wgrad_kernel
    candidates = [_common.wgrad_candidates()[i] for i in kdl.WGRAD_KEEP]
    candidates += [c for i, c in enumerate(_common.wgrad_candidates()) if i not in kdl.WGRAD_KEEP]
    rows = []
    commit = _commit()
    t_start = time.time()
    for name in args.cases.split(","):
        n_in, n_out = VIT_B16[name]
        c = make_case(n_in, n_out, args.seed, dev)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            paths = ((True, False), (False, True), (True, True))
            exact = {p: reference(c, *p, None) for p in paths}
            same = {p: reference(c, *p, dtype) for p in exact}
            w = torch.empty(n_out, n_in, dtype=dtype, device=dev)
            t = {k: c[k].to(dtype) for k in ("xs", "xh", "dys", "dyh")}
            ms, mh = c["ms"].float(), c["mh"].float()
            for ci, cfg in enumerate(candidates if dev.type == "cuda" else tuner.configs):
                kern = tuner.wide if (dtype == torch.float32 and hasattr(tuner, "wide")) else tuner
                if kern is not tuner:  # fp32 launches run the variant with half the row step
                    cfg = _common.wide_config(cfg, "BLOCK_M")
                kern.configs, kern.cache = [cfg], {}
                bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
                for path in exact:
                    soft, hard = path
                    outs = []
                    for _rep in range(args.repeats):
                        try:
                            dw, _db = kdl.dual_linear_wgrad_op(
                                t["dys"] if soft else None, t["dyh"] if hard else None,
                                t["xs"], t["xh"], w, ms, mh, c["in_keep"], c["out_keep"], True,
                            )  # fmt: skip
                            if dev.type == "cuda":
                                torch.cuda.synchronize()
                            outs.append(dw.double())
                        except Exception as e:  # noqa: BLE001
                            outs.append(None)
                            print(f"{name} {dname} cfg{ci} {path}: {type(e).__name__}: "
                                  f"{str(e)[:200]}", flush=True)  # fmt: skip
                            break
                    if outs[0] is None:
                        continue
                    scale = float(exact[path].abs().max())
                    torch_err = float((same[path] - exact[path]).abs().max())
                    errs = [float((o - exact[path]).abs().max()) for o in outs]
                    spread = max(float((o - outs[0]).abs().max()) for o in outs)
                    diff = outs[0] - exact[path]
                    floor = (0.05 * torch.finfo(dtype).eps * scale if dtype != torch.float32
                             else 1e-4 * scale)  # fmt: skip
                    bad_repeats = sum(e > 2 * torch_err + floor for e in errs)
                    ok = bad_repeats == 0
                    row = {
                        "bench": "wgrad_check", "case": f"vit.{name}", "dtype": dname,
                        "config": {**cfg.kwargs, "warps": cfg.num_warps,
                                   "stages": cfg.num_stages},
                        "config_index": ci, "path": "both" if soft and hard else
                        ("soft" if soft else "hard"),
                        "errs": [round(e, 4) for e in errs], "torch_err": round(torch_err, 4),
                        "scale": round(scale, 2), "repeat_spread": spread, "ok": ok,
                        "bad_repeats": bad_repeats,
                        "commit": commit,
                        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                    }  # fmt: skip
                    if not ok:
                        row["where"] = locate(diff.abs(), 2 * torch_err + floor, bn, bk)
                        if soft:
                            row["soft_row_blocks"] = row_blocks(c, diff, True)[:16]
                        if hard:
                            row["hard_row_blocks"] = row_blocks(c, diff, False)[:16]
                    rows.append(row)
                    print(
                        f"{name:4s} {dname} cfg{ci} {row['path']:4s} "
                        f"{'ok ' if ok else 'BAD'} errs={row['errs']} torch={torch_err:.3g} "
                        f"spread={spread:.3g}" + ("" if ok else f" where={row.get('where')} "
                        f"soft_rb={row.get('soft_row_blocks')} "
                        f"hard_rb={row.get('hard_row_blocks')}"),
                        flush=True,
                    )  # fmt: skip
            # The hard path's scatter on its own: index_put(accumulate) vs an indexed add.
            part = torch.randn(len(c["out_keep"]), len(c["in_keep"]), device=dev)
            base = torch.randn(n_out, n_in, device=dev)
            a = base.index_put((c["out_keep"][:, None], c["in_keep"][None, :]), part,
                               accumulate=True)  # fmt: skip
            b = base.clone()
            b[c["out_keep"][:, None], c["in_keep"][None, :]] += part
            cpu = base.cpu().index_put(
                (c["out_keep"].cpu()[:, None], c["in_keep"].cpu()[None, :]), part.cpu(),
                accumulate=True,
            )
            print(f"{name:4s} {dname} index_put vs indexed add {float((a - b).abs().max()):.3g},"
                  f" vs cpu {float((a.cpu() - cpu).abs().max()):.3g}", flush=True)  # fmt: skip
    for ci in sorted({r["config_index"] for r in rows}):
        mine = [r for r in rows if r["config_index"] == ci]
        print(f"config {ci} {mine[0]['config']}: {sum(r['bad_repeats'] for r in mine)} bad of "
              f"{sum(len(r['errs']) for r in mine)} runs, max spread between repeats "
              f"{max(r['repeat_spread'] for r in mine):.3g}", flush=True)  # fmt: skip
    print(f"wgrad_check: {sum(r['ok'] for r in rows)}/{len(rows)} ok, "
          f"{time.time() - t_start:.0f}s", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
