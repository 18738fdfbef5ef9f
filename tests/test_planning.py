"""Plan resolution in-process (the CLI's view of it is in tests/test_cli.py)."""

import json

from reference import eleusis_like

from mergekit_partition_slerp.partition import layer_bins
from mergekit_partition_slerp.planning import plan


def test_rows_are_typed_and_still_read_like_the_dicts_of_0_1_0(family):
    cfg = eleusis_like(family, bins=6, seed=11)
    p = plan(cfg)
    bins = layer_bins("model.layers", 8, 6, 11)  # checked against DESIGN's vectors in test_partition
    donors = [m["model"] for m in cfg["models"]]
    for row in p.layers:
        assert (row.bin, row.donor) == (bins[row.layer], donors[bins[row.layer] % 5])
        assert row["donor"] == row.donor and row["t"] is row.t and row["drop_rate"]["self_attn.q_proj.weight"] == 0.28
    data = json.loads(p.to_json())
    assert list(data["layers"][0]) == ["layer", "bin", "donor_index", "donor", "position", "t", "drop_rate"]
