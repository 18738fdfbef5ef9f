"""plan / compile: resolve every layer of a checked recipe, reading config.json files only.

Values are resolved by mergekit's own parameter machinery (the same resolve_parameters
call its planner makes, at the same layer positions), so the floats `plan` prints and
`compile` freezes are the floats `mergekit-yaml` uses.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from mergekit_partition_slerp import __version__
from mergekit_partition_slerp import recipe as recipes
from mergekit_partition_slerp.architecture import ArchitectureError, for_model, preflight
from mergekit_partition_slerp.checkpoint import model_path
from mergekit_partition_slerp.errors import ConfigError
from mergekit_partition_slerp.partition import bins_problem, layer_bins, layer_position

__all__ = ["ConfigError", "LayerRow", "Plan", "build_plan", "compile_config", "plan"]

SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


@dataclass(frozen=True)
class LayerRow:
    layer: int
    bin: int
    donor_index: int  # position among the donors (models other than the base), config order
    donor: str  # as written in the recipe
    position: float  # i / (L - 1): where gradients are read
    t: dict[str, float]  # tensor name after "{stack}.{layer}." -> t
    drop_rate: dict[str, float]

    def __getitem__(self, key: str) -> Any:
        """row["donor"]: 0.1.0's rows were dicts, and notebooks written against it keep working."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class Plan:
    seed: int
    bins: int
    stack: str
    num_layers: int
    base: str
    donors: list[str]
    layers: list[LayerRow]
    non_layer: list[str]
    config_sha256: str = ""
    source: str | None = None
    source_text: str = field(default="", repr=False)  # the recipe as read, for the model card
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)  # said by plan/compile/run on stderr, not in the JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": recipes.PLAN_SCHEMA,
            "version": 1,
            "seed": self.seed,
            "bins": self.bins,
            "stack": self.stack,
            "num_layers": self.num_layers,
            "base": self.base,
            "donors": self.donors,
            "layers": [asdict(r) for r in self.layers],
            "non_layer": self.non_layer,
            "config_sha256": self.config_sha256,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        from mergekit_partition_slerp.report import table

        return table(self)

    def plot(self, path: str | None = None):
        """The layer x donor heatmap (see report.heatmap)."""
        from mergekit_partition_slerp.report import heatmap

        return heatmap(self, path)


def plan(config) -> Plan:
    """Check a recipe (a path or a dict) and resolve every layer; no weights are read."""
    return build_plan(config)


def build_plan(config) -> Plan:
    recipe = recipes.read(config)
    table = recipes.check(recipe)
    raw = recipe.raw
    from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
    from mergekit.parameter_resolver import resolve_parameters

    from mergekit_partition_slerp.method import partition_slerp

    try:
        cfg = MergeConfiguration.model_validate(raw)
    except Exception as error:
        raise ConfigError(f"mergekit rejects this recipe: {_pydantic_summary(error)}.") from None
    base = cfg.base_model
    donors = [m for m in cfg.models if m.model != base]
    if not donors:
        raise ConfigError("models lists no donor besides the base; add at least one donor.")
    seen = set()
    for m in donors:
        if m.model in seen:
            raise ConfigError(
                f"donor {m.model} is listed twice; mergekit rejects duplicate inputs. To use a model in two roles, "
                f"list it the second time as `{m.model.model.path}@main` (hub) or through a symlinked directory "
                "(local)."
            )
        seen.add(m.model)

    _require_reachable([base] + [m.model for m in donors], recipe.path)
    base_cfg = _model_config(base, "base model", recipe.path)
    if len(getattr(base_cfg, "architectures", None) or []) != 1:
        raise ConfigError(
            f"config.json of base model {base} must name exactly one architecture "
            f"(its `architectures` is {getattr(base_cfg, 'architectures', None)})."
        )
    try:
        arch = for_model(base, base_cfg)
    except ArchitectureError as error:
        raise ConfigError(str(error)) from None
    stack, L = arch.stack, arch.num_layers
    tokenizer_set = raw.get("tokenizer_source") is not None or raw.get("tokenizer") is not None
    for m in donors:
        dcfg = _model_config(m.model, "donor", recipe.path)
        if list(dcfg.architectures or []) != list(base_cfg.architectures or []):
            raise ConfigError(
                f"donor {m.model} is {dcfg.architectures} but the base is {base_cfg.architectures}; "
                "partition_slerp merges models of one architecture."
            )
        for key in SHAPE_KEYS:
            if getattr(dcfg, key, None) != getattr(base_cfg, key, None):
                raise ConfigError(
                    f"donor {m.model} has {key} = {getattr(dcfg, key, None)} but the base has "
                    f"{getattr(base_cfg, key, None)}; its tensors cannot be slerped with the base's."
                )
        if getattr(dcfg, "vocab_size", None) != getattr(base_cfg, "vocab_size", None) and not tokenizer_set:
            raise ConfigError(
                f"donor {m.model} has vocab_size {dcfg.vocab_size} but the base has {base_cfg.vocab_size}; set "
                "`tokenizer_source: base` (or a `tokenizer:` section) so mergekit aligns the embeddings."
            )

    try:  # tensor names only, from the safetensors headers: before any weight is read
        warnings = preflight(arch, [("base model", base)] + [("donor", m.model) for m in donors], raw)
    except ArchitectureError as error:
        raise ConfigError(str(error)) from None
    shared = raw.get("parameters") or {}
    if shared.get("num_layers") not in (None, L):
        raise ConfigError(
            f"num_layers = {shared['num_layers']} (top-level parameters) does not match base model {base}, "
            f"which has {L} layers in {stack}; remove num_layers (it is inferred) or set it to {L}."
        )
    n_bins = shared.get("bins", table["bins"].default) or len(donors)
    seed = shared.get("seed", table["seed"].default)
    problem = bins_problem(n_bins, L, [str(m.model) for m in donors], stack)
    if problem:
        where = "set in the top-level parameters" if "bins" in shared else "by default the donor count"
        raise ConfigError(f"{problem} (bins is {where}).")

    sources = [InputSliceDefinition(layer_range=(0, L), model=m.model, parameters=m.parameters) for m in cfg.models]
    if base not in [m.model for m in cfg.models]:
        sources.append(InputSliceDefinition(layer_range=(0, L), model=base))
    reader = ConfigReader(config=cfg, t=0, slice_out=OutputSliceDefinition(sources=sources))
    spec = partition_slerp.spec
    per_donor = [name for name, p in table.items() if p.per_donor]

    def resolve(donor, name: str, position: float) -> dict[str, float]:
        try:
            _, per = resolve_parameters(
                spec,
                tensor_name=name,
                inputs={donor.model: name},
                sources=reader.with_t(position).parameter_sources,
                base_model=base,
                t=position,
            )
        except Exception as error:  # every written value was checked: what is left is a missing value
            raise ConfigError(
                f"no value of {' / '.join(per_donor)} applies to tensor {name} for donor {donor.model}: "
                f"{_pydantic_summary(error)}. A filter list needs a last entry without `filter:` "
                "(or a top-level default) to cover every tensor."
            ) from None
        return {key: float(per[donor.model][key]) for key in per_donor}

    written = [str(m["model"]) for m in raw["models"] if str(m["model"]) != str(raw["base_model"])]
    bins = layer_bins(stack, L, n_bins, seed)
    layers = []
    for i in range(L):
        position = layer_position(i, L)
        k = bins[i] % len(donors)
        values = {arch.suffix(w.name, i): resolve(donors[k], w.name, position) for w in arch.layers[i]}
        layers.append(
            LayerRow(
                layer=i,
                bin=bins[i],
                donor_index=k,
                donor=written[k],
                position=position,
                t={suffix: v["t"] for suffix, v in values.items()},
                drop_rate={suffix: v["drop_rate"] for suffix, v in values.items()},
            )
        )
    # a donor's values must resolve everywhere, also at depths where it owns no layer
    for m in donors:
        for w in arch.layers[0] + arch.layers[L - 1]:
            resolve(m, w.name, 0.0)
    return Plan(
        seed=seed,
        bins=n_bins,
        stack=stack,
        num_layers=L,
        base=str(raw["base_model"]),
        donors=written,
        layers=layers,
        non_layer=[w.name for w in arch.non_layer],
        config_sha256=recipe.sha256,
        source=recipe.path,
        source_text=recipe.text,
        raw=raw,
        warnings=warnings,
    )


def _local_path(ref) -> str | None:
    path = ref.model.path
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
    return os.path.expanduser(path) if looks_local else None


def _model_config(ref, label: str, recipe_path: str | None):
    path = _local_path(ref)
    if path is not None and not os.path.isdir(path):
        hint = ""
        if recipe_path and not os.path.isabs(path):
            beside = os.path.join(os.path.dirname(os.path.abspath(recipe_path)), path)
            if os.path.isdir(beside):
                hint = (
                    f" It exists relative to the recipe ({beside}), but mergekit reads relative paths from the "
                    f"current directory: run from {os.path.dirname(os.path.abspath(recipe_path))}, or write the "
                    "path from here."
                )
        raise ConfigError(f"{label} {ref} points to {path}, which does not exist.{hint}")
    if path is not None and not os.path.exists(os.path.join(path, "config.json")):
        raise ConfigError(f"{label} {ref}: {path} has no config.json, so it is not a model directory.")
    try:
        return ref.config()
    except Exception as error:  # hub errors, malformed config.json
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot read config.json of {label} {ref}: {first}.") from None


def _require_reachable(refs, recipe_path: str | None) -> None:
    """Fail fast, naming the models, when hub models are needed but the hub is out of reach.

    Without this, transformers retries each lookup for ~30 s before failing.
    """
    remote = [ref for ref in dict.fromkeys(refs) if _local_path(ref) is None and not _cached_config(ref)]
    if not remote:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline:
        if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            return  # a proxy may reach the hub where a direct connection cannot: let the lookup try
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=5).close()
            return
        except OSError:
            pass
    reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached (offline?)"
    names = ", ".join(str(r) for r in remote)
    where = f" in {recipe_path}" if recipe_path else ""
    raise ConfigError(
        f"{reason}, and these models{where} are not in the local cache: {names}. `plan` reads only their "
        "config.json, but it must come from the hub (or point `model:` at a local directory). To try a recipe "
        "offline, `mergekit-partition demo` builds a tiny local model family and writes an Eleusis-shaped "
        "recipe for it (partition-slerp-demo/eleusis-demo.yml)."
    )


def _cached_config(ref) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref.model.path, "config.json", revision=ref.model.revision)
    except Exception:
        return False
    return isinstance(found, str)


def _pydantic_summary(error: Exception) -> str:
    """Pydantic's complaints in plain words, else the message's first line."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        parts = []
        for e in errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if not str(x).startswith(("function-", "constrained")))
            parts.append(f"{loc + ': ' if loc else ''}{e.get('msg')} (got {e.get('input')!r})")
        return "; ".join(parts)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def compile_config(p: Plan, absolute_paths: bool = False) -> str:
    """A plain mergekit config, one slice per layer, sources [base, assigned donor].

    absolute_paths: write existing local model directories as absolute paths
    (mergekit's model card asks the hub about relative ids with one slash).
    """
    raw = p.raw
    fix = _absolute if absolute_paths else (lambda model: model)
    table = recipes.parameters()
    shared = {k: v for k, v in (raw.get("parameters") or {}).items() if not table[k].per_donor}
    shared["bins"], shared["seed"] = p.bins, p.seed
    slices = []
    for row in p.layers:
        params = {key: _frozen(getattr(row, key), p.stack, row.layer) for key in ("t", "drop_rate")}
        span = [row.layer, row.layer + 1]
        slices.append(
            {
                "sources": [
                    {"model": fix(raw["base_model"]), "layer_range": span},
                    {"model": fix(row.donor), "layer_range": span, "parameters": params},
                ]
            }
        )
    out = {"merge_method": recipes.METHOD, "base_model": fix(raw["base_model"]), "parameters": shared, "slices": slices}
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
    path, revision = model_path(model)
    if os.path.isdir(path) and not os.path.isabs(path):
        return os.path.abspath(path) + ("@" + revision if revision is not None else "")
    return model


def _frozen(values: dict[str, float], stack: str, layer: int):
    """One float, or an exact-name filter list with the most common value last."""
    counts: dict[float, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=lambda v: counts[v])
    if len(counts) == 1:
        return common
    rules: list[dict[str, Any]] = [
        {"filter": f"{stack}.{layer}.{k}", "value": v} for k, v in values.items() if v != common
    ]
    return rules + [{"value": common}]
