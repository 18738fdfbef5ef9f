import gc
import hashlib
import os
import threading

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from mergekit.merge_methods.slerp import slerp as mk_slerp_kernel

from mergekit_partition_slerp import kernels, kernels_fastpath, partition

from helpers import assert_close_to_ref, bf16_ulp, ref_keep, ref_slerp64


def pair(shape, dtype=torch.bfloat16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = a + noise * torch.randn(shape, generator=g)
    return a.to(dtype), b.to(dtype)


def mask_for(name, seed, p):
    return lambda start, size: partition.keep_mask_range(name, seed, p, start, size)


@pytest.mark.parametrize("shape", [(7,), (64, 48), (3, 5, 7), (300, 1000), (1,), (1, 1)])
@pytest.mark.parametrize("t", [0.03, 0.3, 0.5, 0.97])
def test_whole_tensor_matches_float64_reference(shape, t):
    a, b = pair(shape)
    out = kernels.merge(a, b, t)
    assert out.dtype == a.dtype and out.shape == a.shape
    assert_close_to_ref(out, ref_slerp64(a, b, t), a, b, f"{shape} t={t}")


@pytest.mark.parametrize("shape", [(64, 48), (5, 70000), (3, 5, 7), (40,)])
def test_rowwise_matches_float64_reference(shape):
    a, b = pair(shape, noise=1.0)
    out = kernels.merge(a, b, 0.4, rowwise=True)
    assert_close_to_ref(out, ref_slerp64(a, b, 0.4, rowwise=True), a, b, f"rowwise {shape}")


def test_whole_tensor_matches_mergekit_slerp_method():
    a, b = pair((256, 384), torch.float32, noise=1.0)
    ours = kernels.merge(a, b, 0.35)
    theirs = merge_tensors([a, b], "slerp", parameters={"t": 0.35}, base_index=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rowwise_matches_mergekit_kernel_on_2d_weight():
    a, b = pair((96, 200), torch.float32, noise=1.0)
    # one row collinear with its base row: both must take the lerp branch
    b[3] = 2 * a[3]
    ours = kernels.merge(a, b, 0.6, rowwise=True)
    theirs = mk_slerp_kernel(torch.full((96,), 0.6), a, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_large_tensor_stays_slerp_in_float64_accuracy():
    # fp32 norms drift on tens of millions of elements and can turn this slerp
    # (cos ~ 0.96) into a lerp; the float64 reference catches that.
    a, b = pair((14336, 4096), noise=0.3)
    out = kernels.merge(a, b, 0.5)
    ref = ref_slerp64(a, b, 0.5)
    lerp = 0.5 * a.double() + 0.5 * b.double()
    assert (ref - lerp).abs().max() > 1e-3  # the case really is a slerp
    assert_close_to_ref(out, ref, a, b, "[14336, 4096]")


HAS_ONE_GEMM = kernels_fastpath.one_gemm_usable(
    *(torch.zeros(1, kernels_fastpath.BLEND_MIN, dtype=torch.bfloat16),) * 2
)


@pytest.fixture(params=["one_gemm", "chunk_loop"])
def blend_path(request, monkeypatch):
    """Run a test through both pass-2 paths for whole-tensor bf16: the single
    GEMM (where this CPU has it) and the float32 chunk loop."""
    if request.param == "chunk_loop":
        monkeypatch.setattr(kernels_fastpath, "select", lambda *args, **kwargs: None)
    elif not HAS_ONE_GEMM:
        pytest.skip("no oneDNN bf16 GEMM on this CPU (the fast path is never chosen here)")
    return request.param


@pytest.mark.parametrize("shape", [(512, 4096), (65537,), (301, 1001)])  # n % 16: 0, 1, 13
@pytest.mark.parametrize("t", [0.2, 0.5])
def test_large_bf16_blend_matches_float64_reference(blend_path, shape, t):
    a, b = pair(shape, noise=0.7, seed=5)
    out = kernels.merge(a, b, t)
    assert out.dtype == torch.bfloat16 and out.shape == a.shape
    assert_close_to_ref(out, ref_slerp64(a, b, t), a, b, f"{blend_path} {shape} t={t}")
    # rounded once from float32: off the correctly rounded value only at near-ties
    ref16 = ref_slerp64(a, b, t).to(torch.bfloat16)
    assert (out != ref16).float().mean() < 1e-3


def test_large_bf16_blend_same_bits_with_one_and_two_threads(blend_path):
    a, b = pair((777, 1024), noise=0.5, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.merge(a, b, 0.3)
        torch.set_num_threads(2)
        two = kernels.merge(a, b, 0.3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))


def test_large_bf16_blend_matches_mergekit_slerp(blend_path):
    a, b = pair((300, 1000), noise=1.0, seed=4)
    ours = kernels.merge(a, b, 0.35)
    theirs = merge_tensors([a.float(), b.float()], "slerp", parameters={"t": 0.35}, base_index=0)
    assert_close_to_ref(ours, theirs.double(), a, b, blend_path)


@pytest.mark.parametrize("rescale", [False, True])
def test_large_bf16_drop_matches_float64_reference(blend_path, rescale):
    name, seed, p, t = "model.layers.3.self_attn.k_proj.weight", 11, 0.35, 0.45
    a, b = pair((300, 1001), noise=0.8, seed=6)  # n % 16 = 12: the GEMM tail too
    out = kernels.merge(a, b, t, drop_rate=p, rescale=rescale, mask=mask_for(name, seed, p))
    keep = torch.from_numpy(ref_keep(name, seed, p, a.numel())).view(a.shape)
    assert torch.equal(out[~keep].view(torch.int16), a[~keep].view(torch.int16))  # dropped: the base's bits
    m = ref_slerp64(a, b, t)
    ref = a.double() + (m - a.double()) / (1 - p) if rescale else m
    assert_close_to_ref(out[keep], ref[keep], a[keep], b[keep], f"{blend_path} rescale={rescale}")
    if not rescale:  # kept: exactly the undropped merge
        assert torch.equal(out[keep], kernels.merge(a, b, t)[keep])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_t_endpoints_are_bit_exact(dtype):
    a, b = pair((33, 17), dtype)
    a[0, 0], b[0, 1] = -0.0, -0.0
    assert torch.equal(kernels.merge(a, b, 0.0).view(-1).view(torch.uint8), a.view(-1).view(torch.uint8))
    assert torch.equal(kernels.merge(a, b, 1.0).view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("shape", [(64, 48), (3, 300000)])
def test_drop_keeps_exactly_the_pinned_elements(rowwise, shape):
    name, seed, p, t = "model.layers.2.self_attn.q_proj.weight", 9, 0.28, 0.4
    a, b = pair(shape)
    out = kernels.merge(a, b, t, drop_rate=p, rowwise=rowwise, mask=mask_for(name, seed, p))
    keep = torch.from_numpy(ref_keep(name, seed, p, a.numel())).view(shape)
    assert torch.equal(out[~keep], a[~keep])  # dropped: the base, bit for bit
    plain = kernels.merge(a, b, t, rowwise=rowwise)
    assert torch.equal(out[keep], plain[keep])  # kept: the merged value
    assert 0.25 < 1 - keep.float().mean() < 0.31


def test_drop_with_t1_is_an_exact_select():
    name, p = "model.layers.0.self_attn.v_proj.weight", 0.5
    a, b = pair((40, 40))
    out = kernels.merge(a, b, 1.0, drop_rate=p, mask=mask_for(name, 0, p))
    keep = torch.from_numpy(ref_keep(name, 0, p, a.numel())).view(a.shape)
    assert torch.equal(out, torch.where(keep, b, a))


def test_rescale_matches_float64_reference():
    name, seed, p, t = "model.layers.1.mlp.down_proj.weight", 1, 0.3, 0.6
    a, b = pair((50, 60), torch.float32)
    out = kernels.merge(a, b, t, drop_rate=p, rescale=True, mask=mask_for(name, seed, p))
    keep = torch.from_numpy(ref_keep(name, seed, p, a.numel())).view(a.shape)
    m = ref_slerp64(a, b, t)
    ref = torch.where(keep, a.double() + (m - a.double()) / (1 - p), a.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_zero_and_antipodal_inputs_stay_finite():
    a = torch.zeros(10, 10)
    b = torch.randn(10, 10)
    torch.testing.assert_close(kernels.merge(a, b, 0.3), 0.3 * b)
    torch.testing.assert_close(kernels.merge(b, -b, 0.25), 0.5 * b)


@pytest.mark.parametrize("precision", ["highest", "medium"])  # "medium": pass 1 in float64
def test_same_bits_with_one_and_two_threads(precision):
    a, b = pair((4096, 1500), noise=0.5)
    p, name = 0.2, "model.layers.4.self_attn.o_proj.weight"
    before, knob = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(1)
        one = [kernels.merge(a, b, 0.3, rowwise=r, drop_rate=p, mask=mask_for(name, 0, p)) for r in (False, True)]
        torch.set_num_threads(2)
        two = [kernels.merge(a, b, 0.3, rowwise=r, drop_rate=p, mask=mask_for(name, 0, p)) for r in (False, True)]
    finally:
        torch.set_num_threads(before)
        torch.set_float32_matmul_precision(knob)
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def test_inputs_are_not_modified_and_strided_inputs_work():
    a, b = pair((48, 64), torch.float32)
    at, bt = a.T, b.T
    copies = (at.clone(), bt.clone())
    out = kernels.merge(at, bt, 0.5, drop_rate=0.4, mask=mask_for("w.0", 0, 0.4))
    assert torch.equal(at, copies[0]) and torch.equal(bt, copies[1])
    ref = kernels.merge(at.contiguous(), bt.contiguous(), 0.5, drop_rate=0.4, mask=mask_for("w.0", 0, 0.4))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_non_finite_inputs_are_refused(which, t):
    a, b = pair((20, 20), torch.float32)
    (a if which == 0 else b)[3, 4] = float("nan")
    if (t == 0 and which == 1) or (t == 1 and which == 0):
        kernels.merge(a, b, t)  # the unused input may hold anything
        return
    with pytest.raises(kernels.NonFiniteError) as info:
        kernels.merge(a, b, t)
    assert info.value.which == which


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0)])
@pytest.mark.parametrize("rowwise", [False, True])
def test_empty_tensors_merge_to_empty(shape, rowwise):
    a = torch.zeros(shape, dtype=torch.bfloat16)
    for p in (0.0, 0.5):
        out = kernels.merge(a, a, 0.5, rowwise=rowwise, drop_rate=p, mask=mask_for("w", 0, p))
        assert out.shape == a.shape and out.dtype == a.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float32_matmul_precision_knob_takes_float64_and_leaves_torch_alone(dtype):
    # torch.set_float32_matmul_precision("medium") lets oneDNN run float32 matmuls with bf16
    # products, so float32 block partials would follow oneDNN's kernels: pass 1 runs in float64
    # then, switching nothing of torch's. Its coefficients move by a few float32 ulps against the
    # float32 partials' (which are ~1e-6 relative off): outputs differ from the knob-free ones by one
    # rounding of the dtype, plus 1e-6 of the inputs' magnitude where they cancel.
    a, b = pair((1500, 1000), dtype, noise=0.4, seed=8)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = kernels.merge(a, b, 0.4)
        torch.set_float32_matmul_precision("medium")
        stats = kernels.row_stats(a.view(1, -1), b.view(1, -1)).view(-1)
        reduced = kernels.merge(a, b, 0.4)
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.backends.mkldnn.enabled
    a64, b64 = a.double().view(-1), b.double().view(-1)
    ref = torch.stack([a64 @ a64, b64 @ b64, a64 @ b64])
    assert ((stats - ref).abs() <= 1e-12 * ref.abs()).all()  # float64 sums, not float32 or bf16 partials
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.double().abs().clamp_min(1e-30))))
    assert ((reduced.double() - exact.double()).abs() <= ulp + 1e-6 * (a.double().abs() + b.double().abs())).all()


def test_bf16_subnormals_stay_within_the_smallest_normal(blend_path):
    # The GEMM path's bf16 dot products flush subnormals (README, Limits);
    # the error stays below the smallest normal bf16 and normal values are exact.
    a, b = pair((256, 1024), noise=0.6, seed=9)
    a.view(-1)[1::3], b.view(-1)[2::5] = 3e-39, -5e-39
    out = kernels.merge(a, b, 0.3)
    ref = ref_slerp64(a, b, 0.3)
    tiny = torch.finfo(torch.bfloat16).tiny
    assert ((out.double() - ref).abs() <= torch.maximum(bf16_ulp(ref), torch.full_like(ref, tiny))).all()
    normal = (a.abs() >= tiny) & (b.abs() >= tiny)
    assert_close_to_ref(out[normal], ref[normal], a[normal], b[normal], blend_path)


def test_concurrent_merges_under_a_precision_knob_keep_their_bits_and_the_flag():
    # With "medium" set, merges on several threads give the bits one merge gives alone, and
    # oneDNN stays on (an earlier kernel switched it off around pass 1).
    jobs = [pair((1 << 17,), noise=0.8, seed=1), pair((1 << 17,), torch.float32, noise=0.8, seed=2)]
    before = torch.get_float32_matmul_precision()
    results = {}

    def work(i):
        x, y = jobs[i % 2]
        results[i] = [kernels.merge(x, y, 0.3) for _ in range(8)]

    try:
        torch.set_float32_matmul_precision("medium")
        want = [kernels.merge(x, y, 0.3) for x, y in jobs]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.backends.mkldnn.enabled
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
    for i, outs in results.items():
        ref = want[i % 2]
        for out in outs:
            assert torch.equal(out.view(bits[out.dtype]), ref.view(bits[ref.dtype]))


def test_rowwise_long_rows_sum_in_block_partials():
    # several rows of 2^20 elements share a piece; one float32 partial per row
    # drifts by ~5e-6 in cos, enough to flip slerp to lerp near 0.9995
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1 << 20, generator=g)
    b = a + 0.0316 * torch.randn(2, 1 << 20, generator=g)
    s = kernels.row_stats(a, b)
    a64, b64 = a.double(), b.double()
    ref = torch.stack([(a64 * a64).sum(1), (b64 * b64).sum(1), (a64 * b64).sum(1)])
    assert ((s - ref).abs() / ref.abs()).max() < 1e-7


def test_rescale_with_huge_weights_stays_finite(blend_path):
    # a + (m - a) / (1 - p) is 1e38 here; folding the rescale into the blend's
    # coefficients would overflow float32
    name, p = "model.layers.0.mlp.up_proj.weight", 0.9
    a = torch.full((1 << 16,), 1e38, dtype=torch.bfloat16)
    out = kernels.merge(a, a.clone(), 0.5, drop_rate=p, rescale=True, mask=mask_for(name, 0, p))
    assert torch.equal(out, a)


# sha256 of the kernel's output bytes, computed from the kernel as it was before the core / fast
# path split (commit 11fcd2a) with this generator, on an AVX-512 CPU (one-GEMM pass 2) and again
# with the chunk loop forced (the same digests):
#
#     Q = "model.layers.0.self_attn.q_proj.weight"
#     cases = {  # name: lambda -> output of kernels.merge
#         "bf16_whole": merge(*pair((300, 1001), noise=0.7, seed=5), 0.3),
#         "bf16_whole_small": merge(*pair((33, 17), noise=0.7, seed=6), 0.6),
#         "bf16_drop": merge(*pair((300, 1001), noise=0.7, seed=7), 0.45, drop_rate=0.28, mask=mask_for(Q, 0, 0.28)),
#         "fp32_rowwise": merge(*pair((64, 3000), torch.float32, noise=1.0, seed=8), 0.4, rowwise=True),
#         "bf16_rescale": merge(*pair((300, 1001), noise=0.7, seed=9), 0.45, drop_rate=0.35, rescale=True,
#                               mask=mask_for(Q, 3, 0.35)),
#         "fp16_rowwise_drop": merge(*pair((40, 70000), torch.float16, noise=0.5, seed=10), 0.7, rowwise=True,
#                                    drop_rate=0.5, mask=mask_for(Q, 1, 0.5)),
#         "fp64_whole": merge(*pair((129, 65), torch.float64, noise=2.0, seed=11), 0.25),
#     }
#     hashlib.sha256(out.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
Q = "model.layers.0.self_attn.q_proj.weight"
PINNED = {
    "bf16_whole": (
        lambda: kernels.merge(*pair((300, 1001), noise=0.7, seed=5), 0.3),
        "cc6909ceffa867d2ea17f139776b73480707a05039a5c710fc17702e633a216a",
    ),
    "bf16_whole_small": (
        lambda: kernels.merge(*pair((33, 17), noise=0.7, seed=6), 0.6),
        "eef4f27bc7bd2d6937169e22640f21488383a8bd75b9b158708f5d50e5652bb2",
    ),
    "bf16_drop": (
        lambda: kernels.merge(*pair((300, 1001), noise=0.7, seed=7), 0.45, drop_rate=0.28, mask=mask_for(Q, 0, 0.28)),
        "113453d14b8ed7be83e557e6736f2c15fe66000a2d0d90dcfd68b0eef9556ec9",
    ),
    "fp32_rowwise": (
        lambda: kernels.merge(*pair((64, 3000), torch.float32, noise=1.0, seed=8), 0.4, rowwise=True),
        "876c55cb53dc7a865382c9ca6d280dab91a49628eeb24fcd3e244c2f5abeb165",
    ),
    "bf16_rescale": (
        lambda: kernels.merge(
            *pair((300, 1001), noise=0.7, seed=9), 0.45, drop_rate=0.35, rescale=True, mask=mask_for(Q, 3, 0.35)
        ),
        "906303d033eb95cc604df032cccb163407a72565ce236475b548dd92a0eadcab",
    ),
    "fp16_rowwise_drop": (
        lambda: kernels.merge(
            *pair((40, 70000), torch.float16, noise=0.5, seed=10),
            0.7,
            rowwise=True,
            drop_rate=0.5,
            mask=mask_for(Q, 1, 0.5),
        ),
        "fe17941ee41b56baeb7aabcf0353a5a3bff9129d321344e816d8f432accd906b",
    ),
    "fp64_whole": (
        lambda: kernels.merge(*pair((129, 65), torch.float64, noise=2.0, seed=11), 0.25),
        "73d1644052e46f03bd6bc8c430d4572e15c44a87f9f689f0be842e19bccabc5a",
    ),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_outputs_keep_the_pinned_bits(blend_path, case):
    run, digest = PINNED[case]
    out = run()
    assert hashlib.sha256(out.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() == digest


def _core_only(monkeypatch):
    monkeypatch.setattr(kernels_fastpath, "select", lambda *args, **kwargs: None)


@pytest.mark.skipif(
    not HAS_ONE_GEMM,
    reason="no oneDNN bf16 GEMM on this CPU: the fast path is never chosen here "
    "(test_fast_path_arithmetic_matches_the_core runs its GEMM expression and restore step)",
)
@pytest.mark.parametrize("shape", [(1 << 16,), (300, 1001), (512, 4096), (7, 9363)])  # n % 16: 0, 12, 0, 9
@pytest.mark.parametrize("t,p", [(0.2, 0.0), (0.5, 0.0), (0.83, 0.0), (0.45, 0.28), (0.6, 0.9)])
def test_fast_path_gives_the_core_bits(monkeypatch, shape, t, p):
    a, b = pair(shape, noise=0.9, seed=shape[0] % 97)
    mask = mask_for("model.layers.5.self_attn.v_proj.weight", 4, p) if p else None
    assert kernels_fastpath.select(a.view(1, -1), b.view(1, -1), t=t, drop_rate=p, rescale=False) is not None
    fast = kernels.merge(a, b, t, drop_rate=p, mask=mask)
    with monkeypatch.context() as m:
        _core_only(m)
        core = kernels.merge(a, b, t, drop_rate=p, mask=mask)
    assert torch.equal(fast.view(torch.int16), core.view(torch.int16))


def test_fast_path_arithmetic_matches_the_core(monkeypatch):
    # Runs everywhere: the fast path's GEMM expression (on torch's generic bf16 GEMM when oneDNN is
    # off, which is exact too) and its bitwise restore, each against the core's chunk loop.
    a, b = pair((300, 1001), noise=0.8, seed=3)
    a2, b2 = a.view(1, -1), b.view(1, -1)
    ca, cb = kernels.coefficients(kernels.row_stats(a2, b2), 0.35)
    name, p = "model.layers.1.self_attn.o_proj.weight", 0.4
    _core_only(monkeypatch)
    core = kernels.merge(a, b, 0.35).view(-1)
    core_drop = kernels.merge(a, b, 0.35, drop_rate=p, mask=mask_for(name, 2, p)).view(-1)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # torch's generic GEMM for this call
    generic = torch.empty_like(core)
    kernels_fastpath.gemm_blend(generic, a2, b2, float(ca[0]), float(cb[0]))
    monkeypatch.undo()
    assert torch.equal(generic.view(torch.int16), core.view(torch.int16))
    if HAS_ONE_GEMM:
        onednn = torch.empty_like(core)
        kernels_fastpath.gemm_blend(onednn, a2, b2, float(ca[0]), float(cb[0]))
        assert torch.equal(onednn.view(torch.int16), core.view(torch.int16))
    restored = core.clone()
    kernels_fastpath.restore_dropped(restored, a.view(-1), mask_for(name, 2, p))
    assert torch.equal(restored.view(torch.int16), core_drop.view(torch.int16))
    keep = torch.from_numpy(ref_keep(name, 2, p, a.numel()))
    assert torch.equal(restored.view(torch.int16), torch.where(keep, core, a.view(-1)).view(torch.int16))


def test_fast_path_is_chosen_only_where_it_applies():
    a, b = pair((300, 1001), noise=0.8, seed=3)
    a2, b2 = a.view(1, -1), b.view(1, -1)
    chosen = kernels_fastpath.select(a2, b2, t=0.3, drop_rate=0.0, rescale=False) is not None
    assert chosen == (torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.backends.mkldnn.is_available())
    assert kernels_fastpath.select(a2, b2, t=1.0, drop_rate=0.3, rescale=False) is None
    assert kernels_fastpath.select(a2, b2, t=0.3, drop_rate=0.3, rescale=True) is None
    assert kernels_fastpath.select(a.view(300, -1), b.view(300, -1), t=0.3, drop_rate=0.0, rescale=False) is None
    assert kernels_fastpath.select(a2.float(), b2.float(), t=0.3, drop_rate=0.0, rescale=False) is None
    small = pair((1000,))
    assert kernels_fastpath.select(*(x.view(1, -1) for x in small), t=0.3, drop_rate=0.0, rescale=False) is None


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_output_memory_lives_as_long_as_a_view_of_it_and_no_longer():
    a, b = pair((1024, 4096), noise=0.5, seed=12)  # 8 MiB outputs
    first = kernels.merge(a, b, 0.3, rowwise=True)
    want = first.clone()
    row = first[3]
    del first
    for _ in range(3):  # new outputs must not land on memory a live view still uses
        kernels.merge(a, b, 0.7, rowwise=True).fill_(7.0)
    assert torch.equal(row, want[3])
    del row
    gc.collect()
    before = _rss()
    for _ in range(16):  # 128 MiB of outputs, each dropped at once: nothing may pile up
        kernels.merge(a, b, 0.7)
    assert _rss() - before < 48 << 20
