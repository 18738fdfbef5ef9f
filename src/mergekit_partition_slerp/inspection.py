"""Read a partition_slerp merge back: the notebook entry `inspect()`.

    inspect(merged, recipe)                      -> verify.VerifyReport   is it what the recipe makes?
    inspect(merged, base=..., donors=[...])      -> explain.Inspection    what plan made it?
    inspect(merged, recipe, explain=True)        -> explain.Inspection    with the recipe's models

Both print as a table (`str()`), serialise with `to_json()`, and raise ConfigError for a usage
or input problem (the CLI's exit status 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekit_partition_slerp.errors import ConfigError
from mergekit_partition_slerp.explain import Inspection, explain
from mergekit_partition_slerp.verify import VerifyReport, plan_of, verify

_explain = explain  # inside inspect(), its keyword `explain` hides the function

__all__ = ["Inspection", "VerifyReport", "explain", "inspect", "verify"]


def inspect(
    merged: str,
    recipe=None,
    *,
    base: str | None = None,
    donors: Sequence[str] | None = None,
    rescale: bool | None = None,
    explain: bool = False,
    **verify_options,
):
    """Verify `merged` against `recipe`, or explain it from `base` and `donors` (or, with
    `explain=True`, from the recipe's base and donors and its `rescale`)."""
    if recipe is not None and base is None and donors is None and not explain:
        return verify(merged, recipe, **verify_options)
    p = plan_of(recipe) if recipe is not None else None
    if p is not None:
        base, donors = base or p.base, donors or p.donors
        if rescale is None:
            rescale = bool((p.raw.get("parameters") or {}).get("rescale", False))
    if base is None or not donors:
        raise ConfigError("inspect needs a recipe (to verify) or a base and donors (to explain).")
    result = _explain(merged, base, donors, rescale=bool(rescale), log=verify_options.get("log"))
    result.recipe = p
    return result
