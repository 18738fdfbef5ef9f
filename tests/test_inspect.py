"""`mergekit-partition inspect`: verify and explain against merges made by the real `run` command.

Ground truth is independent of the code under test: the merges are written by
mergekit (through `mergekit-partition run`), the expected donors/t/drop come
from the recipe's plan (planning.plan, mergekit's own parameter resolution),
and tampering is done here with plain safetensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_partition_slerp.cli import main
from mergekit_partition_slerp.family import Shape, build_family
from mergekit_partition_slerp.inspection import explain, inspect, verify
from mergekit_partition_slerp.planning import plan

from helpers import BIN, eleusis_like, write_config

ENV = {"HF_HUB_OFFLINE": "1"}
GRAD_IN = [{"filter": "self_attn", "value": 0.03}, {"value": [1, 0]}]
GRAD_OUT = [{"filter": "self_attn", "value": 0.03}, {"value": [0, 1]}]
# t of a tensor with at least this many elements is recovered within T_TOL; smaller
# tensors (norm weights: 64 elements, most of which round back to the base) are
# checked against the reported t_range instead
BIG = 1024
T_TOL = 2e-3


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env=ENV, catch_exceptions=False)


def run_merge(tmp, name, cfg, *extra):
    recipe = write_config(tmp / f"{name}.yml", cfg)
    out = tmp / name
    result = cli("run", recipe, out, "--no-copy-tokenizer", *extra)
    assert result.exit_code == 0, result.output
    return recipe, str(out)


def recipes(fam):
    donors4 = [fam[f"donor{k}"] for k in range(4)]
    shared_rowwise = {"bins": 6, "seed": 11, "rowwise": True, "drop_rate": 0.1}
    return {
        # Eleusis-shaped: gradients, attention at 0.03 with drop 0.28, donor0 in two roles (donor0@main)
        "eleusis": eleusis_like(fam, bins=5, seed=7),
        # rowwise slerp, drop on every tensor, a constant t per donor, other seed and bins
        "rowwise": {
            "merge_method": "partition_slerp",
            "base_model": fam["base"],
            "parameters": shared_rowwise,
            "models": [
                {"model": d, "parameters": {"t": t}} for d, t in zip(donors4, (0.35, 0.8, 0.55, 1.0), strict=True)
            ],
            "dtype": "bfloat16",
        },
        # rescale: kept elements scaled by 1 / (1 - p); attention keeps everything (p 0: nothing rescaled)
        "rescale": {
            "merge_method": "partition_slerp",
            "base_model": fam["base"],
            "parameters": {
                "bins": 4,
                "seed": 5,
                "rescale": True,
                "drop_rate": [{"filter": "self_attn", "value": 0.0}, {"value": 0.2}],
            },
            "models": [
                {"model": d, "parameters": {"t": t}} for d, t in zip(donors4, (0.3, 0.7, [0.2, 0.9], 1.0), strict=True)
            ],
            "dtype": "bfloat16",
        },
        # merge in float32, write bfloat16: mergekit casts inputs before the method and the output after
        "casts": {
            "merge_method": "partition_slerp",
            "base_model": fam["base"],
            "parameters": {
                "bins": 3,
                "seed": 123456789,
                "drop_rate": [{"filter": "mlp", "value": 0.5}, {"value": 0.0}],
            },
            "models": [
                {"model": donors4[0], "parameters": {"t": [0.2, 0.9]}},
                {"model": donors4[2], "parameters": {"t": GRAD_IN}},
                {"model": donors4[3], "parameters": {"t": 0.65}},
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    }


@pytest.fixture(scope="module")
def merges(family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    made = {name: run_merge(tmp, name, cfg) for name, cfg in recipes(family).items()}
    # the same Eleusis recipe under another seed: the source of a transplanted layer
    made["eleusis_seed8"] = run_merge(tmp, "eleusis_seed8", eleusis_like(family, bins=5, seed=8))
    return made


def unique_donors(fam):
    return [fam[f"donor{k}"] for k in range(4)]


def model_of(written: str) -> str:
    return written[: -len("@main")] if written.endswith("@main") else written


# --------------------------------------------------------------------------- explain


def test_explain_rescale_within_the_drop_rates_binomial_error(family, merges):
    # with rescale the kept elements are scaled by 1 / (1 - p), and p is only known from counts
    # (binomial): t inherits that error, relative 5 sd of p / (1 - p) at most (docs/inspect.md)
    recipe, out = merges["rescale"]
    truth = plan(recipe)
    donors = unique_donors(family)
    got = explain(out, family["base"], donors, rescale=True)
    for want, row in zip(truth.layers, got.layers, strict=True):
        i = want.layer
        assert row["donor"] == model_of(want.donor), f"layer {i}: {row}"
        for suffix, t in want.t.items():
            p, n = want.drop_rate[suffix], row["drop_elements"][suffix]
            if "layernorm" in suffix or n < 200:
                continue  # a 64-element norm weight: t is rough (t_range), not bounded here
            sd = math.sqrt(max(p * (1 - p), 1 / n) / n)
            assert abs(row["drop_rate"][suffix] - p) <= 5 * sd + 1 / n, (i, suffix, row["drop_rate"][suffix], p, n)
            if p == 0:  # nothing dropped, nothing rescaled: as exact as without rescale
                assert abs(row["t"][suffix] - t) <= T_TOL, (i, suffix, row["t"][suffix], t)
            else:
                assert abs(row["t"][suffix] - t) <= t * 5 * sd / (1 - p) + T_TOL, (i, suffix, row["t"][suffix], t, n)


@pytest.mark.parametrize("case", ["eleusis", "rowwise", "casts"])
def test_explain_recovers_donor_t_and_drop(family, merges, case):
    recipe, out = merges[case]
    truth = plan(recipe)
    donors = unique_donors(family)
    got = explain(out, family["base"], donors)
    assert got.num_layers == truth.num_layers and got.stack == truth.stack
    assert all(got.non_layer_equal_base.values()) and set(got.non_layer_equal_base) == set(truth.non_layer)
    for want, row in zip(truth.layers, got.layers, strict=False):
        i = want["layer"]
        moved_any = any(t > 0 for t in want["t"].values())
        assert moved_any, "every recipe here moves some tensor of every layer"
        assert row["donor"] == model_of(want["donor"]), f"layer {i}: {row}"
        assert row["donor_index"] == donors.index(model_of(want["donor"]))
        assert row["confidence"] > 0.9
        for suffix, t in want["t"].items():
            p = want["drop_rate"][suffix]
            got_t, t_range = row["t"][suffix], row["t_range"][suffix]
            if t == 0:
                assert got_t is None and row["drop_rate"][suffix] is None, (i, suffix)
                continue
            numel = 64 if "layernorm" in suffix else BIG
            if numel >= BIG:
                assert abs(got_t - t) <= T_TOL, (i, suffix, got_t, t)
            # the reported range of t values that reproduce the merge contains the truth
            assert t_range[0] - 1e-3 <= t <= t_range[1] + 1e-3, (i, suffix, t_range, t)
            n = row["drop_elements"][suffix]
            if n == 0:  # no element moved by 2 ulps or more: the drop rate has no sample
                assert row["drop_rate"][suffix] is None, (i, suffix)
            elif p == 0:
                assert row["drop_rate"][suffix] <= 1e-3, (i, suffix, row["drop_rate"][suffix])
            elif n >= 200:
                # binomial (the mask is independent of the values), plus one element of rounding slack
                bound = 5 * math.sqrt(p * (1 - p) / n) + 1 / n
                assert abs(row["drop_rate"][suffix] - p) <= bound, (i, suffix, row["drop_rate"][suffix], p, n)
        if case == "rowwise" and min(want["t"].values()) > 0 and max(want["t"].values()) < 1:
            assert row.get("rowwise") is True, f"layer {i} not recognised as rowwise"


def test_explain_norm_weight_without_drop_reports_no_drop():
    # a 64-element norm weight (nearly parallel to the donor: the kernel lerps) at a small t: few
    # elements move, so t is only known within a wide t_range. No element was dropped, and the
    # drop rate must say 0, not count the elements that a wrong t within the range would move.
    from mergekit_partition_slerp.explain import fit_tensor
    from mergekit_partition_slerp.kernels import merge

    for noise, t in ((0.02, 0.0909), (0.005, 0.2)):  # t_range ~[0.083, 0.136] and ~[0.167, 0.5]
        g = torch.Generator().manual_seed(0)
        base = (1 + 0.02 * torch.randn(64, generator=g)).to(torch.bfloat16)
        donor = (base.float() + noise * torch.randn(64, generator=g)).to(torch.bfloat16)
        merged = merge(base, donor, t)  # the method's kernel, nothing dropped
        fit = fit_tensor(merged, base, [donor], rescale=False)
        low, high = fit.t_range[0]
        assert low - 1e-9 <= t <= high + 1e-9, (t, fit.t_range[0])
        assert fit.drop[0] == 0.0 and fit.informative[0] > 0, (t, fit.drop[0], fit.informative[0])


def test_explain_t_zero_layers_and_identical_donors(family, tmp_path):
    # donor1 at t 0 everywhere: its layers never move; a symlinked copy of donor0 is indistinguishable from it
    cfg = {
        "merge_method": "partition_slerp",
        "base_model": family["base"],
        "parameters": {"bins": 2, "seed": 5},
        "models": [
            {"model": family["donor0"], "parameters": {"t": 0.6}},
            {"model": family["donor1"], "parameters": {"t": 0.0}},
        ],
        "dtype": "bfloat16",
    }
    recipe, out = run_merge(tmp_path, "zero", cfg)
    truth = plan(recipe)
    twin = str(tmp_path / "twin-of-donor0")
    os.symlink(family["donor0"], twin)
    got = explain(out, family["base"], [family["donor0"], family["donor1"], twin])
    for want, row in zip(truth.layers, got.layers, strict=False):
        if want["donor_index"] == 1:  # t == 0: nothing to see
            assert row["donor"] is None and row["confidence"] is None and "nothing moved" in row["note"]
            assert all(v is None for v in row["t"].values())
        else:
            assert row["donor"] is None and row["donor_index"] is None, row
            assert sorted(row["candidate_indices"]) == [0, 2] and "cannot be known" in row["note"]
            assert abs(row["t"]["mlp.up_proj.weight"] - 0.6) <= T_TOL  # t is known even when the donor is not
    assert any(w["donor_index"] == 1 for w in truth.layers) and any(w["donor_index"] == 0 for w in truth.layers)


def test_explain_cli_json_png_and_recipe_models(family, merges, tmp_path):
    recipe, out = merges["eleusis"]
    donors = unique_donors(family)
    args = ["inspect", out, "--base", family["base"]] + [x for d in donors for x in ("--donor", d)]
    result = cli(*args, "--json", "--png", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "mergekit-partition/plan" and data["version"] == 1 and data["donors"] == donors
    assert data["seed"] is None and data["bins"] is None
    truth = plan(recipe)
    assert [r["donor"] for r in data["layers"]] == [model_of(r["donor"]) for r in truth.layers]
    assert all(set(r["t"]) == set(w["t"]) for r, w in zip(data["layers"], truth.layers, strict=False))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli(*args)
    assert table.exit_code == 0 and "confidence" in table.stdout and "base (bit for bit)" in table.stdout
    # the recipe's own models, aliases included: the alias and its original cannot be told apart
    from_recipe = cli("inspect", out, "--recipe", recipe, "--explain", "--json")
    assert from_recipe.exit_code == 0, from_recipe.output
    rows = json.loads(from_recipe.stdout)["layers"]
    for r, w in zip(rows, truth.layers, strict=False):
        if model_of(w["donor"]) == family["donor0"]:
            assert r["donor"] is None and sorted(r["candidate_indices"]) == [0, 4]
        else:
            assert r["donor"] == w["donor"]


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("case", ["eleusis", "rowwise", "casts"])
def test_verify_passes_on_real_merges(merges, case):
    recipe, out = merges[case]
    result = cli("inspect", out, "--recipe", recipe, "--all")
    assert result.exit_code == 0, result.output
    assert "verdict: OK" in result.stdout and "partition.json: seed" in result.stdout
    assert "mergekit_config.yml: byte-identical" in result.stdout


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit(out, edit):
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_verify_fails_on_one_ulp(merges, tmp_path):
    recipe, out = merges["eleusis"]
    bad = _copy(out, tmp_path / "bad")
    name = "model.layers.5.mlp.down_proj.weight"

    def one_ulp(sd):
        x = sd[name].clone()
        bits = x.view(torch.int16).reshape(-1)
        bits[1234] += 1
        sd[name] = x

    _edit(bad, one_ulp)
    result = cli("inspect", bad, "--recipe", recipe, "--all", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["verdict"] == "differs" and name in data["first_difference"]
    (check,) = [c for c in data["tensors"] if c["status"] != "identical"]
    assert check["name"] == name and check["differing"] == 1 and check["max_ulp"] == 1
    assert name in result.stderr
    # sampling layer 5 finds it; a sample without layer 5 does not look there
    seeds = [s for s in range(50) if 5 in _sampled(recipe, bad, s)]
    assert seeds and cli("inspect", bad, "--recipe", recipe, "--layers", 2, "--sample-seed", seeds[0]).exit_code == 1


def _sampled(recipe, out, seed):
    return verify(out, recipe, layers=2, sample_seed=seed).layers_checked


def test_verify_fails_on_a_layer_from_another_seed(merges, tmp_path):
    recipe, out = merges["eleusis"]
    _, other = merges["eleusis_seed8"]
    theirs = load_file(os.path.join(other, "model.safetensors"))
    ours = load_file(os.path.join(out, "model.safetensors"))
    layer = next(
        i
        for i in range(8)
        if not torch.equal(
            theirs[f"model.layers.{i}.self_attn.q_proj.weight"], ours[f"model.layers.{i}.self_attn.q_proj.weight"]
        )
    )
    bad = _copy(out, tmp_path / "bad")
    _edit(bad, lambda sd: sd.update({k: v for k, v in theirs.items() if k.startswith(f"model.layers.{layer}.")}))
    result = cli("inspect", bad, "--recipe", recipe, "--all")
    assert result.exit_code == 1
    assert f"model.layers.{layer}." in result.stderr and "verdict: DIFFERS" in result.stdout


def test_verify_fails_when_the_recipe_seed_changed(family, merges, tmp_path):
    _, out = merges["eleusis"]
    wrong = write_config(tmp_path / "seed8.yml", eleusis_like(family, bins=5, seed=8))
    result = cli("inspect", out, "--recipe", wrong, "--all", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["first_difference"].startswith("tensor model.layers.")
    assert any(f.startswith("partition.json: seed is 7, the recipe gives 8") for f in data["findings"])
    # without the records next to the weights the tensors alone still tell
    bare = _copy(out, tmp_path / "bare")
    os.remove(os.path.join(bare, "partition.json"))
    os.remove(os.path.join(bare, "mergekit_config.yml"))
    again = cli("inspect", bare, "--recipe", wrong, "--all")
    assert again.exit_code == 1 and "model.layers." in again.stderr


def test_verify_checks_non_layer_tensors_tensor_set_and_dtypes(family, merges, tmp_path):
    recipe, out = merges["eleusis"]
    donor = load_file(os.path.join(family["donor1"], "model.safetensors"))
    embed = _copy(out, tmp_path / "embed")
    _edit(embed, lambda sd: sd.update({"model.embed_tokens.weight": donor["model.embed_tokens.weight"]}))
    result = cli("inspect", embed, "--recipe", recipe, "--layers", 1)
    assert result.exit_code == 1 and "model.embed_tokens.weight" in result.stderr

    missing = _copy(out, tmp_path / "missing")
    _edit(missing, lambda sd: sd.pop("model.layers.3.mlp.up_proj.weight"))
    result = cli("inspect", missing, "--recipe", recipe, "--all")
    assert result.exit_code == 1 and "model.layers.3.mlp.up_proj.weight" in result.stdout

    widened = _copy(out, tmp_path / "f32")
    _edit(
        widened,
        lambda sd: sd.update({"model.layers.2.mlp.up_proj.weight": sd["model.layers.2.mlp.up_proj.weight"].float()}),
    )
    result = cli("inspect", widened, "--recipe", recipe, "--all")
    assert result.exit_code == 1 and "model.layers.2.mlp.up_proj.weight" in result.stderr and "dtype" in result.stderr


def test_verify_sample_reads_less_and_is_repeatable(merges):
    recipe, out = merges["eleusis"]
    full = verify(out, recipe, all_layers=True)
    a = verify(out, recipe, layers=2, sample_seed=3)
    b = verify(out, recipe, layers=2, sample_seed=3)
    assert a.ok and a.sampled and len(a.layers_checked) == 2 and a.layers_checked == b.layers_checked
    assert a.bytes_read < full.bytes_read
    # bytes follow the safetensors headers: every tensor of the merge, the base and each layer's donor once
    merged_bytes = os.path.getsize(os.path.join(out, "model.safetensors"))
    assert full.bytes_read < 3 * merged_bytes and full.bytes_read > 2 * merged_bytes
    assert full.full_check_bytes == full.bytes_read


def test_verify_and_explain_sharded_checkpoints(tmp_path):
    fam = build_family(str(tmp_path / "fam"), donors=2, shape=Shape(num_hidden_layers=4), seed=9, shards=3)
    cfg = {
        "merge_method": "partition_slerp",
        "base_model": fam["base"],
        "parameters": {"bins": 2, "seed": 2},
        "models": [
            {"model": fam["donor0"], "parameters": {"t": 0.7}},
            {"model": fam["donor1"], "parameters": {"t": 0.25}},
        ],
        "dtype": "bfloat16",
    }
    recipe, out = run_merge(tmp_path, "sharded", cfg, "--out-shard-size", "40K")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert cli("inspect", out, "--recipe", recipe).exit_code == 0
    got = inspect(out, base=fam["base"], donors=[fam["donor0"], fam["donor1"]])
    assert [r["donor"] for r in got.layers] == [model_of(r["donor"]) for r in plan(recipe).layers]
    assert "confidence" in str(got) and json.loads(got.to_json())["num_layers"] == 4


# --------------------------------------------------------------------------- errors


def test_usage_errors_exit_2_without_traceback(family, merges, tmp_path):
    recipe, out = merges["eleusis"]
    bare = tmp_path / "nothing"
    bare.mkdir()
    cases = [
        ([out], "give --recipe"),
        ([out, "--recipe", tmp_path / "missing.yml"], "does not exist"),
        ([tmp_path / "no-such-dir", "--recipe", recipe], "not a directory"),
        ([str(bare), "--recipe", recipe], "no *.safetensors"),
        ([out, "--recipe", recipe, "--layers", 0], "--layers"),
        ([out, "--base", family["base"]], "--donor"),
        ([out, "--recipe", recipe, "--png", tmp_path / "x.png"], "explain"),
        ([out, "--base", family["base"], "--donor", str(bare)], "no *.safetensors"),
    ]
    for args, words in cases:
        result = cli("inspect", *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.output


def test_console_script_exit_codes(merges, tmp_path):
    """The installed `mergekit-partition` in a subprocess: 0 on a real merge, 1 on a tampered one."""
    recipe, out = merges["casts"]
    exe = os.path.join(BIN, "mergekit-partition")
    env = {**os.environ, **ENV}
    ok = subprocess.run([exe, "inspect", out, "--recipe", recipe], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = _copy(out, tmp_path / "bad")
    _edit(bad, lambda sd: sd["model.layers.1.self_attn.v_proj.weight"].view(torch.int16).reshape(-1).__setitem__(0, 7))
    no = subprocess.run([exe, "inspect", bad, "--recipe", recipe, "--all"], capture_output=True, text=True, env=env)
    assert no.returncode == 1 and "model.layers.1.self_attn.v_proj.weight" in no.stderr and "Traceback" not in no.stderr


def test_recipe_yaml_round_trip_note(merges, tmp_path):
    """A reformatted copy of the recipe is the same recipe: verify passes and says so."""
    recipe, out = merges["rowwise"]
    reformatted = tmp_path / "reformatted.yml"
    with open(recipe) as f:
        reformatted.write_text(yaml.safe_dump(yaml.safe_load(f), sort_keys=True, indent=4))
    result = cli("inspect", out, "--recipe", reformatted)
    # partition.json records the sha256 of the file the merge was made from: said, not a failure
    assert result.exit_code == 0 and "is not this file's" in result.stdout
    assert "mergekit_config.yml: the same recipe (formatting differs)" in result.stdout


# --------------------------------------------------------------------------- random recipes


def random_recipe(fam, seed: int) -> dict:
    """A partition_slerp recipe drawn from `seed`: donors, roles, t shapes, drop, rowwise, dtypes."""
    import random

    rng = random.Random(seed)

    def t_value():
        kind = rng.choice(["const", "gradient", "attention", "tiny", "one"])
        if kind == "const":
            return round(rng.uniform(0.05, 0.95), 3)
        if kind == "gradient":
            return [round(rng.uniform(0, 1), 2), round(rng.uniform(0, 1), 2)]
        if kind == "attention":
            return [{"filter": "self_attn", "value": round(rng.uniform(0.01, 0.2), 3)}, {"value": [1, 0]}]
        return 0.01 if kind == "tiny" else 1.0

    picks = rng.sample(range(4), rng.randint(1, 4))
    models = [{"model": fam[f"donor{k}"], "parameters": {"t": t_value()}} for k in picks]
    if rng.random() < 0.3:  # a donor in a second role
        models.append({"model": fam[f"donor{picks[0]}"] + "@main", "parameters": {"t": t_value()}})
    drop = rng.choice([0.0, 0.1, 0.3, [{"filter": "mlp", "value": 0.4}, {"value": 0.0}]])
    params = {"bins": rng.randint(len(models), 8), "seed": rng.randrange(2**31), "drop_rate": drop}
    if rng.random() < 0.3:
        params["rowwise"] = True
    cfg = {"merge_method": "partition_slerp", "base_model": fam["base"], "parameters": params, "models": models}
    cfg["dtype"] = rng.choice(["bfloat16", "float16", "float32"])
    if cfg["dtype"] == "float32" and rng.random() < 0.5:
        cfg["out_dtype"] = "bfloat16"
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_random_recipes_verify_and_explain(family, tmp_path, seed):
    cfg = random_recipe(family, seed)
    print(f"recipe seed {seed}: {json.dumps(cfg)}")  # shown on failure: the recipe to reproduce it
    recipe, out = run_merge(tmp_path, "random", cfg)
    assert verify(out, recipe, all_layers=True).ok
    truth = plan(recipe)
    got = explain(out, family["base"], unique_donors(family))
    for want, row in zip(truth.layers, got.layers, strict=True):
        i = want.layer
        if all(t == 0 for t in want.t.values()):
            assert row["donor"] is None, (i, row)  # nothing moved: the donor cannot be known
            continue
        assert row["donor"] == model_of(want.donor), (i, row)
        for suffix, t in want.t.items():
            got_t, t_range, n = row["t"][suffix], row["t_range"][suffix], row["drop_elements"][suffix]
            if t_range is None:  # nothing moved in this tensor (t 0, or too small for the dtype)
                assert got_t is None, (i, suffix, got_t)
                continue
            # t_range is rounded to 6 digits, and an end bisected next to a hole of the run (where one
            # element rounds the other way) can sit a few 1e-6 inside it
            assert t_range[0] - 1e-5 <= t <= t_range[1] + 1e-5, (i, suffix, t_range, t)
            if "layernorm" not in suffix:
                assert abs(got_t - t) <= T_TOL, (i, suffix, got_t, t)
            p = want.drop_rate[suffix]
            if n >= 200:
                assert abs(row["drop_rate"][suffix] - p) <= 5 * math.sqrt(p * (1 - p) / n) + 2 / n, (i, suffix, n)
