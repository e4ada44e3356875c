"""Build recipe of the fused residual LayerNorm extensions: one source of truth for setup.py and
the JIT path in megabranch/ops/residual_ln_loader.py.

This file is loaded by path (it is not part of an importable package, and a module called
``build`` would clash with PyPA's ``build``), e.g.::

    spec = importlib.util.spec_from_file_location("megabranch_kernels_build", "kernels/build.py")

Everything here imports torch lazily, so the file can be loaded where torch is missing.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent

# Extension module names: the prebuilt modules that setup.py installs inside the package, and the
# names the JIT path builds under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
CPU_EXT_NAME = "megabranch._C_residual_ln_cpu"
CUDA_EXT_NAME = "megabranch._C_residual_ln_cuda"
CPU_JIT_NAME = "megabranch_residual_ln_cpu"
CUDA_JIT_NAME = "megabranch_residual_ln_cuda"

_CPU_SOURCES = ["residual_ln_cpu.cpp"]
_CUDA_SOURCES = ["residual_ln_cuda_binding.cpp", "residual_ln_cuda.cu"]
_HEADERS = ["residual_ln_common.h", "residual_ln_cuda.h"]
_CPU_HEADERS = ["residual_ln_common.h", "residual_ln_cpu_rows.h"]

# CUDA architectures compiled by setup.py / the JIT build (when TORCH_CUDA_ARCH_LIST is unset) and
# by the compile-only check.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")

# Default places to look for the CUDA toolkit when neither CUDA_HOME nor CUDA_PATH is set.
_CUDA_SEARCH = ("/usr/local/cuda",)


def _paths(names: list[str], relative_to: str | os.PathLike | None) -> list[str]:
    out = []
    for n in names:
        p = KERNELS_DIR / n
        out.append(os.path.relpath(p, relative_to) if relative_to is not None else str(p))
    return out


def cpu_sources(relative_to: str | os.PathLike | None = None) -> list[str]:
    """Sources of the CPU extension (absolute, or relative to `relative_to`, e.g. setup.py's dir)."""
    return _paths(_CPU_SOURCES, relative_to)


def cuda_sources(relative_to: str | os.PathLike | None = None) -> list[str]:
    """Sources of the CUDA extension: the host binding (.cpp) and the kernels (.cu)."""
    return _paths(_CUDA_SOURCES, relative_to)


def header_files(relative_to: str | os.PathLike | None = None) -> list[str]:
    return _paths(sorted(set(_HEADERS + _CPU_HEADERS)), relative_to)


def include_dirs() -> list[str]:
    return [str(KERNELS_DIR)]


def source_hash(kind: str) -> int:
    """A 48-bit hash of the sources and headers of the "cpu" or "cuda" extension.  Compiled into
    the module (RLN_SOURCE_HASH) so the loader can tell a stale prebuilt module from a fresh one."""
    import hashlib

    names = _CPU_SOURCES + _CPU_HEADERS if kind == "cpu" else _CUDA_SOURCES + _HEADERS
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update((KERNELS_DIR / name).read_bytes())
    return int(h.hexdigest()[:12], 16)


def cpu_extra_compile_args() -> list[str]:
    # -O3 lets GCC/Clang vectorise the `omp simd` row loops; -fopenmp enables those pragmas (the
    # row loop runs on torch's own OpenMP pool through at::parallel_for, so no second OpenMP
    # runtime is linked).  No -march: the binary must stay portable (an AVX2 copy of the row
    # kernels is compiled through a target pragma and picked at run time).  -ffp-contract=off:
    # no FMA contraction, so backward recomputes r*x + s*f with exactly the forward's rounding
    # and the baseline and AVX2 copies give identical results.
    return ["-O3", "-fopenmp", "-ffp-contract=off", f"-DRLN_SOURCE_HASH={source_hash('cpu')}"]


def cuda_arch_flags(archs=DEFAULT_CUDA_ARCHS) -> list[str]:
    flags = []
    for a in archs:
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def cuda_extra_compile_args() -> dict[str, list[str]]:
    """`extra_compile_args` for the CUDAExtension / `load(extra_cflags=..., extra_cuda_cflags=...)`.

    Architectures come from TORCH_CUDA_ARCH_LIST when set (torch adds those flags itself);
    otherwise DEFAULT_CUDA_ARCHS are compiled.
    """
    tag = f"-DRLN_SOURCE_HASH={source_hash('cuda')}"
    nvcc = ["-O3", "-lineinfo", tag]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += cuda_arch_flags()
    return {"cxx": ["-O3", tag], "nvcc": nvcc}


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, the default search places, then the folder
    holding an `nvcc` found on PATH.  None when no nvcc is found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *_CUDA_SEARCH]
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return str(Path(c))
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return None


def find_nvcc() -> str | None:
    home = find_cuda_home()
    return str(Path(home) / "bin" / "nvcc") if home else None


def find_cxx() -> str | None:
    """The C++ compiler torch's build helpers would use ($CXX, else c++/g++/clang++)."""
    cxx = os.environ.get("CXX")
    if cxx:
        first = cxx.split()[0]
        return shutil.which(first) or (first if os.path.isfile(first) else None)
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cuda_available_for_build() -> bool:
    """True when a CUDA extension can be compiled here: torch is a CUDA build, and nvcc and a host
    C++ compiler exist.  A GPU is not required."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.version.cuda) and find_nvcc() is not None and find_cxx() is not None


def jit_cpu_kwargs() -> dict:
    """Keyword arguments for torch.utils.cpp_extension.load of the CPU extension."""
    return dict(
        name=CPU_JIT_NAME,
        sources=cpu_sources(),
        extra_cflags=cpu_extra_compile_args(),
        extra_include_paths=include_dirs(),
    )


def jit_cuda_kwargs() -> dict:
    """Keyword arguments for torch.utils.cpp_extension.load of the CUDA extension."""
    args = cuda_extra_compile_args()
    return dict(
        name=CUDA_JIT_NAME,
        sources=cuda_sources(),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args["nvcc"],
        extra_include_paths=include_dirs(),
        with_cuda=True,
    )


def setup_extensions(setup_dir: str | os.PathLike | None = None):
    """(ext_modules, cmdclass) for setup.py.

    The CPU extension is always attempted, the CUDA one only when `cuda_available_for_build()`.
    Nothing is attempted without torch or a C++ compiler, and a failing compile is reported and
    skipped (see `optional_build_ext`), so `pip install` never fails because of these modules:
    megabranch then falls back to JIT builds or the eager PyTorch path at run time.
    """
    if setup_dir is None:
        setup_dir = KERNELS_DIR.parent
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("megabranch: torch not importable at build time; skipping the C++/CUDA extensions")
        return [], {}
    if find_cxx() is None:
        print("megabranch: no C++ compiler found; skipping the C++/CUDA extensions")
        return [], {}
    include = [os.path.relpath(d, setup_dir) for d in include_dirs()]
    exts = [
        cpp_extension.CppExtension(
            name=CPU_EXT_NAME,
            sources=cpu_sources(setup_dir),
            include_dirs=include,
            extra_compile_args={"cxx": cpu_extra_compile_args()},
            depends=header_files(setup_dir),
        )
    ]
    if cuda_available_for_build() and _cuda_versions_match():
        point_torch_at_cuda_home(cpp_extension)
        exts.append(
            cpp_extension.CUDAExtension(
                name=CUDA_EXT_NAME,
                sources=cuda_sources(setup_dir),
                include_dirs=include,
                extra_compile_args=cuda_extra_compile_args(),
                depends=header_files(setup_dir),
            )
        )
    else:
        print("megabranch: torch has no CUDA, nvcc is missing or its CUDA major version differs "
              "from torch's; building the CPU extension only")
    return exts, {"build_ext": optional_build_ext()}


def nvcc_version() -> tuple[int, int] | None:
    """(major, minor) of the nvcc that find_nvcc() picks, or None."""
    import re
    import subprocess

    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_versions_match() -> bool:
    # torch refuses (raises, which would abort the whole build) when nvcc's CUDA major version
    # differs from the one torch was built with; check first and skip the CUDA module instead.
    import torch

    ver = nvcc_version()
    return ver is not None and str(ver[0]) == str(torch.version.cuda).split(".")[0]


def point_torch_at_cuda_home(cpp_extension) -> None:
    """Make torch.utils.cpp_extension use the CUDA toolkit that find_cuda_home() picks."""
    # torch resolves CUDA_HOME once, at import, and may settle on a folder that is no toolkit
    # (e.g. /usr/local when nvcc is a symlink or a wrapper script in /usr/local/bin: no
    # include/cuda_runtime.h there, so the binding's CUDA headers are not found); use the
    # toolkit found above instead.
    home = find_cuda_home()
    current = getattr(cpp_extension, "CUDA_HOME", None)
    is_toolkit = current and all((Path(current) / f).is_file() for f in ("bin/nvcc", "include/cuda_runtime.h"))
    if home and not is_toolkit:
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("CUDA_HOME", home)


def optional_build_ext():
    """A torch BuildExtension subclass that reports a failing extension and carries on."""
    from torch.utils.cpp_extension import BuildExtension

    def first_line(exc):
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__

    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            self._megabranch_failed = set()
            # torch checks the compiler (ABI, CUDA version) before building anything; a broken
            # toolchain must not fail the install either.
            try:
                super().build_extensions()
            except Exception as exc:
                print(f"megabranch: WARNING: C++/CUDA extensions not built ({first_line(exc)}); "
                      "they will be JIT-built or replaced by the eager PyTorch path at run time")
                self._megabranch_failed.update(ext.name for ext in self.extensions)
            # Later steps (--inplace copies, wheel contents) only see what was built.
            self.extensions = [e for e in self.extensions if e.name not in self._megabranch_failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # any compiler failure must not stop pip
                print(f"megabranch: WARNING: building {ext.name} failed ({first_line(exc)}); "
                      "it will be JIT-built or replaced by the eager PyTorch path at run time")
                self._megabranch_failed.add(ext.name)

    return OptionalBuildExtension


def torch_include_flags() -> list[str]:
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    return flags
