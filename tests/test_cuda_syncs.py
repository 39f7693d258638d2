"""Host-device synchronisation budgets, checked on the CPU.

Each test runs skstego code under :class:`_cuda_harness_syncs.SyncCounter`,
which counts the operations that would make the host wait for the GPU on
CUDA (see that module). Budgets of training loops are differences between a
long and a short run, so that setup before the loop does not count:

* StegoProjector: at most 1 per 20 steps (0 without ``verbose``; the
  progress bar reads the loss every 20 steps);
* mini-batch k-means: no synchronisation per step (one per pass);
* exact Lloyd k-means: one per iteration (the stopping flags), plus two
  reads at the end, plus at most two in an iteration that re-seeds an
  empty cluster.
"""

import numpy as np
import pytest
import torch
from _cuda_harness_syncs import SyncCounter
from sklearn.datasets import load_digits

from skstego import KMeansProbe, StegoProjector
from skstego.losses import derangement, stego_loss
from skstego.probes import _kmeans_kernels as _kmeans
from skstego.projection import _stego


def _count(fn, *args, **kwargs):
    with SyncCounter() as syncs:
        out = fn(*args, **kwargs)
    return syncs, out


# ------------------------------------------------------------ the harness


def test_harness_counts_what_syncs_on_cuda():
    t = torch.arange(6.0)
    cases = [
        lambda: t.sum().item(),
        lambda: bool(t.sum() > 0),
        lambda: int(t[2]),
        lambda: float(t[2]),
        lambda: [0, 1, 2, 3][t[1].long()],  # __index__
        lambda: t.tolist(),
        lambda: t.cpu(),
        lambda: t.to("cpu"),
        lambda: torch.nonzero(t > 2),
        lambda: t[t > 2],  # boolean mask: a nonzero
        lambda: torch.masked_select(t, t > 2),
        lambda: torch.unique(t),
        lambda: torch.bincount(t.long()),
        lambda: torch.equal(t, t),
        lambda: torch.repeat_interleave(t.long()),
    ]
    for i, case in enumerate(cases):
        syncs, _ = _count(case)
        assert syncs.count == 1, (i, syncs.report())


def test_harness_ignores_device_side_work_and_host_optimizer_steps():
    t = torch.arange(6.0, requires_grad=True)
    idx = torch.tensor([0, 2])

    def device_side():
        u = t * 2
        u = u[idx] + u.index_select(0, idx)  # integer indices: no sync
        u = torch.where(u > 1, u, -u).to(torch.device("cpu"))  # compute device
        v = torch.repeat_interleave(idx, idx + 1, output_size=4)
        opt = torch.optim.Adam([t], lr=0.1)  # host step counters
        (u.sum() + v.sum()).backward()
        opt.step()

    syncs, _ = _count(device_side)
    assert syncs.count == 0, syncs.report()
    syncs, _ = _count(lambda: float(t.detach().sum()))
    assert syncs.events[0].site.endswith("(<lambda>)")


# ------------------------------------------------------------ losses


def test_derangement_draws_on_the_device_without_syncs():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 16, 1000):
        syncs, p = _count(derangement, n, generator=g)
        assert syncs.count == 0, syncs.report()
        assert not (p == torch.arange(n)).any()


def test_stego_loss_has_no_syncs():
    g = torch.Generator().manual_seed(0)
    feats, knn = torch.randn(2, 8, 16, 6, 6, generator=g)
    head = torch.nn.Conv2d(16, 4, 1)
    syncs, (total, _) = _count(
        stego_loss, feats, head(feats), knn, head(knn), generator=g
    )
    assert syncs.count == 0, syncs.report()
    syncs, _ = _count(total.backward)
    assert syncs.count == 0, syncs.report()


# ------------------------------------------------------------ StegoProjector


@pytest.fixture(scope="module")
def maps():
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 8, 4, 4)).astype(np.float32)


def _stego_syncs(X, n_steps, verbose=False):
    est = StegoProjector(
        dim=3,
        n_steps=n_steps,
        batch_size=4,
        feature_samples=3,
        neg_samples=2,
        device="cpu",
        random_state=0,
        verbose=verbose,
    )
    syncs, _ = _count(est.fit, X)
    return syncs


@pytest.mark.parametrize("kind", ["numpy", "torch", "host-index"])
@pytest.mark.parametrize("verbose", [False, True])
def test_stego_training_at_most_one_sync_per_20_steps(maps, kind, verbose, monkeypatch):
    X = torch.from_numpy(maps) if kind == "torch" else maps
    if kind == "host-index":
        # what CUDA training on NumPy input runs: indices on the host,
        # drawn by their own generator
        monkeypatch.setattr(_stego, "same_device", lambda a, b: False)
    short = _stego_syncs(X, 40, verbose)
    long = _stego_syncs(X, 80, verbose)
    extra = long.count - short.count
    # 40 more steps: at most 2 reads (the progress bar's, every 20 steps)
    assert extra <= 40 // 20, long.report()
    if not verbose:
        assert extra == 0, long.report()


# ------------------------------------------------------------ k-means


@pytest.fixture(scope="module")
def digits():
    X, _ = load_digits(return_X_y=True)
    return X.astype(np.float32)


def test_minibatch_step_has_no_sync(digits):
    X = torch.from_numpy(digits[:500])
    centers = X[:6].clone()
    counts = torch.zeros(6, dtype=torch.float64)
    for cosine in (False, True):
        syncs, (_, new_counts) = _count(
            _kmeans._minibatch_step, X, centers, counts, cosine
        )
        assert syncs.count == 0, syncs.report()
        assert float(new_counts.sum()) == 500


def test_minibatch_fit_has_no_sync_per_step(digits):
    def fit(n):
        probe = KMeansProbe(
            k=5,
            algorithm="minibatch",
            batch_size=40,
            max_iter=1,
            device="cpu",
            random_state=0,
        )
        syncs, probe = _count(probe.fit, digits[:n])
        return syncs, probe

    short, a = fit(800)
    long, b = fit(1600)
    assert (a.n_steps_, b.n_steps_) == (20, 40)
    assert long.count == short.count, long.report()


def test_kmeans_plusplus_has_no_sync(digits):
    X = torch.from_numpy(digits)
    x_sq = (X * X).sum(dim=1)
    syncs, centers = _count(
        _kmeans._kmeans_plusplus, X, x_sq, 10, torch.Generator().manual_seed(0)
    )
    assert syncs.count == 0, syncs.report()
    assert centers.shape == (10, 64)


@pytest.mark.parametrize("cosine", [False, True])
def test_lloyd_reads_once_per_iteration(digits, cosine):
    X = torch.from_numpy(digits)
    if cosine:
        X = _kmeans._normalize_rows(X)
    x_sq = None if cosine else (X * X).sum(dim=1)
    init = X[:: len(X) // 10][:10].clone()
    syncs, out = _count(
        _kmeans._lloyd,
        X,
        x_sq,
        init,
        max_iter=8,
        tol=0.0,
        cosine=cosine,
        verbose=False,
        desc="",
    )
    n_iter = out[3]
    assert n_iter == 8  # these starts need more than 8 iterations
    # one flag read per iteration, one after the last M-step (the final
    # E-step), one copy of the inertia curve
    assert syncs.count == n_iter + 2, syncs.report()


def test_lloyd_with_empty_clusters_reads_at_most_three_per_iteration():
    # 5 distinct points, 8 clusters: clusters stay empty at every iteration
    rng = np.random.default_rng(0)
    X = torch.from_numpy(np.repeat(rng.normal(size=(5, 3)), 20, axis=0)).float()
    init = X[[0, 1, 2, 20, 40, 60, 80, 99]].clone()
    syncs, out = _count(
        _kmeans._lloyd,
        X,
        (X * X).sum(dim=1),
        init,
        max_iter=10,
        tol=0.0,
        cosine=False,
        verbose=False,
        desc="",
    )
    assert syncs.count <= 3 * out[3] + 2, syncs.report()


def test_lloyd_fit_syncs_grow_by_one_per_iteration(digits):
    def fit(max_iter):
        probe = KMeansProbe(
            k=10,
            metric="euclidean",
            max_iter=max_iter,
            tol=0,
            backend="torch",  # what CUDA runs ("sklearn" is CPU-only)
            device="cpu",
            random_state=0,
        )
        syncs, probe = _count(probe.fit, digits)
        return syncs, probe

    short, a = fit(4)
    long, b = fit(8)
    assert (a.n_iter_, b.n_iter_) == (4, 8)
    assert long.count - short.count == 4, long.report()
