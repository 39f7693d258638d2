"""CUDA-semantics harness for the CPU: aten ops that CUDA lacks for integers.

Some aten kernels exist on the CPU for integer dtypes but not on CUDA, so
code that passes every CPU test can crash on its first GPU run (the
motivating case: ``clustering_stability`` multiplied int64 contingency
tables, and CUDA answers ``"addmv_impl_cuda" not implemented for 'Long'``).
:class:`CudaIntegerOpsMode` is a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`
that sees every aten op the code under test issues, records it with the
dtypes of its tensor inputs, and fails on the ops of
:data:`CUDA_MISSING_INTEGER_KERNELS` when one of their tensor inputs has an
integer or bool dtype.

Usage::

    from _cuda_harness_ops import no_cuda_missing_ops

    with no_cuda_missing_ops() as mode:  # fails at the offending op and at exit
        clustering_stability([a, b])
    assert mode.saw("bincount")

The list below holds only ops verified to differ between the CPU and CUDA
kernels of PyTorch (ops that fail for integers on the CPU as well are caught
by ordinary CPU tests and are left out):

* **BLAS products** (``mm``, ``mv``, ``addmm``, ``addmv``, ``bmm``,
  ``baddbmm``, ``addbmm``, ``dot``, ``vdot``, ``matmul``): the CPU has
  integer kernels; CUDA's go through cuBLAS, which has no integer GEMM
  (pytorch/pytorch#44428, open: "Cuda support for matrix multiplication on
  Long Tensor"; the errors read ``"addmm_cuda" not implemented for 'Long'``
  / ``addmv_impl_cuda``). ``matmul`` and ``einsum`` are composite: under a
  dispatch mode they arrive as ``mm`` / ``mv`` / ``bmm`` / ``dot``, which
  are checked. ``_int_mm`` (int8 x int8 -> int32) is CUDA's one integer
  GEMM and is not flagged.
* **Bilinear and bicubic upsampling of integer images**
  (``upsample_bilinear2d``, ``_upsample_bilinear2d_aa``,
  ``upsample_bicubic2d``, ``_upsample_bicubic2d_aa``): since PyTorch 2.1 the
  CPU has uint8 kernels (checked here: ``F.interpolate`` of a uint8 tensor
  works in bilinear and bicubic mode), while ``UpSampleBilinear2d.cu`` and
  ``UpSampleBicubic2d.cu`` dispatch ``AT_DISPATCH_FLOATING_TYPES_AND2(Half,
  BFloat16, ...)`` only. Nearest upsampling has a CUDA uint8 kernel and is
  not flagged.

Ops checked and left out because the CPU rejects integers too (so CPU tests
already catch them): ``histc`` (``"histogram_cpu" not implemented for
'Long'``), ``adaptive_avg_pool2d`` ("area" resize), bool ``mm`` / ``topk`` /
``kthvalue`` / ``median``, every linalg decomposition, ``cdist``, ``mean``.
Integer ops CUDA does support and that are therefore not flagged:
``bincount``, ``cumsum``, ``sort``, ``topk``, ``kthvalue``, ``index_add_``,
``scatter_add_``, ``unique``, elementwise arithmetic and reductions.

Limits: the mode runs the CPU kernels, so branches taken only on CUDA
(``if device.type == "cuda"``) are not exercised, and it cannot see ops run
in other processes (dask workers) or inside extensions that bypass the
dispatcher (faiss, pydensecrf).
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CUDA_MISSING_INTEGER_KERNELS",
    "CudaIntegerOpsMode",
    "CudaKernelMissing",
    "OpRecord",
    "no_cuda_missing_ops",
]

_BLAS = (
    "CUDA has no integer BLAS: cuBLAS GEMM/GEMV are floating point only "
    "(pytorch/pytorch#44428)"
)
_UPSAMPLE = (
    "CUDA's bilinear/bicubic upsampling dispatches floating types only "
    "(UpSampleBilinear2d.cu / UpSampleBicubic2d.cu); the CPU has uint8 kernels"
)

#: aten op name (``OpOverloadPacket.__name__`` without the ``aten.`` prefix)
#: -> why CUDA rejects it for integer or bool tensor inputs.
CUDA_MISSING_INTEGER_KERNELS: dict[str, str] = {
    "mm": _BLAS,
    "mv": _BLAS,
    "addmm": _BLAS,
    "addmv": _BLAS,
    "addbmm": _BLAS,
    "bmm": _BLAS,
    "baddbmm": _BLAS,
    "dot": _BLAS,
    "vdot": _BLAS,
    "matmul": _BLAS,
    "upsample_bilinear2d": _UPSAMPLE,
    "_upsample_bilinear2d_aa": _UPSAMPLE,
    "upsample_bicubic2d": _UPSAMPLE,
    "_upsample_bicubic2d_aa": _UPSAMPLE,
}


class CudaKernelMissing(AssertionError):
    """An op with no CUDA kernel for its integer input was issued."""


@dataclass(frozen=True)
class OpRecord:
    """One aten op as issued: its name and its tensor inputs' dtypes."""

    name: str
    dtypes: tuple[torch.dtype, ...]


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def _caller_frames(n: int = 6) -> str:
    """The innermost ``n`` frames of the Python stack outside torch and here."""
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    frames = [
        f
        for f in traceback.extract_stack()
        if not f.filename.startswith(torch_dir) and f.filename != __file__
    ]
    return "".join(traceback.format_list(frames[-n:]))


def _op_name(func) -> str:
    # func is an OpOverload such as aten.addmv.default: its packet's name
    return func._overloadpacket.__name__


class CudaIntegerOpsMode(TorchDispatchMode):
    """Record every aten op and fail on those CUDA lacks for integer inputs.

    Parameters
    ----------
    strict : bool, default=True
        Raise :class:`CudaKernelMissing` at the offending op (its traceback
        points at the caller). Violations are recorded either way, so code
        that swallows the exception is still caught by :meth:`check`.
    missing : dict, optional
        The ops to fail on; default :data:`CUDA_MISSING_INTEGER_KERNELS`.

    Attributes
    ----------
    ops : collections.Counter of OpRecord
        How often each (op, input dtypes) was issued.
    violations : list of (OpRecord, str)
        The forbidden ops seen, each with the innermost frames of the Python
        stack that issued it.
    """

    def __init__(self, *, strict: bool = True, missing: dict | None = None):
        super().__init__()
        self.strict = strict
        self.missing = CUDA_MISSING_INTEGER_KERNELS if missing is None else missing
        self.ops: Counter[OpRecord] = Counter()
        self.violations: list[tuple[OpRecord, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        dtypes = tuple(t.dtype for t in flat if isinstance(t, torch.Tensor))
        record = OpRecord(_op_name(func), dtypes)
        self.ops[record] += 1
        if record.name in self.missing and any(_is_integer(d) for d in dtypes):
            where = _caller_frames()
            self.violations.append((record, where))
            if self.strict:
                raise CudaKernelMissing(self._message(record, where))
        return func(*args, **kwargs)

    def _message(self, record: OpRecord, where: str) -> str:
        names = ", ".join(str(d).replace("torch.", "") for d in record.dtypes)
        return (
            f"aten.{record.name} on ({names}) has no CUDA kernel: "
            f"{self.missing[record.name]}. Compute in float64 (exact for "
            f"integers below 2**53) or with bincount/sum.\nIssued at:\n{where}"
        )

    def saw(self, name: str, dtype: torch.dtype | None = None) -> bool:
        """Whether op ``name`` ran (with a ``dtype`` input, if given)."""
        return any(
            r.name == name and (dtype is None or dtype in r.dtypes) for r in self.ops
        )

    def check(self) -> None:
        """Raise :class:`CudaKernelMissing` if any forbidden op was recorded."""
        if self.violations:
            record, where = self.violations[0]
            more = len(self.violations) - 1
            raise CudaKernelMissing(
                self._message(record, where)
                + (f"\n(and {more} more violation(s))" if more else "")
            )


@contextlib.contextmanager
def no_cuda_missing_ops(*, strict: bool = True) -> Iterator[CudaIntegerOpsMode]:
    """Run the block under :class:`CudaIntegerOpsMode`; fail on a violation.

    Raises at the offending op when ``strict`` and, in any case, on leaving
    the block if a violation was recorded (even one the code caught).
    """
    mode = CudaIntegerOpsMode(strict=strict)
    with mode:
        yield mode
    mode.check()
