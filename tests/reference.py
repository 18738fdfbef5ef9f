"""An independent float64 reference for a whole `models:`-style recipe.

Re-implements, separately from the package: mergekit's filter/gradient rule
for the handful of forms the tests use, the layer -> bin -> donor assignment
(bins from DESIGN's pinned partition, already checked against its vectors),
the slerp in float64 and the drop mask from raw Philox draws.
"""

from __future__ import annotations

import torch
import yaml

from mergekit_partition_slerp.family import load_state_dict
from mergekit_partition_slerp.partition import layer_bins
from conftest import assert_close_to_ref, ref_keep, ref_slerp64


def setting(value, name, pos):
    """First-match filter list / gradient list / scalar, as mergekit resolves it."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for cond in value:
            if cond.get("filter") in (None, "*") or cond["filter"] in name:
                return setting(cond["value"], name, pos)
        return None
    if isinstance(value, list):
        scaled = pos * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


def param(cfg, model_entry, key, name, pos, default=None):
    for scope in ((model_entry or {}).get("parameters") or {}, cfg.get("parameters") or {}):
        if key in scope:
            v = setting(scope[key], name, pos)
            if v is not None:
                return v
    return default


def strip_alias(model: str) -> str:
    return model.split("@")[0]


def check_merge(cfg_path: str, out_dir: str, num_layers: int):
    """Assert every tensor in out_dir against the reference. Returns {layer: donor index}."""
    cfg = yaml.safe_load(open(cfg_path))
    base = load_state_dict(strip_alias(cfg["base_model"]))
    donors = [m for m in cfg["models"] if m["model"] != cfg["base_model"]]
    donor_sd = {}
    for m in donors:
        donor_sd.setdefault(strip_alias(m["model"]), load_state_dict(strip_alias(m["model"])))
    out = load_state_dict(out_dir)
    assert set(out) == set(base)
    shared = cfg.get("parameters") or {}
    n_bins = shared.get("bins", len(donors))
    seed = shared.get("seed", 0)
    bins = layer_bins("model.layers", num_layers, n_bins, seed)
    assignment = {}
    for name, a in base.items():
        if not name.startswith("model.layers."):
            assert torch.equal(out[name].view(torch.int16), a.view(torch.int16)), name
            continue
        layer = int(name.split(".")[2])
        pos = layer / (num_layers - 1)
        k = bins[layer] % len(donors)
        assignment[layer] = k
        entry = donors[k]
        b = donor_sd[strip_alias(entry["model"])][name]
        t = param(cfg, entry, "t", name, pos)
        p = param(cfg, entry, "drop_rate", name, pos, 0.0)
        rescale = bool(shared.get("rescale", False))
        got = out[name]
        if t == 0 or t == 1:
            merged = (a if t == 0 else b).double()
        else:
            merged = ref_slerp64(a, b, t, rowwise=bool(shared.get("rowwise", False)))
        if p > 0:
            keep = torch.from_numpy(ref_keep(name, seed, p, a.numel())).view(a.shape)
            assert torch.equal(got[~keep].view(torch.int16), a[~keep].view(torch.int16)), f"{name}: dropped != base"
            if rescale:
                merged = a.double() + (merged - a.double()) / (1 - p)
            got, merged, a_k, b_k = got[keep], merged[keep], a[keep], b[keep]
        else:
            a_k, b_k = a, b
        if t in (0, 1) and not rescale:
            assert torch.equal(got.double(), merged), f"{name}: t={t} not bit-exact"
        else:
            assert_close_to_ref(got, merged, a_k, b_k, name)
    return assignment


def write_config(path, cfg) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return str(path)


def eleusis_like(family, *, bins=5, seed=7, alias=True, **shared):
    """base + 4 donors + an @main alias of donor0 in a second role."""
    grad_in = [{"filter": "self_attn", "value": 0.03}, {"value": [1, 0]}]
    grad_out = [{"filter": "self_attn", "value": 0.03}, {"value": [0, 1]}]
    models = [
        {"model": family["donor0"], "parameters": {"t": grad_out}},
        {"model": family["donor1"], "parameters": {"t": grad_in}},
        {"model": family["donor2"], "parameters": {"t": grad_out}},
        {"model": family["donor3"], "parameters": {"t": grad_in}},
    ]
    if alias:
        models.append({"model": family["donor0"] + "@main", "parameters": {"t": grad_in}})
    params = {"bins": bins, "seed": seed, "drop_rate": [{"filter": "self_attn", "value": 0.28}, {"value": 0.0}]}
    params.update(shared)
    return {"merge_method": "partition_slerp", "base_model": family["base"], "parameters": params, "models": models, "dtype": "bfloat16"}
