"""crf_refine (torch, in-process) vs pydensecrf: dense CRF time per image.

STEGO's evaluation setting: 320 x 320 images, 27 classes, 10 mean-field
iterations, Gaussian sxy 1 compat 3, bilateral sxy 67 srgb 3 compat 4.
Images are synthetic scenes (``make_scenes``) with noisy softmax scores.

skstego runs ``crf_refine(method="approx")`` on the whole batch (one call);
pydensecrf runs STEGO's ``dense_crf`` (``unary_from_softmax``, Gaussian and
bilateral pairwise terms, BGR image) image by image, as each worker of
STEGO's pool does. Reported per image: wall-clock time (best of
``--repeat`` after a warm-up) and CPU time of this process (pydensecrf is
single-threaded; torch uses ``--threads`` threads). Ratio = pydensecrf /
skstego (above 1: skstego is faster). When pydensecrf is not installed
(``pip install pydensecrf2`` builds it), the lattice is compared with
skstego's exact method at ``--exact-size`` instead, and the output says so.

    python benchmarks/bench_crf.py --size 320 --classes 27 --images 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from skstego._device import resolve_device
from skstego.datasets import make_scenes
from skstego.postprocess import crf_refine


def best_time(fn, repeat: int, sync: bool = False) -> tuple[float, float]:
    """Best wall-clock and CPU seconds of ``fn()`` over ``repeat`` runs."""
    fn()  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def scenes(n: int, size: int, n_classes: int, seed: int):
    images, labels = make_scenes(n, size=size, n_classes=n_classes, random_state=seed)
    rng = np.random.default_rng(seed)
    onehot = np.eye(n_classes, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    logits = 2.0 * onehot + rng.standard_normal(onehot.shape, dtype=np.float32)
    proba = np.exp(logits - logits.max(1, keepdims=True))
    return images, proba / proba.sum(1, keepdims=True)


def pydensecrf_refine(dcrf, utils, images, proba, n_iter: int) -> np.ndarray:
    """STEGO's ``dense_crf``, one image at a time."""
    out = np.empty_like(proba)
    n_classes, h, w = proba.shape[1:]
    for i, (image, p) in enumerate(zip(images, proba, strict=True)):
        crf = dcrf.DenseCRF2D(w, h, n_classes)
        crf.setUnaryEnergy(np.ascontiguousarray(utils.unary_from_softmax(p)))
        crf.addPairwiseGaussian(sxy=1, compat=3)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
        out[i] = np.array(crf.inference(n_iter)).reshape(n_classes, h, w)
    return out


def report(name: str, times: tuple[float, float], n: int) -> None:
    wall, cpu = times
    print(f"  {name:<34} {1e3 * wall / n:9.1f} ms/image wall {1e3 * cpu / n:9.1f} cpu")


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    diff = np.abs(a - b)
    same = (a.argmax(1) == b.argmax(1)).mean()
    return (
        f"max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, labels agree {same:.4%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--iter", type=int, default=10)
    parser.add_argument("--exact-size", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = device.type == "cuda"
    n = args.images
    images, proba = scenes(n, args.size, args.classes, args.seed)
    print(
        f"{n} images {args.size}x{args.size}, K={args.classes}, {args.iter} "
        f"iterations; skstego on {device}, torch threads {torch.get_num_threads()}"
    )

    def ours(method, imgs=images, p=proba):
        if device.type == "cuda":  # data already on the device, as a pipeline has it
            t_imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(device)
            t_p = torch.from_numpy(p).to(device)
            return lambda: crf_refine(
                t_imgs, t_p, n_iter=args.iter, method=method, device=device
            )
        return lambda: crf_refine(
            imgs, p, n_iter=args.iter, method=method, device=device
        )

    t_ours = best_time(ours("approx"), args.repeat, sync)
    report("skstego crf_refine approx", t_ours, n)
    refined = crf_refine(
        images, proba, n_iter=args.iter, method="approx", device=device
    )
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    except ImportError:
        dcrf = None
    if dcrf is not None:
        t_peer = best_time(
            lambda: pydensecrf_refine(dcrf, utils, images, proba, args.iter),
            args.repeat,
        )
        report("pydensecrf (STEGO dense_crf)", t_peer, n)
        print(
            f"  ratio pydensecrf / skstego: wall {t_peer[0] / t_ours[0]:.2f}, "
            f"cpu {t_peer[1] / t_ours[1]:.2f}"
        )
        peer = pydensecrf_refine(dcrf, utils, images, proba, args.iter)
        print(f"  skstego approx vs pydensecrf: {agreement(refined, peer)}")
        return
    size = args.exact_size
    print(
        f"pydensecrf is not installed: comparing with skstego's exact method at "
        f"{size}x{size} instead"
    )
    small_images, small_proba = scenes(n, size, args.classes, args.seed)
    t_small = best_time(ours("approx", small_images, small_proba), args.repeat, sync)
    t_exact = best_time(ours("exact", small_images, small_proba), args.repeat, sync)
    report(f"skstego approx {size}x{size}", t_small, n)
    report(f"skstego exact {size}x{size}", t_exact, n)
    print(
        f"  ratio exact / approx: wall {t_exact[0] / t_small[0]:.2f}, "
        f"cpu {t_exact[1] / t_small[1]:.2f}"
    )
    exact = crf_refine(
        small_images, small_proba, n_iter=args.iter, method="exact", device=device
    )
    approx = crf_refine(
        small_images, small_proba, n_iter=args.iter, method="approx", device=device
    )
    print(f"  approx vs exact: {agreement(approx, exact)}")


if __name__ == "__main__":
    main()
