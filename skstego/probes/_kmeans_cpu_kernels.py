"""Lloyd iterations on the CPU by scikit-learn's compiled kernel.

scikit-learn's ``KMeans`` runs each Lloyd iteration in one Cython loop
(``sklearn.cluster._k_means_lloyd.lloyd_iter_chunked_dense``): distances,
argmin and per-cluster sums over blocks of 256 tokens that stay in cache,
threads over blocks. Eager torch needs three kernels for the same work (a
distance product, an argmax and ``index_add_``), each a pass over memory:
measured 2.2-2.5x slower per iteration on a 2-core CPU (300k x 70 tokens,
k=27; ``benchmarks/bench_kmeans.py``). So on the CPU, for tokens in
memory, :class:`KMeansProbe` runs its Lloyd loop with this kernel as the
E-step (the kept compiled implementation, as ``DenseCRF`` keeps
pydensecrf's), and everything around it stays skstego's: seeding, ``n_init``,
the stopping rule, the inertia curve, cosine k-means, token weights and the
overflow scaling of huge values.

Cosine k-means runs the Euclidean kernel on unit rows: with centroids of
one norm, the nearest centroid is the one of largest cosine, and the
squared distance is ``2 - 2 cos``. A centroid of zero norm (a cluster whose
tokens cancel out) breaks that equivalence; the run then starts over on the
torch kernels, from the same initial centroids.

The kernel is private to scikit-learn (the same signature in 1.6 to 1.9,
the versions skstego supports; both ends are tested in CI): it is imported
and checked on a 3-token problem once; if it is missing or behaves
otherwise, ``backend="auto"`` runs the torch kernels and
``backend="sklearn"`` raises an ImportError.

An iteration that leaves a cluster empty re-seeds it inside the kernel, as
``KMeans`` does, at the cost of two NumPy temporaries of the tokens' size
(seconds for millions of tokens on a machine slow to map fresh memory; the
torch kernels re-seed from the distances they keep): the same cost as
scikit-learn's, only in the iterations that need it.

The E-step's inertia is taken from the cluster sums the kernel returns
(O(k C) instead of a pass over the tokens) where that is as accurate as a
float32 pass (:meth:`_CompiledPasses._inertia`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ._kmeans_kernels import _EStep, _lloyd, _lloyd_loop, _row_sq_norms

__all__: list[str] = []


#: Largest ``sum w |x|^2 / inertia`` at which the inertia is taken from the
#: cluster sums (error about 5e-8 times this ratio) instead of a pass.
_SUMS_RATIO = 50.0


class _NotSpherical(Exception):
    """A cosine centroid of zero norm: the Euclidean kernel no longer ranks
    centroids by cosine."""


@functools.cache
def _compiled_kernels() -> tuple[Callable, Callable] | None:
    """scikit-learn's Lloyd iteration and inertia kernels, or None when they
    cannot be imported or do not take the arguments this module passes."""
    try:
        lloyd = importlib.import_module("sklearn.cluster._k_means_lloyd")
        common = importlib.import_module("sklearn.cluster._k_means_common")
        iteration = lloyd.lloyd_iter_chunked_dense
        inertia = common._inertia_dense
        # A 3-token, 2-cluster check of the signature and of the results.
        X = np.array([[0.0, 0.0], [0.0, 1.0], [4.0, 0.0]], dtype=np.float32)
        w = np.ones(3, dtype=np.float32)
        c = np.array([[0.0, 0.0], [4.0, 0.0]], dtype=np.float32)
        new, weights = np.empty_like(c), np.empty(2, dtype=np.float32)
        labels, shift = np.empty(3, dtype=np.int32), np.empty(2, dtype=np.float32)
        iteration(X, w, c, new, weights, labels, shift, 1, True)
        value = inertia(X, w, c, labels, 1)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    expected = np.array([[0.0, 0.5], [4.0, 0.0]], dtype=np.float32)
    if labels.tolist() != [0, 0, 1] or not np.allclose(new, expected):
        return None
    if not np.isclose(value, 1.0):
        return None
    return iteration, inertia


def compiled_lloyd_available() -> bool:
    """Whether scikit-learn's compiled Lloyd iteration can run here."""
    return _compiled_kernels() is not None


class _CompiledPasses:
    """Lloyd passes over tokens in CPU memory by scikit-learn's kernel.

    Each call of the kernel is an E-step and the M-step after it (empty
    clusters re-seeded with the farthest tokens, as scikit-learn and
    :func:`~._kmeans_kernels._reseed_empty` do), so :meth:`estep` returns
    the next centroids in ``means``; the last pass (``final``) only labels.
    """

    deferred = False  # the loop names the final pass: it skips the M-step

    def __init__(
        self,
        X: torch.Tensor,
        x_sq: torch.Tensor | None,
        k: int,
        cosine: bool,
        w: torch.Tensor | None,
        kernels: tuple[Callable, Callable],
    ) -> None:
        self.iteration, self.inertia = kernels
        self.X = np.ascontiguousarray(X.numpy())  # a view of contiguous tokens
        n, dtype = self.X.shape[0], self.X.dtype
        self.w = np.ones(n, dtype) if w is None else w.numpy().astype(dtype)
        self.k, self.cosine = k, cosine
        self.labels = np.full(n, -1, dtype=np.int32)
        self.labels_old = np.full(n, -1, dtype=np.int32)
        self.threads = max(1, torch.get_num_threads())
        # sum of w |x|^2 (float64), for the inertia from the cluster sums
        sq = (_row_sq_norms(X) if x_sq is None else x_sq).numpy()
        self.sq_total = float(np.dot(sq.astype(np.float64), self.w))
        # Cosine distance is 2 - 2 cos; the kernel measures |x - c|^2, which
        # equals it for unit rows and is 1 - |x|^2 less for the rows that
        # normalisation left (near) zero.
        self.offset = 0.0
        self.zero = None
        if cosine:
            short = sq < 0.5
            if short.any():
                self.offset = float(
                    np.dot(1.0 - sq[short].astype(np.float64), self.w[short])
                )
            # A zero token is as close to every centroid: the torch kernels
            # (and ``predict``) give it the first cluster, the kernel the
            # centroid whose norm rounded lowest. It moves no centroid
            # (cosine centroids are normalised means).
            zero = np.flatnonzero(sq == 0)
            self.zero = zero if zero.size else None

    def estep(self, centers: torch.Tensor, final: bool) -> _EStep:
        old = np.ascontiguousarray(centers.numpy())
        if self.cosine and (np.einsum("ij,ij->i", old, old) < 0.5).any():
            raise _NotSpherical
        new = np.empty_like(old)
        weights = np.zeros(self.k, dtype=old.dtype)
        shift = np.empty(self.k, dtype=old.dtype)
        self.iteration(
            self.X,
            self.w,
            old,
            new,
            weights,
            self.labels,
            shift,
            self.threads,
            not final,
        )
        if self.zero is not None:
            self.labels[self.zero] = 0
        changed = torch.tensor(not np.array_equal(self.labels, self.labels_old))
        if final:
            counts = np.bincount(self.labels, self.w, minlength=self.k)
            inertia = self._inertia(old, None, None)
            return _EStep(None, torch.from_numpy(counts), inertia, changed)
        inertia = self._inertia(old, new, weights)
        empty = weights == 0  # still empty after re-seeding: keeps its centroid
        new[empty] = old[empty]
        if self.cosine:  # as F.normalize, in float64: unit to float32 rounding
            norms = np.linalg.norm(new.astype(np.float64), axis=1)
            new = (new / np.maximum(norms, 1e-12)[:, None]).astype(old.dtype)
        means = torch.from_numpy(new)
        counts = torch.from_numpy(weights.astype(np.float64))
        return _EStep(None, counts, inertia, changed, means)

    def _inertia(
        self, old: np.ndarray, means: np.ndarray | None, weights: np.ndarray | None
    ) -> torch.Tensor:
        """Inertia of the labels just computed about the centroids ``old``.

        From the cluster sums ``S_j = weights_j * means_j`` the kernel
        returned, in float64: ``sum w |x|^2 - 2 sum_j old_j . S_j + sum_j
        weights_j |old_j|^2``, O(k C) instead of a pass over the tokens (3
        ms of a 20 ms iteration at 300k x 70). Its error grows with ``sum w
        |x|^2 / inertia`` (measured 5e-8 times that ratio, where a float32
        pass is off by 1e-6 to 8e-6): beyond :data:`_SUMS_RATIO`, after a
        re-seeding (the sums then no longer follow the labels) and for the
        last, labelling-only pass, scikit-learn's inertia kernel makes the
        pass instead.
        """
        if means is not None and np.bincount(self.labels, minlength=self.k).all():
            c = old.astype(np.float64)
            sums = means.astype(np.float64) * weights.astype(np.float64)[:, None]
            value = (
                self.sq_total
                - 2.0 * float(np.vdot(c, sums))
                + float(np.dot(weights.astype(np.float64), np.einsum("ij,ij->i", c, c)))
            )
            if value > 0 and self.sq_total <= _SUMS_RATIO * value:
                return torch.tensor(value + self.offset, dtype=torch.float64)
        value = float(self.inertia(self.X, self.w, old, self.labels, self.threads))
        return torch.tensor(value + self.offset, dtype=torch.float64)

    def reseed(self, step: _EStep, empty: torch.Tensor) -> None:
        """Nothing to do: the kernel re-seeded empty clusters already."""

    def advance(self) -> None:
        self.labels, self.labels_old = self.labels_old, self.labels


def _compiled_lloyd(
    X: torch.Tensor,
    x_sq: torch.Tensor | None,
    centers: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    cosine: bool,
    verbose: bool,
    desc: str,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int, np.ndarray]:
    """:func:`~._kmeans_kernels._lloyd` with scikit-learn's compiled E-step.

    Same arguments and results (tokens in CPU memory, float32, contiguous);
    falls back to the torch kernels when the compiled kernel is missing,
    and starts over on them from ``centers`` when a cosine centroid
    reaches zero norm.
    """
    kernels = _compiled_kernels()
    args: dict[str, Any] = dict(
        max_iter=max_iter, tol=tol, cosine=cosine, verbose=verbose, desc=desc, w=w
    )
    if kernels is None or X.device.type != "cpu" or X.dtype != torch.float32:
        return _lloyd(X, x_sq, centers, **args)
    try:
        # The kernel calls BLAS from its own threads: one BLAS thread each.
        # NumPy's own BLAS calls stay on one thread too: OpenBLAS's idle
        # threads spin for ~0.1 s after a threaded call, which measured 2x
        # slower kernel iterations for that long (2.5 times the inertia
        # kernel's cost, for one 300k-element ``np.dot``).
        with threadpool_limits(limits=1, user_api="blas"):
            passes = _CompiledPasses(
                X.contiguous(), x_sq, centers.shape[0], cosine, w, kernels
            )
            found, _, inertia, n_iter, curve = _lloyd_loop(
                passes,
                centers.contiguous(),
                max_iter=max_iter,
                tol=tol,
                cosine=cosine,
                verbose=verbose,
                desc=desc,
            )
    except _NotSpherical:
        return _lloyd(X, x_sq, centers, **args)
    labels = torch.from_numpy(passes.labels.astype(np.int64))
    return found, labels, inertia, n_iter, curve
