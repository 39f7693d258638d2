"""scikit-learn API checks for DinoFeaturizer, with a tiny ViT and small images.

``tests/test_common.py`` cannot run the common checks on DinoFeaturizer: they
feed 2-D float data, and the featurizer takes images. Here every check of
:mod:`sklearn.utils.estimator_checks` that does not need 2-D numeric input is
run directly (those that take only an estimator), and each check that needs
data has an images-based equivalent below, named after the check it mirrors.

Not applicable (documented, not run):

* ``check_n_features_in`` / ``check_n_features_in_after_fitting``: images have
  no feature count, so ``fit`` sets no ``n_features_in_`` (tested below).
* ``check_get_feature_names_out_error``: the featurizer is stateless
  (``requires_fit=False``); ``get_feature_names_out`` works unfitted by design,
  like ``transform`` (tested below).
* Checks of 2-D numeric input handling (dtypes, NaN/inf, sparse fitting,
  complex data, 1-D input, n_features consistency, pandas / polars / array
  API input), sample weights, and classifier / regressor / clusterer /
  outlier checks: they need 2-D features or targets.
"""

import pickle

import joblib
import numpy as np
import pytest
import scipy.sparse as sp
import sklearn
import timm
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks
from sklearn.utils.validation import check_is_fitted

from skstego import DinoFeaturizer, TorchPCA

RES = 32
EMBED = 16
NAME = "DinoFeaturizer"


def _tiny_vit():
    torch.manual_seed(0)
    return timm.models.VisionTransformer(
        img_size=RES, patch_size=8, embed_dim=EMBED, depth=1, num_heads=2
    ).eval()


@pytest.fixture(scope="module")
def featurizer():
    return DinoFeaturizer(_tiny_vit(), pretrained=False, resolution=RES, device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, (4, 40, 48, 3), dtype=np.uint8)


def _check(name):
    """The check ``name`` of the installed scikit-learn; skip where it lacks it."""
    check = getattr(estimator_checks, name, None)
    if check is None:
        pytest.skip(f"scikit-learn {sklearn.__version__} has no {name}")
    return check


# Checks that only take an estimator (no data), run as scikit-learn wrote them.
ESTIMATOR_ONLY_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_get_params_invariance",
    "check_set_params",
    "check_parameters_default_constructible",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    # Invalid parameters must raise InvalidParameterError from fit and
    # transform before any data is looked at.
    "check_param_validation",
]


@pytest.mark.parametrize("check_name", ESTIMATOR_ONLY_CHECKS)
def test_sklearn_estimator_only_check(featurizer, check_name):
    _check(check_name)(NAME, featurizer)


def test_default_constructible_with_model_name():
    # check_parameters_default_constructible, on the default (a model name):
    # constructing it downloads or builds nothing.
    _check("check_parameters_default_constructible")(NAME, DinoFeaturizer())


def _params_fingerprint(est):
    """Hashes of the parameters; a module by identity and weights."""
    out = {}
    for key, value in est.get_params(deep=False).items():
        if isinstance(value, torch.nn.Module):
            state = {k: v.detach().clone() for k, v in value.state_dict().items()}
            out[key] = (id(value), value.training, state)
        else:
            out[key] = joblib.hash(value)
    return out


def _same_fingerprint(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], tuple):
            ida, traininga, statea = a[key]
            idb, trainingb, stateb = b[key]
            assert ida == idb and traininga == trainingb, key
            assert statea.keys() == stateb.keys()
            for k in statea:
                assert torch.equal(statea[k], stateb[k]), (key, k)
        else:
            assert a[key] == b[key], key


def test_estimators_overwrite_params(featurizer, images):
    # Mirrors check_estimators_overwrite_params: fit (and transform) change
    # no parameter; the module stays the same object with the same weights
    # and mode (joblib.hash of a deep copy of a module is not stable, so it
    # is compared by identity and state dict instead).
    est = clone(featurizer)
    before = _params_fingerprint(est)
    est.fit(images)
    est.transform(images)
    _same_fingerprint(before, _params_fingerprint(est))


def test_dont_overwrite_parameters(featurizer, images):
    # Mirrors check_dont_overwrite_parameters: fit adds only private
    # attributes or public ones ending with "_", and changes none of __init__.
    est = clone(featurizer)
    before = dict(est.__dict__)
    est.fit(images)
    added = [k for k in est.__dict__ if k not in before]
    public_added = [k for k in added if not k.startswith("_")]
    assert public_added, "fit records mean_, std_, normalization_"
    assert all(k.endswith("_") for k in public_added), public_added
    for key, value in before.items():
        if not key.startswith("_"):
            assert est.__dict__[key] is value, key


def test_estimators_fit_returns_self(featurizer, images):
    # Mirrors check_estimators_fit_returns_self.
    est = clone(featurizer)
    assert est.fit(images) is est
    assert est.fit(images, np.zeros(len(images))) is est


def test_fit_score_takes_y_and_requires_y_none(featurizer, images):
    # Mirrors check_fit_score_takes_y (fit / fit_transform take (X, y)) and
    # check_requires_y_none (y=None works).
    est = clone(featurizer)
    y = np.arange(len(images))
    np.testing.assert_array_equal(
        est.fit_transform(images, y), est.fit_transform(images, None)
    )
    assert est.fit(X=images, y=None) is est


def test_fit_idempotent(featurizer, images):
    # Mirrors check_fit_idempotent: fitting again (after a fit on other
    # images) gives the same attributes and the same transform.
    est = clone(featurizer).fit(images)
    first = est.transform(images)
    attrs = (est.mean_, est.std_, est.normalization_)
    est.fit(images[::-1][:2]).fit(images)
    assert (est.mean_, est.std_, est.normalization_) == attrs
    np.testing.assert_allclose(est.transform(images), first, rtol=1e-6, atol=1e-6)


def test_fit_check_is_fitted_and_stateless(featurizer, images):
    # Mirrors check_fit_check_is_fitted and check_transformers_unfitted_stateless:
    # requires_fit is False, so check_is_fitted passes before fit and an
    # unfitted transform equals the fitted one.
    est = clone(featurizer)
    check_is_fitted(est)
    unfitted = est.transform(images)
    fitted = clone(featurizer).fit(images).transform(images)
    np.testing.assert_allclose(unfitted, fitted, rtol=1e-6, atol=1e-6)
    check_is_fitted(est.fit(images))


def test_transformer_general(featurizer, images):
    # Mirrors check_transformer_general: fit_transform equals fit + transform,
    # repeated transforms agree, the output has one row per input.
    est = clone(featurizer)
    out = est.fit_transform(images)
    assert out.shape == (len(images), EMBED, RES // 8, RES // 8)
    assert out.dtype == np.float32
    np.testing.assert_allclose(est.transform(images), out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        clone(featurizer).fit(images).transform(images), out, rtol=1e-6, atol=1e-6
    )


def test_dict_unchanged(featurizer, images):
    # Mirrors check_dict_unchanged: transform does not change __dict__.
    est = clone(featurizer).fit(images)
    before = dict(est.__dict__)
    est.transform(images)
    assert est.__dict__.keys() == before.keys()
    for key, value in before.items():
        assert est.__dict__[key] is value, key


def test_methods_sample_order_and_subset_invariance(featurizer, images):
    # Mirrors check_methods_sample_order_invariance and
    # check_methods_subset_invariance.
    est = clone(featurizer).fit(images)
    full = est.transform(images)
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(
        est.transform(images[order]), full[order], rtol=1e-5, atol=1e-5
    )
    for sl in (slice(0, 1), slice(1, 3)):
        np.testing.assert_allclose(
            est.transform(images[sl]), full[sl], rtol=1e-5, atol=1e-5
        )


def test_estimators_pickle(featurizer, images):
    # Mirrors check_estimators_pickle: a fitted (and an unfitted) featurizer
    # round-trips through pickle with the same parameters and transform.
    for est in (clone(featurizer), clone(featurizer).fit(images)):
        expected = est.transform(images)
        restored = pickle.loads(pickle.dumps(est))
        assert type(restored) is type(est)
        assert restored.get_params().keys() == est.get_params().keys()
        assert repr(restored) == repr(est)
        for attr in ("mean_", "std_", "normalization_"):
            assert getattr(restored, attr, None) == getattr(est, attr, None)
        np.testing.assert_allclose(
            restored.transform(images), expected, rtol=1e-6, atol=1e-6
        )


def test_readonly_memmap_input(featurizer, images, tmp_path):
    # Mirrors check_readonly_memmap_input: read-only images work.
    path = tmp_path / "images.npy"
    np.save(path, images)
    readonly = np.load(path, mmap_mode="r")
    est = clone(featurizer).fit(readonly)
    np.testing.assert_allclose(
        est.transform(readonly), est.transform(images), rtol=1e-6, atol=1e-6
    )


def test_sparse_input_is_rejected(featurizer):
    # Mirrors check_estimator_sparse_tag (input_tags.sparse is False): sparse
    # input is refused. fit ignores X (nothing is learnt), so it is transform
    # that must raise.
    assert not featurizer.__sklearn_tags__().input_tags.sparse
    with pytest.raises((TypeError, ValueError)):
        clone(featurizer).transform(sp.csr_matrix(np.ones((2, 3))))


def test_no_n_features_in(featurizer, images):
    # check_n_features_in / check_n_features_in_after_fitting are N/A: images
    # have no feature count, so fit sets no n_features_in_.
    est = clone(featurizer).fit(images)
    assert not hasattr(est, "n_features_in_")
    assert not featurizer.__sklearn_tags__().input_tags.two_d_array


def test_transformer_get_feature_names_out(featurizer, images):
    # Mirrors check_transformer_get_feature_names_out: one name per output
    # channel, strings, also through a Pipeline. Unlike
    # check_get_feature_names_out_error expects, it works before fit: the
    # featurizer is stateless (requires_fit=False).
    est = clone(featurizer)
    names = est.get_feature_names_out()
    out = est.fit(images).transform(images)
    assert names.shape == (out.shape[1],)
    assert list(names) == [f"dino{i}" for i in range(EMBED)]
    assert all(isinstance(name, str) for name in names)
    np.testing.assert_array_equal(est.get_feature_names_out(), names)
    pipe = Pipeline([("dino", clone(featurizer)), ("pca", TorchPCA(dim=3))])
    pipe.fit(images)
    assert list(pipe.get_feature_names_out()) == [f"torchpca{i}" for i in range(3)]
