"""Tensors compared bit for bit, and how far apart in ulps (pure: torch only).

Floats are laid out on the sign-magnitude integer line, where neighbouring values of a dtype
are one apart: the ulp distance of two values is the difference of their positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_SAME_WIDTH_INT = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|position(x) - position(y)| per element, int64, for two tensors of one float dtype."""
    iv = _SAME_WIDTH_INT[x.dtype]
    magnitude = (1 << (torch.iinfo(iv).bits - 1)) - 1

    def position(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(-1).view(iv).to(torch.int64)
        return torch.where(v < 0, -(v & magnitude), v & magnitude)

    return (position(x) - position(y)).abs().reshape(x.shape)


@dataclass
class TensorCheck:
    name: str
    status: str  # identical | differs | missing
    elements: int = 0
    differing: int = 0
    max_ulp: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "identical"

    def describe(self) -> str:
        if self.status == "identical":
            return "identical"
        if self.status == "differs" and self.elements and not self.detail:
            frac = self.differing / self.elements
            return f"DIFFERS: {self.differing} of {self.elements} elements ({frac:.3%}), max {self.max_ulp} ulp"
        return f"{self.status.upper()}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "elements": self.elements,
            "differing": self.differing,
            "fraction": self.differing / self.elements if self.elements else None,
            "max_ulp": self.max_ulp,
            "detail": self.detail or None,
        }


def compare(name: str, expected: torch.Tensor, actual: torch.Tensor) -> TensorCheck:
    """Bits of `actual` against `expected`: identical, or how many elements differ and by how many ulps."""
    if expected.dtype != actual.dtype:
        detail = f"dtype is {dtype_name(actual.dtype)}, expected {dtype_name(expected.dtype)}"
        return TensorCheck(name, "differs", expected.numel(), detail=detail)
    if tuple(expected.shape) != tuple(actual.shape):
        detail = f"shape is {list(actual.shape)}, expected {list(expected.shape)}"
        return TensorCheck(name, "differs", expected.numel(), detail=detail)
    iv = _SAME_WIDTH_INT.get(expected.dtype)
    if iv is None:  # integer or bool buffers: equal or not
        differing = int((expected != actual).sum())
        return TensorCheck(name, "identical" if differing == 0 else "differs", expected.numel(), differing)
    bad = expected.reshape(-1).view(iv) != actual.reshape(-1).view(iv)
    differing = int(bad.sum())
    if differing == 0:
        return TensorCheck(name, "identical", expected.numel())
    far = ulp_distance(expected.reshape(-1)[bad], actual.reshape(-1)[bad])
    return TensorCheck(name, "differs", expected.numel(), differing, int(far.max()))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
