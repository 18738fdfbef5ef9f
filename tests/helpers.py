"""Independent references and small utilities shared by the tests.

Not a test module and not a conftest: test modules import plain functions from
here (`from helpers import ...`); fixtures live in conftest.py. Everything that
computes an expected value is written out again from DESIGN.md, separately from
the package, so a test never checks the code under test against itself:

- `fnv`, `ref_layer_bins`, `ref_keep`: the pinned partition and drop mask
  (DESIGN §3.3, §3.6), checked against DESIGN's test vectors in test_partition.py;
- `setting`, `param`: mergekit's filter / gradient / precedence rule for the
  forms the tests use;
- `ref_slerp64`, `assert_close_to_ref`: the slerp in float64 and its tolerance;
- `ref_plan`: layer -> bin -> donor -> t / drop_rate of a `models:` recipe;
- `check_merge`: a whole `models:` recipe's output against all of the above.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import yaml

BIN = os.path.dirname(sys.executable)
CLI = os.path.join(BIN, "mergekit-partition")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
STACK = "model.layers"
# the tensors of one Mistral layer, after "model.layers.{i}."
MISTRAL_LAYER_TENSORS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
MISTRAL_NON_LAYER = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


# ---------------------------------------------------------------- pinned randomness (DESIGN §3.3, §3.6)


def fnv(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def _raw(name: str, seed: int, n: int) -> np.ndarray:
    return np.random.Philox(key=np.array([fnv(name), seed], dtype=np.uint64)).random_raw(n)


def ref_layer_bins(stack: str, num_layers: int, bins: int, seed: int) -> list[int]:
    """bin of each layer, straight from DESIGN §3.3's pseudocode."""
    raw = _raw(stack, seed, num_layers - 1)
    order = list(range(num_layers))
    for k, i in enumerate(range(num_layers - 1, 0, -1)):
        j = int(raw[k]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    sizes = [math.ceil(num_layers / bins) if b < num_layers % bins else num_layers // bins for b in range(bins)]
    result = [-1] * num_layers
    start = 0
    for b, size in enumerate(sizes):
        for layer in order[start : start + size]:
            result[layer] = b
        start += size
    return result


def ref_keep(name: str, seed: int, p: float, n: int) -> np.ndarray:
    u = (_raw(name, seed, n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u >= p


# ---------------------------------------------------------------- numerics (DESIGN §3.5)


def ref_slerp64(a: torch.Tensor, b: torch.Tensor, t: float, rowwise: bool = False) -> torch.Tensor:
    """DESIGN §3.5 in float64, one row (or the whole tensor) at a time."""
    a64, b64 = a.double(), b.double()
    if rowwise and a.ndim >= 2:
        return torch.stack([ref_slerp64(x, y, t) for x, y in zip(a64, b64, strict=True)])
    x, y = a64.flatten(), b64.flatten()
    na, nb = x.norm().item(), y.norm().item()
    if na < 1e-8 or nb < 1e-8:
        return (1 - t) * a64 + t * b64
    dot = max(-1.0, min(1.0, (x @ y).item() / (na * nb)))
    if abs(dot) > 0.9995:
        return (1 - t) * a64 + t * b64
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a64 + math.sin(t * theta) / s * b64


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    mag = x.abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_close_to_ref(out, ref, a, b, what=""):
    """Within one bf16 ulp of the float64 reference, or 1e-6 (|a| + |b|)."""
    out64 = out.double()
    err = (out64 - ref).abs()
    tol = torch.maximum(bf16_ulp(ref), 1e-6 * (a.double().abs() + b.double().abs()))
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off; worst {float((err / tol).max())} tolerances"


# ---------------------------------------------------------------- mergekit's parameter rule


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
    """A donor's value of `key` for tensor `name`: donor parameters first, then the top level."""
    for scope in ((model_entry or {}).get("parameters") or {}, cfg.get("parameters") or {}):
        if key in scope:
            v = setting(scope[key], name, pos)
            if v is not None:
                return v
    return default


def strip_alias(model: str) -> str:
    return model.split("@")[0]


# ---------------------------------------------------------------- recipes


def config_only_copy(family, root) -> dict:
    """The family with every weight file left out: each model is its config.json alone."""
    bare = {}
    for key, path in family.items():
        bare[key] = os.path.join(str(root), key)
        os.makedirs(bare[key])
        shutil.copy(os.path.join(path, "config.json"), bare[key])
    return bare


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
    return {
        "merge_method": "partition_slerp",
        "base_model": family["base"],
        "parameters": params,
        "models": models,
        "dtype": "bfloat16",
    }


def ref_plan(cfg, num_layers: int) -> list[dict]:
    """Per layer of a `models:` recipe: bin, donor index and entry, position, and t / drop_rate per tensor."""
    donors = [m for m in cfg["models"] if m["model"] != cfg["base_model"]]
    shared = cfg.get("parameters") or {}
    bins = ref_layer_bins(STACK, num_layers, shared.get("bins", len(donors)), shared.get("seed", 0))
    rows = []
    for layer in range(num_layers):
        pos = layer / (num_layers - 1) if num_layers > 1 else 1.0
        k = bins[layer] % len(donors)
        names = {s: f"{STACK}.{layer}.{s}" for s in MISTRAL_LAYER_TENSORS}
        rows.append(
            {
                "layer": layer,
                "bin": bins[layer],
                "donor_index": k,
                "entry": donors[k],
                "position": pos,
                "t": {s: param(cfg, donors[k], "t", n, pos) for s, n in names.items()},
                "drop_rate": {s: param(cfg, donors[k], "drop_rate", n, pos, 0.0) for s, n in names.items()},
            }
        )
    return rows


# ---------------------------------------------------------------- checking a merged model


def load_state_dict(path: str):
    from safetensors.torch import load_file

    out = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fname)))
        elif fname.endswith(".bin"):
            out.update(torch.load(os.path.join(path, fname), weights_only=True))
    assert out, f"no weights in {path}"
    return out


def check_merge(cfg_path: str, out_dir: str, num_layers: int):
    """Assert every tensor in out_dir against the reference. Returns {layer: donor index}."""
    cfg = read_yaml(cfg_path)
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
    bins = ref_layer_bins(STACK, num_layers, n_bins, seed)
    assignment = {}
    for name, a in base.items():
        if not name.startswith(STACK + "."):
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


# ---------------------------------------------------------------- console scripts


def mergekit_yaml(config_path, out_path, *extra):
    cmd = [os.path.join(BIN, "mergekit-yaml"), str(config_path), str(out_path), "--no-copy-tokenizer", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def cli(*args, **kw):
    """The installed `mergekit-partition` console script in a subprocess."""
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=ENV, **kw)


# ---------------------------------------------------------------- files


def read_text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def digest(path) -> str:
    """sha256 over the names and bytes of a merged model's tensors (same bits <=> same digest)."""
    h = hashlib.sha256()
    for name, t in sorted(load_state_dict(str(path)).items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
