"""Native CPU kernels: C sources in hylm/ops/csrc, built once per machine with the system C compiler.

Where PyTorch has no CPU op that runs near the memory bandwidth (decode attention over a long KV cache reads
one query row per KV head at 5-15 GB/s), hylm carries a small C kernel. It is compiled on first use with
`cc -O3 -march=native -fopenmp` (about a second) into a cache directory (`$HYLM_CACHE_DIR`, default
~/.cache/hylm) keyed by the source, the flags and the CPU, and called through ctypes on tensors' data
pointers. Its OpenMP runtime is the libgomp PyTorch has already loaded (same soname), so both share one
thread pool. Without a compiler, or with HYLM_NATIVE=0, `library()` is None and callers take their PyTorch
paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))  # built into one library
HEADERS = tuple(sorted(CSRC.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def cache_dir() -> Path:
    base = os.environ.get("HYLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hylm")
    return Path(base) / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(sources: tuple[Path, ...], compiler: str) -> Path:
    text = b"".join(src.name.encode() + src.read_bytes() for src in sources + HEADERS)
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_id().encode() + compiler.encode()).hexdigest()[:16]
    out = cache_dir() / f"hylm_native-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([compiler, *FLAGS, "-o", str(tmp_out), *map(str, sources), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {', '.join(s.name for s in sources)}: {proc.stderr.strip()[:2000]}")
        os.replace(tmp_out, out)  # atomic: a concurrent process sees the old file or the whole new one
    return out


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they can't be built (no compiler, HYLM_NATIVE=0, not Linux/macOS)."""
    if os.environ.get("HYLM_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None
    if os.name != "posix":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: native CPU kernels are off (PyTorch paths are used)")
        return None
    try:
        import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernel binds to the same runtime)

        lib = ctypes.CDLL(str(_build(SOURCES, compiler)))
    except Exception as e:  # a failed build only costs speed
        log.warning("native CPU kernels unavailable (%s); using PyTorch paths", e)
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.hylm_paged_decode.restype = i32
    lib.hylm_paged_decode.argtypes = [ptr, ptr, ptr, i32, i64, ptr, i64, ptr, i32, i32, i32, i32, i64,
                                      ctypes.c_float, i32, ptr, ptr]
    lib.hylm_linear_rows.restype = i32
    lib.hylm_linear_rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.hylm_linear_rows_t.restype = i32
    lib.hylm_linear_rows_t.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.hylm_linear_rows_panels.restype = i32
    lib.hylm_linear_rows_panels.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64]
    f32 = ctypes.c_float
    lib.hylm_mamba_steps.restype = i32
    lib.hylm_mamba_steps.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, f32, f32, ptr, ptr,
                                     i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.hylm_moe_rows.restype = i32
    lib.hylm_moe_rows.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i32, f32, ptr, i32, i64, ptr, ptr, i64, ptr,
                                  i32, ptr, i32, ptr, i32, i64, ptr, f32, i32, ptr]
    lib.hylm_rmsnorm_rows.restype = i32
    lib.hylm_rmsnorm_rows.argtypes = [ptr, ptr, f32, i64, i64, ptr]
    lib.hylm_attention_rows.restype = i32
    lib.hylm_attention_rows.argtypes = [ptr, i64, i64, ptr, f32, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i64, i64, i64,
                                        ptr, ptr, i64, ptr, ptr, i64, ptr, i64, f32, i32, ptr, ptr]
    lib.hylm_q8_0_rows.restype = i32
    lib.hylm_q8_0_rows.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64]
    lib.hylm_q8_0_experts_rows.restype = i32
    lib.hylm_q8_0_experts_rows.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr]
    lib.hylm_mamba_rows.restype = i32
    lib.hylm_mamba_rows.argtypes = [ptr, i64, i64, ptr, f32, ptr, i32, ptr, i32, ptr, ptr, ptr, i64, ptr, ptr, ptr, f32,
                                    f32, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, f32, i64, ptr, ptr, ptr]
    lib.hylm_mtp_greedy.restype = i32
    lib.hylm_mtp_greedy.argtypes = [i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr,  # sizes, catch-up rows
                                    ptr, ptr, f32, ptr, f32, ptr, i32, ptr, f32, ptr, i32,
                                    # attention block
                                    ptr, f32, ptr, i32, ptr, i32, ptr, i32, ptr, i32, i64, i64, i64, ptr, ptr, i64,
                                    ptr, i64, i64, i64, f32, i32, i32, ptr,
                                    # MoE block
                                    ptr, ptr, i64, i64, i32, f32, ptr, i32, i64, ptr, ptr, i64, ptr, i32, ptr, i32,
                                    ptr, i32, i64, ptr, f32,
                                    f32, ptr, ptr, ptr]  # min_confidence, tok, drafted, prev_out
    return lib


def available() -> bool:
    return library() is not None
