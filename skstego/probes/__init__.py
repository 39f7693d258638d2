"""Probes: codes in, segmentation out.

:class:`KMeansProbe` clusters (unsupervised, Hungarian-matched to classes for
scoring); :class:`HNNEClusterProbe` does the same with a level of h-NNE's FINCH
hierarchy instead of k-means; :class:`LinearProbe` is a supervised softmax
classifier; :class:`CRFProbe` refines any of them with a dense CRF on the
images.
"""

from ._crf import CRFProbe
from ._hnne_cluster import HNNEClusterProbe
from ._kmeans import KMeansProbe
from ._linear import LinearProbe

__all__ = ["CRFProbe", "HNNEClusterProbe", "KMeansProbe", "LinearProbe"]
