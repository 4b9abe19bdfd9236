"""The CPU backend's native kernels (backends/native/*.cpp), compiled at first use and loaded through ctypes.

`build_library(source)` is the generic part: it compiles one C++ file of backends/native (with the headers
beside it) into the runtime cache folder (`$DSV4RT_HOME/kernels/<key>/`, the key a hash of the sources, the
compiler's version and the flags, so a changed file or compiler never reuses a stale library) and returns
the loaded `ctypes.CDLL`, or None and the reason. A plain C ABI: the build needs a C++ compiler and nothing
else (no torch headers, no ninja, no isolated build environment). Flags: `-O3` for the baseline ISA (the
stored-format library first with `-fopenmp`, so that its small-M GEMM shares torch's OpenMP threads) -- the
kernels carry their own `target` attributes and pick AVX-512 / AVX2 at run time -- then, should the compiler
refuse something, the same without the SIMD paths (`-DDSV4_NO_NEON`, `-DDSV4_NO_X86_SIMD`).

`kernels()` is this backend's stored-format GEMV library (backends/native/stored_gemm.cpp). A machine
without a compiler (or where the build fails) gets `None` and one line on stderr naming the reason; the CPU
backend then reports capability `native_kernels` as missing and the dispatch table shows the torch tile path
(`backends.cpu_stored`) for the stored-format linears -- never silently.

Instruction set: the best this CPU runs (AVX-512 VBMI -- the AVX-512 kernels with FP4 decoded without a
widening step, Ice Lake / Zen 4 and later --, else AVX-512 F/BW/VL/DQ, else AVX2 + FMA + F16C on x86-64; NEON
on aarch64; else portable scalar code). `DSV4_NATIVE_ISA=avx512vbmi|avx512|avx2|neon|scalar` forces one (a value this CPU
cannot run is refused with one line); `isa()` says which runs. The library reads the same variable for
the calls that do not name a path (the fused decode step, backends/native/decode_step.cpp). Threads: torch's (`torch.get_num_threads()`,
i.e. `torch.set_num_threads` / `OMP_NUM_THREADS`), passed per call.
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

NATIVE = Path(__file__).parent / "native"
SOURCE = NATIVE / "stored_gemm.cpp"
_FLAGS = (["-O3"], ["-O3", "-DDSV4_NO_NEON"], ["-O3", "-DDSV4_NO_NEON", "-DDSV4_NO_X86_SIMD"])
# the stored-format library first with OpenMP: its small-M GEMM then runs on torch's own OpenMP threads
# (backends/native/stored_mgemm.h says why); without it, on the library's pool
_STORED_FLAGS = (["-O3", "-fopenmp"], *_FLAGS)
_BASE = ["-shared", "-fPIC", "-std=c++17", "-pthread", "-fno-math-errno"]
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3, "avx512vbmi": 4}
ISA_ENV = "DSV4_NATIVE_ISA"

_state: dict = {}
_libs: dict = {}


class Job(ctypes.Structure):
    """One GEMV job (struct Dsv4Job in stored_gemm.cpp): rows [n0, n0 + N) of a stored weight."""
    _fields_ = [("kind", ctypes.c_int32), ("M", ctypes.c_int32), ("K", ctypes.c_int64), ("N", ctypes.c_int64),
                ("n0", ctypes.c_int64), ("x", ctypes.c_void_p), ("ldx", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("ldw", ctypes.c_int64), ("s", ctypes.c_void_p), ("lds", ctypes.c_int64), ("rs", ctypes.c_void_p),
                ("y", ctypes.c_void_p), ("ldy", ctypes.c_int64)]


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


def _build(cxx: str, source: Path, lib_name: str, folder: Path, flag_sets=_FLAGS) -> tuple[Path | None, str]:
    """Compile into `folder` (a fresh temporary one) with the first of `flag_sets` that builds -> (library path
    or None, why not)."""
    err = ""
    for flags in flag_sets:
        out = folder / lib_name
        cmd = [cxx, *flags, *_BASE, str(source), "-o", str(out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{cxx} could not run ({e})"
        if r.returncode == 0 and out.is_file():
            (folder / "flags.txt").write_text(" ".join(flags) + "\n")
            return out, ""
        err = next((ln for ln in r.stderr.splitlines() if "error" in ln), None) or \
            (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"{Path(cxx).name} failed: {err}"


def build_library(source: str | Path, lib_name: str | None = None,
                  flag_sets: tuple = _FLAGS) -> tuple[ctypes.CDLL | None, str]:
    """Compile (once, cached) and load a C++ file of backends/native -> (CDLL or None, why not).
    `source` is a path or a file name in backends/native; the other sources and headers beside it (*.cpp
    included by it, *.h) are part of the cache key. `flag_sets`: compiler flags to try in order.
    Cached per process too: a second call returns the same library."""
    source = Path(source) if os.sep in str(source) else NATIVE / source
    lib_name = lib_name or f"libdsv4rt_{source.stem}.so"
    if source in _libs:
        return _libs[source]
    if os.environ.get("DSV4RT_NO_NATIVE"):
        return None, "DSV4RT_NO_NATIVE is set"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ / clang++)"
    from runtime.cache import cache_dir

    try:
        text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.[ch]*"))
                                             if h != source)
    except OSError as e:
        return None, f"kernel source {source} is unreadable ({e.strerror or e})"
    key = hashlib.sha256(text + _version(cxx).encode() + platform.machine().encode()
                         + repr((flag_sets, _BASE, lib_name)).encode()).hexdigest()[:16]
    final = cache_dir() / "kernels" / key
    if not (final / lib_name).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        lib, why = _build(cxx, source, lib_name, tmp, flag_sets)
        if lib is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return None, why
        try:
            tmp.rename(final)                   # a concurrent builder may have won: then use its library
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        res = ctypes.CDLL(str(final / lib_name)), ""
    except OSError as e:
        res = None, f"cannot load {final / lib_name} ({e})"
    _libs[source] = res
    return res


def _bind(lib):
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.dsv4_gemv.argtypes = [p, i32, i32, i32]
    lib.dsv4_gemv.restype = i32
    lib.dsv4_mgemm.argtypes = [p, i32, i32, i32]
    lib.dsv4_mgemm.restype = i32
    lib.dsv4_mgemm_path.argtypes = [i32]
    lib.dsv4_mgemm_path.restype = i32
    for name in ("dsv4_fp8_dequant", "dsv4_fp4_dequant"):
        getattr(lib, name).argtypes = [p, i64, p, i64, i64, p, i64, i64, i32]
        getattr(lib, name).restype = None
    for name in ("dsv4_max_m", "dsv4_best_isa", "dsv4_process_isa"):
        getattr(lib, name).restype = i32
    lib.dsv4_isa_supported.argtypes = [i32]
    lib.dsv4_isa_supported.restype = i32
    return lib


def _choose_isa(lib) -> tuple[int | None, str]:
    want = os.environ.get(ISA_ENV, "").strip().lower()
    if not want:
        return lib.dsv4_best_isa(), ""
    if want not in ISAS:
        return None, f"{ISA_ENV}={want!r} is not one of {', '.join(ISAS)}"
    if not lib.dsv4_isa_supported(ISAS[want]):
        return None, f"{ISA_ENV}={want} is not supported by this CPU / build (unset it for the best one)"
    return ISAS[want], ""


def kernels():
    """The loaded stored-format library, or None (then `unavailable_reason()` says why; printed once)."""
    if "lib" not in _state:
        lib, why = build_library(SOURCE, "libdsv4rt_stored.so", _STORED_FLAGS)
        if lib is not None:
            lib = _bind(lib)
            code, why = _choose_isa(lib)
            if code is None:
                lib = None
            else:
                _state["isa"] = code
        _state["lib"], _state["why"] = lib, why
        if lib is None:
            print(f"note: native CPU kernels unavailable ({why}); FP8 / FP4 / bf16 linears run through the "
                  "slower torch tile path (dispatch: cpu.stored_torch_tiles)", file=sys.stderr)
    return _state["lib"]


def unavailable_reason() -> str:
    kernels()
    return _state["why"]


def isa() -> str | None:
    """Name of the instruction set the kernels run (None without the library)."""
    if kernels() is None:
        return None
    return next(n for n, c in ISAS.items() if c == _state["isa"])


def isa_code(name: str | None = None) -> int:
    """The library's code for `name` (default: the one chosen at load)."""
    if name is None:
        kernels()
        return _state["isa"]
    lib = kernels()
    if name not in ISAS or lib is None or not lib.dsv4_isa_supported(ISAS[name]):
        from runtime.errors import InputError

        raise InputError(f"instruction set {name!r} is not available here (choose from "
                         f"{', '.join(n for n in ISAS if lib is not None and lib.dsv4_isa_supported(ISAS[n]))})")
    return ISAS[name]
