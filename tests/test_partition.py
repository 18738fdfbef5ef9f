"""The pinned partition and drop mask (DESIGN §3.3, §3.6) against DESIGN's vectors and helpers' references."""

import numpy as np
import pytest

from mergekit_partition_slerp import partition

from helpers import fnv, ref_keep, ref_layer_bins

# fmt: off
ORDER_SEED0_L32 = [
    5, 3, 22, 13, 26, 4, 8, 24, 17, 27, 30, 7, 14, 25, 2, 29,
    18, 15, 31, 6, 16, 20, 11, 19, 12, 10, 23, 28, 1, 0, 9, 21,
]
BINS_SEED0_L32_B9 = [
    8, 7, 3, 0, 1, 0, 4, 2, 1, 8, 6, 5, 6, 0, 3, 4,
    5, 2, 4, 6, 5, 8, 0, 7, 1, 3, 1, 2, 7, 3, 2, 4,
]
# fmt: on
BINS_SEED7_L8_B3 = [2, 0, 1, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("hash_fn", [partition.fnv1a64, fnv], ids=["package", "reference"])
def test_fnv_vectors(hash_fn):
    assert hash_fn("model.layers") == 0x081D6A381A2B0FDE
    assert hash_fn("model.layers.0.self_attn.k_proj.weight") == 0xA14BC08969FC54DD


def test_order_vector_seed0():
    assert partition.layer_order("model.layers", 32, 0) == ORDER_SEED0_L32


@pytest.mark.parametrize("bins_fn", [partition.layer_bins, ref_layer_bins], ids=["package", "reference"])
def test_bins_vectors(bins_fn):
    # the reference in helpers.py is pinned here too, since other tests take expectations from it
    assert bins_fn("model.layers", 32, 9, 0) == BINS_SEED0_L32_B9
    assert bins_fn("model.layers", 8, 3, 7) == BINS_SEED7_L8_B3


def test_bins_follow_the_order_vector():
    # DESIGN: order cut into 9 consecutive chunks, the first 32 mod 9 = 5 of 4 layers, then 3
    sizes = [4] * 5 + [3] * 4
    expected = [None] * 32
    start = 0
    for b, size in enumerate(sizes):
        for layer in ORDER_SEED0_L32[start : start + size]:
            expected[layer] = b
        start += size
    assert expected == BINS_SEED0_L32_B9 == partition.layer_bins("model.layers", 32, 9, 0)


@pytest.mark.parametrize(
    "layers,bins,sizes",
    [
        (32, 9, [4, 4, 4, 4, 4, 3, 3, 3, 3]),
        (8, 3, [3, 3, 2]),
        (7, 7, [1] * 7),
        (5, 1, [5]),
        (40, 6, [7, 7, 7, 7, 6, 6]),
        (12, 4, [3, 3, 3, 3]),
        (1, 1, [1]),
    ],
)
def test_bin_sizes(layers, bins, sizes):
    got = partition.layer_bins("model.layers", layers, bins, 11)
    assert len(got) == layers
    assert [got.count(b) for b in range(bins)] == sizes
    assert got == ref_layer_bins("model.layers", layers, bins, 11)


@pytest.mark.parametrize("layers,bins", [(4, 5), (4, 0), (4, -1), (1, 2)])
def test_bins_out_of_range(layers, bins):
    with pytest.raises(ValueError, match=f"between 1 and the layer count \\({layers}\\); got {bins}"):
        partition.layer_bins("model.layers", layers, bins, 0)


@pytest.mark.parametrize(
    "name,bits",
    [
        ("model.layers.0.self_attn.q_proj.weight", "111111101110100111110110"),
        ("model.layers.0.self_attn.k_proj.weight", "010111101111011111100111"),  # fnv1a64 above 2**63
    ],
)
def test_drop_mask_vectors(name, bits):
    keep = partition.keep_mask(name, 0, 0.28, 24)
    assert "".join("1" if k else "0" for k in keep) == bits
    assert "".join("1" if k else "0" for k in ref_keep(name, 0, 0.28, 24)) == bits


def test_raw_draw_vector():
    raw = partition.philox("model.layers.0.self_attn.q_proj.weight", 0).random_raw(4)
    assert [int(x) for x in raw] == [0x740C812869F712EA, 0xBFA51C9B4FCBDB95, 0xD93DF16ED1D15A8E, 0xE6A26D50C2C69ACC]


@pytest.mark.parametrize("p", [0.0, 0.28, 0.5, 0.9999, 1 - 2**-60, 1.0])
def test_mask_matches_float_definition(p):
    name = "model.layers.3.mlp.up_proj.weight"
    assert np.array_equal(partition.keep_mask(name, 5, p, 4099), ref_keep(name, 5, p, 4099))


@pytest.mark.parametrize("start,size", [(0, 7), (1, 10), (3, 1), (4, 9), (1001, 555), (4094, 5), (17, 0)])
def test_mask_range_is_a_slice_of_the_reference(start, size):
    name, seed, p = "model.layers.1.self_attn.k_proj.weight", 2**64 - 1, 0.3
    got = partition.keep_mask_range(name, seed, p, start, size)
    assert got.shape == (size,)
    assert np.array_equal(got, ref_keep(name, seed, p, 5000)[start : start + size])


def test_positions():
    assert partition.layer_position(0, 32) == 0.0
    assert partition.layer_position(31, 32) == 1.0
    assert partition.layer_position(0, 1) == 1.0
    assert partition.layer_position(3, 7) == 0.5
    assert partition.layer_position(1, 3) == 0.5


@pytest.mark.parametrize(
    "name,seed",
    [("model.layers.1.self_attn.k_proj.weight", 2**64 - 1), ("x", 2**63 + 5), ("model.layers", 0)],
)
def test_philox_key_is_exactly_fnv_and_seed(name, seed):
    # numpy casts some lists of two large ints through float64; the key must not be rounded
    key = [int(k) for k in partition.philox(name, seed).state["state"]["key"]]
    assert key == [fnv(name), seed]
