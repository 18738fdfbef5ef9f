"""Recipe checks in-process: every bad value is named in the recipe's own words.

The expected messages are written out here from the parameter table in DESIGN §2
(names, scopes, ranges), not taken from the code under test.
"""

import json

import pytest

from mergekit_partition_slerp import recipe
from mergekit_partition_slerp.errors import ConfigError

ATTN = [{"filter": "self_attn", "value": 0.03}, {"value": [1, 0]}]


def base_recipe():
    return {
        "merge_method": "partition_slerp",
        "base_model": "/models/base",
        "parameters": {"bins": 2, "seed": 0, "drop_rate": [{"filter": "self_attn", "value": 0.28}, {"value": 0.0}]},
        "models": [
            {"model": "/models/a", "parameters": {"t": ATTN}},
            {"model": "/models/b", "parameters": {"t": 0.5}},
        ],
    }


def error_of(mutate):
    cfg = base_recipe()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        recipe.check(recipe.read(cfg))
    message = str(info.value)
    assert "\n" not in message and "constrained" not in message and "Input should" not in message
    return message


def test_a_good_recipe_passes():
    table = recipe.check(recipe.read(base_recipe()))
    # DESIGN §2: names, scopes and defaults, read from the method's spec
    assert {k: (p.per_donor, p.default) for k, p in table.items()} == {
        "t": (True, None),
        "drop_rate": (True, 0.0),
        "rescale": (False, False),
        "bins": (False, None),
        "seed": (False, 0),
        "rowwise": (False, False),
        "num_layers": (False, None),
    }
    assert table["t"].required and not table["drop_rate"].required


CASES = [
    (
        "top-level drop_rate 1.0",
        lambda c: c["parameters"].update(drop_rate=1.0),
        "drop_rate = 1.0 (top-level parameters) is out of range: it must be a number in [0, 1)",
    ),
    (
        "top-level t overridden by every donor",
        lambda c: c["parameters"].update(t=1.5),
        "t = 1.5 (top-level parameters) is out of range: it must be a number in [0, 1]",
    ),
    (
        "t in a donor's filter entry",
        lambda c: c["models"][0]["parameters"].update(t=[{"filter": "self_attn", "value": 1.5}, {"value": 0.5}]),
        "t = 1.5 (parameters of models[0] (/models/a), filter 'self_attn' (entry 1)) is out of range: "
        "it must be a number in [0, 1]",
    ),
    (
        "t gradient point",
        lambda c: c["models"][1]["parameters"].update(t=[0, 0.5, 1.25]),
        "t = 1.25 (parameters of models[1] (/models/b), gradient point 3 of 3) is out of range",
    ),
    (
        "gradient inside the catch-all entry",
        lambda c: c["models"][0]["parameters"].update(t=[{"filter": "mlp", "value": 0.5}, {"value": [1, -0.5]}]),
        "t = -0.5 (parameters of models[0] (/models/a), filter entry 2, gradient point 2 of 2) is out of range",
    ),
    (
        "t not a number",
        lambda c: c["models"][1]["parameters"].update(t="half"),
        "t = 'half' (parameters of models[1] (/models/b)) is not a number: t must be a number in [0, 1], "
        "a gradient list",
    ),
    (
        "negative seed",
        lambda c: c["parameters"].update(seed=-3),
        "seed = -3 (top-level parameters) is out of range: it must be an integer in [0, 2**64)",
    ),
    (
        "seed too large",
        lambda c: c["parameters"].update(seed=2**64),
        f"seed = {2**64} (top-level parameters) is out of range",
    ),
    (
        "fractional bins",
        lambda c: c["parameters"].update(bins=2.5),
        "bins = 2.5 (top-level parameters) is not an integer: bins must be an integer >= 1",
    ),
    ("bins 0", lambda c: c["parameters"].update(bins=0), "bins = 0 (top-level parameters) is out of range"),
    (
        "rescale not a boolean",
        lambda c: c["parameters"].update(rescale="sometimes"),
        "rescale = 'sometimes' (top-level parameters) is not true or false",
    ),
    (
        "seed as a filter list",
        lambda c: c["parameters"].update(seed=[{"filter": "mlp", "value": 1}, {"value": 0}]),
        "seed = [{'filter': 'mlp', 'value': 1}, {'value': 0}] (top-level parameters) is a filter list, "
        "but it is one value for the whole merge",
    ),
    (
        "shared parameter per donor",
        lambda c: c["models"][0]["parameters"].update(seed=1),
        "seed is shared by the whole merge, but parameters of models[0] (/models/a) sets it (seed = 1)",
    ),
    (
        "filter entry without value",
        lambda c: c["parameters"].update(drop_rate=[{"filter": "self_attn"}, {"value": 0.0}]),
        "(top-level parameters) has entry 1 without a `value:`",
    ),
    (
        "misspelt filter key",
        lambda c: c["parameters"].update(drop_rate=[{"filtre": "self_attn", "value": 0.2}, {"value": 0.0}]),
        "unknown key 'filtre' Did you mean 'filter'?",
    ),
    (
        "t missing everywhere",
        lambda c: c["models"][1].update(parameters={}),
        "t is required for every donor, but models[1] (/models/b) has none and there is no top-level t",
    ),
    (
        "dtype mergekit cannot merge in",
        lambda c: c.update(dtype="bf16"),
        "dtype = 'bf16' (top level of the recipe) is not a dtype to merge in: it must be one of bfloat16, "
        "float16, float32, float64",
    ),
    (
        "misspelt parameter",
        lambda c: c["parameters"].update({"drop-rate": 0.1}),
        "unknown parameter 'drop-rate' in top-level parameters (mergekit would silently ignore it). "
        "Did you mean 'drop_rate'?",
    ),
]


@pytest.mark.parametrize("label,mutate,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_values_are_named_where_they_were_set(label, mutate, expected):
    message = error_of(mutate)
    for part in expected.split(" Did you mean"):
        assert part.strip() in message.replace(" Did you mean", ""), message
    if "Did you mean" in expected:
        assert "Did you mean" in message


def test_a_partition_record_is_not_a_recipe(tmp_path):
    record = tmp_path / "merged" / "partition.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"schema": "mergekit-partition/plan", "version": 1, "seed": 0}))
    with pytest.raises(ConfigError, match="mergekit_config.yml"):
        recipe.read(record)


def test_a_directory_is_not_a_recipe(tmp_path):
    (tmp_path / "mergekit_config.yml").write_text("merge_method: partition_slerp\n")
    with pytest.raises(ConfigError, match="is a directory.*mergekit_config.yml inside it"):
        recipe.read(tmp_path)
