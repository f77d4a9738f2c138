"""Ahead-of-time compile of the dual kernels for a real GPU target, on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests) checks numerics only: it
accepts code that the compiler rejects (a plain Python global read inside ``@triton.jit``
was one such case). This module compiles every kernel *exactly as a launch would*:

1. :func:`capture_launches` runs an op's host code (``torch.ops.s2h_kernels.*`` bodies) on
   CPU tensors with the launcher swapped for a recorder, so every kernel launch the op would
   make -- its arguments, constexprs and grid -- is captured instead of run;
2. :func:`compile_launch` binds those arguments with Triton's own specialisation rules (the
   16-byte alignment of pointers, the divisibility of integers by 16, integers equal to 1)
   for a :class:`~triton.backends.compiler.GPUTarget` and calls :func:`triton.compile`: the
   TTIR, TTGIR, PTX and cubin (ptxas ships in the triton wheel) are produced for the target;
3. :func:`kernel_stats` reads the result: registers, spills, shared memory, tensor-core ops
   (``wgmma`` on sm_90, ``mma`` on sm_80), asynchronous copies and global-load widths.

Needs triton importable *without* ``TRITON_INTERPRET=1`` (interpreted kernels are not
compiled). ``bench/compile_kernels.py`` is the command line; CI runs it in quick mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common, dual_conv2d, dual_depthwise, dual_linear

# Per-block shared-memory limits (opt-in maximum, bytes): H100/H200 and A100.
SMEM_LIMIT = {90: 232448, 80: 166912}


@dataclass
class Launch:
    """One kernel launch as the op would make it."""

    kernel: Any  # the Autotuner or JITFunction the op launches
    args: tuple
    kwargs: dict

    @property
    def jit_fn(self) -> JITFunction:
        """The JITFunction under the autotuner / heuristics wrappers."""
        fn = self.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        return fn

    @property
    def name(self) -> str:
        return self.jit_fn.__name__

    def configs(self) -> list[triton.Config]:
        """The autotune configs (a single empty config for a plain jit kernel)."""
        return list(getattr(self.kernel, "configs", [triton.Config({})]))


class _Recorder:
    def __init__(self, kernel: Any, sink: list[Launch]) -> None:
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            kernel = _common.kernel_for(self.kernel, args)
            kwargs = _common.with_align_hint(kernel, args, kwargs)
            self.sink.append(Launch(kernel, args, kwargs))

        return record


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Within the block, the dual ops record their kernel launches instead of running them.

    The ops' outputs are then left uninitialised; only the recorded launches are meaningful.
    """
    if _common.INTERPRET:
        raise RuntimeError("capture_launches compiles real kernels: unset TRITON_INTERPRET")
    sink: list[Launch] = []
    modules = (dual_linear, dual_conv2d, dual_depthwise)  # every module that launches kernels
    saved = [m.launcher for m in modules]

    def recorder(kernel: Any) -> _Recorder:
        return _Recorder(kernel, sink)

    for m in modules:
        m.launcher = recorder
    try:
        yield sink
    finally:
        for m, s in zip(modules, saved, strict=True):
            m.launcher = s


def compile_launch(launch: Launch, config: triton.Config, target: GPUTarget) -> Any:
    """Compile ``launch`` with autotune ``config`` for ``target``; returns the compiled kernel.

    The arguments are specialised by Triton's own binder, as a real launch on that target
    would specialise them (so a compact width that is not a multiple of 16 is compiled with
    the alignment Triton can prove, exactly as at run time).
    """
    fn = launch.jit_fn
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.update(config.all_kwargs())
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


@dataclass
class KernelStats:
    """What a compiled kernel uses and which instructions carry its hot loop."""

    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    shared_bytes: int
    mma: int  # tensor-core instructions in the PTX: wgmma (sm_90) or mma.sync (sm_80)
    async_copies: int  # cp.async (16-byte and narrower) and bulk tensor copies (TMA)
    loads_16B: int  # 16-byte global loads (cp.async of 16 bytes, ld.global.v4.b32 / .v2.b64)
    loads_2B: int  # 2-byte (or narrower) global loads: an unaligned bf16/fp16 stream


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = out.stdout + out.stderr
    regs = max((int(m) for m in _PTXAS_REGS.findall(log)), default=0)
    spills = sum(int(a) + int(b) for a, b in _PTXAS_SPILL.findall(log))
    return regs, spills


def kernel_stats(compiled: Any) -> KernelStats:
    """Resource use and instruction mix of a compiled kernel (metadata, PTX and ptxas -v)."""
    ptx: str = compiled.asm["ptx"]
    arch = int(compiled.metadata.target.arch)
    regs, spills = _ptxas_usage(ptx, arch)

    def count(pattern: str) -> int:
        return len(re.findall(pattern, ptx))

    cp_async = r"\bcp\.async\.c[ag]\.shared\.global(?:\.\w+)* \[[^]]+\], \[[^]]+\], "
    cp_async_16 = count(cp_async + r"0x10\b")
    cp_async_2 = count(cp_async + r"0x[12]\b")
    return KernelStats(
        registers=regs,
        spill_bytes=spills,
        shared_bytes=int(compiled.metadata.shared),
        mma=count(r"\bwgmma\.mma_async\b") + count(r"\bmma\.sync\b"),
        async_copies=count(r"\bcp\.async\.c[ag]\b") + count(r"\bcp\.async\.bulk\.tensor\b"),
        loads_16B=cp_async_16 + count(r"\bld\.global(?:\.\w+)*\.v4\.[bfu]32\b")
        + count(r"\bld\.global(?:\.\w+)*\.v2\.[bfu]64\b"),
        loads_2B=cp_async_2 + count(r"\bld\.global(?:\.\w+)*\.[bfu](?:16|8)\b"),
    )
