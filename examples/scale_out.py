"""Scale out: featurize an image folder on a Dask cluster into a zarr store,
fit PCA and k-means from the store chunk by chunk, evaluate.

1. Images: synthetic scenes with ground truth written as PNG files to a
   temporary folder (or your own folder with ``--images DIR``, then without
   evaluation).
2. A local Dask cluster (``--workers`` processes; one worker per GPU with
   ``dask_cuda.LocalCUDACluster`` when CUDA and dask-cuda are there). Each
   worker builds ONE backbone and writes its chunks of images straight into
   the shared zarr store (``DinoFeaturizer.transform_to_store(...,
   client=client)``); an interrupted run resumes where it stopped.
3. ``TorchPCA.fit(store)`` and ``KMeansProbe.fit`` read the store one chunk at
   a time; PCA codes go to a memory map, cluster predictions are scored
   chunk by chunk (the unsupervised mIoU: clusters Hungarian-matched to
   classes). Nothing ever holds all the features in memory.
4. Prints throughput (images and tokens per second) and peak memory of the
   client process and of every worker.

Offline by default: the backbone is RANDOMLY INITIALISED (saved once to a
file that every worker loads, so all workers share it), which the output says;
pass ``--weights FILE`` for real DINO features (or ``--pretrained`` to
download them). Run ``python examples/scale_out.py`` (a few minutes on two CPU
cores) or ``python examples/scale_out.py --quick`` (well under a minute).
"""

# %%
import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skstego import DinoFeaturizer, KMeansProbe, TorchPCA
from skstego.datasets import make_scenes
from skstego.metrics import confusion_matrix, report_from_confusion

SEED = 0
N_CLASSES = 5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB; Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


# %% 1. images on disk
def write_scenes(folder: Path, n_images: int, size: int) -> tuple[list, np.ndarray]:
    images, labels = make_scenes(
        n_images, size=size, n_classes=N_CLASSES, random_state=SEED
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"scene{i:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths, labels


def list_images(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a directory.")
    paths = sorted(
        str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise SystemExit(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return paths


# %% 2. the cluster and the backbone
def start_cluster(n_workers: int):
    """One worker per GPU with dask-cuda where GPUs exist, else CPU processes."""
    import distributed

    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(
                host="127.0.0.1",
                dashboard_address=None,
                threads_per_worker=1,
                silence_logs=logging.ERROR,
            )
            return cluster, distributed.Client(cluster)
        except ImportError:
            print("CUDA found but not dask-cuda: one CPU-process cluster instead")
    cluster = distributed.LocalCluster(
        n_workers=n_workers,
        silence_logs=logging.ERROR,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    )
    return cluster, distributed.Client(cluster)


def make_featurizer(args, folder: Path) -> DinoFeaturizer:
    if args.weights or args.pretrained:
        return DinoFeaturizer(
            args.model, weights=args.weights, resolution=args.resolution
        )
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    net = timm.create_model(args.model, pretrained=False, num_classes=0)
    weights = folder / "random_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    print(
        f"using a RANDOMLY INITIALISED {args.model} (offline default; pass "
        "--weights FILE for real DINO features)"
    )
    return DinoFeaturizer(args.model, weights=weights, resolution=args.resolution)


# %% 3. fit and evaluate from the store, chunk by chunk
def fit_and_evaluate(store, labels, folder: Path, dim: int, k: int) -> dict:
    chunk = int(store.attrs["chunk_images"])
    n, _, h, w = store.shape
    start = time.perf_counter()
    pca = TorchPCA(dim=dim, random_state=SEED).fit(store)  # streams the store
    t_pca = time.perf_counter() - start

    codes = np.lib.format.open_memmap(
        folder / "codes.npy", mode="w+", dtype=np.float32, shape=(n, dim, h, w)
    )
    for a in range(0, n, chunk):
        codes[a : a + chunk] = pca.transform(store[a : a + chunk])
    codes.flush()
    start = time.perf_counter()
    probe = KMeansProbe(k=k, random_state=SEED).fit(codes)  # streams the memmap
    t_kmeans = time.perf_counter() - start

    result = {"pca_s": t_pca, "kmeans_s": t_kmeans, "tokens": n * h * w}
    if labels is not None:
        conf = np.zeros((N_CLASSES, k), dtype=np.int64)
        for a in range(0, n, chunk):
            pred = probe.predict(codes[a : a + chunk], size=labels.shape[-2:])
            conf += confusion_matrix(
                labels[a : a + chunk], pred, n_classes=N_CLASSES, n_pred=k
            )
        result.update(report_from_confusion(conf, matching="hungarian"))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of your own images")
    parser.add_argument("--store", type=Path, help="where to write the zarr store")
    parser.add_argument("--n-images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--model", default="vit_small_patch8_224.dino")
    parser.add_argument("--weights", help="local DINO checkpoint")
    parser.add_argument("--pretrained", action="store_true", help="download DINO")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-images", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--k", type=int, default=N_CLASSES)
    parser.add_argument("--quick", action="store_true", help="a small fast run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.resolution, args.chunk_images = 48, 48, 8
        if not (args.weights or args.pretrained):
            args.model = "vit_tiny_patch16_224"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.images is not None:
            paths, labels = list_images(args.images), None
        else:
            paths, labels = write_scenes(tmp / "scenes", args.n_images, args.resolution)
        store_path = args.store or tmp / "features.zarr"
        featurizer = make_featurizer(args, tmp)

        cluster, client = start_cluster(args.workers)
        with cluster, client:
            n_workers = len(client.scheduler_info()["workers"])
            start = time.perf_counter()
            store = featurizer.transform_to_store(
                paths, store_path, chunk_images=args.chunk_images, client=client
            )
            t_feat = time.perf_counter() - start
            worker_rss = client.run(peak_rss_mib)
        n, c, h, w = store.shape
        print(
            f"featurized {n} images ({n * h * w} tokens of {c} channels) on "
            f"{n_workers} Dask workers in {t_feat:.1f} s: {n / t_feat:.1f} images/s, "
            f"{n * h * w / t_feat:.0f} tokens/s -> {store_path} "
            f"({store.storage_dtype}, chunks of {args.chunk_images} images)"
        )
        result = fit_and_evaluate(store, labels, tmp, args.dim, args.k)
        tokens = result["tokens"]
        print(
            f"TorchPCA(dim={args.dim}).fit(store): {result['pca_s']:.2f} s "
            f"({1e9 * result['pca_s'] / tokens:.0f} ns/token); "
            f"KMeansProbe(k={args.k}).fit(codes memmap): {result['kmeans_s']:.2f} s "
            f"({1e9 * result['kmeans_s'] / tokens:.0f} ns/token)"
        )
        if labels is not None:
            print(
                f"unsupervised mIoU {100 * result['miou']:.1f}, accuracy "
                f"{100 * result['accuracy']:.1f} (clusters Hungarian-matched)"
            )
        shown = ", ".join(f"{v:.0f}" for v in worker_rss.values())
        print(
            f"peak RSS: client {peak_rss_mib():.0f} MiB, workers {shown} MiB "
            f"(features as float32: {n * c * h * w * 4 / 2**20:.1f} MiB)"
        )
        if torch.cuda.is_available():
            print(
                f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
            )


if __name__ == "__main__":
    main()
