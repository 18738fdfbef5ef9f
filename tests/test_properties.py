"""Property tests (hypothesis) for the kernel and the pinned masks."""

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_partition_slerp import kernels, partition

from helpers import assert_close_to_ref, ref_keep, ref_slerp64

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# derandomize: the same 200 examples every run, so CI cannot fail on a draw a
# developer never saw; a failure prints its example
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
)


@st.composite
def pairs(draw, kinds=("random", "zero", "collinear", "antipodal", "close")):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    kind = draw(st.sampled_from(kinds))
    b = {
        "random": lambda: torch.randn(shape, generator=g),
        "zero": lambda: torch.zeros(shape),
        "collinear": lambda: a * draw(st.floats(0.1, 10)),
        "antipodal": lambda: -a,
        "close": lambda: a + 1e-3 * torch.randn(shape, generator=g),
    }[kind]()
    if draw(st.booleans()) and kind == "random":
        a = torch.zeros(shape)
    return a.to(dtype), b.to(dtype)


ts = st.floats(0, 1, exclude_min=True, exclude_max=True)


@SETTINGS
@given(pairs(), st.booleans())
def test_t_endpoints_exact(ab, rowwise):
    a, b = ab
    assert torch.equal(kernels.merge(a, b, 0.0, rowwise=rowwise).view(-1).float(), a.view(-1).float())
    assert torch.equal(kernels.merge(a, b, 1.0, rowwise=rowwise).view(-1).float(), b.view(-1).float())


@SETTINGS
@given(pairs(), ts, st.booleans())
def test_matches_float64_reference_and_stays_finite(ab, t, rowwise):
    a, b = ab
    out = kernels.merge(a, b, t, rowwise=rowwise)
    assert out.dtype == a.dtype and out.shape == a.shape and torch.isfinite(out).all()
    ref = ref_slerp64(a, b, t, rowwise=rowwise)
    if a.dtype == torch.bfloat16:
        assert_close_to_ref(out, ref, a, b)
    else:
        info = torch.finfo(a.dtype)
        # + one ulp at the bottom of the range: a correctly rounded float16
        # subnormal is off by up to half of it whatever its relative error
        tol = 2 * info.eps * ref.abs() + 1e-6 * (a.double().abs() + b.double().abs()) + info.tiny * info.eps
        assert ((out.double() - ref).abs() <= tol).all()


@SETTINGS
@given(pairs(kinds=("random", "close", "collinear")), ts, st.booleans())
def test_symmetric_in_swapping_ends(ab, t, rowwise):
    a, b = (x.float() for x in ab)
    one = kernels.merge(a, b, t, rowwise=rowwise).double()
    two = kernels.merge(b, a, 1 - t, rowwise=rowwise).double()
    assert ((one - two).abs() <= 1e-5 * (a.double().abs() + b.double().abs()) + 1e-6).all()


@SETTINGS
@given(st.integers(1, 20000), st.floats(0.01, 0.99), st.integers(0, 2**64 - 1))
def test_drop_fraction_within_binomial_bounds(n, p, seed):
    keep = partition.keep_mask("model.layers.0.self_attn.q_proj.weight", seed, p, n)
    dropped = n - int(keep.sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) <= 6 * sd + 1


@SETTINGS
@given(
    st.integers(1, 3000),
    st.lists(st.integers(1, 700), min_size=1, max_size=8),
    st.integers(0, 2**64 - 1),
    st.floats(0, 0.999),
)
def test_chunked_mask_equals_one_shot(n, cuts, seed, p):
    name = "model.layers.7.mlp.gate_proj.weight"
    whole = ref_keep(name, seed, p, n)
    start, parts = 0, []
    for c in cuts + [n]:
        size = min(c, n - start)
        parts.append(partition.keep_mask_range(name, seed, p, start, size))
        start += size
        if start >= n:
            break
    assert np.array_equal(np.concatenate(parts), whole)


@SETTINGS
@given(st.tuples(st.integers(1, 30), st.integers(1, 30)), ts, st.floats(0.05, 0.9), st.integers(0, 1000))
def test_rescale_keeps_the_expected_delta(shape, t, p, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    name = "model.layers.1.self_attn.o_proj.weight"

    def mask(s, k):
        return partition.keep_mask_range(name, seed, p, s, k)

    plain = kernels.merge(a, b, t).double()
    out = kernels.merge(a, b, t, drop_rate=p, rescale=True, mask=mask).double()
    keep = torch.from_numpy(ref_keep(name, seed, p, a.numel())).view(shape)
    assert torch.equal(out[~keep], a.double()[~keep])
    expected = a.double() + (plain - a.double()) / (1 - p)
    assert torch.allclose(out[keep], expected[keep], rtol=1e-5, atol=1e-5)
