from sklearn.base import BaseEstimator


class RandomProjection(BaseEstimator):  # placeholder, being written
    pass
