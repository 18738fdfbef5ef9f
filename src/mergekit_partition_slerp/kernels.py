"""Slerp + drop of one tensor pair, chunked (DESIGN §3.5); the kernel core.

    m = a                          when t == 0    (bit-exact)
    m = b                          when t == 1    (bit-exact)
    m = slerp(t, a, b)             otherwise: the whole tensor, or each row of dim 0 (rowwise)
    m = where(keep, m, a)          drop;  rescale: where(keep, a + (m - a) / (1 - p), a)

in float32 (float64 for float64 inputs), rounded to the inputs' dtype once. Two passes over a
[rows, cols] view (the whole tensor is one row), a CHUNK of elements at a time, so scratch stays a
few CHUNK-sized buffers whatever the tensor size:

  1. per row |a|^2, |b|^2 and a.b: float32 partial sums over blocks of BLOCK elements, added up in
     float64 in a fixed order. One float32 sum over tens of millions of elements drifts enough to
     read cos 0.990 as 1.0002 and turn a slerp into a lerp.
  2. per chunk: ca * a + cb * b, then the drop as a bitwise select (dropped elements keep a's
     exact bits, -0.0 included), then one rounding to the dtype.

Every reduction runs over fixed blocks combined in a fixed order and pass 2 is elementwise, so the
bits do not depend on the thread count. Where a CPU has a faster pass 2 giving the same bits,
`kernels_fastpath.select` hands it over; that function is the only seam.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mergekit_partition_slerp import kernels_fastpath

BLOCK = 4096  # elements per float32 partial sum
# elements per chunk (8 MiB of float32 per scratch buffer): big enough that per-op overhead (Python,
# OpenMP fork/join) stays small next to the memory traffic, small enough to bound the scratch
CHUNK = 512 * BLOCK
DOT_THRESHOLD = 0.9995
EPS = 1e-8
MASK_DRAW = 1 << 18  # keep-mask elements one worker thread draws at once

MaskSource = Callable[[int, int], np.ndarray]  # (start, size) -> keep, row-major elements
Piece = tuple[int, int, int, int]  # rows [r0, r1) x columns [c0, c1), at most CHUNK elements


class NonFiniteError(ValueError):
    """A NaN or Inf in an input; `which` is 0 for the base, 1 for the donor."""

    def __init__(self, which: int):
        super().__init__("non-finite value")
        self.which = which


def merge(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    drop_rate: float = 0.0,
    rescale: bool = False,
    rowwise: bool = False,
    mask: MaskSource | None = None,
) -> torch.Tensor:
    """slerp(t, a, b), then the dropped elements back to `a` (DESIGN §3.5).

    `mask(start, size)` returns elements [start, start + size) of the keep mask; required when
    drop_rate > 0. Inputs are never modified. Raises NonFiniteError when an input the result
    depends on holds a NaN or Inf.
    """
    if t == 0 or (t == 1 and drop_rate == 0):  # no arithmetic keeps every bit (-0.0 included)
        src, which = (a, 0) if t == 0 else (b, 1)
        if not check_finite(src):
            raise NonFiniteError(which)
        return src
    if drop_rate > 0 and mask is None:
        raise ValueError("drop_rate > 0 needs a mask source")
    rows = a.shape[0] if rowwise and a.ndim >= 2 and a.numel() else 1
    a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
    if t == 1:  # drop on the donor: an exact select, no blend
        for which, x in enumerate((a2, b2)):
            if not check_finite(x):
                raise NonFiniteError(which)
        ca, cb = torch.zeros(rows, dtype=torch.float64), torch.ones(rows, dtype=torch.float64)
    else:
        ca, cb = coefficients(row_stats(a2, b2), t)
    out = torch.empty(a2.shape, dtype=a.dtype)
    fast = kernels_fastpath.select(a2, b2, t=t, drop_rate=drop_rate, rescale=rescale)
    if fast is not None:
        fast(out, float(ca[0]), float(cb[0]), mask)
    else:
        _blend(out, a2, b2, t, ca, cb, drop_rate, rescale, mask)
    return out.view(a.shape)


def row_stats(a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """[3, rows] float64: |a|^2, |b|^2 and a.b of each row of the 2-D a2, b2 (pass 1).

    Raises NonFiniteError for a NaN or Inf in either input: free to detect from the sums.
    """
    work = torch.float64 if a2.dtype == torch.float64 else torch.float32
    if _float32_matmul_is_reduced():
        # oneDNN would run the float32 products in bf16 (torch's float32 matmul precision set to
        # "medium" or "high"); float64 products are never reduced and lose nothing
        work = torch.float64
    sums = _pass1(a2, b2, work)
    if not torch.isfinite(sums).all():
        for which, x in enumerate((a2, b2)):
            if not check_finite(x):
                raise NonFiniteError(which)
        sums = _pass1(a2, b2, torch.float64)  # finite inputs whose squares overflow float32
    return sums


def _pass1(a2: torch.Tensor, b2: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Partials of BLOCK elements (a shorter row is one partial; a longer row is zero-padded to whole
    BLOCKs, and zeros add exactly nothing), one batched [2, L] x [L, 2] product per group of rows;
    bmm splits the batch across threads, never one product. The partials of each row are then summed
    in float64, in order."""
    rows, cols = a2.shape
    if a2.numel() == 0:
        return torch.zeros(3, rows, dtype=torch.float64)
    grams: list[torch.Tensor] = []
    owners: list[np.ndarray] = []  # the row of each partial, non-decreasing
    buf = torch.empty(2, CHUNK, dtype=work)
    for r0, r1, c0, c1 in _pieces(rows, cols):
        width = c1 - c0
        part = min(width, BLOCK)
        stride = -(-width // part) * part  # a row's width padded to whole partials
        per = CHUNK // stride
        for q0 in range(r0, r1, per):
            q1 = min(q0 + per, r1)
            x = buf[:, : (q1 - q0) * stride].view(2, q1 - q0, stride)
            x[0, :, :width].copy_(a2[q0:q1, c0:c1])
            x[1, :, :width].copy_(b2[q0:q1, c0:c1])
            x[:, :, width:].zero_()
            v = x.view(2, -1, part).transpose(0, 1)  # [partials, 2, part]
            grams.append(torch.bmm(v, v.transpose(1, 2)))
            owners.append(np.repeat(np.arange(q0, q1), stride // part))
    g = torch.cat(grams).numpy().astype(np.float64)
    owner = np.concatenate(owners)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    return torch.from_numpy(np.add.reduceat(np.stack((g[:, 0, 0], g[:, 1, 1], g[:, 0, 1])), starts, axis=1))


def coefficients(sums: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (ca, cb) with slerp = ca * a + cb * b, in float64; lerp's (1 - t, t) when a norm is
    below EPS or |cos| above DOT_THRESHOLD."""
    theta, linear = angle(sums)
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return ca, cb


def angle(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the angle between a and b (float64) and whether the kernel lerps there instead
    (a norm below EPS or |cos| above DOT_THRESHOLD; theta is not used there)."""
    aa, bb, ab = sums
    norm_a, norm_b = aa.sqrt(), bb.sqrt()
    linear = (norm_a < EPS) | (norm_b < EPS)
    dot = torch.where(linear, 0.0, ab / (norm_a * norm_b)).clamp(-1, 1)
    linear |= dot.abs() > DOT_THRESHOLD
    return torch.acos(torch.where(linear, 0.0, dot)), linear


def _blend(out, a2, b2, t, ca, cb, drop_rate, rescale, mask) -> None:
    """Pass 2 into `out`, one chunk at a time: blend in the work dtype, drop, round once."""
    rows, cols = a2.shape
    work = torch.float64 if a2.dtype == torch.float64 else torch.float32
    bits = torch.int64 if work == torch.float64 else torch.int32  # same width, for the select
    ca, cb = ca.to(work), cb.to(work)
    ca1, cb1 = float(ca[0]), float(cb[0])  # one row: scalar operands are faster
    x, y = torch.empty(CHUNK, dtype=work), torch.empty(CHUNK, dtype=work)
    z = torch.empty(CHUNK, dtype=bits)
    with ThreadPoolExecutor(max_workers=2) as pool:  # draws the keep masks
        for r0, r1, c0, c1 in _pieces(rows, cols):
            shape = (r1 - r0, c1 - c0)
            n = shape[0] * shape[1]
            xs, ys = x[:n].view(shape), y[:n].view(shape)
            xs.copy_(a2[r0:r1, c0:c1])
            ys.copy_(b2[r0:r1, c0:c1])
            if t == 1:
                pass  # ys keeps the donor's bits, signed zeros included
            elif rows == 1:
                ys.mul_(cb1).add_(xs, alpha=ca1)
            else:
                ys.mul_(cb[r0:r1, None]).addcmul_(xs, ca[r0:r1, None])
            if drop_rate > 0:
                if rescale:
                    ys.sub_(xs).div_(1.0 - drop_rate).add_(xs)
                # ys = keep ? ys : xs, bit for bit: xs ^ ((xs ^ ys) & select)
                select = _select_mask(pool, mask, r0 * cols + c0, n, bits).view(shape)
                xi, yi, zi = xs.view(bits), ys.view(bits), z[:n].view(shape)
                torch.bitwise_xor(xi, yi, out=zi)
                zi.bitwise_and_(select)
                torch.bitwise_xor(zi, xi, out=yi)
            out[r0:r1, c0:c1].copy_(ys)


def _pieces(rows: int, cols: int) -> list[Piece]:
    """The [rows, cols] view cut into pieces of at most CHUNK elements, in row-major order: whole
    rows when a row fits in a chunk, else CHUNK-long segments of one row."""
    if cols == 0:
        return []
    if cols <= CHUNK:
        per = CHUNK // cols
        return [(r, min(r + per, rows), 0, cols) for r in range(0, rows, per)]
    return [(r, r + 1, c, min(c + CHUNK, cols)) for r in range(rows) for c in range(0, cols, CHUNK)]


def _select_mask(pool: ThreadPoolExecutor, mask: MaskSource, start: int, size: int, bits: torch.dtype) -> torch.Tensor:
    """Keep-mask elements [start, start + size) as a bitwise-select mask (keep: all ones, drop: 0),
    drawn on two threads (numpy releases the GIL). Drawing and blending take turns rather than
    overlap: on two cores, workers beside torch's own threads stall its OpenMP barriers."""
    select = np.empty(size, dtype=np.int64 if bits == torch.int64 else np.int32)

    def fill(off: int) -> None:
        k = min(MASK_DRAW, size - off)
        select_bits(mask(start + off, k), select[off : off + k])

    list(pool.map(fill, range(0, size, MASK_DRAW)))
    return torch.from_numpy(select)


def select_bits(keep: np.ndarray, out: np.ndarray) -> None:
    """keep -> all ones, drop -> 0, into the integer array `out`: a bitwise select by this mask is
    exact and much faster than torch.where."""
    out[...] = keep
    np.negative(out, out=out)


def _float32_matmul_is_reduced() -> bool:
    """Whether oneDNN may run float32 matmuls in lower precision: torch's float32 matmul precision
    "high"/"medium", common in GPU scripts, or the fp32_precision properties (matmul > mkldnn >
    global). Only read, never set."""
    try:
        for level in (getattr(torch.backends.mkldnn, "matmul", None), torch.backends.mkldnn, torch.backends):
            value = getattr(level, "fp32_precision", "none")
            if value != "none":
                return value != "ieee"
        return False
    except Exception:  # an API we do not know: assume the worst
        return True


def check_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. A chunk's sum is finite unless the chunk holds a NaN or Inf (or overflows,
    which the exact check then clears): ~10x cheaper than isfinite() on every element."""
    flat = x.reshape(-1)
    step = 4 * CHUNK
    for s in range(0, flat.numel(), step):
        chunk = flat[s : s + step]
        if not torch.isfinite(chunk.sum()) and not torch.isfinite(chunk).all():
            return False
    return True
