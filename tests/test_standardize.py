"""Tests for TokenStandardScaler against scikit-learn's StandardScaler."""

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skstego import TokenStandardScaler
from skstego.datasets import make_feature_maps


def _tokens(maps):
    return maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])


# Per-batch statistics make the output depend on the order of the samples.
_ORDER = {
    "check_methods_sample_order_invariance": "per-batch statistics",
    "check_methods_subset_invariance": "per-batch statistics",
}


@parametrize_with_checks(
    [TokenStandardScaler(), TokenStandardScaler(batch_size=4)],
    expected_failed_checks=lambda e: _ORDER if e.batch_size else {},
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def maps():
    X, _ = make_feature_maps(20, n_features=12, map_size=5, random_state=0)
    X = X * np.linspace(0.5, 4, 12, dtype=np.float32)[None, :, None, None] + 3
    X[:, 3] = 2.0  # a constant channel: centred, not divided by zero
    return X.astype(np.float32)


def test_training_statistics_equal_standard_scaler(maps):
    sk = StandardScaler().fit(_tokens(maps))
    ours = TokenStandardScaler(device="cpu").fit(maps)
    np.testing.assert_allclose(ours.mean_, sk.mean_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.var_, sk.var_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.scale_, sk.scale_, rtol=1e-5)
    assert ours.n_samples_seen_ == sk.n_samples_seen_ == 20 * 25
    z = ours.transform(maps)
    assert z.shape == maps.shape and z.dtype == np.float32
    np.testing.assert_allclose(_tokens(z), sk.transform(_tokens(maps)), atol=1e-5)
    # 2-D tokens: the same numbers
    flat = TokenStandardScaler(device="cpu").fit(_tokens(maps))
    np.testing.assert_allclose(flat.transform(_tokens(maps)), _tokens(z), atol=1e-6)


def test_per_batch_statistics_equal_one_scaler_per_batch(maps):
    ours = TokenStandardScaler(8, device="cpu").fit(maps[:4])  # fit data unused
    z = ours.transform(maps)
    for start in (0, 8, 16):  # batches of 8, 8 and the last 4 images
        batch = maps[start : start + 8]
        expected = StandardScaler().fit_transform(_tokens(batch))
        np.testing.assert_allclose(_tokens(z[start : start + 8]), expected, atol=1e-5)
    # the study's torch formula: (x - mean) / std(unbiased=False), per batch
    t = torch.from_numpy(_tokens(maps[8:16]))
    torch_way = (t - t.mean(0, keepdim=True)) / t.std(0, unbiased=False, keepdim=True)
    keep = np.arange(12) != 3  # the torch formula divides the constant by 0
    np.testing.assert_allclose(
        _tokens(z[8:16])[:, keep], torch_way.numpy()[:, keep], atol=1e-5
    )
    assert np.all(_tokens(z)[:, 3] == 0)


def test_torch_in_torch_out_and_memmap(maps, tmp_path):
    scaler = TokenStandardScaler(8, device="cpu").fit(maps)
    out = scaler.transform(torch.from_numpy(maps))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), scaler.transform(maps), atol=1e-7)
    path = tmp_path / "maps.npy"
    np.save(path, maps)
    mm = np.load(path, mmap_mode="r")
    plain = TokenStandardScaler(device="cpu")
    np.testing.assert_allclose(
        plain.fit(mm).transform(mm), plain.fit(maps).transform(maps), atol=1e-6
    )


def test_bad_input(maps):
    with pytest.raises(ValueError, match="batch_size"):
        TokenStandardScaler(0).fit(maps)
    with pytest.raises(ValueError, match="features"):
        TokenStandardScaler(device="cpu").fit(maps).transform(maps[:, :5])
