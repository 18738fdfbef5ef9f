"""A faster pass 2 for whole-tensor bf16 on CPUs where oneDNN runs bf16 GEMMs (AVX-512).

There `out.addmm_(b @ I, beta=ca, alpha=cb)`, with `out` holding a, computes ca * a + cb * b in
float32 and rounds once, reading a and b once each, which the core's float32 chunk loop (two
conversions, two blends and a cast per chunk) cannot match. b @ I is exact (one product by 1, the
rest exact zeros), so each element is the core's float32 expression whatever the GEMM's blocking
or thread count: the same bits (tests/test_kernels.py checks it), except that oneDNN flushes bf16
subnormals to zero (README, Limits). Elsewhere torch's generic bf16 GEMM is exact but slow, so the
core runs. A drop (without rescale) then puts the dropped elements back from a, bit for bit.

`select` is the one entry point; the kernel core (kernels.py) calls nothing else from here, and this
module imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

BLEND_MIN = 1 << 16  # below this the core's chunk loop is as fast
EYE = 16  # the GEMM's width: out[:, j] = beta * a[:, j] + alpha * (b @ I)[:, j]
RESTORE_DRAW = 1 << 18  # keep-mask elements one restore worker handles at once

MaskSource = Callable[[int, int], np.ndarray]  # (start, size) -> keep, as in the core
Pass2 = Callable[[torch.Tensor, float, float, MaskSource | None], None]  # (out, ca, cb, mask)


def select(a2: torch.Tensor, b2: torch.Tensor, *, t: float, drop_rate: float, rescale: bool) -> Pass2 | None:
    """The pass 2 for these [rows, cols] inputs when this CPU has a faster one with the core's bits,
    else None. Rescale stays in the core: folded into the blend's coefficients it overflows float32
    for large weights at high drop rates."""
    if t == 1 or (drop_rate > 0 and rescale) or not one_gemm_usable(a2, b2):
        return None

    def one_gemm(out: torch.Tensor, ca: float, cb: float, mask: MaskSource | None) -> None:
        gemm_blend(out.view(-1), a2, b2, ca, cb)
        if drop_rate > 0:
            assert mask is not None
            restore_dropped(out.view(-1), a2.view(-1), mask)

    return one_gemm


def one_gemm_usable(a2: torch.Tensor, b2: torch.Tensor) -> bool:
    """Whole-tensor (one row) contiguous bf16 on a CPU where oneDNN runs bf16 GEMMs."""
    return (
        a2.device.type == b2.device.type == "cpu"
        and a2.dtype == b2.dtype == torch.bfloat16
        and a2.shape[0] == 1
        and a2.numel() >= BLEND_MIN
        and a2.is_contiguous()
        and b2.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
    )


def gemm_blend(out: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, ca: float, cb: float) -> None:
    """out = ca * a + cb * b in float32, rounded once to bf16, as one GEMM against a 16x16 identity
    (the last n % 16 elements elementwise); `out` is 1-D and contiguous."""
    n = a2.numel()
    body = n - n % EYE
    out.copy_(a2.view(-1))
    eye = torch.eye(EYE, dtype=torch.bfloat16)
    out[:body].view(-1, EYE).addmm_(b2.view(-1)[:body].view(-1, EYE), eye, beta=ca, alpha=cb)
    if body < n:
        tail = slice(body, n)
        out[tail] = (ca * a2.view(-1)[tail].float() + cb * b2.view(-1)[tail].float()).to(torch.bfloat16)


def restore_dropped(out: torch.Tensor, a: torch.Tensor, mask: MaskSource) -> None:
    """Dropped elements of the bf16 `out` back to `a`, bit for bit: out = keep ? out : a as the
    core's bitwise select, a ^ ((a ^ out) & select), on int16 bits. Two numpy workers each draw a
    slice of the keep mask and select; no torch op runs meanwhile, so no OpenMP thread competes."""
    o, x = out.view(torch.int16).numpy(), a.view(torch.int16).numpy()

    def restore(start: int) -> None:
        os_, xs = o[start : start + RESTORE_DRAW], x[start : start + RESTORE_DRAW]
        select = mask(start, os_.size).astype(np.int16)
        np.negative(select, out=select)  # keep: all ones, drop: 0
        z = np.bitwise_xor(os_, xs)  # np.copyto(where=) is ~8x slower
        np.bitwise_and(z, select, out=z)
        np.bitwise_xor(z, xs, out=os_)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(restore, range(0, o.size, RESTORE_DRAW)))
