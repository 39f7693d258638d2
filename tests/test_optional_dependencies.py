"""The core works without the optional extras (zarr, dask, distributed).

A fresh interpreter whose import system refuses those packages runs the
pipeline, the streamed fits on a memory map and the exact streamed k-means,
and gets the install hint where a feature needs an extra.
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys
    import tempfile

    OPTIONAL = {"dask", "distributed", "zarr"}


    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in OPTIONAL:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, Refuse())

    import numpy as np
    from sklearn.pipeline import make_pipeline

    from skstego import HNNEProjector, KMeansProbe, LinearProbe, TorchPCA
    from skstego.datasets import make_feature_maps
    from skstego.features import FeatureStore

    maps, labels = make_feature_maps(12, n_features=16, map_size=4, random_state=0)
    pipe = make_pipeline(TorchPCA(4), KMeansProbe(3, random_state=0)).fit(maps)
    assert 0.0 <= pipe.score(maps, labels) <= 1.0

    folder = tempfile.mkdtemp()
    mm = np.lib.format.open_memmap(folder + "/m.npy", "w+", np.float32, maps.shape)
    mm[:] = maps
    mm.flush()
    on_disk = np.load(folder + "/m.npy", mmap_mode="r")
    pca = TorchPCA(4).fit(on_disk)
    codes = pca.transform(on_disk)
    exact = KMeansProbe(3, max_samples=None, random_state=0).fit(codes)
    assert exact.labels_.shape == (12, 4, 4)
    LinearProbe(max_iter=2).fit(on_disk, labels)
    HNNEProjector(2, random_state=0).partial_fit(on_disk[:6]).partial_fit(on_disk[6:])

    try:
        FeatureStore(folder + "/missing.zarr")
    except ImportError as exc:
        assert "pip install skstego[store]" in str(exc), exc
    else:
        raise AssertionError("FeatureStore opened without zarr")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
    assert not loaded, loaded
    print("core without extras: ok")
    """
)


def test_core_runs_without_dask_zarr_and_distributed():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core without extras: ok" in done.stdout
