"""The engine's own CPU kernels (kernels.cpp: AVX2, and AVX-512 where the CPU has it; float32), built on first
use and called with ctypes.

GEMMs over the GGUF's own Q4_1/Q8_0 blocks (blocks.py), and a decoder layer's glue for the lean forward
(lean.py: RMSNorm, residual add + RMSNorm, rotary in place, SiLU(gate) * up, grouped-query attention). The source
is compiled with the system's g++ (~2 s) into the cache directory once per source and flags, and
loaded into this process; its OpenMP resolves to the runtime torch loaded, so both share threads.
`unavailable()` says why the kernels cannot run here (no AVX2, no compiler). The instruction set is AVX-512
where torch finds it (`torch.backends.cpu.get_cpu_capability()`), else AVX2; `DARE_KERNELS_ISA=avx2` forces
AVX2 (read here from the environment, as the setting of that name documents). Each build's block GEMMs sum in
their own order (8 or 16 lanes): outputs differ in the last bits between the two, and within one build a row's
output never depends on the rows beside it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()

SOURCE = Path(__file__).with_name("kernels.cpp")
# no fused multiply-adds but the written ones: the glue rounds as torch does where it can (rotary)
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ISA_FLAGS = {"avx2": [], "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


class KernelBuildError(RuntimeError):
    pass


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def unavailable() -> str | None:
    """None when the engine's CPU kernels can run here, else why not."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the engine's CPU kernels need AVX2; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    if compiler() is None:
        return "the engine's CPU kernels are built on first use and no C++ compiler (g++, or $CXX) was found"
    return None


def isa() -> str:
    """The instruction set the kernels are built for here: "avx512" or "avx2"."""
    asked = os.environ.get("DARE_KERNELS_ISA", "").strip().lower()  # the setting of that name (infra.settings)
    asked = "" if asked == "auto" else asked
    if asked and asked not in ISA_FLAGS:
        raise KernelBuildError(f"DARE_KERNELS_ISA={asked!r}: expected auto, {' or '.join(ISA_FLAGS)}")
    if asked and asked not in runnable():
        raise KernelBuildError(f"DARE_KERNELS_ISA={asked} but this CPU offers {torch.backends.cpu.get_cpu_capability()}")
    return asked or runnable()[-1]  # the widest


def runnable() -> list[str]:
    """Every instruction set the kernels can be built for on this CPU (tests run each)."""
    return ["avx2"] + (["avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])


def flags(instructions: str | None = None) -> list[str]:
    """The compiler flags for `instructions` (default: `isa()`)."""
    return FLAGS + ISA_FLAGS[instructions or isa()]


def library(cache_dir: Path) -> ctypes.CDLL:
    """The kernels, built into `cache_dir`/kernels once per source and compiler flags. One library per
    process: the first call builds or finds it; later calls return it whatever their `cache_dir`."""
    global _library
    with _lock:
        if _library is None:
            _library = _load(_build(cache_dir))
        return _library


def digest(cxx: str | None = None, instructions: str | None = None) -> str:
    """Names the kernels' source and compiler flags: their library's file, and the cost curves measured on it."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx or compiler() or "", *flags(instructions)]).encode()).hexdigest()[:16]


def build(cache_dir: Path, instructions: str | None = None) -> ctypes.CDLL:
    """A library of these kernels for `instructions` (default: `isa()`), beside the one `library` loaded: for tests
    and benches that compare the two builds."""
    with _lock:
        return _load(_build(cache_dir, instructions))


def _build(cache_dir: Path, instructions: str | None = None) -> Path:
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError(unavailable() or "no C++ compiler")
    used = flags(instructions)
    target = cache_dir / "kernels" / f"kernels-{digest(cxx, instructions)}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([cxx, *used, str(SOURCE), "-o", str(built)], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"building {SOURCE.name} with {cxx} failed: {done.stderr.strip()[-800:]}")
        os.replace(built, target)  # atomic: processes building at once each leave a whole library
    log.info("CPU kernels built", path=str(target), isa=instructions or isa(), seconds=round(time.perf_counter() - start, 1))
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.q4_1_gemm.argtypes = [p, i, i, p, p, p, i, p]
    lib.q8_0_gemm.argtypes = [p, i, i, p, p, i, p]
    lib.rms_norm.argtypes = [p, p, f, i, i, p]
    lib.add_rms_norm.argtypes = [p, p, p, f, i, i, p]
    lib.rope.argtypes = [p, p, p, i, i, i, i]
    lib.silu_mul.argtypes = [p, i, i, p]
    lib.attention.argtypes = [p, i, i, i, p, p, i, i, i, p, i, i, i, i, i, i, i, i, f, p, p, p]
    lib.attention.restype = ctypes.c_int
    if hasattr(lib, "fma_roof"):  # absent from older builds, which benches load beside the current one
        lib.fma_roof.argtypes = [i]
        lib.fma_roof.restype = ctypes.c_double
    for name in ("q4_1_gemm", "q8_0_gemm", "rms_norm", "add_rms_norm", "rope", "silu_mul"):
        getattr(lib, name).restype = None
    return lib


# The glue, on contiguous float32 tensors whose last dimension is the feature one.

def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), eps, x.numel() // x.shape[-1], x.shape[-1], out.data_ptr())
    return out


def add_rms_norm(lib: ctypes.CDLL, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place; returns rms_norm(h)."""
    out = torch.empty_like(h)
    lib.add_rms_norm(h.data_ptr(), delta.contiguous().data_ptr(), weight.data_ptr(), eps, h.numel() // h.shape[-1],
                     h.shape[-1], out.data_ptr())
    return out


def rope_(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, dim: int) -> None:
    """Rotate the first `heads` heads of `dim` of each row of x (rows, features) in place; cos/sin (rows, dim)."""
    lib.rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], heads, dim, x.shape[1])


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows of [gate | up]."""
    half = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], half)
    lib.silu_mul(gate_up.data_ptr(), gate_up.numel() // gate_up.shape[-1], half, out.data_ptr())
    return out




def fma_roof(lib: ctypes.CDLL, seconds: float = 0.5) -> float:
    """This CPU's fp32 FMA roof, FLOP/s on torch's threads (benches divide GEMM rates by it)."""
    iterations = 1_000_000
    while True:
        start = time.perf_counter()
        flops = lib.fma_roof(iterations)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return flops / elapsed
        iterations *= 4


def attention(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              row_queries: torch.Tensor | None = None, row_keys: torch.Tensor | None = None) -> torch.Tensor | None:
    """Grouped-query attention of q (batch, heads, T, dim) over k/v (batch, kv_heads, S, dim) under an
    additive mask (batch or 1, 1, T or 1, >= S): (batch, T, heads * dim); None where the kernel does not
    apply (head size other than 64 or 128, a layout it does not read), for the caller to use SDPA.
    `row_queries` / `row_keys` (contiguous int64, one per row): row b computes only its first row_queries[b]
    queries (the rest are zeros) over its first row_keys[b] keys (the mask must hide the rest from it). Given
    `row_keys`, a row's queries sit in order at its last key columns and none sees a column after its own (a causal
    prefill, a draft tree in pop order): each query reads keys up to its own column only."""
    batch, heads, queries, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    if (heads % kv_heads or q.stride(-1) != 1 or k.stride() != v.stride() or k.stride(-1) != 1 or mask.stride(-1) != 1
            or mask.shape[0] not in (1, batch) or mask.shape[-1] < keys):
        return None
    out = q.new_empty(batch, queries, heads * dim)
    mask_b = mask.stride(0) if mask.shape[0] > 1 else 0
    mask_t = mask.stride(2) if mask.shape[2] > 1 else 0
    done = lib.attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(0),
                         k.stride(1), k.stride(2), mask.data_ptr(), mask_b, mask_t, batch, heads, kv_heads, queries, keys,
                         dim, scale, out.data_ptr(), None if row_queries is None else row_queries.data_ptr(),
                         None if row_keys is None else row_keys.data_ptr())
    return out if done == 0 else None
