"""Fused CPU kernels for batches that mix adapters: segmented shrink and expand (Punica's SGMV/BGMV), built on
first use.

One call per layer replaces the per-adapter small GEMMs, the gather of the routed rows and the scatter of their
deltas: `shrink` computes h = x·Aᵀ for every segment of rows (each segment with its own adapter, at its own rank),
reading the rows where they lie, and `expand` adds h·(s·B)ᵀ into the output rows in place, fp32 accumulation.

`sgmv()` gives the compiled ops, or None, and callers keep their eager PyTorch path, which computes the same thing:
- `LORAKIT_KERNELS=eager` never builds; `compiled` raises KernelError when the build fails; `auto` (default) builds
  and falls back to eager with one warning (e.g. no C++ compiler on the machine).
- Built by `torch.utils.cpp_extension.load` (ninja and the system C++ compiler, `-O3 -march=native`, about 10 s,
  once) into `<lorakit cache>/kernels/<key>`; the key covers the source, torch, Python and the CPU, so each
  machine builds its own and later processes just load it.
- CPU only: fp32, bf16 and fp16 activations where that pays (see `uses`); other devices and dtypes keep the eager
  path. Factors are read in fp32, or in bf16 / fp16 where the adapter holds them so (`down_factor`, `up_factor`):
  half the bytes, the same result.
- A row's result does not depend on the other rows of the batch, bit for bit (see sgmv.cpp).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..cache import cache_dir
from ..errors import LorakitError

SOURCE = Path(__file__).with_name("sgmv.cpp")
MODES = ("auto", "eager", "compiled")
RANK_MULTIPLE = 8  # the shrink kernel works on 8 or 16 ranks at a time; At is zero-padded to a multiple of 8


class KernelError(LorakitError):
    """The compiled kernels were required (`LORAKIT_KERNELS=compiled`) but could not be built or loaded."""


_lock = threading.Lock()
_state: dict = {}  # "ops" / "generic": (op namespace or None, why not), once tried; "mode": set by `using`


def mode() -> str:
    """"auto", "eager" or "compiled": `using(...)` inside its block, else `$LORAKIT_KERNELS` (default auto)."""
    value = _state.get("mode") or os.environ.get("LORAKIT_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise KernelError(f"LORAKIT_KERNELS={value!r}; use one of {list(MODES)}")
    return value


def sgmv():
    """The compiled ops (`torch.ops.lorakit_sgmv`), or None when the eager path is to be used (see the module doc)."""
    current = mode()
    if current == "eager":
        return None
    ops, error = _built("ops", first=_warn_fallback if current == "auto" else None)
    if ops is None and current == "compiled":
        raise KernelError(f"LORAKIT_KERNELS=compiled, but the CPU kernels could not be built: {error}")
    return ops


def _warn_fallback(ops, error) -> None:
    if ops is None:
        warnings.warn(f"lorakit: the CPU kernels for mixed-adapter batches could not be built ({error}); using the "
                      "eager PyTorch path (same results, slower with many adapters). Set LORAKIT_KERNELS=eager to "
                      "skip the build.", RuntimeWarning, stacklevel=4)  # the caller of sgmv()


def uses(x: torch.Tensor, out_features: int | None = None) -> bool:
    """Whether the compiled kernels serve an inference call on activations `x` (and `out_features` outputs).

    - fp32: always.
    - bf16 on a CPU with AVX512-BF16 (`bf16_dot`): with bf16 factors in pair layout, when the input features are
      even and the output features a multiple of 16 (else eager).
    - bf16 and fp16 on a CPU without GEMM instructions for that dtype (`native_half`): the fp32 loops. There
      PyTorch's half-precision GEMMs are emulated: a 1024-wide LoRA at 16 adapters took 20 ms eager vs 2 ms fused,
      beside a 110 ms base GEMM (bf16 on an AVX2-only EPYC; fp16 alike).
    - fp16 on a CPU with fp16 GEMM instructions, and fp64: eager (the fp32 loops would lose to the former and round
      the latter).
    """
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype not in (torch.float32, torch.bfloat16,
                                                                            torch.float16):
        return False
    if sgmv() is None:
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16 and bf16_dot():
        return x.shape[-1] % 2 == 0 and (out_features is None or out_features % 16 == 0)
    return not native_half(x.dtype)


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU has GEMM instructions for `dtype` (bf16: AVX512-BF16 or AMX on x86, BF16 on Arm; fp16:
    AVX512-FP16 or AMX-FP16 on x86, half-precision SIMD on Arm). True when the flags cannot be read."""
    if "flags" not in _state:
        lines = _cpuinfo("flags", "Features")
        _state["flags"] = frozenset(lines[0].split(":", 1)[1].split()) if lines else None
    flags = _state["flags"]
    if flags is None:
        return True
    wanted = {"avx512_bf16", "amx_bf16", "bf16"} if dtype == torch.bfloat16 else {"avx512_fp16", "amx_fp16", "asimdhp"}
    return bool(flags & wanted)


def bf16_dot() -> bool:
    """Whether the built kernels compute bf16 activations with AVX512-BF16 dot products (`pairs` factor layout)."""
    ops = sgmv()
    if ops is None:
        return False
    if "bf16_dot" not in _state:
        _state["bf16_dot"] = bool(ops.bf16_dot())
    return _state["bf16_dot"]


@contextlib.contextmanager
def using(value: str):
    """Inside the block, kernels run in mode `value` ("eager": the PyTorch path; "compiled": the kernels or
    KernelError), e.g. to compare both in one process."""
    if value not in MODES:
        raise KernelError(f"kernel mode {value!r}; use one of {list(MODES)}")
    previous = _state.get("mode")
    _state["mode"] = value
    try:
        yield
    finally:
        _state["mode"] = previous


def reset() -> None:
    """Forget the build outcome (the next `sgmv()` tries again: tests switch modes with it)."""
    with _lock:
        for key in ("ops", "bf16_dot"):
            _state.pop(key, None)


def build_dir(name: str = "lorakit_sgmv") -> Path:
    cpu = _cpu_signature()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(),
                                     cpu.encode(), name.encode()])).hexdigest()[:16]
    return cache_dir() / "kernels" / key


def generic_ops():
    """The kernels built without the AVX2 register tiles, as `torch.ops.lorakit_sgmv_generic`: the loops that
    AVX-512 and Arm CPUs run, for tests on AVX2 machines. Raises KernelError when they cannot be built."""
    ops, error = _built("generic", name="lorakit_sgmv_generic", defines=("-DLORAKIT_GENERIC",))
    if ops is None:
        raise KernelError(f"the generic kernels could not be built: {error}")
    return ops


def _built(key: str, first=None, name: str = "lorakit_sgmv", defines: tuple = ()) -> tuple:
    """`_build`'s outcome, kept in `_state[key]`: built by the first caller while other threads wait; `first(ops,
    error)` runs once, after that build."""
    if key not in _state:
        with _lock:
            if key not in _state:
                _state[key] = _build(name, defines)
                if first is not None:
                    first(*_state[key])
    return _state[key]


def _build(name: str = "lorakit_sgmv", defines: tuple = ()):
    """(ops, None), or (None, why not)."""
    try:
        _check_toolchain()
        from torch.utils.cpp_extension import load

        directory = build_dir(name)
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.glob("*.so")):
            print(f"lorakit: building the CPU kernels for mixed-adapter batches (once, ~10 s) in {directory}",
                  file=sys.stderr)
        load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DLORAKIT_OPS={name}", *defines],
             extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False, verbose=False)
        return getattr(torch.ops, name), None
    except Exception as e:  # a missing compiler, ninja or header shows up as many exception types
        text = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _check_toolchain() -> None:
    """ninja (the PyPI wheel or the system one) on PATH and a C++ compiler, or an error saying which is missing."""
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        raise KernelError("ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelError(f"no C++ compiler ({compiler!r} is not on PATH)")


def _cpu_signature() -> str:
    """The CPU's model and feature flags (`-march=native` builds for exactly these)."""
    lines = _cpuinfo("model name", "flags", "Features")
    return platform.machine() + ("\n" + "\n".join(lines) if lines is not None else platform.processor())


def _cpuinfo(*prefixes: str) -> list[str] | None:
    """The distinct lines of /proc/cpuinfo that start with one of `prefixes` (None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return list(dict.fromkeys(ln for ln in text.splitlines() if ln.startswith(prefixes)))


# ---- factors in the kernels' layout -----------------------------------------------------------------------------
def down_factor(a: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """A (r, d_in) as the shrink kernel reads it: Aᵀ (d_in, r') contiguous, r' = r rounded up to a multiple of 8
    (zero columns), in A's dtype when that is bf16 or fp16 (the kernel widens it exactly), else fp32. `pairs` (bf16
    activations, `bf16_dot`): bf16 (d_in / 2, r'', 2) with [k, c, p] = Aᵀ[2k + p, c], r'' a multiple of 16."""
    r = a.shape[0]
    multiple = 16 if pairs else RANK_MULTIPLE
    dtype = torch.bfloat16 if pairs else _factor_dtype(a)
    at = torch.zeros(a.shape[1], -(-r // multiple) * multiple, dtype=dtype, device=a.device)
    at[:, :r] = a.detach().T
    if not pairs:
        return at
    return at.view(-1, 2, at.shape[1]).transpose(1, 2).contiguous()


def up_factor(b: torch.Tensor, scale=1.0, pairs: bool = False) -> torch.Tensor:
    """s·B (d_out, r) as the expand kernel reads it: (s·B)ᵀ (r, d_out) contiguous; fp32, or B's own bf16 / fp16 when
    s = 1 (then nothing is rounded; B itself when Bᵀ is already contiguous). `pairs`: bf16 (⌈r / 2⌉, d_out, 2) with
    [j, c, p] = (s·B)ᵀ[2j + p, c] (a zero row pads an odd rank)."""
    if isinstance(scale, (int, float)) and scale == 1 and not pairs and _factor_dtype(b) == b.dtype:
        return b.detach().T.contiguous()
    bt = (b.detach().float() * scale).T.contiguous()
    if not pairs:
        return bt
    if bt.shape[0] % 2:
        bt = torch.cat([bt, bt.new_zeros(1, bt.shape[1])])
    return bt.to(torch.bfloat16).view(-1, 2, bt.shape[1]).transpose(1, 2).contiguous()


def _factor_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the kernels read a factor in: its own when 16-bit (half the bytes, widened exactly), else fp32."""
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32
