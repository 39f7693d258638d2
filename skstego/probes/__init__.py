"""Probes: codes in, segmentation out.

:class:`KMeansProbe` clusters (unsupervised, Hungarian-matched to classes for
scoring); :class:`HNNEClusterProbe` does the same with a level of h-NNE's FINCH
hierarchy instead of k-means; :class:`LinearProbe` is a supervised softmax
classifier.
"""

from ._hnne_cluster import HNNEClusterProbe
from ._kmeans import KMeansProbe
from ._linear import LinearProbe

__all__ = ["HNNEClusterProbe", "KMeansProbe", "LinearProbe"]
