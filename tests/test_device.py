"""The shared boundary: devices, validation, layouts, batching, generators."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator

from skstego._device import (
    TorchEstimatorMixin,
    apply_tokenwise,
    as_tensor,
    check_features,
    iter_slices,
    make_generator,
    maps_to_tokens,
    resolve_device,
    to_device,
    tokens_to_maps,
)


class _Est(TorchEstimatorMixin, BaseEstimator):
    def __init__(self, device="auto"):
        self.device = device


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_device_rejects_nonsense_with_clear_message():
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu-please")


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_resolve_device_cuda_without_cuda_is_clear():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_maps_tokens_round_trip_matches_explicit_loop():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.normal(size=(2, 3, 4, 5)).astype(np.float32))
    tokens = maps_to_tokens(maps)
    assert tokens.shape == (2 * 4 * 5, 3)
    # token order: image-major, then row-major over (h, w)
    assert torch.equal(tokens[1 * 20 + 2 * 5 + 3], maps[1, :, 2, 3])
    assert torch.equal(tokens_to_maps(tokens, 2, 4, 5), maps)


def test_iter_slices_covers_range_once():
    covered = np.concatenate([np.arange(10)[sl] for sl in iter_slices(10, 3)])
    np.testing.assert_array_equal(covered, np.arange(10))


@pytest.mark.parametrize("batch_size", [None, 1, 3])
@pytest.mark.parametrize("ndim", [2, 4])
def test_apply_tokenwise_matches_direct_computation(batch_size, ndim):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(6, 2)).astype(np.float32)
    shape = (5, 6) if ndim == 2 else (5, 6, 3, 4)
    X = rng.normal(size=shape)  # float64: converted to float32 for compute
    X_before = X.copy()
    out = apply_tokenwise(
        lambda t: t @ torch.from_numpy(W),
        X,
        device=torch.device("cpu"),
        out_features=2,
        batch_size=batch_size,
    )
    if ndim == 2:
        expected = X.astype(np.float32) @ W
    else:
        expected = np.einsum("nchw,cd->ndhw", X.astype(np.float32), W)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(X, X_before)


def test_apply_tokenwise_torch_in_torch_out_and_labels_for_maps():
    X = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    labels = apply_tokenwise(
        lambda t: t.argmax(dim=1), X, device=torch.device("cpu"), out_features=0
    )
    assert isinstance(labels, torch.Tensor)
    assert labels.shape == (2, 2, 2)
    assert torch.equal(labels, X.argmax(dim=1))


def test_check_features_numpy_and_torch_set_n_features_in():
    est = _Est()
    X = np.ones((4, 3, 2, 2))
    check_features(est, X, reset=True)
    assert est.n_features_in_ == 3
    with pytest.raises(ValueError, match="X has 5 features, but _Est is expecting 3"):
        check_features(est, torch.ones(4, 5), reset=False)


@pytest.mark.parametrize(
    "X, message",
    [
        (np.ones(5), "Expected 2D array"),
        (np.ones((2, 3, 4)), "got an array of shape"),
        (torch.ones(2, 3, 4), "got a tensor of shape"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or infinity"),
        (np.empty((0, 3)), "0 sample"),
        (torch.empty(0, 3), "0 sample"),
    ],
)
def test_check_features_bad_input_is_clear(X, message):
    with pytest.raises(ValueError, match=message):
        check_features(_Est(), X, reset=True)


def test_as_tensor_does_not_alias_user_numpy_when_dtype_changes():
    X = np.zeros((3, 2))
    t = as_tensor(X, torch.device("cpu"))
    t += 1
    assert X.sum() == 0


def test_make_generator_is_deterministic_per_seed():
    a = torch.rand(5, generator=make_generator(7, torch.device("cpu")))
    b = torch.rand(5, generator=make_generator(7, torch.device("cpu")))
    c = torch.rand(5, generator=make_generator(8, torch.device("cpu")))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    rs = np.random.RandomState(3)
    d = torch.rand(5, generator=make_generator(rs, torch.device("cpu")))
    e = torch.rand(5, generator=make_generator(np.random.RandomState(3), "cpu"))
    assert torch.equal(d, e)


def test_device_copies_stay_out_of_state_and_pickles():
    est = _Est()
    est.components_ = np.eye(3, dtype=np.float32)
    t = est._tensor("components_", torch.device("cpu"))
    assert torch.equal(t, torch.eye(3))
    assert est._tensor("components_", torch.device("cpu")) is t  # cached
    assert b"torch" not in pickle.dumps(est)
    clone = pickle.loads(pickle.dumps(est))
    assert vars(clone).keys() == {"device", "components_"}
    np.testing.assert_array_equal(clone.components_, est.components_)
    # a new attribute value invalidates the cache
    est.components_ = 2 * np.eye(3, dtype=np.float32)
    assert torch.equal(est._tensor("components_", torch.device("cpu")), 2 * t)


def test_as_tensor_copies_synchronously_and_pins_nothing(monkeypatch):
    # issue 21: the old as_tensor ran ``X.to(cpu, non_blocking=True)`` (an
    # asynchronous device-to-host copy read at once) and pinned whole arrays
    calls = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return real_to(self, *args, **kwargs)

    def pin_memory(self, *args, **kwargs):  # pragma: no cover - the old code
        raise AssertionError("as_tensor pinned its input")

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    as_tensor(torch.ones(3), torch.device("cpu"))
    as_tensor(np.ones(3), torch.device("cpu"))
    assert calls == [False, False]


def test_to_device_is_asynchronous_only_from_staged_pinned_memory():
    x = torch.ones(3)
    assert to_device(x, torch.device("cpu")) is x
    assert to_device(x, torch.device("cpu"), staged=True) is x


@pytest.mark.gpu
def test_as_tensor_device_to_host_is_complete_when_it_returns():
    # a copy of work still queued on the GPU, read at once: an asynchronous
    # copy into pinned memory would show zeros or stale values here
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        y = x @ x
        host = as_tensor(y, torch.device("cpu"))
        snapshot = host.numpy().copy()  # read before any synchronisation
        np.testing.assert_array_equal(snapshot, y.cpu().numpy())
        assert not host.is_pinned()


@pytest.mark.gpu
def test_pickled_estimator_with_a_cuda_parameter_loads_on_the_cpu():
    from skstego import KMeansProbe

    init = torch.eye(3, 4, device="cuda")
    blob = pickle.dumps(KMeansProbe(k=3, init=init, device="cuda"))
    assert b"cuda:0" not in blob  # no CUDA storage location
    loaded = pickle.loads(blob)
    assert loaded.init.device.type == "cpu" and init.is_cuda
