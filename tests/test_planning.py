"""`plan(...)` in-process: recipe validation and plan resolution, against helpers' reference.

test_cli.py runs the same recipes through the console script; here each case costs
milliseconds instead of a subprocess paying mergekit's import.
"""

import hashlib
import json
import os

import pytest

from mergekit_partition_slerp import ConfigError, plan

from helpers import MISTRAL_LAYER_TENSORS, MISTRAL_NON_LAYER, config_only_copy, eleusis_like, ref_plan, write_config

LAYERS = 8  # the session family's depth


def check_against_reference(data, cfg):
    """The plan JSON (DESIGN §4 schema) equals the reference resolution of the recipe, value for value."""
    donors = [m["model"] for m in cfg["models"] if m["model"] != cfg["base_model"]]
    shared = cfg.get("parameters") or {}
    assert data["schema"] == "mergekit-partition/plan" and data["version"] == 1
    assert data["seed"] == shared.get("seed", 0) and data["bins"] == shared.get("bins", len(donors))
    assert data["stack"] == "model.layers" and data["num_layers"] == LAYERS
    assert data["base"] == cfg["base_model"] and data["donors"] == donors
    assert data["non_layer"] == MISTRAL_NON_LAYER
    expected = ref_plan(cfg, LAYERS)
    assert [r["layer"] for r in data["layers"]] == list(range(LAYERS))
    for got, want in zip(data["layers"], expected, strict=True):
        where = f"layer {want['layer']}"
        assert (got["bin"], got["donor_index"]) == (want["bin"], want["donor_index"]), where
        assert got["donor"] == want["entry"]["model"], where
        assert got["position"] == want["position"], where
        assert got["t"] == want["t"], where
        assert got["drop_rate"] == want["drop_rate"], where
        assert sorted(got["t"]) == sorted(MISTRAL_LAYER_TENSORS), where


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # bins 5, seed 7, the alias donor0@main in a second role
        {"bins": 8, "seed": 0},
        {"bins": 6, "seed": 2**64 - 1},
        {"bins": 4, "seed": 3, "alias": False, "rescale": True, "rowwise": True},
    ],
    ids=["eleusis-like", "one-layer-bins", "max-seed", "four-donors"],
)
def test_plan_matches_reference(family, kwargs):
    cfg = eleusis_like(family, **kwargs)
    check_against_reference(plan(cfg).to_dict(), cfg)


def test_top_level_t_and_default_bins(family):
    cfg = eleusis_like(family, alias=False, t=0.4)
    del cfg["parameters"]["bins"]  # default: one bin per donor
    for m in cfg["models"][:2]:
        del m["parameters"]  # these two donors take the top-level t
    data = plan(cfg).to_dict()
    assert data["bins"] == 4
    check_against_reference(data, cfg)
    owned = {r["donor_index"] for r in data["layers"]}
    assert owned == {0, 1, 2, 3}


def test_plan_from_a_file_records_its_sha256(family, tmp_path):
    cfg = eleusis_like(family)
    path = write_config(tmp_path / "recipe.yml", cfg)
    data = plan(path).to_dict()
    with open(path, "rb") as f:
        assert data["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
    check_against_reference(data, cfg)
    assert json.loads(plan(path).to_json()) == data


def test_plan_reads_config_json_only(family, tmp_path):
    bare = config_only_copy(family, tmp_path)
    cfg = eleusis_like(bare, bins=6, seed=11)
    check_against_reference(plan(cfg).to_dict(), cfg)


def test_plan_text_table_rows(family):
    cfg = eleusis_like(family)
    text = str(plan(cfg))
    lines = text.splitlines()
    assert lines[0] == f"partition_slerp plan: {LAYERS} layers of model.layers in 5 bins, seed 7"
    assert lines[-1] == "base (bit for bit): " + ", ".join(MISTRAL_NON_LAYER)
    rows = [line.split() for line in lines if line[:1].isdigit()]
    expected = ref_plan(cfg, LAYERS)
    assert [[int(r[0]), int(r[1]), r[2]] for r in rows] == [
        [e["layer"], e["bin"], e["entry"]["model"]] for e in expected
    ]


# ---------------------------------------------------------------- refusals


def _set(path, value):
    def mutate(cfg):
        *parents, last = path
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


BAD = [
    ("typo", _set(["parameters", "drop-rate"], 0.1), r"unknown parameter 'drop-rate' .*Did you mean 'drop_rate'\?"),
    (
        "unknown donor key",
        _set(["models", 0, "parameters", "weight"], 1),
        r"unknown parameter 'weight' in parameters of ",
    ),
    (
        "t out of range",
        _set(["models", 1, "parameters", "t"], 1.5),
        r"t = 1\.5 \(parameters of models\[1\] \(.*donor1\)\) is out of range: it must be a number in \[0, 1\]",
    ),
    (
        "drop 1",
        _set(["parameters", "drop_rate"], 1.0),
        r"drop_rate = 1\.0 \(top-level parameters\) is out of range: it must be a number in \[0, 1\)",
    ),
    (
        "negative seed",
        _set(["parameters", "seed"], -3),
        r"seed = -3 \(top-level parameters\) is out of range: .*\[0, 2\*\*64\)",
    ),
    (
        "seed 2**64",
        _set(["parameters", "seed"], 2**64),
        r"seed = 18446744073709551616 \(top-level parameters\) is out of range",
    ),
    (
        "bins 0",
        _set(["parameters", "bins"], 0),
        r"bins = 0 \(top-level parameters\) is out of range: it must be an integer >= 1",
    ),
    ("bins > layers", _set(["parameters", "bins"], 9), r"bins is 9 but model\.layers has only 8 layers.*top-level"),
    (
        "num_layers wrong",
        _set(["parameters", "num_layers"], 6),
        r"num_layers = 6 \(top-level parameters\) does not match base model .* which has 8 layers",
    ),
    ("missing base", lambda c: c.pop("base_model"), r"base_model is missing"),
    ("empty models", _set(["models"], []), r"models is missing or empty"),
    ("shared per donor", _set(["models", 0, "parameters", "seed"], 1), r"seed is shared by the whole merge"),
    (
        "top-level typo",
        _set(["tokenizer_sorce"], "base"),
        r"unknown top-level key 'tokenizer_sorce'.*'tokenizer_source'",
    ),
    ("other method", _set(["merge_method"], "slerp"), r"merge_method is 'slerp'"),
    ("slices", _set(["slices"], [{"sources": []}]), r"`slices:`/`modules:` recipes are not supported"),
]


@pytest.mark.parametrize("label,mutate,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_is_one_paragraph(family, label, mutate, pattern):
    cfg = eleusis_like(family)
    mutate(cfg)
    with pytest.raises(ConfigError, match=pattern) as error:
        plan(cfg)
    assert "\n" not in str(error.value)


def test_bins_below_donor_count_names_the_unused_donors(family):
    cfg = eleusis_like(family, bins=3)  # 5 donors: the 4th and 5th entries own no bin
    with pytest.raises(ConfigError) as error:
        plan(cfg)
    message = str(error.value)
    assert "bins is 3 but there are 5 donors" in message
    unused = message.split("would never be used: ")[1]
    assert family["donor3"] in unused and family["donor0"] + "@main" in unused
    assert family["donor1"] not in unused and family["donor2"] not in unused


def test_missing_model_directory_is_named(family):
    cfg = eleusis_like(family)
    cfg["models"][2]["model"] = "/nonexistent/model"
    with pytest.raises(
        ConfigError, match=r"donor /nonexistent/model points to /nonexistent/model, which does not exist"
    ):
        plan(cfg)


def test_duplicate_donor_suggests_an_alias(family):
    cfg = eleusis_like(family, alias=False)
    cfg["models"].append(dict(cfg["models"][1]))
    with pytest.raises(ConfigError, match=rf"donor {family['donor1']} is listed twice.*{family['donor1']}@main"):
        plan(cfg)


def _edited_copy(family, key, tmp_path, **changes):
    path = tmp_path / key
    os.makedirs(path)
    with open(os.path.join(family[key], "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_donor_of_another_shape(family, tmp_path):
    odd = _edited_copy(family, "donor1", tmp_path, intermediate_size=256)
    with pytest.raises(ConfigError, match=rf"donor {odd} has intermediate_size = 256 but the base has 128"):
        plan(eleusis_like(dict(family, donor1=odd)))


def test_donor_of_another_architecture(family, tmp_path):
    odd = _edited_copy(family, "donor2", tmp_path, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(
        ConfigError, match=rf"donor {odd} is \['LlamaForCausalLM'\] but the base is \['MistralForCausalLM'\]"
    ):
        plan(eleusis_like(dict(family, donor2=odd)))


def test_vocab_mismatch_needs_a_tokenizer_setting(family, tmp_path):
    odd = _edited_copy(family, "donor1", tmp_path, vocab_size=130)
    cfg = eleusis_like(dict(family, donor1=odd))
    with pytest.raises(
        ConfigError, match=rf"donor {odd} has vocab_size 130 but the base has 128; set `tokenizer_source: base`"
    ):
        plan(cfg)
    cfg["tokenizer_source"] = "base"
    check_against_reference(plan(cfg).to_dict(), cfg)


# Where each message says the value was set: the parameter, the model entry, and the entry or point.
WRONG_GRADIENTS = [
    ({"a": 1}, "t = {{'a': 1}} (parameters of models[1] ({donor1})) is a mapping", ""),
    ([{"filter": "self_attn"}], "(parameters of models[1] ({donor1})) has entry 1 without a `value:`", ""),
    (["x", "y"], "t = 'x' (parameters of models[1] ({donor1}), gradient point 1 of 2) is not a number", ""),
]


@pytest.mark.parametrize("bad,where,value", WRONG_GRADIENTS, ids=["dict", "no-value", "strings"])
def test_gradient_of_the_wrong_type_says_where(family, bad, where, value):
    cfg = eleusis_like(family)
    cfg["models"][1]["parameters"]["t"] = bad
    with pytest.raises(ConfigError) as error:
        plan(cfg)
    message = str(error.value)
    assert where.format(donor1=family["donor1"]) in message and value in message and "\n" not in message


def test_rows_are_typed_and_still_read_like_the_dicts_of_0_1_0(family):
    from mergekit_partition_slerp.partition import layer_bins

    cfg = eleusis_like(family, bins=6, seed=11)
    p = plan(cfg)
    bins = layer_bins("model.layers", 8, 6, 11)  # checked against DESIGN's vectors in test_partition
    donors = [m["model"] for m in cfg["models"]]
    for row in p.layers:
        assert (row.bin, row.donor) == (bins[row.layer], donors[bins[row.layer] % 5])
        assert row["donor"] == row.donor and row["t"] is row.t and row["drop_rate"]["self_attn.q_proj.weight"] == 0.28
    data = json.loads(p.to_json())
    assert list(data["layers"][0]) == ["layer", "bin", "donor_index", "donor", "position", "t", "drop_rate"]
