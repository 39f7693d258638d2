"""CUDA-semantics harness for the CPU: count host-device synchronisations.

On a GPU, every operation whose result the host must *read* (a Python number,
a shape that depends on the data, a copy to host memory) makes the host wait
until the device has finished all the work queued before it. One such wait
per training step keeps the GPU idle between steps; on the CPU the same code
costs nothing, so ordinary tests never notice.

:class:`SyncCounter` runs the code under test on the CPU and counts the
operations that *would* synchronise on CUDA. It combines two modes:

* a :class:`~torch.overrides.TorchFunctionMode`, which sees the Python-level
  reads that on a CPU tensor never reach the dispatcher: ``Tensor.item``,
  ``tolist``, ``__bool__`` (``if t:``, ``while t:``), ``__int__``,
  ``__float__``, ``__index__`` (a tensor used as a Python index or size),
  ``Tensor.cpu`` and ``Tensor.to("cpu")`` with the string ``"cpu"``
  (device-to-host copies: on the CPU they are no-ops and never dispatched,
  so the harness counts them as a pattern -- code that knows its tensor is
  on the host does not call ``.cpu()``; ``.to(device)`` with a
  ``torch.device`` is taken for a move to the compute device and not
  counted);
* a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, which sees the
  aten ops of :data:`SYNC_OPS`: ops whose CUDA kernel reads a device value
  back to size its output or answer the host (``nonzero``, ``masked_select``,
  boolean-mask indexing, ``unique``, ``bincount``, ``equal``...) and
  ``_local_scalar_dense`` (every scalar read issued by torch itself), plus
  real device-to-host copies when the harness runs on a GPU.

A read counted by the first mode is not counted again by the ops it issues.

Usage::

    from _cuda_harness_syncs import SyncCounter

    with SyncCounter() as syncs:
        est.fit(X)
    print(syncs.count, syncs.report())

Budgets are asserted as differences (``n_steps=80`` minus ``n_steps=40``),
so that the setup before a training loop does not count.

Host tensors that stay on the host on CUDA too: ``torch.optim`` keeps its
step counters on the host (``capturable=False``, the default) and reads them
with ``.item()`` every step; those reads are not synchronisations, and
:data:`HOST_SCALAR_SITES` ignores every event issued from ``torch/optim/``.

Limits:

* the mode runs the CPU kernels, so branches taken only on CUDA
  (``if device.type == "cuda"``) are not exercised;
* a ``.cpu()`` of a tensor that is on the host on CUDA as well is counted
  (a false positive: drop the ``.cpu()``);
* blocking host-to-device copies (``tensor.to("cuda")`` of pageable memory,
  which PyTorch follows by a stream synchronisation) are invisible on the
  CPU, where the estimator's device *is* the host;
* ops inside extensions that bypass the dispatcher (faiss) or in other
  processes (dask workers) are not seen.

``python tests/_cuda_harness_syncs.py`` prints the counts of StegoProjector
training, mini-batch k-means and exact Lloyd k-means.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "HOST_SCALAR_SITES",
    "SYNC_METHODS",
    "SYNC_OPS",
    "SyncCounter",
    "SyncEvent",
]

_READ = "reads a device value on the host"
_SIZE = "the output size depends on the data: the kernel reads it back"

#: aten op name (``OpOverloadPacket.__name__``) -> why CUDA synchronises.
#: ``index``/``index_put_`` count only with boolean masks among the indices,
#: ``repeat_interleave`` only without ``output_size``, ``_to_copy``/``copy_``
#: only from a non-CPU tensor to the CPU (real device-to-host copies, seen
#: when the harness runs on a GPU).
SYNC_OPS: dict[str, str] = {
    "_local_scalar_dense": _READ + " (item, bool, int, float of a tensor)",
    "is_nonzero": _READ + " (bool of a one-element tensor)",
    "equal": _READ + " (torch.equal returns a Python bool)",
    "nonzero": _SIZE,
    "masked_select": _SIZE,
    "unique": _SIZE,
    "_unique": _SIZE,
    "_unique2": _SIZE,
    "unique_dim": _SIZE,
    "unique_consecutive": _SIZE,
    "unique_dim_consecutive": _SIZE,
    "bincount": _SIZE + " (CUDA's bincount reads max(input) for the bin count)",
    "histc": _SIZE + " (CUDA's histc reads min/max when min == max)",
    "repeat_interleave": _SIZE + " (without output_size)",
    "index": _SIZE + " (boolean-mask indexing is a nonzero)",
    "index_put": _SIZE + " (boolean-mask assignment is a nonzero)",
    "index_put_": _SIZE + " (boolean-mask assignment is a nonzero)",
    "_to_copy": "device-to-host copy",
    "copy_": "device-to-host copy",
}

#: Tensor methods (Python level) that read a device tensor on the host.
SYNC_METHODS: dict[str, str] = {
    "item": _READ,
    "tolist": _READ,
    "__bool__": _READ + " (if/while on a tensor)",
    "__int__": _READ,
    "__float__": _READ,
    "__index__": _READ + " (a tensor used as a Python index or size)",
    "__complex__": _READ,
    "cpu": "device-to-host copy (.cpu())",
    "to": "device-to-host copy (.to('cpu'))",
}

#: Source paths (substrings) whose events are host-only on CUDA too.
HOST_SCALAR_SITES: tuple[str, ...] = ("torch/optim/",)

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0]


@dataclass(frozen=True)
class SyncEvent:
    """One synchronising operation: what it was and where it came from."""

    op: str
    why: str
    site: str


def _sites() -> tuple[str, str]:
    """(innermost frame, innermost frame outside torch and this file)."""
    stack = [f for f in traceback.extract_stack() if f.filename != __file__]
    inner = stack[-1] if stack else None
    outside = [f for f in stack if not f.filename.startswith(_TORCH_DIR)]
    caller = outside[-1] if outside else inner

    def fmt(f):
        return f"{f.filename}:{f.lineno} ({f.name})" if f is not None else "?"

    return fmt(inner), fmt(caller)


def _is_cpu(x) -> bool:
    if isinstance(x, torch.device):
        return x.type == "cpu"
    if isinstance(x, str):
        return x.split(":")[0] == "cpu"
    return False


def _is_cpu_literal(x) -> bool:
    """``"cpu"`` written as a string: an explicit move to the host. A
    ``torch.device`` is usually the compute device (the CPU here, CUDA on a
    GPU), so it is not taken for a device-to-host copy."""
    return isinstance(x, str) and x.split(":")[0] == "cpu"


def _method_syncs(name: str, args, kwargs) -> bool:
    if name not in SYNC_METHODS:
        return False
    if name == "to":  # only to the host: .to("cpu"), .to(device="cpu", ...)
        return any(_is_cpu_literal(a) for a in args[1:]) or _is_cpu_literal(
            kwargs.get("device")
        )
    return True


def _op_syncs(name: str, args, kwargs) -> bool:
    if name not in SYNC_OPS:
        return False
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in indices
        )
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and not (
            len(args) > 3 and args[3] is not None
        )
    if name == "_to_copy":
        src, dev = args[0], kwargs.get("device")
        return src.device.type != "cpu" and dev is not None and _is_cpu(dev)
    if name == "copy_":
        dst, src = args[0], args[1]
        return (
            isinstance(src, torch.Tensor)
            and src.device.type != "cpu"
            and dst.device.type == "cpu"
        )
    return True


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if self.counter._depth == 0 and _op_syncs(name, args, kwargs):
            self.counter._record(f"aten.{name}", SYNC_OPS[name])
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not _method_syncs(name, args, kwargs):
            return func(*args, **kwargs)
        if self.counter._depth == 0:
            self.counter._record(f"Tensor.{name}", SYNC_METHODS[name])
        self.counter._depth += 1  # the aten ops it issues are the same sync
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._depth -= 1


class SyncCounter:
    """Count the operations that would synchronise host and device on CUDA.

    A context manager; see the module docstring for what is counted.

    Parameters
    ----------
    ignore : tuple of str, default=:data:`HOST_SCALAR_SITES`
        Events issued from a source file whose path contains one of these
        substrings are not counted (host-only reads).

    Attributes
    ----------
    events : list of SyncEvent
        Every counted event, in order.
    """

    def __init__(self, *, ignore: tuple[str, ...] = HOST_SCALAR_SITES):
        self.ignore = tuple(ignore)
        self.events: list[SyncEvent] = []
        self._depth = 0
        self._modes = (_Function(self), _Dispatch(self))

    def _record(self, op: str, why: str) -> None:
        inner, caller = _sites()
        if any(s in inner for s in self.ignore):
            return
        self.events.append(SyncEvent(op, why, caller))

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def count(self) -> int:
        """Number of synchronising events."""
        return len(self.events)

    def by_site(self) -> Counter:
        """Events per (op, calling line outside torch)."""
        return Counter((e.op, e.site) for e in self.events)

    def report(self) -> str:
        """One line per (op, site), most frequent first."""
        rows = [
            f"{n:6d}  {op}  at {site}" for (op, site), n in self.by_site().most_common()
        ]
        return "\n".join(rows) if rows else "(no synchronisation)"


def count_syncs(fn, *args, **kwargs) -> tuple[int, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`SyncCounter`."""
    with SyncCounter() as counter:
        fn(*args, **kwargs)
    return counter.count, counter


def _main() -> None:  # pragma: no cover - a measuring script
    import numpy as np

    from skstego import KMeansProbe, StegoProjector
    from skstego.probes import _kmeans

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(32, 16, 6, 6)).astype(np.float32)

    def stego(n_steps, data):
        est = StegoProjector(
            dim=4, n_steps=n_steps, batch_size=8, device="cpu", random_state=0
        )
        return count_syncs(est.fit, data)

    for what, data in (("NumPy", maps), ("torch", torch.from_numpy(maps))):
        a, _ = stego(40, data)
        b, cb = stego(80, data)
        print(
            f"StegoProjector ({what} input): 40 steps {a}, 80 steps {b}: "
            f"{(b - a) / 40:.3f} per step"
        )
    print(cb.report())

    tokens = rng.normal(size=(8000, 8)).astype(np.float32)
    a, _ = count_syncs(
        KMeansProbe(
            k=5,
            algorithm="minibatch",
            batch_size=100,
            max_iter=1,
            device="cpu",
            random_state=0,
        ).fit,
        tokens[:4000],
    )
    b, cb = count_syncs(
        KMeansProbe(
            k=5,
            algorithm="minibatch",
            batch_size=100,
            max_iter=1,
            device="cpu",
            random_state=0,
        ).fit,
        tokens,
    )
    print(
        f"mini-batch k-means: 40 steps {a}, 80 steps {b}: {(b - a) / 40:.3f} per step"
    )
    print(cb.report())

    X = torch.from_numpy(tokens)
    centers = X[:5].clone()
    for it in (5, 10):
        with SyncCounter() as c:
            out = _kmeans._lloyd(
                X,
                (X * X).sum(1),
                centers,
                max_iter=it,
                tol=0.0,
                cosine=False,
                verbose=False,
                desc="",
            )
        print(f"exact Lloyd, {out[3]} iterations: {c.count} syncs")
    print(c.report())


if __name__ == "__main__":  # pragma: no cover
    _main()
