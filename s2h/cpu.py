"""CPU run settings that keep an S2H step at its cost floor (issue 16, item 7).

An S2H step keeps two graphs alive (the soft and the hard network) and frees them at its end.
glibc's allocator gives the freed top of the heap back to the system (``M_TRIM_THRESHOLD``)
and serves large blocks with fresh ``mmap`` s (``M_MMAP_THRESHOLD``), so the next step touches
new pages again: measured on ResNet-20 (batch 64, 28x28, one thread) ~27,700 minor page
faults per S2H step (~110 MB zeroed by the kernel) against none for a dense step, and 2.75
instead of 2.45-2.52 dense steps per S2H step (``bench/s2h_step.py`` reports both). A dense
step stays below glibc's dynamic thresholds and never pays this.

:func:`tune_allocator` sets both thresholds once for the process (the blocks of a step are
then reused from the heap, as a caching allocator would): peak memory stays reserved between
steps instead of being returned and faulted in again. ``s2h prune`` calls it for CPU runs.
glibc offers no way to read the thresholds back, so the setting lasts for the process; set
``S2H_TUNE_MALLOC=0`` to leave the allocator alone. Other C libraries (macOS, musl) are left
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "allocator_state", "tune_allocator"]

#: blocks up to this size come from the heap (glibc caps the setting at 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept instead of returned to the system
TRIM_THRESHOLD = 1 << 30

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_state: dict | None = None


def allocator_state() -> dict:
    """What :func:`tune_allocator` did in this process (``{"tuned": False, ...}`` before)."""
    return dict(_state) if _state is not None else {"tuned": False, "reason": "not requested"}


def tune_allocator() -> dict:
    """Set glibc's mmap and trim thresholds for this process (once; later calls return the
    first result). Returns ``{"tuned": bool, "reason": str, ...}``."""
    global _state
    if _state is not None:
        return dict(_state)
    if os.environ.get("S2H_TUNE_MALLOC", "1") == "0":
        _state = {"tuned": False, "reason": "S2H_TUNE_MALLOC=0"}
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = {"tuned": False, "reason": f"not glibc ({platform.system()} "
                                            f"{platform.libc_ver()[0] or 'unknown libc'})"}
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
        except (OSError, AttributeError) as e:  # no libc to load, or no mallopt in it
            _state = {"tuned": False, "reason": f"mallopt unavailable: {e}"}
        else:
            _state = {"tuned": ok, "reason": "glibc mallopt" if ok else "mallopt refused",
                      "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return dict(_state)
