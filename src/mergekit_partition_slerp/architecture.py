"""One answer to "which tensors are layers, and of which stack": mergekit's own.

The method (which layer is this tensor?) and the planner (what does every
layer get?) both ask `for_model`, so they cannot disagree. The answer is
mergekit 0.1.5's architecture definition for the base model's config, or,
where mergekit has none (e.g. exaone4), the architecture mergekit itself
infers from the checkpoint's tensor names when it merges such a model.

`checkpoint_tensors`, `missing_tensors` and `filter_warnings` answer at plan
time from tensor names alone (safetensors headers or the shard index): no
tensor data is read.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mergekit_partition_slerp.checkpoint import tensor_dtypes


class ArchitectureError(ValueError):
    """The base model's layers cannot be found the way mergekit finds them."""


@dataclass(frozen=True)
class Weight:
    """One output tensor as mergekit's architecture names it."""

    name: str
    optional: bool = False  # mergekit skips it when no input has it
    aliases: tuple[str, ...] = ()  # other input names mergekit reads it from
    tied_names: tuple[str, ...] = ()  # a tied tensor that stands in for it (lm_head -> embeddings)

    @property
    def input_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases, *self.tied_names)


@dataclass(frozen=True)
class Architecture:
    model: str  # the base model as mergekit references it
    architecture: str  # config.json `architectures[0]`
    model_type: str
    inferred: bool  # True: no definition in mergekit, layout inferred from the weights as mergekit does
    stack: str  # partition key: the tensor-name prefix before ".{i}.", e.g. "model.layers"
    num_layers: int
    layers: tuple[tuple[Weight, ...], ...]  # layers[i]: the output tensors of layer i
    non_layer: tuple[Weight, ...]  # embeddings, final norm, lm_head, ...: the base's, bit for bit

    def layer_index(self) -> dict[str, int]:
        """{output tensor name: layer index} for every layer tensor."""
        return {w.name: i for i, layer in enumerate(self.layers) for w in layer}

    def suffix(self, name: str, index: int) -> str:
        """The tensor name after "{stack}.{index}.", e.g. "self_attn.q_proj.weight"."""
        return name[len(self.stack) + len(str(index)) + 2 :]

    def all_weights(self) -> list[Weight]:
        return [w for layer in self.layers for w in layer] + list(self.non_layer)


def stack_of(name: str, index: int) -> str | None:
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part == str(index):
            return ".".join(parts[:k])
    return None


def _weight(info: Any) -> Weight:
    return Weight(
        name=info.name,
        optional=bool(info.optional),
        aliases=tuple(info.aliases or ()),
        tied_names=tuple(info.tied_names or ()),
    )


def for_model(ref: Any, config: Any = None) -> Architecture:
    """The architecture of mergekit ModelReference `ref` (its config.json is read unless given)."""
    if config is None:
        return _cached(ref)
    return _build(ref, config)


@lru_cache(maxsize=64)
def _cached(ref: Any) -> Architecture:
    return _build(ref, ref.config())


def _build(ref: Any, config: Any) -> Architecture:
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModelArchitecture

    names = list(getattr(config, "architectures", None) or [])
    if len(names) != 1:
        raise ArchitectureError(
            f"config.json of base model {ref} must name exactly one architecture (its `architectures` is {names}); "
            "mergekit picks the tensor layout from it."
        )
    arch = arch_info_for_config(config)
    inferred = arch is None
    if inferred:
        arch = _infer(ref, names[0])
    if len(arch.modules) != 1:
        raise ArchitectureError(
            f"base model {ref} ({names[0]}) is a multi-module architecture "
            f"({', '.join(sorted(arch.modules))}); partition_slerp v1 merges single-module models only "
            "(Llama, Mistral, Qwen, Gemma, GPT-2, ...)."
        )
    (module_name,) = arch.modules
    module = ConfiguredModelArchitecture(info=arch, config=config).get_module(module_name)
    count = module.num_layers()
    if not count:
        raise ArchitectureError(
            f"base model {ref} ({names[0]}): mergekit finds no layers in it, so there is nothing to partition."
        )
    layers = tuple(tuple(_weight(w) for w in module.layer_weights(i)) for i in range(count))
    stacks = [stack_of(w.name, i) for i, layer in enumerate(layers) for w in layer]
    if not layers[0] or None in stacks or len(set(stacks)) != 1:
        odd = sorted({w.name for i, layer in enumerate(layers) for w in layer if stack_of(w.name, i) != stacks[0]})
        raise ArchitectureError(
            f"base model {ref} ({names[0]}): mergekit's layer tensors do not share one stack prefix "
            f"(e.g. {', '.join(odd[:3]) or 'no layer tensors'}); partition_slerp needs one stack to partition."
        )
    non_layer = tuple(_weight(w) for w in module.pre_weights() + module.post_weights())
    return Architecture(
        model=str(ref),
        architecture=names[0],
        model_type=str(getattr(config, "model_type", "") or ""),
        inferred=inferred,
        stack=str(stacks[0]),
        num_layers=count,
        layers=layers,
        non_layer=non_layer,
    )


def _infer(ref: Any, name: str) -> Any:
    """mergekit's inferred architecture, as its merge path builds it for a model it has no definition for."""
    from mergekit.architecture.auto import infer_architecture_info
    from mergekit.options import MergeOptions

    try:
        return infer_architecture_info((ref,), ref, MergeOptions())
    except Exception as error:  # no weight files, unreadable index, no layer-shaped names
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArchitectureError(
            f"mergekit 0.1.5 has no architecture definition for {name} (base model {ref}), and inferring one "
            f"from its weights the way mergekit does failed: {detail}."
        ) from None


# --- tensor names from the checkpoint, without reading tensor data ---------------------------


def checkpoint_tensors(ref: Any) -> dict[str, str] | None:
    """{tensor name: dtype} of a local checkpoint, from the files mergekit would read.

    mergekit looks for model.safetensors(.index.json), then pytorch_model.bin(.index.json);
    dtypes are known for safetensors only ("" otherwise). None when the model is not a local
    directory or its names cannot be read without unpickling.
    """
    path = os.path.expanduser(getattr(getattr(ref, "model", None), "path", str(ref)))
    if not os.path.isdir(path):
        return None
    return tensor_dtypes(path)


def _conversion_rules(model_type: str) -> list:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    return list(get_checkpoint_conversion_mapping(model_type) or [])


def _convertible(model_type: str, names: set[str], target: str) -> bool:
    """mergekit's own test: can transformers' checkpoint conversion build `target` from `names`?"""
    from mergekit.architecture.conversion import can_convert_checkpoint_keys

    return bool(can_convert_checkpoint_keys(model_type or None, names, target))


@dataclass(frozen=True)
class TensorCheck:
    """What a checkpoint has against what mergekit's architecture will ask it for."""

    model: str
    missing: tuple[str, ...]  # required by the definition, absent, not convertible: mergekit fails at merge time
    missing_optional: tuple[str, ...]  # marked optional by mergekit: skipped when no input has them
    converted: tuple[str, ...]  # output names mergekit builds from differently named inputs (fused MoE experts)
    unknown: tuple[str, ...]  # layer tensors of the checkpoint that no output tensor is made from: dropped
    non_float: tuple[tuple[str, str], ...]  # (name, dtype) of layer buffers (bool masks, int indices)


def check_tensors(arch: Architecture, ref: Any, names: dict[str, str]) -> TensorCheck:
    keys = set(names)
    missing, optional, converted = [], [], []
    for w in arch.all_weights():
        if any(n in keys for n in w.input_names):
            continue
        if any(_convertible(arch.model_type, keys, n) for n in (w.name, *w.aliases)):
            converted.append(w.name)
        elif w.optional:
            optional.append(w.name)
        else:
            missing.append(w.name)
    used = {n for w in arch.all_weights() for n in w.input_names}
    rules = _conversion_rules(arch.model_type) if converted else []
    prefix = arch.stack + "."
    unknown = []
    for key in sorted(keys - used):
        if not key.startswith(prefix):
            continue
        if any(rule.rename_source_key(key)[1] is not None for rule in rules):
            continue  # an input of a conversion (per-expert weights fused into one output)
        unknown.append(key)
    layer_names = {w.name for layer in arch.layers for w in layer}
    non_float = tuple((k, names[k]) for k in sorted(layer_names & keys) if names[k] and names[k] not in _FLOAT_DTYPES)
    return TensorCheck(str(ref), tuple(missing), tuple(optional), tuple(converted), tuple(unknown), non_float)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _some(names: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def missing_message(arch: Architecture, check: TensorCheck, role: str) -> str | None:
    """One paragraph when mergekit would fail at merge time on this checkpoint, else None."""
    if not check.missing:
        return None
    layered = [n for n in check.missing if n in arch.layer_index()]
    per_layer = sorted({arch.suffix(n, arch.layer_index()[n]) for n in layered})
    where = f" (per layer: {', '.join(per_layer)})" if per_layer else ""
    return (
        f"{role} {check.model} does not have {len(check.missing)} tensor(s) that mergekit 0.1.5's "
        f"{arch.architecture} definition requires: {_some(list(check.missing))}{where}. mergekit would fail on "
        "them at merge time, after loading the models (`Tensor ... required but not present`), whatever the merge "
        "method. The checkpoint's layout differs from the one mergekit's definition expects (often a newer or older "
        "transformers version, or a config flag that adds or removes those tensors); mergekit marks no such tensor "
        "optional. Re-save the checkpoint in the layout the definition expects, or pass a checkpoint whose "
        "config.json names an architecture mergekit handles; `--allow-crimes` does not help here."
    )


def check_notes(arch: Architecture, check: TensorCheck, role: str, output: bool = True) -> list[str]:
    """Warnings about what mergekit will do differently from a plain copy of the layout.

    output: include the notes about the output's tensors (said once, for the base).
    """
    notes = []
    if output and check.converted:
        notes.append(
            f"{role} {check.model}: mergekit builds {len(check.converted)} output tensor(s) from differently named "
            f"inputs (transformers' checkpoint conversion, e.g. per-expert MoE weights fused into one 3-D tensor): "
            f"{_some(list(check.converted), 3)}. The output uses these names; t, drop_rate and the drop masks "
            "apply to them (a fused expert tensor is slerped as one vector unless `rowwise: true`)."
        )
    if check.unknown:
        notes.append(
            f"{role} {check.model} has {len(check.unknown)} layer tensor(s) that mergekit's "
            f"{'inferred layout' if arch.inferred else arch.architecture + ' definition'} does not know: "
            f"{_some(list(check.unknown))}. mergekit does not write them to the output; if the model needs them, "
            "the merged model will not load or will re-initialise them."
        )
    if output and check.non_float:
        shown = ", ".join(f"{n} ({d})" for n, d in check.non_float[:3])
        notes.append(
            f"{role} {check.model}: {len(check.non_float)} layer tensor(s) are buffers, not weights: {shown}. "
            "mergekit loads them in the recipe's dtype like every tensor (a bool mask becomes 0.0/1.0 floats) and "
            "the method merges them like weights: equal in base and donor, they come out unchanged, as floats."
        )
    return notes


# --- filters --------------------------------------------------------------------------------


def recipe_filters(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(filter, parameter, where) for every `filter:` in the recipe's parameters."""
    found = []
    scopes: list[tuple[str, Any]] = [("the top-level parameters", raw.get("parameters"))]
    for m in raw.get("models") or []:
        if isinstance(m, dict):
            scopes.append((f"the parameters of {m.get('model')}", m.get("parameters")))
    for where, params in scopes:
        if not isinstance(params, dict):
            continue
        for key, value in params.items():
            for entry in value if isinstance(value, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("filter"), str):
                    found.append((entry["filter"], str(key), where))
    return found


def filter_warnings(raw: dict[str, Any], arch: Architecture) -> list[str]:
    """One warning per recipe filter that matches no tensor name of the architecture.

    mergekit matches a filter as a substring of the output tensor name and silently
    ignores one that matches nothing, so the value it guards is never applied.
    """
    names = [w.name for w in arch.all_weights()]
    warnings, seen = [], set()
    for text, key, where in recipe_filters(raw):
        if text == "*" or (text, key) in seen or any(text in n for n in names):
            continue
        seen.add((text, key))
        warnings.append(
            f"filter '{text}' for {key} in {where} matches no tensor of {arch.architecture} "
            f"(base model {arch.model}), so the value it sets is never applied.{_did_you_mean(text, names)}"
        )
    return warnings


def _did_you_mean(text: str, names: Iterable[str]) -> str:
    parts: set[str] = set()
    for name in names:
        pieces = name.split(".")
        for i in range(len(pieces)):
            for j in range(i + 1, min(len(pieces), i + 3) + 1):
                if not any(p.isdigit() for p in pieces[i:j]):
                    parts.add(".".join(pieces[i:j]))
    close = difflib.get_close_matches(text, sorted(parts), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


# --- what the planner calls -------------------------------------------------------------------


def preflight(arch: Architecture, models: Sequence[tuple[str, Any]], raw: dict[str, Any] | None = None) -> list[str]:
    """Check every checkpoint's tensor names against the architecture, before any weight is read.

    models: (role, ModelReference) pairs, the base first, e.g. ("base model", ref). Raises ArchitectureError
    (one paragraph) where mergekit would fail at merge time; returns warning strings otherwise.
    """
    crashing = [w.name for w in arch.all_weights() if w.optional and w.aliases]
    if crashing:
        # mergekit 0.1.5's planner builds `[name] + aliases` for optional weights, and aliases is a tuple
        raise ArchitectureError(
            f"mergekit 0.1.5 cannot merge {arch.architecture} (base model {arch.model}) with any method: its "
            f"definition marks {_some(crashing, 3)} optional with aliases, and its planner fails on that before "
            'merging (`can only concatenate list (not "tuple") to list`). A checkpoint saved with a head '
            "(e.g. a *ForMaskedLM or *ForSequenceClassification class in config.json `architectures`) uses a "
            "definition without this problem."
        )
    warnings: list[str] = []
    if arch.inferred:
        warnings.append(
            f"mergekit 0.1.5 has no architecture definition for {arch.architecture} (base model {arch.model}); "
            f"the layers are the ones mergekit infers from the weights when it merges it: {arch.num_layers} "
            f"layers of {arch.stack}, {len(arch.non_layer)} other tensor(s) kept from the base."
        )
    seen = set()
    unchecked = []
    for k, (role, ref) in enumerate(models):
        if str(ref) in seen:
            continue
        seen.add(str(ref))
        names = checkpoint_tensors(ref)
        if names is None:
            unchecked.append(str(ref))
            continue
        check = check_tensors(arch, ref, names)
        message = missing_message(arch, check, role)
        if message:
            raise ArchitectureError(message)
        warnings.extend(check_notes(arch, check, role, output=k == 0))
    if unchecked:
        warnings.append(
            f"tensor names not checked for {', '.join(unchecked)} (not a local directory with safetensors, or "
            "pickle weights only): a tensor mergekit's definition requires and the checkpoint lacks would only "
            "show at merge time."
        )
    if raw is not None:
        warnings.extend(filter_warnings(raw, arch))
    return warnings
