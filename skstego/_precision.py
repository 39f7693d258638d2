"""Which reduced precision is fast on a device.

:func:`fast_bf16` is the one rule every estimator follows for
``precision="auto"`` and for bf16 autocast: bfloat16 only on GPUs that
compute it natively; float32 on every CPU.
"""

from __future__ import annotations

import torch

__all__ = ["fast_bf16"]

#: The first CUDA compute capability with native bf16 tensor-core math
#: (Ampere, sm_80).
_BF16_CAPABILITY = (8, 0)


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``precision="auto"`` takes bfloat16 on ``device``.

    True only for CUDA devices of compute capability 8.0 or more (A100,
    the RTX 30/40 series, L4, L40, H100, H200 and later), whose tensor cores
    compute bf16. Older GPUs (V100: 7.0, T4: 7.5, P100: 6.0) have no bf16
    units: PyTorch emulates bf16 there, slower than float32, so estimators
    keep float32. False for the CPU and every other device type. Most CPUs
    emulate bf16 (slower than float32); those that compute it natively
    (AVX512-BF16 or AMX) run a ViT about 1.5x faster in bf16, but "auto"
    keeps float32 there too, so that CPU results do not depend on the CPU
    model; ``precision="bfloat16"`` opts in.

    Reads only device properties (no synchronisation); safe to call at every
    ``fit``.

    Parameters
    ----------
    device : torch.device or str
        A resolved device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...);
        ``"cuda"`` without an index is the current CUDA device.

    Returns
    -------
    bool

    Examples
    --------
    >>> from skstego._precision import fast_bf16
    >>> fast_bf16("cpu")
    False
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= _BF16_CAPABILITY
