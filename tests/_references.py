"""Independent references shared by the tests.

Written with scikit-learn, SciPy and NumPy only, never with skstego, so that
a test comparing skstego with them checks skstego against something else.
Tests import them as ``from _references import ...`` (pytest puts ``tests/``
on ``sys.path``, as for the ``_cuda_harness_*`` modules).
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.metrics import confusion_matrix

__all__ = ["hungarian_scores", "numpy_lloyd", "reference_crf"]


def hungarian_scores(y_true, y_pred, n_classes, k):
    """mIoU, pixel accuracy and cluster -> class mapping of a clustering.

    scikit-learn's confusion matrix, SciPy's Hungarian matching (maximum
    agreement), then NumPy IoU. Labels below zero are ignored; unmatched
    clusters predict no class (mapping -1), so their pixels are errors; a
    class absent from both the labels and the matched predictions is left
    out of the mean.

    Returns
    -------
    miou : float
    accuracy : float
    mapping : ndarray of shape (k,)
        The class of each cluster, -1 for unmatched clusters.
    """
    y_true, y_pred = np.ravel(y_true), np.ravel(y_pred)
    valid = y_true >= 0
    y_true, y_pred = y_true[valid], y_pred[valid]
    conf = confusion_matrix(y_true, y_pred, labels=np.arange(max(n_classes, k)))
    conf = conf[:n_classes, :k]
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(k, -1)
    mapping[cols] = rows
    pred = mapping[y_pred]
    ious = []
    for c in range(n_classes):
        union = np.sum((pred == c) | (y_true == c))
        if union:
            ious.append(np.sum((pred == c) & (y_true == c)) / union)
    return float(np.mean(ious)), float(np.mean(pred == y_true)), mapping


def numpy_lloyd(X, centers, n_iter, spherical):
    """``n_iter`` steps of a textbook Lloyd loop in float64.

    Euclidean: nearest centre by squared distance, centre = mean of its
    members. Spherical (``spherical=True``): rows and centres on the unit
    sphere, nearest by cosine, centre = normalised mean. No empty clusters
    are expected (an empty one would get a NaN centre).
    """
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(centers, dtype=np.float64)
    if spherical:
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        C = C / np.linalg.norm(C, axis=1, keepdims=True)
    for _ in range(n_iter):
        if spherical:
            labels = np.argmax(X @ C.T, axis=1)
        else:
            labels = np.argmin(cdist(X, C, "sqeuclidean"), axis=1)
        C = np.stack([X[labels == j].mean(axis=0) for j in range(len(C))])
        if spherical:
            C /= np.linalg.norm(C, axis=1, keepdims=True)
    return C


def reference_crf(
    image,
    proba,
    n_iter=10,
    gaussian_sxy=1.0,
    gaussian_compat=3.0,
    bilateral_sxy=67.0,
    bilateral_srgb=3.0,
    bilateral_compat=4.0,
):
    """Mean-field of densecrf's model on one (H, W, 3) image, (K, H, W) proba.

    Float64, O(N^2) in the number of pixels (full kernel matrices). Unary
    -log(clip(p, 1e-5, 1)); Potts pairwise with kernel matrices normalised
    symmetrically, D^-1/2 K D^-1/2 with D = diag(K 1), the pixel itself
    included; Q <- softmax(-U + sum_k w_k A_k Q).
    """
    h, w, _ = image.shape
    k = proba.shape[0]
    n = h * w
    yy, xx = np.mgrid[:h, :w]
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
    col = image.reshape(n, 3).astype(np.float64)
    d_pos = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    d_col = ((col[:, None, :] - col[None, :, :]) ** 2).sum(-1)
    kernels = [
        (gaussian_compat, np.exp(-d_pos / (2 * gaussian_sxy**2))),
        (
            bilateral_compat,
            np.exp(-d_pos / (2 * bilateral_sxy**2) - d_col / (2 * bilateral_srgb**2)),
        ),
    ]
    messages = []
    for weight, K in kernels:
        deg = K.sum(1)
        messages.append(weight * K / np.sqrt(deg[:, None] * deg[None, :]))
    log_p = np.log(np.clip(proba.reshape(k, n).astype(np.float64), 1e-5, 1.0))

    def softmax(e):
        e = e - e.max(0)
        q = np.exp(e)
        return q / q.sum(0)

    Q = softmax(log_p)
    for _ in range(n_iter):
        Q = softmax(log_p + sum(A @ Q.T for A in messages).T)
    return Q.reshape(k, h, w)
