"""Build of s2h and its extension ``s2h._C``.

Switches (environment variables, as in flash-attention / torchao):

* default             the C++ CPU ops always; the CUDA sources only where they can run: torch
                         has CUDA, nvcc is found *and* a GPU is present (compiling them takes
                         minutes on a small machine and is of no use without a GPU).
* ``S2H_SKIP_CUDA=1``   build only the C++ CPU ops.
* ``S2H_FORCE_CUDA=1``  build the CUDA sources even without a GPU, or when torch or nvcc look
                         unusable (fails loudly if they really are): CI sets it as a compile
                         check.
* ``TORCH_CUDA_ARCH_LIST`` archs to compile for (default ``8.0;9.0``: A100, H100/H200).
* ``MAX_JOBS``          parallel compile jobs (default 2: the CI machine has 2 cores).

Install with ``pip install -e . --no-build-isolation`` after torch is installed.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME once, at import; /usr/local/bin/nvcc may be a wrapper
# script that makes it guess /usr/local (then linking cannot find -lcudart). Prefer the toolkit.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _cuda_wanted() -> tuple[bool, str]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("S2H_SKIP_CUDA", "0") == "1":
        return False, "S2H_SKIP_CUDA=1"
    if os.environ.get("S2H_FORCE_CUDA", "0") == "1":
        return True, "S2H_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    if not torch.cuda.is_available():
        return False, "no GPU on this machine (S2H_FORCE_CUDA=1 compiles them anyway)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc}, a GPU is present"


def _extra_cuda_includes() -> list[str]:
    """Headers torch includes that the system toolkit may lack (ENV.md): the pip nvidia wheels.

    Passed to nvcc as ``-isystem`` (searched *after* the toolkit's own headers): as plain include
    dirs they would shadow the toolkit's runtime headers with another CUDA version's."""
    out = []
    try:
        import nvidia  # namespace package shipped with CUDA builds of torch

        for base in list(getattr(nvidia, "__path__", [])):
            for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
                out.append(inc)
            for inc in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
                if inc not in out:
                    out.append(inc)
    except ImportError:
        pass
    return out


def _version() -> str:
    """The one version string: ``__version__`` in s2h/__init__.py (pyproject reads it too)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "s2h", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda, why = _cuda_wanted()
    os.environ.setdefault("MAX_JOBS", "2")
    # no -std flag: BuildExtension adds the standard this torch needs (C++20 for torch >= 2.10)
    cxx = ["-O3"]
    if sys.platform != "win32":
        cxx.append("-fopenmp")
    define_macros = [("S2H_VERSION", f'"{_version()}"')]
    print(f"[s2h setup] CUDA sources: {'yes' if use_cuda else 'no'} ({why})", flush=True)
    if use_cuda and cu_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"[s2h setup] TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
        define_macros.append(("S2H_WITH_CUDA", "1"))
        define_macros.append(
            ("S2H_CUDA_ARCHS",
             '"' + re.sub(r"[\s;]+", ";", os.environ["TORCH_CUDA_ARCH_LIST"].strip()) + '"')
        )
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        for inc in _extra_cuda_includes():
            nvcc += ["-isystem", inc]
        return [
            CUDAExtension(
                "s2h._C",
                cpp_sources + cu_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
            )
        ]
    define_macros.append(("S2H_CUDA_ARCHS", '""'))
    return [
        CppExtension(
            "s2h._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    packages = find_packages(include=["s2h", "s2h.*"]) + ["s2h.kernels"]
    setup(
        packages=packages,
        package_dir={"s2h.kernels": "kernels"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
