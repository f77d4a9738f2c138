"""``s2h info`` / ``python -m s2h.info``: versions, what was built, which back-end runs each op."""

from __future__ import annotations

import platform


def collect() -> dict:
    import torch

    out: dict = {
        "s2h": __import__("s2h").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    try:
        from . import ops

        out["extension_loaded"] = ops.available()
        out["extension_build"] = ops.build_info()
        out["channel_ops"] = ops.op_backends()
    except Exception as exc:  # pragma: no cover - depends on the build
        out["extension_loaded"] = False
        out["extension_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from . import functional

        out["dual_kernels"] = {
            "cpu": functional.backend_for(torch.device("cpu")),
            "cuda": functional.backend_for(torch.device("cuda")),
        }
    except Exception as exc:  # pragma: no cover
        out["dual_kernels"] = f"unavailable ({type(exc).__name__}: {exc})"
    import os

    out["S2H_BACKEND"] = os.environ.get("S2H_BACKEND", "auto")
    return out


def format_info(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for k2, v2 in v.items():
                lines.append(f"    {k2}: {v2}")
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)


def main() -> int:
    print(format_info(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
