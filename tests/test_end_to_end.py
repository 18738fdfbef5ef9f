"""Plain `mergekit-yaml` (the real console script) on tiny checkpoints."""

import os

import pytest

from helpers import check_merge, eleusis_like, mergekit_yaml, read_yaml, write_config

LAYERS = 8


def run_and_check(tmp_path, cfg):
    path = write_config(tmp_path / "recipe.yml", cfg)
    out = tmp_path / "out"
    proc = mergekit_yaml(path, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").exists()
    return check_merge(path, str(out), LAYERS)


def test_eleusis_shaped_recipe(family, tmp_path):
    assignment = run_and_check(tmp_path, eleusis_like(family))
    assert set(assignment.values()) == set(range(5))  # every donor, the alias included, owns layers


@pytest.mark.slow  # mergekit-yaml in a subprocess
def test_rowwise_rescale_and_top_level_t(family, tmp_path):
    cfg = eleusis_like(family, bins=4, seed=1, alias=False, rowwise=True, rescale=True, t=0.4)
    for m in cfg["models"][:2]:
        del m["parameters"]
    run_and_check(tmp_path, cfg)


@pytest.mark.slow  # mergekit-yaml in a subprocess
def test_eleusis_example_on_local_stand_ins(tmp_path_factory, tmp_path):
    from mergekit_partition_slerp.family import Shape, build_family

    here = os.path.dirname(__file__)
    cfg = read_yaml(os.path.join(here, "..", "examples", "eleusis.yml"))
    hub_ids = sorted({m["model"].split("@")[0] for m in cfg["models"]} | {cfg["base_model"]})
    fam = build_family(
        str(tmp_path_factory.mktemp("eleusis")), donors=len(hub_ids) - 1, shape=Shape(num_hidden_layers=10), seed=5
    )
    local = dict(zip([cfg["base_model"]] + [h for h in hub_ids if h != cfg["base_model"]], fam.values(), strict=True))
    cfg["base_model"] = local[cfg["base_model"]]
    for m in cfg["models"]:
        hub, _, rev = m["model"].partition("@")
        m["model"] = local[hub] + ("@" + rev if rev else "")
    cfg.pop("x-gradients")  # anchors are already expanded by the YAML loader
    cfg.pop("tokenizer_source"), cfg.pop("chat_template")  # stand-ins have no tokenizer
    path = write_config(tmp_path / "eleusis.yml", cfg)
    proc = mergekit_yaml(path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assignment = check_merge(path, str(tmp_path / "out"), 10)
    assert sorted(set(assignment.values())) == list(range(9))


@pytest.mark.slow  # mergekit-yaml in a subprocess
def test_bins_below_donor_count_is_refused_naming_donors(family, tmp_path):
    cfg = eleusis_like(family, bins=3)
    proc = mergekit_yaml(write_config(tmp_path / "r.yml", cfg), tmp_path / "out")
    assert proc.returncode != 0
    assert "would never be used" in proc.stderr and family["donor3"] in proc.stderr
    assert not (tmp_path / "out" / "config.json").exists()
