"""Probes: codes in, segmentation out.

:class:`KMeansProbe` clusters (unsupervised, Hungarian-matched to classes for
scoring); :class:`LinearProbe` is a supervised softmax classifier.
"""

from ._kmeans import KMeansProbe
from ._linear import LinearProbe

__all__ = ["KMeansProbe", "LinearProbe"]
