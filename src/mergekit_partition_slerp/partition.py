"""Pinned randomness: layer partition and drop masks (DESIGN §3.3, §3.6).

Pure numpy. Every draw comes from a Philox stream keyed by
(FNV-1a-64 of a name, seed), never from global RNG state, so a recipe shared
on the hub rebuilds the same bins and masks on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = _FNV_OFFSET
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def philox(name: str, seed: int) -> np.random.Philox:
    # an explicit uint64 key: a plain list of two large ints may be cast through float64
    return np.random.Philox(key=np.array([fnv1a64(name), seed], dtype=np.uint64))


def layer_order(stack_key: str, num_layers: int, seed: int) -> list[int]:
    """Seeded Fisher-Yates shuffle of range(num_layers)."""
    raw = philox(stack_key, seed).random_raw(max(num_layers - 1, 0))
    order = list(range(num_layers))
    for k, i in enumerate(range(num_layers - 1, 0, -1)):
        j = int(raw[k]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def layer_bins(stack_key: str, num_layers: int, bins: int, seed: int) -> list[int]:
    """bin of each layer: the shuffled order cut into `bins` near-equal chunks."""
    if not 1 <= bins <= num_layers:
        raise ValueError(f"bins must be between 1 and the layer count ({num_layers}); got {bins}")
    order = layer_order(stack_key, num_layers, seed)
    small, extra = divmod(num_layers, bins)
    result = [0] * num_layers
    pos = 0
    for b in range(bins):
        size = small + (1 if b < extra else 0)
        for layer in order[pos : pos + size]:
            result[layer] = b
        pos += size
    return result


def layer_position(index: int, num_layers: int) -> float:
    """mergekit's gradient position for layer `index` of a full-depth slice."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def keep_threshold(p: float) -> int:
    """Raw 64-bit draws >= this are kept: (raw >> 11) >= ceil(p * 2**53).

    p * 2**53 is exact in float64, so the comparison is exactly DESIGN's
    `u >= p` with u = (raw >> 11) * 2**-53. Returns 2**64 (keep nothing)
    when p rounds to 1.
    """
    return math.ceil(p * 2**53) << 11


def keep_mask_range(name: str, seed: int, p: float, start: int, size: int) -> np.ndarray:
    """Elements [start, start + size) of the keep mask of tensor `name`.

    Philox is counter-based: advance() jumps to any point of the stream, so
    chunks can be drawn in any order, on any thread, with identical bits.
    """
    threshold = keep_threshold(p)
    if threshold >= 1 << 64:
        return np.zeros(size, dtype=bool)
    gen = philox(name, seed)
    gen.advance(start // 4)  # one Philox4x64 counter step = 4 draws
    skip = start % 4
    raw = gen.random_raw(size + skip)[skip:]
    return raw >= np.uint64(threshold)


def keep_mask(name: str, seed: int, p: float, numel: int) -> np.ndarray:
    """The whole keep mask at once (tests, plots and small tensors)."""
    return keep_mask_range(name, seed, p, 0, numel)


def bins_problem(bins: int, num_layers: int, donors: Sequence[str], stack: str = "the stack") -> str | None:
    """Why `bins` cannot work for these layers and donors, or None (DESIGN §3.3).

    The one home of this rule: the planner and the method both ask it.
    """
    if bins > num_layers:
        return f"bins is {bins} but {stack} has only {num_layers} layers; use at most {num_layers} bins"
    if bins < len(donors):
        unused = ", ".join(str(d) for d in donors[bins:])
        return (
            f"bins is {bins} but there are {len(donors)} donors, so these donors would never be used: {unused}. "
            f"Set bins to at least {len(donors)} or remove them"
        )
    return None
