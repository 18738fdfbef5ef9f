"""Read a partition_slerp recipe and check everything written in it, before any model is opened.

Parameter names, scopes (shared or per donor), defaults and ranges all come from the
method's own spec (`method.partition_slerp.spec`, built by mergekit from its type hints),
so this file never repeats them. Every value the recipe spells out is checked, used or
not, and a bad one is reported in the recipe's own words: the parameter, where it was
set, the allowed range and the value given.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

import yaml

from mergekit_partition_slerp.errors import ConfigError

METHOD = "partition_slerp"
PLAN_SCHEMA = "mergekit-partition/plan"
TOP_LEVEL = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
DTYPES = ("bfloat16", "float16", "float32", "float64")  # what `dtype:`/`out_dtype:` may name


@dataclass
class Recipe:
    raw: dict[str, Any]
    path: str | None  # None for an in-memory dict
    sha256: str
    text: str  # as read; mergekit copies it into the model card


@dataclass(frozen=True)
class Param:
    """One parameter of the method, as its spec declares it."""

    name: str
    per_donor: bool
    required: bool
    default: Any
    kind: str  # "number", "integer" or "boolean"
    low: tuple[float, bool] | None  # (bound, inclusive)
    high: tuple[float, bool] | None
    gradient: bool  # a list of values along the depth is accepted

    def allowed(self) -> str:
        if self.kind == "boolean":
            return "true or false"
        what = "a number" if self.kind == "number" else "an integer"
        if self.low and self.high:
            lo, hi = self.low, self.high
            return f"{what} in {'[' if lo[1] else '('}{_num(lo[0])}, {_num(hi[0])}{']' if hi[1] else ')'}"
        if self.low:
            return f"{what} {'>=' if self.low[1] else '>'} {_num(self.low[0])}"
        return what

    def problem(self, value: Any) -> str | None:
        """Why one scalar value is not allowed, or None."""
        if self.kind == "boolean":
            return None if isinstance(value, bool) else "is not true or false"
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (self.kind == "integer" and not float(value).is_integer()):
            return "is not a number" if self.kind == "number" else "is not an integer"
        if isinstance(value, float) and not math.isfinite(value):
            return "is not a finite number"
        if self.low and (value < self.low[0] or (value == self.low[0] and not self.low[1])):
            return "is out of range"
        if self.high and (value > self.high[0] or (value == self.high[0] and not self.high[1])):
            return "is out of range"
        return None


def _num(x: float) -> str:
    if x == 2**64:
        return "2**64"
    return str(int(x)) if float(x).is_integer() else str(x)


def _describe(name: str, value_type: Any, per_donor: bool, default: Any, required: bool) -> Param:
    """Kind and bounds from the pydantic type hint (Annotated[float, Field(ge=0, lt=1)], ...)."""
    from typing import Annotated, get_args, get_origin

    gradient = False
    scalar, metadata = value_type, []  # type: tuple[Any, list[Any]]
    # Optional[X] / Union[X, List[X]]: the scalar member carries the bounds
    while True:
        origin = get_origin(scalar)
        if origin is Union or origin is types.UnionType:  # Optional[X], X | None, Union[X, list[X]]
            members = [m for m in get_args(scalar) if m is not type(None)]
            lists = [m for m in members if _is_list(m)]
            gradient = gradient or bool(lists)
            scalar = next(m for m in members if not _is_list(m))
        elif origin is Annotated:
            scalar, *extra = get_args(scalar)
            for info in extra:
                metadata.extend(getattr(info, "metadata", []) or [])
        else:
            break
    low = high = None
    for c in metadata:
        for attr, inclusive, is_low in (
            ("ge", True, True),
            ("gt", False, True),
            ("le", True, False),
            ("lt", False, False),
        ):
            if hasattr(c, attr):
                if is_low:
                    low = (getattr(c, attr), inclusive)
                else:
                    high = (getattr(c, attr), inclusive)
    kind = {bool: "boolean", int: "integer"}.get(scalar, "number")
    return Param(name, per_donor, required, default, kind, low, high, gradient)


def _is_list(annotation: Any) -> bool:
    from typing import Annotated, get_args, get_origin

    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return get_origin(annotation) is list


def parameters() -> dict[str, Param]:
    """The method's parameters, read from its spec (the one source of truth)."""
    from mergekit.merge_methods.base import MISSING, ParameterScope

    from mergekit_partition_slerp.method import partition_slerp

    out = {}
    for spec in partition_slerp.spec.parameters:
        per_donor = spec.scope != ParameterScope.SHARED
        required = spec.default is MISSING
        out[spec.name] = _describe(spec.name, spec.value_type, per_donor, None if required else spec.default, required)
    return out


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key).replace("-", "_"), list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def read(config: str | os.PathLike | dict[str, Any]) -> Recipe:
    """The recipe from a path or a dict, with the sha256 of exactly what was read."""
    if isinstance(config, dict):
        text = yaml.safe_dump(config, sort_keys=False)
        return Recipe(config, None, hashlib.sha256(text.encode()).hexdigest(), text)
    path = os.fspath(config)
    if os.path.isdir(path):
        hint = " (a merged model directory? its recipe is mergekit_config.yml inside it)"
        if not os.path.exists(os.path.join(path, "mergekit_config.yml")):
            hint = ""
        raise ConfigError(f"config {path} is a directory, not a YAML recipe{hint}.")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}.") from None
    try:
        text = data.decode("utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; is it really a YAML recipe?") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}.") from None
    if isinstance(raw, dict) and raw.get("schema") == PLAN_SCHEMA:
        folder = os.path.dirname(os.path.abspath(path))
        raise ConfigError(
            f"{path} is the partition record that `mergekit-partition run` writes beside a merge, not a recipe. "
            f"The recipe that produced that merge is {os.path.join(folder, 'mergekit_config.yml')}: "
            "pass that file to `mergekit-partition run` or `mergekit-yaml` to rebuild it."
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a YAML mapping with merge_method, base_model and models.")
    return Recipe(raw, path, hashlib.sha256(data).hexdigest(), text)


def _model_label(i: int, entry: Any) -> str:
    return f"models[{i}] ({entry.get('model')})" if isinstance(entry, dict) else f"models[{i}]"


def scopes(raw: dict[str, Any]) -> Iterator[tuple[str, int | None, dict[str, Any]]]:
    """(where, model index or None, parameters) for the top level and every model entry."""
    yield "top-level parameters", None, raw.get("parameters") or {}
    for i, m in enumerate(raw.get("models") or []):
        yield f"parameters of {_model_label(i, m)}", i, (m.get("parameters") if isinstance(m, dict) else None) or {}


def check(recipe: Recipe) -> dict[str, Param]:
    """Keys and every parameter value written; returns the parameter table."""
    raw = recipe.raw
    for key in raw:
        if key not in TOP_LEVEL and not str(key).startswith("x-"):
            raise ConfigError(
                f"unknown top-level key '{key}' (mergekit would silently ignore it).{suggest(key, TOP_LEVEL)} "
                "Prefix private keys with 'x-'."
            )
    if raw.get("merge_method") != METHOD:
        raise ConfigError(
            f"merge_method is {raw.get('merge_method')!r}; mergekit-partition handles '{METHOD}' recipes only."
        )
    if not raw.get("base_model"):
        raise ConfigError(
            "base_model is missing: partition_slerp slerps every layer between the base and one donor, "
            "so it needs a base."
        )
    if raw.get("slices") or raw.get("modules"):
        raise ConfigError(
            "mergekit-partition takes a `models:` recipe (the partition spans the full depth); "
            "`slices:`/`modules:` recipes are not supported."
        )
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(
            "models is missing or empty: list the donors under `models:`, each as `- model: <id or path>`."
        )
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"models[{i}] must be a mapping with a `model:` key; got {m!r}.")
        for key in m:
            if key not in ("model", "parameters"):
                raise ConfigError(
                    f"{_model_label(i, m)} has unknown key '{key}'.{suggest(key, ('model', 'parameters'))}"
                )
    for key in ("dtype", "out_dtype"):
        value = raw.get(key)
        if value is not None and str(value).removeprefix("torch.") not in DTYPES:
            raise ConfigError(
                f"{key} = {value!r} (top level of the recipe) is not a dtype to merge in: it must be one of "
                f"{', '.join(DTYPES)} (mergekit would fail on it after loading the models)."
            )
    table = parameters()
    for where, index, params in scopes(raw):
        if not isinstance(params, dict):
            raise ConfigError(f"{where} must be a mapping of parameter names to values; got {params!r}.")
        for key, value in params.items():
            if key not in table:
                raise ConfigError(
                    f"unknown parameter '{key}' in {where} (mergekit would silently ignore it)."
                    f"{suggest(key, table)} partition_slerp takes: {', '.join(table)}."
                )
            param = table[key]
            if index is not None and not param.per_donor:
                raise ConfigError(
                    f"{key} is shared by the whole merge, but {where} sets it ({key} = {value!r}); "
                    "set it once under the top-level `parameters:`."
                )
            _check_value(param, value, where)
    _check_required(raw, table)
    return table


def _check_value(param: Param, value: Any, where: str) -> None:
    def fail(shown: Any, problem: str, place: str = "") -> None:
        forms = param.allowed()
        if param.gradient:
            forms += ", a gradient list of such values, or a filter list of {filter, value} entries"
        elif param.per_donor:
            forms += " or a filter list of {filter, value} entries"
        range_only = problem == "is out of range"
        must = f"it must be {param.allowed()}" if range_only else f"{param.name} must be {forms}"
        raise ConfigError(f"{param.name} = {shown!r} ({where}{place}) {problem}: {must}.")

    def scalar_or_gradient(v: Any, place: str) -> None:
        if isinstance(v, list):
            if not param.gradient:
                fail(v, "is a list", place)
            if not v:
                fail(v, "is an empty gradient list", place)
            for k, point in enumerate(v):
                if isinstance(point, (list, dict)):
                    fail(v, "is not a flat list of numbers", place)
                problem = param.problem(point)
                if problem:
                    fail(point, problem, f"{place}, gradient point {k + 1} of {len(v)}")
        elif isinstance(v, dict):
            fail(v, "is a mapping", place)
        else:
            problem = param.problem(v)
            if problem:
                fail(v, problem, place)

    is_filter_list = isinstance(value, list) and value and any(isinstance(e, dict) for e in value)
    if not is_filter_list:
        scalar_or_gradient(value, "")
        return
    if not param.per_donor:
        fail(value, "is a filter list, but it is one value for the whole merge")
    for k, entry in enumerate(value):
        label = f", filter entry {k + 1}"
        if not isinstance(entry, dict) or "value" not in entry:
            fail(value, f"has entry {k + 1} without a `value:` ({entry!r})")
        unknown = [key for key in entry if key not in ("filter", "value")]
        if unknown:
            fail(value, f"has entry {k + 1} with unknown key '{unknown[0]}'{suggest(unknown[0], ('filter', 'value'))}")
        if entry.get("filter") is not None:
            label = f", filter '{entry['filter']}' (entry {k + 1})"
        scalar_or_gradient(entry["value"], label)


def _check_required(raw: dict[str, Any], table: dict[str, Param]) -> None:
    top = raw.get("parameters") or {}
    base = str(raw.get("base_model"))
    for name, param in table.items():
        if not (param.required and param.per_donor) or name in top:
            continue
        for i, m in enumerate(raw["models"]):
            if str(m["model"]) != base and name not in (m.get("parameters") or {}):
                raise ConfigError(
                    f"{name} is required for every donor, but {_model_label(i, m)} has none and there is no "
                    f"top-level {name}: set it under that model's `parameters:` (or once at the top level). "
                    f"{name} must be {param.allowed()}."
                )
