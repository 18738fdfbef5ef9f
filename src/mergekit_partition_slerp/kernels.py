"""Chunked slerp + drop (DESIGN §3.5): torch arithmetic, numpy masks, bounded scratch.

Two passes over [rows, cols] (whole tensor: one row of numel):
  1. per-row |a|^2, |b|^2, a.b: float32 partials over blocks of BLOCK
     elements (or one short row), summed in float64. Plain float32
     accumulation over tens of millions of elements drifts enough to turn a
     slerp into a lerp; 4096-element partials stay within ~1e-7.
  2. out = ca * a + cb * b per chunk, drop applied, rounded once to the dtype.
     Whole-tensor bf16 takes one oneDNN GEMM instead (`_blend_bf16`): the
     same float32 expression, a and b read once each; drop (without
     rescale) then puts the dropped elements back from a (`_restore_dropped`).
Scratch is a few CHUNK-sized buffers (one chunk of drop mask included),
whatever the tensor size. Outputs come from `_OutputPool`, which reuses the
memory of outputs nobody holds any more (no first-touch page faults).

Determinism: pass 1 is one batched matmul per chunk; bmm splits the batch
across threads, never a single [2, L] x [L, 2] product, and the partials are
added in a fixed order. Pass 2 is elementwise, or the GEMM against an
identity, which is exact per element. So the bits do not depend on the
thread count (tests/test_kernels.py checks 1 vs 2 threads, on both paths).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

BLOCK = 4096  # elements per float32 partial sum; partials add up in float64
# elements per chunk (8 MiB of float32 per scratch buffer): big enough that
# per-op overhead (Python + OpenMP fork/join) stays small next to the memory
# traffic, small enough for ~24 MiB of scratch whatever the tensor size
CHUNK = 512 * BLOCK
DOT_THRESHOLD = 0.9995
EPS = 1e-8

MaskSource = Callable[[int, int], np.ndarray]  # (start, size) -> keep
MASK_DRAW = 1 << 18  # raw 64-bit draws one worker holds at once


class NonFiniteError(ValueError):
    """A NaN or Inf in an input; `which` is 0 for the base, 1 for the donor."""

    def __init__(self, which: int):
        super().__init__("non-finite value")
        self.which = which


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(x: torch.Tensor, rowwise: bool) -> Tuple[int, int]:
    rows = x.shape[0] if rowwise and x.ndim >= 2 and x.numel() else 1
    return rows, (x.numel() // rows if rows else 0)


def _chunks(rows: int, cols: int) -> List[Tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) pieces in row-major order, <= CHUNK elements."""
    if cols == 0:
        return []
    if cols <= CHUNK:
        per = CHUNK // cols
        return [(r, min(r + per, rows), 0, cols) for r in range(0, rows, per)]
    return [(r, r + 1, c, min(c + CHUNK, cols)) for r in range(rows) for c in range(0, cols, CHUNK)]


# oneDNN's global on/off flag, which _ieee_matmul may switch off while a
# reduced-precision knob is set; every read or switch goes through this lock
# so that concurrent merges never see each other's switch.
_ONEDNN_FLAG = threading.RLock()


def _reduced_fp32_matmul() -> bool:
    """Whether oneDNN may run float32 matmuls in lower precision: set by
    torch.set_float32_matmul_precision("high"/"medium") -- common in GPU
    scripts -- or the fp32_precision properties (matmul > mkldnn > global)."""
    try:
        for level in (torch.backends.mkldnn.matmul, torch.backends.mkldnn, torch.backends):
            value = getattr(level, "fp32_precision", "none")
            if value != "none":
                return value != "ieee"
        return False
    except Exception:  # an API we do not know: assume the worst
        return True


@contextlib.contextmanager
def _ieee_matmul() -> Iterator[None]:
    """float32 bmm at full precision. With a reduced-precision knob set,
    oneDNN runs float32 matmuls in bf16 and the norms of float32/float16
    weights drift by ~1e-5 (and every output's bits follow the knob); MKL's
    sgemm, used while oneDNN is off, ignores the knob."""
    if not _reduced_fp32_matmul():
        yield
        return
    with _ONEDNN_FLAG:
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before


def _onednn_enabled() -> bool:
    with _ONEDNN_FLAG:
        return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _stats(a2, b2, rows, cols, pieces, wd):
    """Per-row (|a|^2, |b|^2, a.b) in float64.

    float32 (wd) partials go into one array, one bmm per piece: a row of at
    most BLOCK elements is one partial; longer rows are laid out zero-padded
    to whole BLOCKs (zeros add exactly nothing), one partial per BLOCK. The
    partials are summed per row in float64 at the end, in a fixed order."""
    if not pieces:  # an empty tensor
        return torch.zeros(3, rows, dtype=torch.float64)
    plan = []  # (r0, r1, c0, c1, row stride in buf); each a few rows or one row's segment
    owners = []  # rows of the partials, non-decreasing
    for r0, r1, c0, c1 in pieces:
        w = c1 - c0
        stride = w if w <= BLOCK else -(-w // BLOCK) * BLOCK
        per = CHUNK // stride
        for q0 in range(r0, r1, per):
            q1 = min(q0 + per, r1)
            plan.append((q0, q1, c0, c1, stride))
            owners.append(np.repeat(np.arange(q0, q1), stride // min(w, BLOCK)))
    owner = np.concatenate(owners)
    grams = torch.empty(len(owner), 2, 2, dtype=wd)
    buf = torch.empty(2, CHUNK, dtype=wd)
    at = 0
    with _ieee_matmul():
        for r0, r1, c0, c1, stride in plan:
            k, w = r1 - r0, c1 - c0
            rows_ = buf[:, : k * stride].view(2, k, stride)
            rows_[0, :, :w].copy_(a2[r0:r1, c0:c1])
            rows_[1, :, :w].copy_(b2[r0:r1, c0:c1])
            rows_[:, :, w:].zero_()
            m = k * stride // min(w, BLOCK)
            v = rows_.view(2, m, -1).transpose(0, 1)  # [m, 2, L]
            torch.bmm(v, v.transpose(1, 2), out=grams[at : at + m])
            at += m
    g = grams.numpy().astype(np.float64)
    parts = np.stack((g[:, 0, 0], g[:, 1, 1], g[:, 0, 1]))
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    return torch.from_numpy(np.add.reduceat(parts, starts, axis=1))


def _coefficients(sums: torch.Tensor, t: float) -> Tuple[torch.Tensor, torch.Tensor]:
    aa, bb, ab = sums
    na, nb = aa.sqrt(), bb.sqrt()
    linear = (na < EPS) | (nb < EPS)
    dot = torch.where(linear, 0.0, ab / (na * nb)).clamp(-1, 1)
    linear |= dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return ca, cb


def _select_bits(keep: np.ndarray, out: np.ndarray) -> None:
    """keep -> all ones, drop -> 0, into the integer array `out`: the mask of
    a bitwise select, which is exact and much faster than torch.where."""
    out[...] = keep
    np.negative(out, out=out)


class _MaskBatches:
    """Draw each chunk's keep mask on two worker threads (numpy releases the
    GIL), then hand it to pass 2.

    Drawing and arithmetic take turns instead of overlapping: on two cores,
    mask workers running beside torch's own two threads stall its OpenMP
    barriers, which measured slower. One chunk of mask is alive at a time.
    """

    def __init__(self, mask: MaskSource, spans: List[Tuple[int, int]], wd: torch.dtype):
        self.mask, self.spans = mask, spans
        self.int_type = np.int64 if wd == torch.float64 else np.int32
        self.pool = ThreadPoolExecutor(max_workers=2)

    def _chunk(self, start: int, size: int) -> torch.Tensor:
        select = np.empty(size, dtype=self.int_type)

        def fill(off: int) -> None:
            k = min(MASK_DRAW, size - off)
            _select_bits(self.mask(start + off, k), select[off : off + k])

        list(self.pool.map(fill, range(0, size, MASK_DRAW)))
        return torch.from_numpy(select)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start, size in self.spans:
            yield self._chunk(start, size)

    def close(self):
        self.pool.shutdown(wait=True)


BLEND_MIN = 1 << 16  # below this the fp32 chunk loop is as fast
_EYE = 16  # the blend's GEMM width: out[:, j] = beta * a[:, j] + alpha * (b @ I)[:, j]


class _OutputPool:
    """Memory for merged tensors, reused once nobody holds the tensor made
    from it. A fresh 112 MiB output costs ~28k first-touch page faults (20-25
    ms here, a third of the merge); a reused one none. Memory in use belongs
    to its tensor alone. Of the released memory the pool keeps the latest
    buffer and, within IDLE_BYTES, the ones before it; the rest is freed."""

    IDLE_BYTES = 256 << 20

    def __init__(self) -> None:
        self.idle: List[torch.Tensor] = []  # released uint8 buffers, oldest first
        self.lock = threading.Lock()
        # releases arrive from weakref finalizers, possibly while this very
        # thread holds the lock (a garbage collection inside empty()): they go
        # through a queue whose put() is safe there, then _tidy() files them
        self.returned: "queue.SimpleQueue[torch.Tensor]" = queue.SimpleQueue()

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            self._file_returned()
            # the most recently released match: likeliest still in cache
            match = [i for i, buf in enumerate(self.idle) if buf.numel() == nbytes]
            buf = self.idle.pop(match[-1]) if match else None
        self._tidy()
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        # A numpy view stands between the buffer and the tensor: when the last
        # tensor (or view of it) using this memory dies, the view dies, and
        # its finalizer hands the buffer back.
        view = buf.numpy().view()
        weakref.finalize(view, self._release, buf).atexit = False
        return torch.from_numpy(view).view(dtype).view(shape)

    def _release(self, buf: torch.Tensor) -> None:
        self.returned.put(buf)
        self._tidy()

    def _tidy(self) -> None:
        # if the lock is held, its holder files the returns on its way out
        while not self.returned.empty() and self.lock.acquire(blocking=False):
            try:
                self._file_returned()
            finally:
                self.lock.release()

    def _file_returned(self) -> None:
        """Returned buffers into `idle`, then trim it (lock held)."""
        while not self.returned.empty():
            self.idle.append(self.returned.get())
        keep, total = [], 0
        for buf in reversed(self.idle):
            if not keep or total + buf.numel() <= self.IDLE_BYTES:
                keep.append(buf)
                total += buf.numel()
        self.idle = keep[::-1]


_POOL = _OutputPool()


def _one_gemm_blend(a2: torch.Tensor, b2: torch.Tensor) -> bool:
    """Whole-tensor bf16 on a CPU where oneDNN runs bf16 GEMMs (AVX-512):
    there `addmm_` computes beta * out + alpha * (b @ I) in float32 and rounds
    once, reading a and b once each, which no float32 chunk loop matches
    (two conversions, two blends and a cast per chunk). Elsewhere torch's
    generic bf16 GEMM is exact but slow, so the chunk loop runs instead."""
    return (
        a2.device.type == b2.device.type == "cpu"
        and a2.dtype == b2.dtype == torch.bfloat16
        and a2.shape[0] == 1
        and a2.numel() >= BLEND_MIN
        and a2.is_contiguous()
        and b2.is_contiguous()
        and _onednn_enabled()
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
    )


def _blend_bf16(a2: torch.Tensor, b2: torch.Tensor, ca: float, cb: float) -> torch.Tensor:
    """ca * a + cb * b in float32, rounded once to bf16. b @ I is exact (one
    product by 1, the rest exact zeros), so each element is one float32
    expression whatever the GEMM's blocking or thread count."""
    n = a2.numel()
    body = n - n % _EYE
    out = _POOL.empty((n,), a2.dtype)
    out.copy_(a2.view(-1))
    eye = torch.eye(_EYE, dtype=torch.bfloat16)
    # with a precision knob set, another thread's pass 1 may switch oneDNN
    # off; the lock keeps this GEMM on oneDNN (the path _one_gemm_blend chose)
    with _ONEDNN_FLAG if _reduced_fp32_matmul() else contextlib.nullcontext():
        out[:body].view(-1, _EYE).addmm_(b2.view(-1)[:body].view(-1, _EYE), eye, beta=ca, alpha=cb)
    if body < n:  # the last n % 16 elements
        tail = slice(body, n)
        out[tail] = (ca * a2.view(-1)[tail].float() + cb * b2.view(-1)[tail].float()).to(torch.bfloat16)
    return out


def check_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. A chunk's sum is finite unless the chunk holds a
    NaN/Inf (or overflows, which the exact check then clears): ~10x cheaper
    than isfinite() on every element."""
    flat = x.reshape(-1)
    step = 4 * CHUNK
    for s in range(0, flat.numel(), step):
        chunk = flat[s : s + step]
        if not torch.isfinite(chunk.sum()) and not torch.isfinite(chunk).all():
            return False
    return True


def merge(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    drop_rate: float = 0.0,
    rescale: bool = False,
    rowwise: bool = False,
    mask: Optional[MaskSource] = None,
) -> torch.Tensor:
    """slerp(t, a, b), then dropped elements back to `a` (DESIGN §3.5).

    `mask(start, size)` returns elements [start, start + size) of the keep
    mask (row-major); required when drop_rate > 0. Inputs are never modified. Raises
    NonFiniteError when an input the result depends on holds NaN or Inf.
    """
    if t == 0 or (t == 1 and drop_rate == 0):
        src, which = (a, 0) if t == 0 else (b, 1)
        if not check_finite(src):
            raise NonFiniteError(which)
        return src
    wd = _work_dtype(a.dtype)
    rows, cols = _layout(a, rowwise)
    a2, b2 = a.reshape(rows, cols), b.reshape(rows, cols)
    pieces = _chunks(rows, cols)
    if drop_rate > 0 and mask is None:
        raise ValueError("drop_rate > 0 needs a mask source")
    # rescale stays in the chunk loop: folded into the blend's coefficients it
    # overflows float32 for large weights at high drop rates
    one_gemm = t != 1 and not (drop_rate > 0 and rescale) and _one_gemm_blend(a2, b2)
    if t == 1:
        ca = torch.zeros(rows, dtype=torch.float64)
        cb = torch.ones(rows, dtype=torch.float64)
        for which, x in enumerate((a2, b2)):
            if not check_finite(x):
                raise NonFiniteError(which)
    else:
        sums = _stats(a2, b2, rows, cols, pieces, wd)
        if not torch.isfinite(sums).all():
            for which, x in enumerate((a2, b2)):
                if not check_finite(x):
                    raise NonFiniteError(which)
            # finite but huge (squares overflow float32): redo in float64
            sums = _stats(a2, b2, rows, cols, pieces, torch.float64)
        ca, cb = _coefficients(sums, t)
    if one_gemm:
        out = _blend_bf16(a2, b2, float(ca[0]), float(cb[0]))
        if drop_rate > 0:
            _restore_dropped(out, a2.view(-1), mask)
        return out.view(a.shape)
    masks: Iterable = [None] * len(pieces)
    if drop_rate > 0:
        masks = _MaskBatches(mask, [(r0 * cols + c0, (r1 - r0) * (c1 - c0)) for r0, r1, c0, c1 in pieces], wd)
    try:
        return _chunk_loop(a, a2, b2, t, rows, cols, pieces, masks, wd, ca, cb, drop_rate, rescale)
    finally:
        if isinstance(masks, _MaskBatches):
            masks.close()


def _restore_dropped(out: torch.Tensor, a: torch.Tensor, mask: MaskSource) -> None:
    """Dropped elements of the bf16 `out` back to `a`, bit for bit. Two numpy
    workers each draw a slice of the pinned mask and copy `a` in where it
    drops; no torch op runs meanwhile, so no OpenMP thread competes with them."""
    o, x = out.view(torch.int16).numpy(), a.view(torch.int16).numpy()

    def restore(start: int) -> None:
        os_, xs = o[start : start + MASK_DRAW], x[start : start + MASK_DRAW]
        select = np.empty(os_.size, dtype=np.int16)
        _select_bits(mask(start, os_.size), select)
        # os_ = keep ? os_ : xs, as in the chunk loop (np.copyto(where=) is ~8x slower)
        z = np.bitwise_xor(os_, xs)
        np.bitwise_and(z, select, out=z)
        np.bitwise_xor(z, xs, out=os_)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(restore, range(0, o.size, MASK_DRAW)))


def _chunk_loop(a, a2, b2, t, rows, cols, pieces, masks, wd, ca, cb, drop_rate, rescale):
    ca, cb = ca.to(wd), cb.to(wd)
    ca1, cb1 = float(ca[0]), float(cb[0])  # rows == 1: scalar ops are faster

    keep_scale = 1.0 - drop_rate

    out = _POOL.empty((rows, cols), a.dtype)
    x = torch.empty(CHUNK, dtype=wd)
    y = torch.empty(CHUNK, dtype=wd)
    it = torch.int64 if wd == torch.float64 else torch.int32
    z = torch.empty(CHUNK, dtype=it)
    for (r0, r1, c0, c1), select in zip(pieces, masks):
        shape = (r1 - r0, c1 - c0)
        n = shape[0] * shape[1]
        xs, ys = x[:n].view(shape), y[:n].view(shape)
        xs.copy_(a2[r0:r1, c0:c1])
        ys.copy_(b2[r0:r1, c0:c1])
        if t == 1:
            pass  # keeps the donor's bits, signed zeros included
        elif rows == 1:
            ys.mul_(cb1).add_(xs, alpha=ca1)  # ys = merged
        else:
            ys.mul_(cb[r0:r1, None]).addcmul_(xs, ca[r0:r1, None])
        if select is not None:
            if rescale:
                ys.sub_(xs).div_(keep_scale).add_(xs)
            # ys = keep ? ys : xs, bit for bit: xs ^ ((xs ^ ys) & select)
            xi, yi, zi = xs.view(it), ys.view(it), z[:n].view(shape)
            torch.bitwise_xor(xi, yi, out=zi)
            zi.bitwise_and_(select.view(shape))
            torch.bitwise_xor(zi, xi, out=yi)
        out[r0:r1, c0:c1].copy_(ys)
    return out.view(a.shape)
