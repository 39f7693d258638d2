"""crf_refine against pydensecrf: dense CRF time per image.

STEGO's evaluation setting: 320 x 320 images, 27 classes, 10 mean-field
iterations, Gaussian sxy 1 compat 3, bilateral sxy 67 srgb 3 compat 4.
Images are synthetic scenes (``make_scenes``) with noisy softmax scores.

Contenders, timed in the same run, alternating, best of ``--repeat`` after a
warm-up, each on the whole batch:

* ``skstego auto``: ``crf_refine(images, proba)`` with its defaults on
  ``--device`` (on the CPU with pydensecrf installed, the ``"pydensecrf"``
  backend; on CUDA, the torch lattice on the GPU);
* ``pydensecrf``: STEGO's ``dense_crf`` (``unary_from_softmax``, Gaussian and
  bilateral pairwise terms, BGR image) image by image, as each worker of
  STEGO's pool does, always on the CPU;
* ``skstego torch lattice (cpu)``: ``crf_refine(backend="torch")`` on the
  CPU, batched, with ``--threads`` torch threads (the speed of the torch
  lattice, recorded separately; ``--no-torch`` skips it).

Reported per image: wall-clock time and CPU time of this process
(pydensecrf is single-threaded). Ratio = pydensecrf / skstego (above 1:
skstego is faster). With ``--phases``, the cost of each phase (lattice
construction, one iteration of each kernel) of the torch lattice and of
pydensecrf on one image and one thread, and the time of the gathers a blur
cannot avoid: whether the torch lattice could reach the C++ speed. When
pydensecrf is not installed (``pip install pydensecrf2`` builds it), the
lattice is compared with skstego's exact method at ``--exact-size`` instead,
and the output says so.

    python benchmarks/bench_crf.py --size 320 --classes 27 --images 4
    python benchmarks/bench_crf.py --images 1 --phases --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from skstego import postprocess
from skstego._device import resolve_device
from skstego.datasets import make_scenes
from skstego.postprocess import DenseCRF, crf_refine


def best_time(fn, repeat: int, sync: bool = False) -> tuple[float, float]:
    """Best wall-clock and CPU seconds of ``fn()`` over ``repeat`` runs."""
    return best_times({"fn": fn}, repeat, sync)["fn"]


def best_times(
    fns: dict[str, Callable[[], object]], repeat: int, sync: bool = False
) -> dict[str, tuple[float, float]]:
    """Best wall-clock and CPU seconds of each function, runs alternating.

    Every function is warmed up once, then the functions run in turn
    ``repeat`` times, so that a burst of load on a shared machine hits all
    of them alike.
    """
    for fn in fns.values():
        fn()  # warm-up
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if sync:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


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


def _pydensecrf_modules():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as utils
    except ImportError:
        return None, None
    return dcrf, utils


def measure(
    *,
    size: int = 320,
    classes: int = 27,
    images: int = 4,
    n_iter: int = 10,
    device: str = "cpu",
    repeat: int = 3,
    seed: int = 0,
    torch_lattice: bool = True,
) -> dict:
    """Time skstego's CRF (auto), pydensecrf and the torch lattice on the CPU.

    Returns a dict with the per-image ``(wall, cpu)`` seconds of ``"auto"``,
    ``"pydensecrf"`` (None when not installed) and ``"torch_cpu"`` (None when
    skipped), the backend ``auto`` ran with, the device, the torch threads
    and the agreement of the outputs with pydensecrf's.
    """
    dev = resolve_device(device)
    sync = dev.type == "cuda"
    imgs, proba = scenes(images, size, classes, seed)
    crf = DenseCRF(n_iter, device=dev)
    if dev.type == "cuda":  # data already on the device, as a pipeline has it
        t_imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(dev)
        t_proba = torch.from_numpy(proba).to(dev)

        def auto():
            return crf.refine(t_imgs, t_proba)
    else:

        def auto():
            return crf.refine(imgs, proba)

    fns = {"auto": auto}
    dcrf, utils = _pydensecrf_modules()
    if dcrf is not None:
        fns["pydensecrf"] = lambda: pydensecrf_refine(dcrf, utils, imgs, proba, n_iter)
    if torch_lattice:
        fns["torch_cpu"] = lambda: crf_refine(
            imgs, proba, n_iter=n_iter, backend="torch", method="approx", device="cpu"
        )
    times = best_times(fns, repeat, sync)
    outputs = {name: fn() for name, fn in fns.items()}
    if sync:
        outputs["auto"] = outputs["auto"].cpu().numpy()
    result = {
        "images": images,
        "size": size,
        "classes": classes,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "backend": crf.backend_,
        "pydensecrf": None,
        "torch_cpu": None,
    }
    for name, (wall, cpu) in times.items():
        result[name] = (wall / images, cpu / images)
    if dcrf is not None:
        peer = outputs["pydensecrf"]
        result["agree_auto"] = agreement(outputs["auto"], peer)
        if torch_lattice:
            result["agree_torch"] = agreement(outputs["torch_cpu"], peer)
    return result


def phases(size: int, classes: int, n_iter: int, seed: int) -> None:
    """Cost of each phase of the torch lattice and of pydensecrf, one image."""
    imgs, proba = scenes(1, size, classes, seed)

    def cpu_best(fn, repeat=3):
        fn()
        best = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        return best

    colours = torch.from_numpy(imgs).float()
    pos, col = postprocess._features(colours)
    bilateral = postprocess._LatticeBilateral(pos, col, 67.0, 3.0)
    lattice = bilateral.lattice
    m = lattice.splat.shape[0]
    gauss = postprocess._GaussianKernel((size, size), 1.0, "cpu")
    Q = torch.from_numpy(proba)
    V = torch.rand(size * size, classes)
    values = lattice.splat @ V
    index = torch.randint(0, m, (2 * m,))

    def blur():
        out = values
        for b in lattice.blur:
            out = b @ out
        return out

    rows = {
        "torch: lattice construction": cpu_best(
            lambda: postprocess._LatticeBilateral(pos, col, 67.0, 3.0)
        ),
        "torch: bilateral, one iteration": cpu_best(lambda: bilateral(Q)),
        "torch:   splat": cpu_best(lambda: lattice.splat @ V),
        "torch:   blur (6 directions)": cpu_best(blur),
        "torch:   slice": cpu_best(lambda: lattice.slice @ values),
        "torch:   6 gathers of 2m rows (bound)": 6
        * cpu_best(lambda: values.index_select(0, index)),
        "torch: Gaussian, one iteration": cpu_best(lambda: gauss(Q)),
    }
    dcrf, utils = _pydensecrf_modules()
    if dcrf is not None:

        def run(iters):
            return lambda: pydensecrf_refine(dcrf, utils, imgs, proba, iters)

        build = cpu_best(run(0))
        rows["pydensecrf: construction (0 iterations)"] = build
        rows["pydensecrf: one iteration, both kernels"] = (
            cpu_best(run(n_iter)) - build
        ) / n_iter
    print(
        f"phases, one {size}x{size} image, K={classes}, {m:,} lattice points, "
        f"{torch.get_num_threads()} torch thread(s), CPU seconds:"
    )
    for name, seconds in rows.items():
        print(f"  {name:<42} {1e3 * seconds:8.1f} ms")


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
    parser.add_argument(
        "--no-torch",
        action="store_true",
        help="skip the torch lattice on the CPU",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time each phase of the torch lattice and of pydensecrf",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.images
    print(
        f"{n} images {args.size}x{args.size}, K={args.classes}, {args.iter} "
        f"iterations; skstego on {device}, torch threads {torch.get_num_threads()}"
    )
    if args.phases:
        phases(args.size, args.classes, args.iter, args.seed)
    if _pydensecrf_modules()[0] is not None:
        r = measure(
            size=args.size,
            classes=args.classes,
            images=n,
            n_iter=args.iter,
            device=args.device,
            repeat=args.repeat,
            seed=args.seed,
            torch_lattice=not args.no_torch,
        )
        report(f"skstego auto ({r['backend']}, {r['device']})", r["auto"], 1)
        report("pydensecrf (STEGO dense_crf)", r["pydensecrf"], 1)
        peer = r["pydensecrf"]
        print(
            f"  ratio pydensecrf / skstego auto: wall {peer[0] / r['auto'][0]:.2f}, "
            f"cpu {peer[1] / r['auto'][1]:.2f}"
        )
        print(f"  skstego auto vs pydensecrf: {r['agree_auto']}")
        if r["torch_cpu"] is not None:
            report(
                f"skstego torch lattice (cpu, {r['threads']} thr)", r["torch_cpu"], 1
            )
            print(
                "  ratio pydensecrf / torch lattice: wall "
                f"{peer[0] / r['torch_cpu'][0]:.2f}, "
                f"cpu {peer[1] / r['torch_cpu'][1]:.2f}"
            )
            print(f"  torch lattice vs pydensecrf: {r['agree_torch']}")
        return
    sync = device.type == "cuda"
    size = args.exact_size
    print(
        f"pydensecrf is not installed: comparing with skstego's exact method at "
        f"{size}x{size} instead"
    )
    small_images, small_proba = scenes(n, size, args.classes, args.seed)

    def ours(method):
        return lambda: crf_refine(
            small_images, small_proba, n_iter=args.iter, method=method, device=device
        )

    t = best_times(
        {"approx": ours("approx"), "exact": ours("exact")}, args.repeat, sync
    )
    report(f"skstego approx {size}x{size}", t["approx"], n)
    report(f"skstego exact {size}x{size}", t["exact"], n)
    print(
        f"  ratio exact / approx: wall {t['exact'][0] / t['approx'][0]:.2f}, "
        f"cpu {t['exact'][1] / t['approx'][1]:.2f}"
    )
    print(f"  approx vs exact: {agreement(ours('approx')(), ours('exact')())}")


if __name__ == "__main__":
    main()
