"""The CPU backend's native kernels on checkpoint storage (backends/native/stored_gemm.cpp), built at first use.

`kernels()` compiles the C++ file once into the runtime cache folder (`$DSV4RT_HOME/kernels/<key>/`, the key a
hash of the source, the compiler's version and the flags, so a changed file or compiler never reuses a stale
library) and loads it through ctypes: a plain C ABI, so the build needs a C++ compiler and nothing else (no
torch headers, no ninja, no isolated build environment; it takes ~2 s). Flags: `-O3 -march=native` (AVX2 /
AVX-512 on x86, NEON on aarch64), and plain `-O3` where the compiler refuses `-march=native`. A machine
without a compiler (or where the build fails) gets `None` and one line on stderr naming the reason; the CPU
backend then reports capability `native_kernels` as missing and the dispatch table shows the torch tile path
(`backends.cpu_stored`) for the stored-format linears -- never silently.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "native" / "stored_gemm.cpp"
LIB = "libdsv4rt_stored.so"
_FLAGS = (["-O3", "-march=native"], ["-O3"])
_BASE = ["-shared", "-fPIC", "-std=c++17", "-pthread", "-fno-math-errno"]

_state: dict = {}


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cxx: str, folder: Path) -> tuple[Path | None, str]:
    """Compile into `folder` (a fresh temporary one) -> (library path or None, why not)."""
    err = ""
    for flags in _FLAGS:
        out = folder / LIB
        cmd = [cxx, *flags, *_BASE, str(SOURCE), "-o", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{cxx} could not run ({e})"
        if r.returncode == 0 and out.is_file():
            (folder / "flags.txt").write_text(" ".join(flags) + "\n")
            return out, ""
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"{Path(cxx).name} failed: {err}"


def _load() -> tuple[object | None, str]:
    if os.environ.get("DSV4RT_NO_NATIVE"):
        return None, "DSV4RT_NO_NATIVE is set"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ / clang++)"
    from runtime.cache import cache_dir

    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        return None, f"kernel source {SOURCE} is unreadable ({e.strerror or e})"
    key = hashlib.sha256(source + _version(cxx).encode() + platform.machine().encode()
                         + repr((_FLAGS, _BASE)).encode()).hexdigest()[:16]
    final = cache_dir() / "kernels" / key
    if not (final / LIB).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        lib, why = _build(cxx, tmp)
        if lib is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return None, why
        try:
            tmp.rename(final)                   # a concurrent builder may have won: then use its library
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        lib = ctypes.CDLL(str(final / LIB))
    except OSError as e:
        return None, f"cannot load {final / LIB} ({e})"
    return _bind(lib), ""


def _bind(lib):
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    gemv = [p, i64, i64, i64, p, i64, p, i64, p, i64, i64, i64, i32]
    for name in ("dsv4_fp8_gemv", "dsv4_fp4_gemv"):
        getattr(lib, name).argtypes = gemv
    lib.dsv4_bf16_gemv.argtypes = [p, i64, i64, i64, p, i64, p, i64, i64, i64, i32]
    lib.dsv4_int8_gemv.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, i64, i64, i32]
    for name in ("dsv4_fp8_dequant", "dsv4_fp4_dequant"):
        getattr(lib, name).argtypes = [p, i64, p, i64, i64, p, i64, i64, i32]
    for f in ("dsv4_fp8_gemv", "dsv4_fp4_gemv", "dsv4_bf16_gemv", "dsv4_int8_gemv", "dsv4_fp8_dequant",
              "dsv4_fp4_dequant"):
        getattr(lib, f).restype = None
    lib.dsv4_max_m.restype = i32
    return lib


def kernels():
    """The loaded native library, or None (then `unavailable_reason()` says why; printed once)."""
    if "lib" not in _state:
        lib, why = _load()
        _state["lib"], _state["why"] = lib, why
        if lib is None:
            print(f"note: native CPU kernels unavailable ({why}); FP8 / FP4 / bf16 linears run through the "
                  "slower torch tile path (dispatch: cpu.stored_torch_tiles)", file=sys.stderr)
    return _state["lib"]


def unavailable_reason() -> str:
    kernels()
    return _state["why"]
