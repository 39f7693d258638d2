"""Counts, means and scatters of token sets, merged pairwise (Chan et al.).

Every streamed or chunked estimator that needs a mean and a spread (TorchPCA's
scatter matrix, k-means' tolerance, the linear probe's standardisation)
computes them per chunk and merges the parts here, in float64. A part is
``(n, mean, m2)``: the count, the mean and the sum of squared deviations from
it, either per feature (``m2`` of shape (C,)) or as the scatter matrix
(``m2`` of shape (C, C)).

References
----------
.. [1] Chan, T. F., Golub, G. H. and LeVeque, R. J. "Updating formulae and a
   pairwise algorithm for computing sample variances". COMPSTAT 1982.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["merge_moments", "merge_pair", "token_moments"]

Moments = tuple[int, np.ndarray, np.ndarray]


def merge_pair(a: Moments, b: Moments) -> Moments:
    """The moments of the union of two disjoint token sets (Chan et al.).

    ``m2`` is per feature (C,) or a scatter matrix (C, C); both parts must
    have the same kind and a positive total count.
    """
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    delta = np.asarray(mean_b, dtype=np.float64) - mean_a
    cross = np.outer(delta, delta) if np.ndim(m2_a) == 2 else delta * delta
    m2 = m2_a + m2_b + cross * (n_a * n_b / n)
    return n, mean_a + delta * (n_b / n), m2


def merge_moments(parts: Iterable[Moments]) -> Moments:
    """Merge per-chunk ``(count, mean, m2)`` in order, in float64.

    Parts of zero count are skipped (when every part is empty, the first is
    returned). ``parts`` is read once, so it may be a generator.
    """
    merged = first = None
    for part in parts:
        first = part if first is None else first
        if part[0] == 0:
            continue
        merged = part if merged is None else merge_pair(merged, part)
    return merged if merged is not None else first


def token_moments(x: torch.Tensor) -> Moments:
    """Count, float64 mean and per-feature sum of squared deviations of
    (n, C) tokens (zeros for no tokens)."""
    x = x.double()
    if x.shape[0] == 0:
        zeros = np.zeros(x.shape[1])
        return 0, zeros, zeros
    mean = x.mean(dim=0)
    return x.shape[0], mean.cpu().numpy(), ((x - mean) ** 2).sum(dim=0).cpu().numpy()
