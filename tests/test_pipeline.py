"""Estimators chained as users chain them: Pipeline, GridSearchCV, clone, pickle."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import Pipeline

from skstego import (
    DinoFeaturizer,
    KMeansProbe,
    LinearProbe,
    RandomProjection,
    StegoProjector,
    TorchPCA,
)
from skstego.datasets import make_feature_maps, make_scenes
from skstego.metrics import accuracy_scorer, miou_scorer, segmentation_report


@pytest.fixture(scope="module")
def data():
    maps, labels = make_feature_maps(
        24, n_features=48, n_classes=4, map_size=8, label_size=16, random_state=0
    )
    return maps, labels


def _pipe(reducer=None, probe=None):
    return Pipeline(
        [
            ("reduce", reducer if reducer is not None else TorchPCA(dim=4)),
            ("probe", probe if probe is not None else KMeansProbe(k=4, random_state=0)),
        ]
    )


@pytest.mark.parametrize("as_torch", [False, True])
def test_pipeline_fit_predict_score_and_output_types(data, as_torch):
    maps, labels = data
    X = torch.from_numpy(maps) if as_torch else maps
    y = torch.from_numpy(labels) if as_torch else labels
    pipe = _pipe().fit(X)
    codes = pipe[:-1].transform(X)
    pred = pipe.predict(X)
    upsampled = pipe.predict(X, size=labels.shape[-2:])
    kind = torch.Tensor if as_torch else np.ndarray
    assert isinstance(codes, kind) and codes.shape == (24, 4, 8, 8)
    assert isinstance(pred, kind) and pred.shape == (24, 8, 8)
    assert isinstance(upsampled, kind) and upsampled.shape == (24, 16, 16)
    # score is the Hungarian mIoU of the upsampled prediction (independent path)
    expected = segmentation_report(
        labels, np.asarray(upsampled), n_classes=4, matching="hungarian"
    )["miou"]
    assert pipe.score(X, y) == pytest.approx(expected, abs=1e-6)
    assert miou_scorer(pipe, X, y) == pytest.approx(expected, abs=1e-6)


def test_numpy_and_torch_input_give_the_same_model(data):
    maps, _ = data
    a = _pipe().fit(maps)
    b = _pipe().fit(torch.from_numpy(maps))
    np.testing.assert_allclose(a[0].components_, b[0].components_, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(a.predict(maps), b.predict(maps))


def test_grid_search_over_reducers_and_dims(data):
    maps, labels = data
    grid = GridSearchCV(
        _pipe(),
        {
            "reduce": [TorchPCA(), RandomProjection(random_state=0)],
            "reduce__dim": [2, 4, 8],
        },
        scoring={"miou": miou_scorer, "accuracy": accuracy_scorer},
        refit="miou",
        cv=KFold(2),
    )
    grid.fit(maps, labels)
    results = grid.cv_results_
    assert len(results["params"]) == 6
    assert np.all(np.isfinite(results["mean_test_miou"]))
    assert np.all(
        (results["mean_test_accuracy"] > 0) & (results["mean_test_accuracy"] <= 1)
    )
    # the best pipeline was refitted on all images and scores them
    assert 0 < grid.score(maps, labels) <= 1


def test_grid_search_on_torch_input(data):
    maps, labels = data
    grid = GridSearchCV(_pipe(), {"reduce__dim": [2, 4]}, cv=KFold(2))
    grid.fit(torch.from_numpy(maps), torch.from_numpy(labels))
    assert grid.best_params_["reduce__dim"] in (2, 4)


def test_linear_probe_pipeline_cross_validates_images(data):
    maps, labels = data
    pipe = _pipe(RandomProjection(dim=16, random_state=0), LinearProbe(random_state=0))
    scores = cross_val_score(pipe, maps, labels, cv=KFold(3), scoring=miou_scorer)
    assert scores.shape == (3,)
    assert np.all(scores > 0.5)  # class information is linearly available


def test_scorers_compute_their_metric_through_a_pipeline():
    # Pipeline.score drops **params without metadata routing; the scorers must
    # still compute the metric they are named after.
    maps, labels = make_feature_maps(
        8, n_features=16, n_classes=3, map_size=4, random_state=1
    )
    pipe = _pipe(TorchPCA(dim=3), KMeansProbe(k=3, random_state=0)).fit(maps)
    codes = pipe[0].transform(maps)
    probe = pipe[-1]
    assert accuracy_scorer(pipe, maps, labels) == pytest.approx(
        probe.score(codes, labels, metric="accuracy")
    )
    assert miou_scorer(pipe, maps, labels) == pytest.approx(
        probe.score(codes, labels, metric="miou")
    )


def test_clone_and_pickle_round_trip(data):
    maps, _ = data
    pipe = _pipe().fit(maps)
    fresh = clone(pipe)
    assert not hasattr(fresh[0], "components_")
    restored = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(restored.predict(maps), pipe.predict(maps))
    np.testing.assert_array_equal(restored[0].transform(maps), pipe[0].transform(maps))


def _tiny_featurizer():
    import timm

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2
    ).eval()
    return DinoFeaturizer(vit, resolution=64, device="cpu", batch_size=8)


def test_featurizer_stego_kmeans_pipeline_and_grid_search():
    # The README's pipeline, end to end, on images: featurizer -> STEGO head
    # -> k-means, then GridSearchCV over the head's dim (each fold retrains).
    images, labels = make_scenes(12, size=64, n_classes=4, random_state=0)
    stego = StegoProjector(
        dim=70,
        n_steps=4,
        batch_size=4,
        feature_samples=5,
        device="cpu",
        random_state=0,
    )
    pipe = Pipeline(
        [
            ("features", _tiny_featurizer()),
            ("reduce", stego),
            ("probe", KMeansProbe(k=4, device="cpu", random_state=0)),
        ]
    )
    pipe.fit(images, labels)
    pred = pipe.predict(images)
    assert pred.shape == (12, 8, 8) and pred.dtype == np.int64
    # scoring upsamples to the label size and equals the metric computed
    # from the steps applied by hand
    codes = pipe[:-1].transform(images)
    assert codes.shape == (12, 70, 8, 8)
    report = pipe[-1].score_report(codes, labels)
    assert pipe.score(images, labels) == pytest.approx(report["miou"])
    full = pipe[-1].predict(codes, size=(64, 64))
    direct = segmentation_report(labels, full, n_classes=4)
    assert report["miou"] == pytest.approx(direct["miou"])

    search = GridSearchCV(
        pipe, {"reduce__dim": [3, 6]}, cv=KFold(2), scoring=miou_scorer
    )
    search.fit(images, labels)
    assert search.best_params_["reduce__dim"] in (3, 6)
    assert (
        search.best_estimator_["reduce"].head_state_["linear.weight"].shape[0]
        == (search.best_params_["reduce__dim"])
    )
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
