"""Shared test helpers: independent float64 references and tiny families."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergekit_partition_slerp.family import Shape, build_family

BIN = os.path.dirname(sys.executable)


def fnv(text: str) -> int:
    # written out again here so the tests do not trust the code under test
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def ref_keep(name: str, seed: int, p: float, n: int) -> np.ndarray:
    raw = np.random.Philox(key=np.array([fnv(name), seed], dtype=np.uint64)).random_raw(n)
    u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u >= p


def ref_slerp64(a: torch.Tensor, b: torch.Tensor, t: float, rowwise: bool = False) -> torch.Tensor:
    """DESIGN §3.5 in float64, one row (or the whole tensor) at a time."""
    a64, b64 = a.double(), b.double()
    if rowwise and a.ndim >= 2:
        return torch.stack([ref_slerp64(x, y, t) for x, y in zip(a64, b64)])
    x, y = a64.flatten(), b64.flatten()
    na, nb = x.norm().item(), y.norm().item()
    if na < 1e-8 or nb < 1e-8:
        return ((1 - t) * a64 + t * b64)
    dot = max(-1.0, min(1.0, (x @ y).item() / (na * nb)))
    if abs(dot) > 0.9995:
        return (1 - t) * a64 + t * b64
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a64 + math.sin(t * theta) / s * b64


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_close_to_ref(out, ref, a, b, what=""):
    """Within one bf16 ulp of the float64 reference, or 1e-6 (|a| + |b|)."""
    out64 = out.double()
    err = (out64 - ref).abs()
    tol = torch.maximum(bf16_ulp(ref), 1e-6 * (a.double().abs() + b.double().abs()))
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off; worst {float((err / tol).max())} tolerances"


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return build_family(str(root), donors=4, shape=Shape(num_hidden_layers=8), seed=3)


def mergekit_yaml(config_path, out_path, *extra):
    cmd = [os.path.join(BIN, "mergekit-yaml"), str(config_path), str(out_path), "--no-copy-tokenizer", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
