"""Save and load fitted skstego estimators and pipelines without pickle.

A model file is a zip archive with two members:

``manifest.json``
    The format name (``"skstego-model"``) and version, the skstego version
    that wrote it, and for every estimator its public class name (e.g.
    ``"skstego.KMeansProbe"``, ``"sklearn.pipeline.Pipeline"``), its
    parameters (``get_params(deep=False)``) and its fitted state: scalars,
    strings and lists as JSON, arrays as references into the blob below.

``arrays.safetensors``
    Every array (fitted attributes such as ``cluster_centers_``, nested
    dicts of arrays such as :class:`~skstego.StegoProjector`'s
    ``head_state_``) in the safetensors format, which holds raw numbers only.

Loading never runs code from the file: classes come from a fixed allow-list
(the skstego estimators and :class:`sklearn.pipeline.Pipeline`), parameters
are plain JSON values and arrays are read by safetensors. Files that are not
skstego models, or come from a newer format version, are refused with a
message naming the path.

:func:`load_stego_checkpoint` reads the other kind of model file users bring:
a released STEGO checkpoint (a PyTorch Lightning ``.ckpt``), through a
restricted unpickler that runs no code from the file.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._stego_checkpoint import (
    PUBLISHED_RESULTS,
    load_stego_checkpoint,
    read_stego_checkpoint,
)
from ._version import __version__

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PUBLISHED_RESULTS",
    "load",
    "load_stego_checkpoint",
    "read_stego_checkpoint",
    "save",
]

#: Name written to every manifest; files with another name are refused.
FORMAT_NAME = "skstego-model"
#: Version of the file layout; files of a newer version are refused.
FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_ARRAYS = "arrays.safetensors"

#: Classes a model file may name: public name -> (module, attribute).
_ALLOWED: dict[str, tuple[str, str]] = {
    "skstego.DinoFeaturizer": ("skstego", "DinoFeaturizer"),
    "skstego.TorchPCA": ("skstego", "TorchPCA"),
    "skstego.RandomProjection": ("skstego", "RandomProjection"),
    "skstego.StegoProjector": ("skstego", "StegoProjector"),
    "skstego.KMeansProbe": ("skstego", "KMeansProbe"),
    "skstego.LinearProbe": ("skstego", "LinearProbe"),
    "sklearn.pipeline.Pipeline": ("sklearn.pipeline", "Pipeline"),
}


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def save(estimator: Any, path: str | os.PathLike) -> Path:
    """Write an estimator or a pipeline of estimators to a model file.

    Parameters
    ----------
    estimator : skstego estimator or sklearn.pipeline.Pipeline
        A :class:`~skstego.DinoFeaturizer`, :class:`~skstego.TorchPCA`,
        :class:`~skstego.RandomProjection`, :class:`~skstego.StegoProjector`,
        :class:`~skstego.KMeansProbe`, :class:`~skstego.LinearProbe`, or a
        (nested) :class:`~sklearn.pipeline.Pipeline` of them, fitted or not.
        A featurizer is stored by its parameters: its ``model`` must be a
        timm name (a ``weights`` file is stored as its path, not its
        contents).
    path : str or path-like
        File to write (conventionally ``*.skstego``); replaced atomically
        if it exists.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    TypeError
        If the estimator (or a step) is not of a class this format stores,
        or holds state that cannot be stored without pickle (e.g. a
        featurizer built on a torch module); the message names the class.

    Notes
    -----
    Parameters that are not JSON values are stored when they have a plain
    form (a ``torch.device`` as its name, an array as an array); others (a
    ``numpy.random.RandomState`` as ``random_state``) are left out with a
    warning, and the loaded estimator has the default instead.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skstego import TorchPCA
    >>> from skstego.io import load, save
    >>> X = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    >>> pca = TorchPCA(dim=2, device="cpu").fit(X)
    >>> path = save(pca, os.path.join(tempfile.mkdtemp(), "pca.skstego"))
    >>> again = load(path)
    >>> np.array_equal(again.transform(X), pca.transform(X))
    True
    """
    path = Path(os.fspath(path))
    arrays: dict[str, np.ndarray] = {}
    root = _encode_estimator(estimator, "root", arrays)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "skstego_version": __version__,
        "root": root,
    }
    from safetensors.numpy import save as save_arrays

    blob = save_arrays(arrays) if arrays else b""
    text = json.dumps(manifest, indent=1, allow_nan=True)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Cannot write {str(path)!r}: the directory {str(directory)!r} does not "
            "exist."
        )
    fd, tmp = tempfile.mkstemp(prefix=".skstego-", suffix=".tmp", dir=directory)
    try:
        with (
            os.fdopen(fd, "wb") as f,
            zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf,
        ):
            zf.writestr(_MANIFEST, text)
            zf.writestr(_ARRAYS, blob)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | os.PathLike, *, device: Any = None) -> Any:
    """Read an estimator or pipeline written by :func:`save`.

    Parameters
    ----------
    path : str or path-like
        A model file written by :func:`save`.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default=None
        When given, set as the ``device`` parameter of every estimator (e.g.
        ``"auto"`` to run a model saved with ``device="cuda"`` on a machine
        without a GPU). None keeps the stored parameter; devices are
        resolved when the estimator computes, never at load time.

    Returns
    -------
    estimator : estimator or sklearn.pipeline.Pipeline
        The estimator with its parameters and fitted attributes (NumPy
        arrays, as after ``fit``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a skstego model (not a zip archive, no manifest,
        another format), was written by a newer format version, or names a
        class outside the allow-list. The message names the path.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skstego import KMeansProbe
    >>> from skstego.io import load, save
    >>> X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    >>> probe = KMeansProbe(k=3, random_state=0).fit(X)
    >>> path = save(probe, os.path.join(tempfile.mkdtemp(), "probe.skstego"))
    >>> np.array_equal(load(path, device="cpu").predict(X), probe.predict(X))
    True
    """
    where = os.fspath(path)
    if os.path.isdir(where):
        found = sorted(Path(where).glob("*.skstego"))
        hint = f" ({found[0].name} is one)" if found else ""
        raise IsADirectoryError(
            f"Model file {where!r} is a directory; pass the .skstego file "
            f"inside it{hint}, e.g. OUT/pipeline.skstego from `skstego segment`."
        )
    if not os.path.isfile(where):
        raise FileNotFoundError(f"Model file {where!r} does not exist.")
    manifest, blob = _read_archive(where)
    arrays: dict[str, np.ndarray] = {}
    if blob:
        from safetensors.numpy import load as load_arrays

        try:
            arrays = load_arrays(blob)
        except Exception as exc:
            raise ValueError(
                f"{where!r} is damaged: its arrays cannot be read ({exc})."
            ) from exc
    try:
        return _decode_estimator(manifest["root"], arrays, device)
    except _FormatError as exc:
        raise ValueError(
            f"{where!r} is not a valid skstego model file: {exc}"
        ) from None
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        # an edited manifest whose entries have the wrong types
        raise ValueError(
            f"{where!r} is not a valid skstego model file: its manifest is "
            f"malformed ({type(exc).__name__}: {exc}); write the file again "
            "with skstego.io.save or `skstego fit` rather than editing it."
        ) from None


# --------------------------------------------------------------------------
# reading the archive
# --------------------------------------------------------------------------
class _FormatError(Exception):
    """Inconsistent manifest (reported with the path by :func:`load`)."""


def _read_archive(where: str) -> tuple[dict, bytes]:
    not_ours = (
        f"{where!r} is not a skstego model file ({{why}}); model files are "
        "written by skstego.io.save or `skstego fit`."
    )
    if not zipfile.is_zipfile(where):
        raise ValueError(not_ours.format(why="not a zip archive"))
    try:
        with zipfile.ZipFile(where) as zf:
            names = set(zf.namelist())
            if _MANIFEST not in names:
                raise ValueError(not_ours.format(why=f"no {_MANIFEST} inside"))
            text = zf.read(_MANIFEST)
            blob = zf.read(_ARRAYS) if _ARRAYS in names else b""
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(not_ours.format(why=f"unreadable zip archive: {exc}")) from exc
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            not_ours.format(why=f"{_MANIFEST} is not valid JSON: {exc}")
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            not_ours.format(why=f"format {found!r} instead of {FORMAT_NAME!r}")
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{where!r} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where!r} was written in skstego model format version {version} "
            f"(by skstego {manifest.get('skstego_version', '?')}); this skstego "
            f"reads versions up to {FORMAT_VERSION}. Upgrade skstego to load it."
        )
    if "root" not in manifest:
        raise ValueError(not_ours.format(why="the manifest holds no estimator"))
    return manifest, blob


# --------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------
def _public_name(estimator: Any) -> str:
    cls = type(estimator)
    for name, (module, attr) in _ALLOWED.items():
        try:
            allowed = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):  # pragma: no cover
            continue
        if cls is allowed:
            return name
    allowed_names = ", ".join(n.rsplit(".", 1)[-1] for n in _ALLOWED)
    why = (
        "its fitted state (e.g. an hnne model) has no pickle-free form"
        if cls.__module__.startswith("skstego.")
        else "it is not a skstego estimator"
    )
    raise TypeError(
        f"{cls.__qualname__} ({cls.__module__}) cannot be saved by skstego.io: "
        f"{why}. The format stores {allowed_names} and pipelines of them; use "
        "joblib.dump or pickle (trusted files only) for this estimator."
    )


def _encode_estimator(estimator: Any, key: str, arrays: dict) -> dict:
    from sklearn.pipeline import Pipeline

    name = _public_name(estimator)
    cls_name = type(estimator).__name__
    if isinstance(estimator, Pipeline):
        steps = []
        for step_name, step in estimator.steps:
            if step is None or (isinstance(step, str) and step == "passthrough"):
                steps.append([step_name, step])
            else:
                steps.append(
                    [step_name, _encode_estimator(step, f"{key}.{step_name}", arrays)]
                )
        params = {
            k: v for k, v in estimator.get_params(deep=False).items() if k != "steps"
        }
        return {
            "class": name,
            "steps": steps,
            "params": _encode_params(cls_name, params, key, arrays),
            "state": _encode_state(estimator, set(params) | {"steps"}, key, arrays),
        }
    params = estimator.get_params(deep=False)
    if cls_name == "DinoFeaturizer" and isinstance(
        params.get("model"), torch.nn.Module
    ):
        raise TypeError(
            "DinoFeaturizer cannot be saved when its model is a torch module "
            f"({type(params['model']).__name__}): skstego.io stores a featurizer "
            "by its parameters. Build it from a timm name, with your checkpoint "
            "as weights: DinoFeaturizer('vit_small_patch8_224.dino', "
            "weights='backbone.safetensors')."
        )
    return {
        "class": name,
        "params": _encode_params(cls_name, params, key, arrays),
        "state": _encode_state(estimator, set(params), key, arrays),
    }


def _encode_params(cls_name: str, params: dict, key: str, arrays: dict) -> dict:
    out = {}
    for name, value in params.items():
        if isinstance(value, torch.device):
            value = str(value)
        elif isinstance(value, os.PathLike):  # e.g. a weights file
            value = os.fspath(value)
        try:
            out[name] = _encode_value(value, f"{key}#param.{name}", arrays)
        except TypeError:
            warnings.warn(
                f"{cls_name} parameter {name}={value!r} ({type(value).__name__}) "
                "has no pickle-free form and is not saved; the loaded estimator "
                "has the default value.",
                UserWarning,
                stacklevel=4,
            )
    return out


def _encode_state(estimator: Any, params: set, key: str, arrays: dict) -> dict:
    out = {}
    for name, value in vars(estimator).items():
        if name in params:
            continue
        try:
            out[name] = _encode_value(value, f"{key}#{name}", arrays)
        except TypeError as exc:
            raise TypeError(
                f"{type(estimator).__name__} cannot be saved without pickle: its "
                f"attribute {name!r} holds {exc}. Use pickle or joblib (trusted "
                "files only) for this estimator."
            ) from None
    return out


def _encode_value(value: Any, key: str, arrays: dict) -> Any:
    """JSON form of ``value``; arrays go to ``arrays`` under ``key``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return _encode_value(np.asarray(value), key, arrays)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            # a C-contiguous copy when needed (ascontiguousarray makes 0-d 1-d)
            arrays[key] = value if value.flags.c_contiguous else value.copy(order="C")
            return {"__array__": key}
        if value.dtype.kind in "US" or (
            value.dtype == object
            and all(isinstance(v, str) for v in value.reshape(-1).tolist())
        ):
            return {
                "__strings__": [str(v) for v in value.reshape(-1).tolist()],
                "dtype": value.dtype.str if value.dtype.kind in "US" else "object",
                "shape": list(value.shape),
            }
        raise TypeError(f"an array of dtype {value.dtype}")
    if isinstance(value, tuple):
        return {
            "__tuple__": [
                _encode_value(v, f"{key}.{i}", arrays) for i, v in enumerate(value)
            ]
        }
    if isinstance(value, list):
        return [_encode_value(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("a dict with non-string keys")
        return {
            "__dict__": {
                k: _encode_value(v, f"{key}.{k}", arrays) for k, v in value.items()
            }
        }
    raise TypeError(f"a {type(value).__module__}.{type(value).__qualname__} object")


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------
def _allowed_class(name: Any) -> type:
    if not isinstance(name, str) or name not in _ALLOWED:
        raise _FormatError(
            f"class {name!r} is not one that skstego.io loads (allowed: "
            f"{', '.join(sorted(_ALLOWED))})."
        )
    module, attr = _ALLOWED[name]
    return getattr(importlib.import_module(module), attr)


def _decode_estimator(node: Any, arrays: dict, device: Any) -> Any:
    if not isinstance(node, dict) or "class" not in node:
        raise _FormatError("an estimator entry lacks its class.")
    cls = _allowed_class(node["class"])
    params = _decode_value(node.get("params", {}), arrays)
    if not isinstance(params, dict):
        raise _FormatError(f"the parameters of {node['class']} are not a mapping.")
    if "steps" in node:
        steps = []
        for entry in node["steps"]:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise _FormatError("a pipeline step is not a [name, estimator] pair.")
            name, step = entry
            if not (step is None or step == "passthrough"):
                step = _decode_estimator(step, arrays, device)
            steps.append((str(name), step))
        params["steps"] = steps
    elif device is not None and "device" in params:
        params["device"] = device
    try:
        estimator = cls(**params)
    except TypeError as exc:
        raise _FormatError(
            f"its parameters do not fit {cls.__name__} of this skstego ({exc})."
        ) from exc
    try:
        estimator._validate_params()
    except (ValueError, TypeError) as exc:  # InvalidParameterError is both
        raise _FormatError(f"a parameter of {cls.__name__} is invalid: {exc}") from None
    state = _decode_value(node.get("state", {}), arrays)
    if not isinstance(state, dict):
        raise _FormatError(f"the state of {node['class']} is not a mapping.")
    for name, value in state.items():
        if (
            not isinstance(name, str)
            or not name.isidentifier()
            or name.startswith("__")
        ):
            raise _FormatError(
                f"the state of {cls.__name__} names {name!r}, which is not a "
                "fitted attribute."
            )
        setattr(estimator, name, value)
    _check_state(estimator, state)
    return estimator


#: Shapes fitted arrays must have, by class: attribute (``a.b`` for an entry
#: of a dict attribute) -> sizes, each an int, a parameter name, a state
#: name, or ``len:NAME`` (the length of a state array).
_SHAPES: dict[str, dict[str, tuple]] = {
    "TorchPCA": {
        "components_": ("n_components_", "n_features_in_"),
        "mean_": ("n_features_in_",),
        "explained_variance_": ("n_components_",),
    },
    "RandomProjection": {"components_": ("n_components_", "n_features_in_")},
    "KMeansProbe": {
        "cluster_centers_": ("k", "n_features_in_"),
        "counts_": ("k",),
        "mapping_": ("k",),
    },
    "LinearProbe": {
        "coef_": ("len:classes_", "n_features_in_"),
        "intercept_": ("len:classes_",),
    },
    "StegoProjector": {
        "head_state_.linear.weight": ("dim", "n_features_in_"),
        "head_state_.linear.bias": ("dim",),
        "head_state_.nonlinear.0.weight": ("n_features_in_", "n_features_in_"),
        "head_state_.nonlinear.2.weight": ("dim", "n_features_in_"),
    },
}


def _lookup(estimator: Any, name: str) -> Any:
    attr, _, key = name.partition(".")
    value = getattr(estimator, attr, None)
    if key:
        return value.get(key) if isinstance(value, dict) else None
    return value


def _check_state(estimator: Any, state: dict) -> None:
    """Fitted arrays finite and of the shapes the parameters imply."""
    cls = type(estimator).__name__

    def arrays(value: Any, label: str):
        if isinstance(value, np.ndarray):
            yield label, value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from arrays(v, f"{label}[{k!r}]")

    for name, value in state.items():
        for label, arr in arrays(value, name):
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise _FormatError(f"{cls}.{label} holds NaN or infinite values.")
    n_features = state.get("n_features_in_")
    if n_features is not None and (
        isinstance(n_features, bool)
        or not isinstance(n_features, int)
        or n_features < 1
    ):
        raise _FormatError(f"{cls}.n_features_in_={n_features!r} is not a count.")
    params = estimator.get_params(deep=False)
    for attr, sizes in _SHAPES.get(cls, {}).items():
        arr = _lookup(estimator, attr)
        if arr is None:
            continue
        expected = []
        for size in sizes:
            if isinstance(size, int):
                expected.append(size)
            elif size.startswith("len:"):
                other = state.get(size[4:])
                expected.append(None if other is None else len(other))
            else:
                value = state.get(size, params.get(size))
                expected.append(value if isinstance(value, int) else None)
        shape = getattr(arr, "shape", None)
        if (
            shape is None
            or len(shape) != len(expected)
            or any(
                e is not None and e != got
                for e, got in zip(expected, shape, strict=False)
            )
        ):
            want = tuple("?" if e is None else e for e in expected)
            raise _FormatError(
                f"{cls}.{attr} has shape {shape}, but its parameters and "
                f"state imply {want}."
            )


def _decode_value(value: Any, arrays: dict) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__array__" in value:
        key = value["__array__"]
        if key not in arrays:
            raise _FormatError(f"the array {key!r} is missing.")
        return arrays[key]
    if "__strings__" in value:
        dtype = value.get("dtype", "object")
        arr = np.array(
            value["__strings__"], dtype=object if dtype == "object" else dtype
        )
        return arr.reshape(value.get("shape", [len(value["__strings__"])]))
    if "__tuple__" in value:
        return tuple(_decode_value(v, arrays) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode_value(v, arrays) for k, v in value["__dict__"].items()}
    # parameters and state are mappings of names to encoded values
    return {k: _decode_value(v, arrays) for k, v in value.items()}
