"""Read pickled checkpoints without running code from them.

A PyTorch Lightning checkpoint pickles more than tensors: its
``hyper_parameters`` hold an OmegaConf ``DictConfig``, and callbacks or
optimizer states may hold further classes. ``torch.load(weights_only=True)``
refuses such files, and ``weights_only=False`` lets the file call any Python
function while it loads.

:class:`RestrictedUnpickler` is a third way: tensors, NumPy arrays and plain
containers are rebuilt as usual; every other global the file names becomes an
:class:`InertRecord`, a plain object that remembers the class's module and
name and the arguments and state the file gave it. Nothing is imported and
nothing is called, so a ``__reduce__`` that would run a shell command leaves
only a record of the attempt. :func:`plain` turns records of OmegaConf
containers (and of any dict- or list-like class) back into dicts, lists and
values, so the settings can be read without OmegaConf installed.

Use it through :func:`safe_torch_load`.
"""

from __future__ import annotations

import os
import pickle
import types
from typing import Any

import torch

__all__ = ["InertRecord", "RestrictedUnpickler", "plain", "safe_torch_load"]

#: Globals rebuilt as themselves: torch's tensor and storage rebuild
#: functions, NumPy's array rebuilding and plain value types. None of them
#: can reach the file system, the network or the interpreter.
_ALLOWED: dict[tuple[str, str], Any] = {}


def _allow(module: str, name: str, obj: Any) -> None:
    _ALLOWED[(module, name)] = obj


def _build_allowlist() -> None:
    import builtins
    import collections

    import numpy as np

    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        if hasattr(torch._utils, name):
            _allow("torch._utils", name, getattr(torch._utils, name))
    _allow("torch", "Size", torch.Size)
    _allow("torch.nn.parameter", "Parameter", torch.nn.Parameter)
    _allow("torch", "device", torch.device)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            _allow("torch", name, value)
    _allow("collections", "OrderedDict", collections.OrderedDict)
    _allow("collections", "defaultdict", collections.defaultdict)
    for name in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "complex",
        "str",
        "bytes",
        "bytearray",
        "bool",
        "slice",
        "range",
    ):
        _allow("builtins", name, getattr(builtins, name))
    _allow("builtins", "NoneType", type(None))
    # Protocol-2 pickles store bytes as _codecs.encode(text, "latin1").
    _allow("_codecs", "encode", _latin1_encode)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        _allow(module, "_reconstruct", _numpy_reconstruct)
        _allow(module, "scalar", _numpy_scalar)
    _allow("numpy", "ndarray", np.ndarray)
    _allow("numpy", "dtype", np.dtype)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            _allow("numpy.dtypes", name, getattr(np.dtypes, name))


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode arguments")
    return text.encode("latin1")


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    import numpy as np

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy.ndarray can be rebuilt")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric NumPy scalars can be rebuilt")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class InertRecord:
    """What a refused class left in the file: names, arguments, state.

    Attributes
    ----------
    module, name : str
        Where the pickle said the class or function lives (never imported).
    args : tuple
        Arguments the pickle would have called it with.
    state : object
        The state it would have set (``__setstate__`` / ``__dict__``).
    items : dict
        Items the pickle set on it (dict-like classes).
    elements : list
        Elements the pickle appended to it (list-like classes).
    """

    __slots__ = ("args", "elements", "items", "module", "name", "state")

    def __init__(self, module: str, name: str, args: tuple = ()) -> None:
        self.module, self.name, self.args = module, name, tuple(args)
        self.state: Any = None
        self.items: dict = {}
        self.elements: list = []

    # The pickle opcodes that follow object creation (BUILD, SETITEM(S),
    # APPEND(S)) only ever store data on the record.
    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    @property
    def qualname(self) -> str:
        """``module.name`` of the refused global."""
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"InertRecord({self.qualname})"


def _stand_in(module: str, name: str) -> type:
    """A class that turns calls and ``__new__`` into InertRecords."""

    def new(cls: type, *args: Any, **kwargs: Any) -> InertRecord:
        return InertRecord(module, name, args)

    # NEWOBJ calls cls.__new__(cls, *args); REDUCE calls cls(*args): both
    # return a record, and InertRecord is not an instance of the stand-in,
    # so no __init__ runs.
    return types.new_class(
        name if name.isidentifier() else "Refused",
        (),
        {},
        lambda ns: ns.update({"__new__": new, "__module__": "skstego._refused"}),
    )


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds tensors and plain data, and records the rest.

    ``find_class`` returns the real object only for the allowlisted tensor,
    NumPy and container globals; any other ``module.name`` becomes a stand-in
    whose instances are :class:`InertRecord`. The ``refused`` attribute lists
    the globals that were replaced.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: set[str] = set()
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not _ALLOWED:
            _build_allowlist()
        if module == "__builtin__":
            module = "builtins"
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        self.refused.add(f"{module}.{name}")
        if key not in self._stand_ins:
            self._stand_ins[key] = _stand_in(module, name)
        return self._stand_ins[key]


class _PickleModule(types.ModuleType):
    """The ``pickle_module`` torch.load is given: pickle with our Unpickler."""

    Unpickler = RestrictedUnpickler

    def __init__(self) -> None:
        super().__init__("skstego_restricted_pickle")

    def load(self, file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(self, data: bytes, **kwargs: Any) -> Any:
        import io

        return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` a file (zip or legacy format) without running its code.

    Tensors are loaded on the CPU. Classes other than tensors, NumPy arrays
    and plain containers come back as :class:`InertRecord` objects; use
    :func:`plain` to read settings from them.

    Parameters
    ----------
    path : str or path-like
        A file written by ``torch.save`` (a PyTorch Lightning checkpoint,
        a DINO training checkpoint...).

    Returns
    -------
    object
        The unpickled object.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> torch.save({"w": torch.ones(2), "epoch": 3}, path)
    >>> obj = safe_torch_load(path)
    >>> obj["epoch"], obj["w"].tolist()
    (3, [1.0, 1.0])
    """
    # weights_only=False is what lets torch accept a custom pickle module;
    # the safety lies entirely in RestrictedUnpickler.find_class.
    return torch.load(
        os.fspath(path),
        map_location="cpu",
        pickle_module=_PickleModule(),
        weights_only=False,
    )


def plain(obj: Any, _depth: int = 0) -> Any:
    """Dicts, lists and values from records of dict- and list-like classes.

    OmegaConf's ``DictConfig`` / ``ListConfig`` keep their children in
    ``_content`` and leaf nodes keep their value in ``_val``; other records
    become a dict of their items, a list of their elements, or their state.
    Tensors and values pass through; containers are converted recursively.

    Parameters
    ----------
    obj : object
        What :func:`safe_torch_load` returned, or a part of it.

    Returns
    -------
    object
        The same data made of dicts, lists, tuples and values.

    Examples
    --------
    >>> record = InertRecord("omegaconf.nodes", "AnyNode")
    >>> record.__setstate__({"_val": 70, "_metadata": None})
    >>> plain({"dim": record})
    {'dim': 70}
    """
    if _depth > 200:
        raise ValueError("the checkpoint's settings are nested too deeply")
    depth = _depth + 1
    if isinstance(obj, InertRecord):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (None, slot state) of classes with __slots__
        if isinstance(state, dict) and "_content" in state:
            return plain(state["_content"], depth)
        if isinstance(state, dict) and "_val" in state:
            return plain(state["_val"], depth)
        if obj.items:
            return {plain(k, depth): plain(v, depth) for k, v in obj.items.items()}
        if obj.elements:
            return [plain(v, depth) for v in obj.elements]
        if state is not None:
            return plain(state, depth)
        if len(obj.args) == 1:
            return plain(obj.args[0], depth)
        return obj
    if isinstance(obj, dict):
        return {plain(k, depth): plain(v, depth) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v, depth) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v, depth) for v in obj)
    return obj
