"""plan / compile: validate a recipe and resolve every layer, without weights.

Values are resolved by mergekit's own parameter machinery (the same
resolve_parameters call its planner makes, at the same layer positions), so
the floats printed by `plan` and frozen by `compile` are the floats
`mergekit-yaml` uses.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from mergekit_partition_slerp import __version__
from mergekit_partition_slerp.architecture import ArchitectureError, for_model, preflight
from mergekit_partition_slerp.partition import layer_bins, layer_position

METHOD = "partition_slerp"
PARAMETERS = ("t", "drop_rate", "rescale", "bins", "seed", "rowwise", "num_layers")
PER_DONOR = ("t", "drop_rate")
TOP_LEVEL = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template",
)
SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim",
)


class ConfigError(ValueError):
    """A recipe problem, explained in one paragraph."""


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


@dataclass
class Plan:
    seed: int
    bins: int
    stack: str
    num_layers: int
    base: str
    donors: List[str]
    layers: List[Dict[str, Any]]
    non_layer: List[str]
    config_sha256: str = ""
    source: Optional[str] = None
    source_text: str = field(default="", repr=False)  # the recipe as read, for the model card
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: List[str] = field(default_factory=list)  # said by plan/compile/run on stderr, not in the JSON

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": "mergekit-partition/plan", "version": 1,
            "seed": self.seed, "bins": self.bins, "stack": self.stack, "num_layers": self.num_layers,
            "base": self.base, "donors": self.donors, "layers": self.layers, "non_layer": self.non_layer,
            "config_sha256": self.config_sha256,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @staticmethod
    def tensor_class(key: str) -> str:
        first = key.split(".")[0]
        return "attn" if "attn" in first else "mlp" if first in ("mlp", "block_sparse_moe", "feed_forward") else "other"

    def classes(self) -> List[str]:
        present = {self.tensor_class(k) for r in self.layers[:1] for k in r["t"]}
        return [c for c in ("attn", "mlp", "other") if c in present]

    def _by_class(self, values: Dict[str, float], cls: str) -> str:
        vals = sorted({v for k, v in values.items() if self.tensor_class(k) == cls})
        return "/".join(f"{v:.4g}" for v in vals)

    def __str__(self) -> str:
        classes = self.classes()
        head = ["layer", "bin", "donor"] + [f"t:{c}" for c in classes] + [f"drop:{c}" for c in classes]
        rows = [
            [str(r["layer"]), str(r["bin"]), r["donor"]]
            + [self._by_class(r["t"], c) for c in classes]
            + [self._by_class(r["drop_rate"], c) for c in classes]
            for r in self.layers
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip()
        lines = [
            f"partition_slerp plan: {self.num_layers} layers of {self.stack} in {self.bins} bins, seed {self.seed}",
            f"base: {self.base}",
            fmt(head), fmt(["-" * w for w in widths]),
        ] + [fmt(r) for r in rows]
        lines.append(f"base (bit for bit): {', '.join(self.non_layer)}")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None):
        """Layer x donor heatmap of the non-attention t; × marks drop_rate > 0.

        With a path the figure is drawn off-screen (no pyplot, no backend
        switch) and saved; without one it is a pyplot figure for notebooks.
        """
        import numpy as np

        if path:
            from matplotlib.figure import Figure

            fig = Figure()
        else:
            import matplotlib.pyplot as plt

            fig = plt.figure()
        fig.set_size_inches(max(6, self.num_layers * 0.32 + 3), max(2.5, len(self.donors) * 0.42 + 1.4))
        ax = fig.add_subplot()
        grid = np.full((len(self.donors), self.num_layers), np.nan)
        dropped = np.zeros_like(grid)
        for r in self.layers:
            main = [v for k, v in r["t"].items() if self.tensor_class(k) != "attn"] or list(r["t"].values())
            grid[r["donor_index"], r["layer"]] = max(main)
            dropped[r["donor_index"], r["layer"]] = max(r["drop_rate"].values(), default=0)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        for d, l in zip(*np.nonzero(dropped > 0)):
            # dark mark on the bright (yellow) end of viridis, light elsewhere
            ax.text(l, d, "×", ha="center", va="center", color="black" if grid[d, l] > 0.6 else "white", fontsize=8)
        labels = [os.path.basename(x.rstrip("/")) if os.path.isabs(x) or x.startswith(".") else x for x in self.donors]
        ax.set_yticks(range(len(self.donors)), labels, fontsize=8)
        ax.set_xticks(range(self.num_layers), [str(i) for i in range(self.num_layers)], fontsize=7)
        ax.set_xlabel("layer (empty cell: layer not assigned to that donor)")
        ax.set_title(f"partition_slerp: donor t per layer ({self.bins} bins, seed {self.seed}); × = drop_rate > 0", fontsize=9)
        fig.colorbar(im, ax=ax, label="t (0 = base, 1 = donor)", fraction=0.03)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=130)
        return fig


def read_source(config) -> tuple:
    """(raw dict, path or None, sha256, text) from a config path or dict."""
    if isinstance(config, dict):
        text = yaml.safe_dump(config, sort_keys=False)
        return config, None, hashlib.sha256(text.encode()).hexdigest(), text
    path = os.fspath(config)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping with merge_method, base_model and models.")
    return raw, path, hashlib.sha256(data).hexdigest(), data.decode("utf-8")


def _check_keys(raw: Dict[str, Any]) -> None:
    for key in raw:
        if key not in TOP_LEVEL and not str(key).startswith("x-"):
            raise ConfigError(f"unknown top-level key '{key}' (mergekit would silently ignore it).{_suggest(key, TOP_LEVEL)} Prefix private keys with 'x-'.")
    if raw.get("merge_method") != METHOD:
        raise ConfigError(f"merge_method is {raw.get('merge_method')!r}; mergekit-partition handles '{METHOD}' recipes only.")
    if not raw.get("base_model"):
        raise ConfigError("base_model is missing: partition_slerp slerps every layer between the base and one donor, so it needs a base.")
    if raw.get("slices") or raw.get("modules"):
        raise ConfigError("mergekit-partition takes a `models:` recipe (the partition spans the full depth); `slices:`/`modules:` recipes are not supported.")
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models is missing or empty: list the donors under `models:`, each as `- model: <id or path>`.")
    scopes = [("parameters", raw.get("parameters"))]
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models[{i}] must be a mapping with a `model:` key; got {m!r}.")
        for key in m:
            if key not in ("model", "parameters"):
                raise ConfigError(f"models[{i}] ({m['model']}) has unknown key '{key}'.{_suggest(key, ('model', 'parameters'))}")
        scopes.append((f"parameters of {m['model']}", m.get("parameters")))
    for where, params in scopes:
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{where} must be a mapping; got {params!r}.")
        for key in params:
            if key not in PARAMETERS:
                raise ConfigError(f"unknown parameter '{key}' in {where} (mergekit would silently ignore it).{_suggest(key, PARAMETERS)} partition_slerp takes: {', '.join(PARAMETERS)}.")


def _local_config(ref, label: str):
    path = ref.model.path
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"{label} {ref} points to {path}, which does not exist.")
    try:
        return ref.config()
    except Exception as error:  # hub errors, malformed config.json
        raise ConfigError(f"cannot read config.json of {label} {ref}: {str(error).splitlines()[0] if str(error) else type(error).__name__}.") from None


def build_plan(config) -> Plan:
    raw, source, sha, text = read_source(config)
    _check_keys(raw)
    from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
    from mergekit.merge_methods import get
    from mergekit.parameter_resolver import resolve_parameters

    try:
        cfg = MergeConfiguration.model_validate(raw)
    except Exception as error:
        raise ConfigError(f"mergekit rejects this config: {_pydantic_summary(error)}") from None
    base = cfg.base_model
    donors = [m for m in cfg.models if m.model != base]
    if not donors:
        raise ConfigError("models lists no donor besides the base; add at least one donor.")
    seen = {}
    for m in donors:
        if m.model in seen:
            raise ConfigError(f"donor {m.model} is listed twice; mergekit rejects duplicate inputs. To use a model in two roles, list it the second time as `{m.model.model.path}@main` (hub) or through a symlinked directory (local).")
        seen[m.model] = True

    base_cfg = _local_config(base, "base model")
    if len(getattr(base_cfg, "architectures", None) or []) != 1:
        raise ConfigError(f"config.json of base model {base} must name exactly one architecture (its `architectures` is {getattr(base_cfg, 'architectures', None)}).")
    try:
        arch = for_model(base, base_cfg)
    except ArchitectureError as error:
        raise ConfigError(str(error)) from None
    tokenizer_set = raw.get("tokenizer_source") is not None or raw.get("tokenizer") is not None
    for m in donors:
        dcfg = _local_config(m.model, "donor")
        if list(dcfg.architectures or []) != list(base_cfg.architectures or []):
            raise ConfigError(f"donor {m.model} is {dcfg.architectures} but the base is {base_cfg.architectures}; partition_slerp merges models of one architecture.")
        for key in SHAPE_KEYS:
            if getattr(dcfg, key, None) != getattr(base_cfg, key, None):
                raise ConfigError(f"donor {m.model} has {key} = {getattr(dcfg, key, None)} but the base has {getattr(base_cfg, key, None)}; its tensors cannot be slerped with the base's.")
        if getattr(dcfg, "vocab_size", None) != getattr(base_cfg, "vocab_size", None) and not tokenizer_set:
            raise ConfigError(f"donor {m.model} has vocab_size {dcfg.vocab_size} but the base has {base_cfg.vocab_size}; set `tokenizer_source: base` (or a `tokenizer:` section) so mergekit aligns the embeddings.")

    try:  # tensor names only, before any weight is read
        warnings = preflight(arch, [("base model", base)] + [("donor", m.model) for m in donors], raw)
    except ArchitectureError as error:
        raise ConfigError(str(error)) from None
    L = arch.num_layers
    shared = raw.get("parameters") or {}
    spec = get(METHOD).spec
    shared_specs = {p.name: p for p in spec.parameters}
    for key in ("bins", "seed", "rescale", "rowwise", "num_layers"):
        if key in shared:
            try:
                shared_specs[key].validate(shared[key])
            except Exception as error:
                raise ConfigError(f"parameter {key} = {shared[key]!r} is invalid: {_pydantic_summary(error)}") from None
    for i, m in enumerate(cfg.models):
        for key in ("bins", "seed", "rescale", "rowwise", "num_layers"):
            if key in (m.parameters or {}):
                raise ConfigError(f"{key} is shared by the whole merge; set it under the top-level `parameters:`, not for {m.model}.")
    if shared.get("num_layers") not in (None, L):
        raise ConfigError(f"num_layers is {shared['num_layers']} but base model {base} has {L} layers.")
    n_bins = shared.get("bins", len(donors))
    seed = shared.get("seed", 0)
    if n_bins > L:
        raise ConfigError(f"bins is {n_bins} but the base model has only {L} layers; use at most {L} bins.")
    if n_bins < len(donors):
        unused = ", ".join(str(m.model) for m in donors[n_bins:])
        raise ConfigError(f"bins is {n_bins} but there are {len(donors)} donors, so these donors would never be used: {unused}. Set bins to at least {len(donors)} or remove them.")

    stack = arch.stack
    sources = [InputSliceDefinition(layer_range=(0, L), model=m.model, parameters=m.parameters) for m in cfg.models]
    if base not in [m.model for m in cfg.models]:
        sources.append(InputSliceDefinition(layer_range=(0, L), model=base))
    reader = ConfigReader(config=cfg, t=0, slice_out=OutputSliceDefinition(sources=sources))
    bins = layer_bins(stack, L, n_bins, seed)
    layers = []
    for i in range(L):
        pos = layer_position(i, L)
        k = bins[i] % len(donors)
        donor = donors[k]
        row = {"layer": i, "bin": bins[i], "donor_index": k, "donor": _as_written(raw, k, base), "position": pos, "t": {}, "drop_rate": {}}
        for w in arch.layers[i]:
            suffix = arch.suffix(w.name, i)
            try:
                _, per = resolve_parameters(spec, tensor_name=w.name, inputs={donor.model: w.name}, sources=reader.with_t(pos).parameter_sources, base_model=base, t=pos)
            except Exception as error:
                raise ConfigError(f"donor {donor.model}, tensor class {suffix.split('.')[0]} ({w.name}): {_pydantic_summary(error)}") from None
            row["t"][suffix] = float(per[donor.model]["t"])
            row["drop_rate"][suffix] = float(per[donor.model]["drop_rate"])
        layers.append(row)
    # every donor's values must be valid, also where it owns no layer
    for m in donors:
        for w in arch.layers[0] + arch.layers[L - 1]:
            try:
                resolve_parameters(spec, tensor_name=w.name, inputs={m.model: w.name}, sources=reader.parameter_sources, base_model=base, t=0)
            except Exception as error:
                raise ConfigError(f"donor {m.model}, tensor class {w.name.split('.')[len(stack.split('.')) + 1]} ({w.name}): {_pydantic_summary(error)}") from None
    non_layer = [w.name for w in arch.non_layer]
    return Plan(seed=seed, bins=n_bins, stack=stack, num_layers=L, base=str(raw["base_model"]),
                donors=[_as_written(raw, k, base) for k in range(len(donors))], layers=layers,
                non_layer=non_layer, config_sha256=sha, source=source, source_text=text, raw=raw,
                warnings=warnings)


def _as_written(raw, k, base) -> str:
    entries = [m["model"] for m in raw["models"] if str(m["model"]) != str(raw["base_model"])]
    return str(entries[k])


def _pydantic_summary(error: Exception) -> str:
    """The first few pydantic complaints on one line, else the message's first line."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        parts = []
        for e in errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc + ': ' if loc else ''}{e.get('msg')} (got {e.get('input')!r})")
        return "; ".join(parts)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def plan(config) -> Plan:
    """Validate a recipe (path, YAML file or dict) and resolve every layer; no weights are read."""
    return build_plan(config)


def compile_config(p: Plan, absolute_paths: bool = False) -> str:
    """A plain mergekit config, one slice per layer, sources [base, assigned donor].

    absolute_paths: write existing local model directories as absolute paths
    (mergekit's model card asks the hub about relative ids with one slash).
    """
    raw = p.raw
    fix = _absolute if absolute_paths else (lambda model: model)
    shared = {k: v for k, v in (raw.get("parameters") or {}).items() if k not in PER_DONOR}
    shared["bins"], shared["seed"] = p.bins, p.seed
    slices = []
    for row in p.layers:
        params = {}
        for key in PER_DONOR:
            params[key] = _frozen(row[key], p.stack, row["layer"])
        slices.append({"sources": [
            {"model": fix(raw["base_model"]), "layer_range": [row["layer"], row["layer"] + 1]},
            {"model": fix(row["donor"]), "layer_range": [row["layer"], row["layer"] + 1], "parameters": params},
        ]})
    out = {"merge_method": METHOD, "base_model": fix(raw["base_model"]), "parameters": shared, "slices": slices}
    for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
        if key in raw:
            out[key] = raw[key]
    header = (
        f"# Compiled by mergekit-partition {__version__} from {p.source or '<in-memory config>'}\n"
        f"# source sha256: {p.config_sha256}\n"
        f"# seed {p.seed}, bins {p.bins}: one slice per layer reading only the base and that layer's donor;\n"
        f"# gradients are frozen to their per-layer floats. `mergekit-yaml` on this file gives the same bits.\n"
    )
    return header + yaml.safe_dump(out, sort_keys=False, width=1000)


def _absolute(model: str) -> str:
    path, sep, revision = str(model).partition("@")
    if os.path.isdir(path) and not os.path.isabs(path):
        return os.path.abspath(path) + sep + revision
    return model


def _frozen(values: Dict[str, float], stack: str, layer: int):
    """One float, or an exact-name filter list with the most common value last."""
    counts: Dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=counts.get)
    if len(counts) == 1:
        return common
    rules = [{"filter": f"{stack}.{layer}.{k}", "value": v} for k, v in values.items() if v != common]
    return rules + [{"value": common}]
