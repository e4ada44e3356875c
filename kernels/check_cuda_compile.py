"""Compile-only check of the CUDA sources of the fused residual LayerNorm, no GPU needed.

Compiles kernels/residual_ln_cuda.cu with one nvcc for all the architectures (sm_80 and sm_90 by
default; one device front end for all of them while the device code never tests __CUDA_ARCH__,
_gencodes) and the torch binding kernels/residual_ln_cuda_binding.cpp (nvcc as the host-compiler
driver), against the installed torch's headers (torch.utils.cpp_extension.include_paths()), with
the flags torch's own CUDA extension build uses.  Object files go to a temporary folder and
nothing is linked.  Works with a CPU-only torch install: its c10/cuda headers lack the generated
cuda_cmake_macros.h, which is then skipped with C10_CUDA_NO_CMAKE_CONFIGURE_FILE (it only
matters for Windows DLL exports).

    python kernels/check_cuda_compile.py [--arch 8.0 --arch 9.0] [--source FILE.cu] [-v]

A successful check is remembered (a stamp named by a hash of the sources, headers, flags, nvcc
version and torch version, under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions), so an
unchanged tree is not recompiled; --no-cache (or MEGABRANCH_NVCC_CHECK_NO_CACHE=1) forces it.
Failures are never cached.

Exit status: 0 when everything compiles, 1 on any compiler error, 2 when nvcc is not found.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _build_helpers():
    name = "megabranch_kernels_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass
class CheckResult:
    ok: bool
    skipped: bool = False
    message: str = ""
    commands: list[tuple[str, list[str]]] = field(default_factory=list)  # (label, argv)
    logs: list[str] = field(default_factory=list)


def _common_flags(helpers) -> list[str]:
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-O3", "-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=megabranch_residual_ln_cuda_check"]
    flags += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    abi = getattr(__import__("torch")._C, "_GLIBCXX_USE_CXX11_ABI", None)
    if abi is not None:
        flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(abi)}")
    for inc in helpers.include_dirs():
        flags.append(f"-I{inc}")
    for inc in cpp_extension.include_paths():
        flags.append(f"-I{inc}")
        if not (Path(inc) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() and (
                Path(inc) / "c10" / "cuda" / "CUDAMacros.h").is_file():
            flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "torch_extensions")
    return Path(root) / "megabranch_nvcc_check"


def _cache_key(nvcc: str, archs, files: list[str], flags: list[str]) -> str:
    import torch

    h = hashlib.sha256()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    for part in (version, torch.__version__, repr(tuple(archs)), repr(flags)):
        h.update(part.encode())
    headers = sorted(str(p) for p in _HERE.glob("*.h"))
    for path in list(files) + headers:
        h.update(str(Path(path).name).encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:32]


def _gencodes(source: str, nums: list[str]) -> list[str]:
    """nvcc's -gencode flags for `source`. Device code that never tests __CUDA_ARCH__ (the source
    and the kernels' own headers) reads the same for every architecture, so its device front end
    (cicc, about 10 s of the check's ~35 s) runs once, for the lowest architecture, and ptxas
    assembles that PTX for each one. A source that branches on __CUDA_ARCH__ gets a front end per
    architecture, as the real build does."""
    texts = [Path(source).read_text(errors="replace")]
    texts += [p.read_text(errors="replace") for p in _HERE.glob("*.h")]
    if any("__CUDA_ARCH__" in t for t in texts):
        return [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    lowest = min(nums, key=int)
    return [f"-gencode=arch=compute_{lowest},code=[{','.join(f'sm_{n}' for n in nums)}]"]


def check_cuda_compile(archs=("8.0", "9.0"), sources: list[str] | None = None,
                       binding: bool = True, jobs: int | None = None,
                       verbose: bool = False, cache: bool = True) -> CheckResult:
    """Compile `sources` (default: the fused residual LayerNorm .cu) for every architecture (one
    nvcc each, _gencodes), and the binding .cpp once, with nvcc -c.  Returns a CheckResult;
    `skipped` when nvcc is absent.
    With `cache`, a previous success for identical inputs is reused (see the module doc)."""
    helpers = _build_helpers()
    nvcc = helpers.find_nvcc()
    if nvcc is None:
        return CheckResult(ok=False, skipped=True,
                           message="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    all_sources = helpers.cuda_sources()
    cu_sources = sources if sources is not None else [s for s in all_sources if s.endswith(".cu")]
    cpp_sources = [s for s in all_sources if s.endswith(".cpp")] if binding else []
    flags = _common_flags(helpers)
    if os.environ.get("MEGABRANCH_NVCC_CHECK_NO_CACHE", "") not in ("", "0"):
        cache = False
    stamp = None
    if cache:
        stamp = _cache_dir() / (_cache_key(nvcc, archs, cu_sources + cpp_sources, flags) + ".ok")
        if stamp.is_file():
            return CheckResult(ok=True, message=stamp.read_text().strip() + " (cached: inputs "
                               "unchanged since a successful check)")

    with tempfile.TemporaryDirectory(prefix="rln_nvcc_check_") as tmp:
        commands = []
        nums = [arch.replace(".", "") for arch in archs]
        for src in cu_sources:
            # one nvcc per source, every architecture in it (as a TORCH_CUDA_ARCH_LIST build does): the host
            # side is compiled once, not once per architecture
            out = Path(tmp) / f"{Path(src).stem}.o"
            commands.append((f"{Path(src).name} [{', '.join(f'sm_{n}' for n in nums)}]",
                             [nvcc, "-c", str(src), "-o", str(out), *_gencodes(src, nums), *flags]))
        for src in cpp_sources:
            out = Path(tmp) / f"{Path(src).stem}.o"
            commands.append((f"{Path(src).name} [host]",
                             [nvcc, "-c", str(src), "-o", str(out), *flags]))

        def run(cmd):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            return proc.returncode, proc.stdout + proc.stderr

        workers = jobs or max(1, min(len(commands), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, [cmd for _, cmd in commands]))

    logs, failed = [], []
    for (label, cmd), (rc, out) in zip(commands, results):
        head = f"$ {' '.join(cmd)}" if verbose else f"{label}: rc={rc}"
        logs.append(f"{head}\n{out}".rstrip())
        if rc != 0:
            failed.append(label)
    ok = not failed
    message = ("compiled " + ", ".join(label for label, _ in commands) if ok
               else "nvcc failed on: " + ", ".join(failed))
    if ok and stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(message + "\n")
        except OSError:
            pass
    return CheckResult(ok=ok, message=message, commands=commands, logs=logs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="compute capability, e.g. 8.0 (repeatable)")
    parser.add_argument("--source", action="append", help="a .cu file to compile instead")
    parser.add_argument("--no-binding", action="store_true", help="skip the binding .cpp")
    parser.add_argument("--no-cache", action="store_true", help="recompile even if unchanged")
    parser.add_argument("-v", "--verbose", action="store_true", help="print commands and output")
    args = parser.parse_args(argv)
    res = check_cuda_compile(archs=tuple(args.arch or ("8.0", "9.0")), sources=args.source,
                             binding=not args.no_binding, verbose=args.verbose,
                             cache=not args.no_cache)
    if res.skipped:
        print(f"SKIP: {res.message}")
        return 2
    for log in res.logs:
        if args.verbose or not res.ok:
            print(log)
    print(("OK: " if res.ok else "FAIL: ") + res.message)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
