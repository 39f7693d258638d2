"""CUDA-semantics harness for the CPU: device-to-host copies and pinned memory.

Two classes of CUDA defect pass every CPU test, because on the CPU the
offending call is harmless:

* **an asynchronous device-to-host copy read before it lands.**
  ``x.to("cpu", non_blocking=True)`` (or ``host.copy_(x, non_blocking=True)``,
  ``x.cpu()`` after an async copy) on a CUDA tensor returns at once and fills
  pinned host memory later; reading the result before a synchronisation gives
  wrong values. On the CPU the same line is a plain copy.
* **pinned (page-locked) host memory that grows with the data.** Pinning a
  whole array, or a new buffer for every batch and keeping them, exhausts
  page-locked memory on a GPU machine; on a CPU-only build ``pin_memory()``
  raises, so CPU runs never reach those branches.

:class:`CopyRecorder` is a :class:`~torch.overrides.TorchFunctionMode` that
records both *patterns*, whatever device the source is on:

* ``d2h_async``: every call that copies *to the host* with
  ``non_blocking=True`` -- ``Tensor.to(<cpu device>, non_blocking=True)``
  (the target named explicitly, by string, :class:`torch.device` or
  ``device=``), ``Tensor.to(<dtype>, non_blocking=True)`` of a host tensor,
  ``Tensor.copy_(src, non_blocking=True)`` into a host (or pinned)
  destination from a (fake) CUDA source, ``Tensor.cpu()`` is always
  synchronous and is not flagged. Each record keeps the caller's frames.
* ``pins``: every ``Tensor.pin_memory()`` call and every factory called with
  ``pin_memory=True`` (``torch.empty``, ``torch.zeros``, ...), with its byte
  size; ``pinned_bytes`` is the pinned memory alive now and
  ``peak_pinned_bytes`` the most alive at once (freed tensors are
  subtracted through weak references). Pinning is emulated (an ordinary CPU
  copy, reported pinned by ``is_pinned()``), so the code after it runs.

With ``fake_cuda=True`` (:func:`cuda_copy_harness` default) the recorder
also emulates a CUDA device, so that the ``if device.type == "cuda"`` and
``if x.is_cuda`` branches run on the CPU:

* ``torch.cuda.is_available()`` is True, one device, ``synchronize`` and
  ``empty_cache`` are no-ops, ``torch.Generator(device="cuda")`` is a CPU
  generator;
* a tensor created with ``device="cuda"``, moved with ``.to("cuda")`` /
  ``.cuda()``, or computed from such a tensor is a CPU tensor *tagged* as
  CUDA: its ``device`` reads ``cuda:0``, ``is_cuda`` is True, ``.numpy()``
  raises as on a GPU, and ``.to("cpu")`` / ``.cpu()`` return an untagged
  copy (a device-to-host copy);
* pickling a tagged tensor (``Tensor.__reduce_ex__``, so also the
  parameters of a module on the fake GPU) is recorded in ``cuda_pickled``:
  what a dask worker without that device could not unpickle;
* with ``strict_devices=True`` an op mixing tagged and untagged tensors
  (other than 0-d ones and copies/indexing) raises, as CUDA does.

Usage::

    from _cuda_harness_copies import cuda_copy_harness

    with cuda_copy_harness() as rec:         # fake CUDA
        DinoFeaturizer(vit, device="cuda").transform(images)
    rec.assert_no_async_d2h()
    assert rec.peak_pinned_bytes <= 3 * batch_bytes

    with cuda_copy_harness(fake_cuda=False) as rec:   # real CPU run
        HNNEProjector(device="cpu").fit(X)
    rec.assert_no_async_d2h()

Limits: the emulation runs only what Python-level torch calls reach (no
streams, events or CUDA graphs are modelled), it does not see other
processes (dask workers), and extensions that bypass torch (faiss) see
plain CPU arrays. It checks the copy and pinning *patterns*; numerical
CUDA differences are for the ``gpu``-marked tests.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["CopyRecord", "CopyRecorder", "cuda_copy_harness"]

_CUDA = torch.device("cuda", 0)
_CPU = torch.device("cpu")
# calls allowed to mix (fake) CUDA and host tensors, as CUDA allows them
_MIXING_ALLOWED = {
    "copy_",
    "to",
    "__getitem__",
    "__setitem__",
    "index_put_",
    "__set__",
    "set_",
    "_make_subclass",
    "pin_memory",
    "__reduce_ex__",
    "_has_compatible_shallow_copy_type",
}
_FACTORY_PIN = "pin_memory"
#: Tensors on the emulated CUDA device, for the whole process: device copies
#: that skstego caches (a backbone moved to "cuda", fitted attributes) stay
#: on the fake GPU from one harness block to the next, as on a real one.
_FAKE_CUDA: dict[int, weakref.ref] = {}


@dataclass
class CopyRecord:
    """One recorded call: its name, bytes, and where it was made."""

    what: str
    nbytes: int
    where: str


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # a bare index names a CUDA device
    return False


def _is_cpu_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cpu"
    return isinstance(value, str) and value == "cpu"


def _name(func: Any) -> str:
    return getattr(func, "__name__", repr(func))


def _where() -> str:
    frames = [
        f
        for f in traceback.extract_stack()[:-3]
        if "torch/" not in f.filename and "_cuda_harness" not in f.filename
    ]
    return " <- ".join(
        f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-4:][::-1]
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CopyRecorder(TorchFunctionMode):
    """Record async device-to-host copies and pinned memory (see the module)."""

    def __init__(self, *, fake_cuda: bool = False, strict_devices: bool = True) -> None:
        super().__init__()
        self.fake_cuda = fake_cuda
        self.strict_devices = strict_devices
        self.d2h_async: list[CopyRecord] = []
        self.pins: list[CopyRecord] = []
        self.cuda_pickled: list[CopyRecord] = []
        self.pinned_bytes = 0
        self.peak_pinned_bytes = 0
        self._pinned: dict[int, weakref.ref] = {}

    # -- tags ---------------------------------------------------------------
    def is_fake_cuda(self, t: Any) -> bool:
        """True for a tensor that lives on the emulated CUDA device."""
        ref = _FAKE_CUDA.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _tag_cuda(self, t: torch.Tensor) -> None:
        key = id(t)
        if self.is_fake_cuda(t):
            return
        _FAKE_CUDA[key] = weakref.ref(t, lambda _r, k=key: _FAKE_CUDA.pop(k, None))

    def _is_pinned(self, t: Any) -> bool:
        ref = self._pinned.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _pin(self, t: torch.Tensor, what: str) -> torch.Tensor:
        nbytes = _nbytes(t)
        self.pins.append(CopyRecord(what, nbytes, _where()))
        key = id(t)

        def freed(_ref: Any, key: int = key, nbytes: int = nbytes) -> None:
            self._pinned.pop(key, None)
            self.pinned_bytes -= nbytes

        self._pinned[key] = weakref.ref(t, freed)
        self.pinned_bytes += nbytes
        self.peak_pinned_bytes = max(self.peak_pinned_bytes, self.pinned_bytes)
        return t

    def _async_d2h(self, what: str, t: torch.Tensor) -> None:
        self.d2h_async.append(CopyRecord(what, _nbytes(t), _where()))

    # -- checks -------------------------------------------------------------
    def assert_no_async_d2h(self) -> None:
        """Fail naming every recorded ``non_blocking`` copy to the host."""
        if self.d2h_async:
            lines = "\n".join(
                f"  {r.what} ({r.nbytes} B) at {r.where}" for r in self.d2h_async
            )
            raise AssertionError(
                f"{len(self.d2h_async)} device-to-host copies with non_blocking=True "
                f"(their result may be read before it lands on a GPU):\n{lines}"
            )

    def assert_pinned_at_most(self, budget: int) -> None:
        """Fail when more than ``budget`` bytes were pinned at once."""
        if self.peak_pinned_bytes > budget:
            lines = "\n".join(
                f"  {r.what} ({r.nbytes} B) at {r.where}" for r in self.pins[:10]
            )
            raise AssertionError(
                f"{self.peak_pinned_bytes} bytes pinned at once, over the budget of "
                f"{budget} ({len(self.pins)} pin calls; first ones:)\n{lines}"
            )

    def assert_no_cuda_pickled(self) -> None:
        """Fail when a (fake) CUDA tensor was pickled."""
        if self.cuda_pickled:
            lines = "\n".join(
                f"  {r.what} ({r.nbytes} B) at {r.where}"
                for r in self.cuda_pickled[:10]
            )
            raise AssertionError(
                f"{len(self.cuda_pickled)} CUDA tensor(s) pickled (they unpickle only "
                f"where that device exists):\n{lines}"
            )

    # -- the mode -------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _name(func)
        first = args[0] if args else None

        # properties of the emulated device
        if name == "__get__" and self.fake_cuda and self.is_fake_cuda(first):
            attr = _property_name(func)
            if attr == "device":
                return _CUDA
            if attr == "is_cuda":
                return True
            if attr == "is_cpu":
                return False
        if name == "is_pinned" and isinstance(first, torch.Tensor):
            return self._is_pinned(first)
        if name == "get_device" and self.fake_cuda and self.is_fake_cuda(first):
            return 0
        if name in ("numpy", "__array__") and self.is_fake_cuda(first):
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() "
                "to copy the tensor to host memory first. (fake CUDA harness)"
            )

        # pinning: recorded and emulated
        if name == "pin_memory" and isinstance(first, torch.Tensor):
            if self._is_pinned(first):
                return first
            if self.is_fake_cuda(first):
                raise RuntimeError("cannot pin 'CUDA' memory (fake CUDA harness)")
            return self._pin(first.clone(), "Tensor.pin_memory")
        pin = kwargs.get(_FACTORY_PIN) is True
        if pin:
            kwargs[_FACTORY_PIN] = False

        # async copies to the host
        if name == "to" and isinstance(first, torch.Tensor):
            target, non_blocking = _to_target(args, kwargs)
            source_host = not self.is_fake_cuda(first)
            to_host = _is_cpu_device(target) or (target is None and source_host)
            if non_blocking and to_host:
                self._async_d2h("Tensor.to(cpu, non_blocking=True)", first)
        if name == "copy_" and len(args) >= 2:
            non_blocking = kwargs.get(
                "non_blocking", args[2] if len(args) > 2 else False
            )
            dst, src = args[0], args[1]
            if non_blocking and not self.is_fake_cuda(dst):
                if self.is_fake_cuda(src) or self._is_pinned(dst):
                    self._async_d2h(
                        "Tensor.copy_(host <- device, non_blocking=True)", src
                    )

        if not self.fake_cuda:
            out = func(*args, **kwargs)
            if pin and isinstance(out, torch.Tensor):
                self._pin(out, f"{name}(pin_memory=True)")
            return out
        return self._run_fake(func, name, args, kwargs, pin)

    def _run_fake(self, func, name, args, kwargs, pin):
        first = args[0] if args else None
        wants_cuda = False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
            wants_cuda = True
        d2h = False
        if name == "to" and isinstance(first, torch.Tensor):
            target, _ = _to_target(args, kwargs)
            args = tuple(
                _CPU if _is_cuda_device(a) and i >= 1 else a for i, a in enumerate(args)
            )
            if target is not None and _is_cuda_device(target):
                wants_cuda = True
                if not self.is_fake_cuda(first):
                    kwargs["copy"] = True  # host -> device: a new tensor
            elif (
                target is not None
                and _is_cpu_device(target)
                and self.is_fake_cuda(first)
            ):
                kwargs["copy"] = True  # device -> host: a new, untagged tensor
                d2h = True
        if name == "cuda" and isinstance(first, torch.Tensor):
            out = first if self.is_fake_cuda(first) else first.clone()
            self._tag_cuda(out)
            return out
        if (
            name == "cpu"
            and isinstance(first, torch.Tensor)
            and self.is_fake_cuda(first)
        ):
            return first.clone()
        if name == "__set__" and len(args) >= 2 and self.is_fake_cuda(args[1]):
            out = func(*args, **kwargs)  # ``param.data = <a CUDA tensor>``
            if isinstance(first, torch.Tensor):
                self._tag_cuda(first)
            return out

        flat_in, _ = tree_flatten((args, kwargs))
        tensors_in = [t for t in flat_in if isinstance(t, torch.Tensor)]
        cuda_in = [t for t in tensors_in if self.is_fake_cuda(t)]
        if (
            self.strict_devices
            and cuda_in
            and name not in _MIXING_ALLOWED
            and any(not self.is_fake_cuda(t) and t.ndim > 0 for t in tensors_in)
        ):
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least "
                f"two devices, cuda:0 and cpu! ({name}; fake CUDA harness)"
            )
        out = func(*args, **kwargs)
        if pin and isinstance(out, torch.Tensor):
            self._pin(out, f"{name}(pin_memory=True)")
            return out
        if d2h or name in _MIXING_ALLOWED - {"to", "__getitem__", "_make_subclass"}:
            return out
        if wants_cuda or cuda_in:
            ids_in = {id(t) for t in tensors_in}

            def tag(x: Any) -> Any:
                if isinstance(x, torch.Tensor) and id(x) not in ids_in:
                    self._tag_cuda(x)
                return x

            tree_map(tag, out)
            if name == "to" and first is not None and out is first and wants_cuda:
                self._tag_cuda(out)
        return out


def _property_name(func: Any) -> str | None:
    # ``Tensor.device.__get__`` and friends: the descriptor is the bound self
    descriptor = getattr(func, "__self__", None)
    return getattr(descriptor, "__name__", None)


def _to_target(args: tuple, kwargs: dict) -> tuple[Any, bool]:
    """(target device or None, non_blocking) of a ``Tensor.to`` call."""
    target = kwargs.get("device")
    non_blocking = bool(kwargs.get("non_blocking", False))
    rest = list(args[1:])
    if rest and isinstance(rest[0], torch.Tensor):
        other = rest.pop(0)
        target = other.device
    elif rest and (isinstance(rest[0], (str, torch.device)) or _is_index(rest[0])):
        target = rest.pop(0)
    if rest and isinstance(rest[0], torch.dtype):
        rest.pop(0)
    if rest and isinstance(rest[0], bool):
        non_blocking = non_blocking or rest[0]
    return target, non_blocking


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_Generator = torch.Generator


class _FakeCudaGenerator(_Generator):
    """``torch.Generator(device="cuda")`` on the CPU."""

    def __new__(cls, device: Any = "cpu") -> torch.Generator:
        return _Generator.__new__(cls, device="cpu")

    def __init__(self, device: Any = "cpu") -> None:
        pass


@contextlib.contextmanager
def cuda_copy_harness(
    *, fake_cuda: bool = True, strict_devices: bool = True
) -> Iterator[CopyRecorder]:
    """Run the block under a :class:`CopyRecorder` (with an emulated GPU)."""
    recorder = CopyRecorder(fake_cuda=fake_cuda, strict_devices=strict_devices)
    with contextlib.ExitStack() as stack:
        if fake_cuda:
            for name, value in {
                "is_available": lambda: True,
                "device_count": lambda: 1,
                "current_device": lambda: 0,
                "synchronize": lambda device=None: None,
                "empty_cache": lambda: None,
                "is_bf16_supported": lambda *a, **k: True,
                "get_device_capability": lambda device=None: (8, 0),
            }.items():
                stack.enter_context(mock.patch.object(torch.cuda, name, value))
            stack.enter_context(
                mock.patch.object(torch, "Generator", _FakeCudaGenerator)
            )
            # optimizers ask the accelerator about CUDA-graph capture
            stack.enter_context(
                mock.patch.object(
                    torch.accelerator, "current_accelerator", lambda *a, **k: None
                )
            )
        # TorchFunctionMode is per thread: pinning in worker threads (image
        # decoding) is caught by patching the method itself
        real_pin = torch.Tensor.pin_memory

        def pin_memory(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if torch.overrides.has_torch_function((self,)) or recorder._is_pinned(self):
                return real_pin(self, *args, **kwargs)  # the mode handles it
            return recorder._pin(self.clone(), "Tensor.pin_memory (thread)")

        stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", pin_memory))
        real_reduce = torch.Tensor.__reduce_ex__

        def reduce_ex(self: torch.Tensor, protocol: int) -> Any:
            if recorder.is_fake_cuda(self):
                recorder.cuda_pickled.append(
                    CopyRecord("pickle", _nbytes(self), _where())
                )
            return real_reduce(self, protocol)

        stack.enter_context(mock.patch.object(torch.Tensor, "__reduce_ex__", reduce_ex))
        stack.enter_context(recorder)
        yield recorder
