import numpy as np
import pytest

from mergekit_partition_slerp import partition
from conftest import ref_keep


def test_fnv_vector():
    assert partition.fnv1a64("model.layers") == 0x081D6A381A2B0FDE


def test_order_vector_seed0():
    assert partition.layer_order("model.layers", 32, 0) == [
        5, 3, 22, 13, 26, 4, 8, 24, 17, 27, 30, 7, 14, 25, 2, 29,
        18, 15, 31, 6, 16, 20, 11, 19, 12, 10, 23, 28, 1, 0, 9, 21,
    ]


def test_bins_vectors():
    assert partition.layer_bins("model.layers", 32, 9, 0) == [
        8, 7, 3, 0, 1, 0, 4, 2, 1, 8, 6, 5, 6, 0, 3, 4,
        5, 2, 4, 6, 5, 8, 0, 7, 1, 3, 1, 2, 7, 3, 2, 4,
    ]
    assert partition.layer_bins("model.layers", 8, 3, 7) == [2, 0, 1, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("layers,bins", [(32, 9), (8, 3), (7, 7), (5, 1), (40, 6)])
def test_bin_sizes(layers, bins):
    got = partition.layer_bins("model.layers", layers, bins, 11)
    sizes = [got.count(b) for b in range(bins)]
    big, extra = -(-layers // bins), layers % bins
    assert sizes == [big if b < extra else layers // bins for b in range(bins)] if extra else [layers // bins] * bins


def test_bins_out_of_range():
    with pytest.raises(ValueError):
        partition.layer_bins("model.layers", 4, 5, 0)


def test_drop_mask_vector():
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = partition.philox(name, 0).random_raw(4)
    assert [int(x) for x in raw] == [0x740C812869F712EA, 0xBFA51C9B4FCBDB95, 0xD93DF16ED1D15A8E, 0xE6A26D50C2C69ACC]
    keep = partition.keep_mask(name, 0, 0.28, 24)
    assert "".join("1" if k else "0" for k in keep) == "111111101110100111110110"


@pytest.mark.parametrize("p", [0.0, 0.28, 0.5, 0.9999, 1 - 2**-60])
def test_mask_matches_float_definition(p):
    name = "model.layers.3.mlp.up_proj.weight"
    assert np.array_equal(partition.keep_mask(name, 5, p, 4099), ref_keep(name, 5, p, 4099))


@pytest.mark.parametrize("start,size", [(0, 7), (1, 10), (3, 1), (4, 9), (1001, 555), (4094, 5)])
def test_mask_range_equals_slice_of_whole(start, size):
    name, seed, p = "model.layers.1.self_attn.k_proj.weight", 2**64 - 1, 0.3
    whole = partition.keep_mask(name, seed, p, 5000)
    assert np.array_equal(partition.keep_mask_range(name, seed, p, start, size), whole[start : start + size])


def test_positions():
    assert partition.layer_position(0, 32) == 0.0
    assert partition.layer_position(31, 32) == 1.0
    assert partition.layer_position(0, 1) == 1.0
    assert partition.layer_position(3, 7) == 0.5


@pytest.mark.parametrize("name,seed", [("model.layers.1.self_attn.k_proj.weight", 2**64 - 1), ("x", 2**63 + 5), ("model.layers", 0)])
def test_philox_key_is_exactly_fnv_and_seed(name, seed):
    # numpy casts some lists of two large ints through float64; the key must not be rounded
    key = [int(k) for k in partition.philox(name, seed).state["state"]["key"]]
    assert key == [partition.fnv1a64(name), seed]
