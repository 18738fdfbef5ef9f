"""The `partition_slerp` merge method: mergekit glue and registration.

Each layer of the stack belongs to one donor, chosen by a seeded partition of
the layers into bins (bin b -> donor b mod N). A layer tensor is slerped
between the base and that donor at the donor's t, then a pinned random
fraction drop_rate of its elements goes back to the base. Tensors outside the
stack (embeddings, final norm, lm_head) are the base's, bit for bit.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Annotated, Union

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import Field

from mergekit_partition_slerp import kernels, partition
from mergekit_partition_slerp.layers import LayerError, layer_from_name, locate

Fraction = Annotated[float, Field(ge=0, le=1)]
DropRate = Annotated[float, Field(ge=0, lt=1)]
# Lists are gradients for the in-memory API; on the YAML path mergekit has
# already resolved them to the layer's float.
TValue = Union[Fraction, Annotated[list[Fraction], Field(min_length=1)]]  # noqa: UP007 (a runtime alias)
DropValue = Union[DropRate, Annotated[list[DropRate], Field(min_length=1)]]  # noqa: UP007
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**64)]


class PartitionSlerpError(ValueError):
    pass


@lru_cache(maxsize=256)
def _bins(stack: str, num_layers: int, bins: int, seed: int) -> tuple[int, ...]:
    return tuple(partition.layer_bins(stack, num_layers, bins, seed))


def _at(value, name: str, position: float) -> float:
    if isinstance(value, list):
        from mergekit.config import evaluate_setting

        return float(evaluate_setting(name, value, position, validate=float))
    return float(value)


@merge_method(
    name="partition_slerp",
    pretty_name="Partition SLERP",
    # the release page (its README holds the semantics); the model cards mergekit writes link to it
    reference_url="https://pypi.org/project/mergekit-partition-slerp/",
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
)
def partition_slerp(
    group: TensorGroup,
    t: PerNonBase[TValue],
    drop_rate: PerNonBase[DropValue] = 0.0,
    rescale: bool = False,
    bins: PositiveInt | None = None,
    seed: Seed = 0,
    rowwise: bool = False,
    num_layers: PositiveInt | None = None,
) -> torch.Tensor:
    base, donors = group.base, group.non_base
    name = group.metadata.name
    try:
        layer = locate(name, base.id, num_layers)
    except LayerError as error:
        raise PartitionSlerpError(f"partition_slerp (at {name}): {error}") from None
    if layer is None:  # embeddings, final norm, lm_head: the base, bit for bit
        _require_finite(base.tensor, base.id, name, "base")
        return base.tensor

    _warn_if_stale_record()
    n_bins = len(donors) if bins is None else bins
    # a compiled per-layer slice hands us only this layer's donor: then only the layer count limits bins
    single = len(donors) == 1
    problem = partition.bins_problem(
        n_bins, layer.num_layers, [] if single else [str(d.id) for d in donors], layer.stack
    )
    if problem:
        raise PartitionSlerpError(f"partition_slerp (at {name}): {problem}")
    if single:
        donor = donors[0]
    else:
        donor = donors[_bins(layer.stack, layer.num_layers, n_bins, seed)[layer.index] % len(donors)]

    position = partition.layer_position(layer.index, layer.num_layers)
    t_value = _at(t[donor.id], name, position)
    p_value = _at(drop_rate[donor.id], name, position)

    try:
        return merge_layer_tensor(
            name, base.tensor, donor.tensor, t_value, p_value, seed=seed, rescale=rescale, rowwise=rowwise
        )
    except kernels.NonFiniteError as error:
        entry, role = (base, "base") if error.which == 0 else (donor, "donor")
        raise _non_finite(entry.id, name, role) from None


def merge_layer_tensor(
    name: str,
    base: torch.Tensor,
    donor: torch.Tensor,
    t: float,
    drop_rate: float,
    *,
    seed: int,
    rescale: bool = False,
    rowwise: bool = False,
) -> torch.Tensor:
    """One layer tensor: slerp at t, then the pinned drop mask of (name, seed). May return an input."""

    def mask(start: int, size: int):
        return partition.keep_mask_range(name, seed, drop_rate, start, size)

    return kernels.merge(base, donor, t, drop_rate=drop_rate, rescale=rescale, rowwise=rowwise, mask=mask)


def _non_finite(model, name, role) -> PartitionSlerpError:
    return PartitionSlerpError(
        f"partition_slerp: tensor {name} of {role} model {model} contains NaN or Inf; "
        "refusing to write a merged model from it. Check that checkpoint (a corrupt "
        "download or a broken fine-tune) before merging."
    )


def _require_finite(tensor: torch.Tensor, model, name, role) -> None:
    if tensor.is_floating_point() and not kernels.check_finite(tensor):
        raise _non_finite(model, name, role)


class _Method(FunctionalGroupMergeMethod):
    """The in-memory entry (merge_tensors, merge_state_dicts) sees every tensor at once:
    there a num_layers that disagrees with the tensors is caught before anything merges."""

    def __call__(self, groups, /, **kwargs):
        groups = tuple(groups)
        _check_num_layers(groups, (kwargs.get("parameters") or {}).get("num_layers"))
        return super().__call__(groups, **kwargs)


def _check_num_layers(groups, num_layers) -> None:
    if not isinstance(num_layers, int) or len(groups) < 2:
        return
    common = sys.modules.get("mergekit.common")
    if common is not None and any(isinstance(e.id, common.ModelReference) for g in groups for e in g.entries):
        return  # mergekit's architecture info decides (layers.locate)
    names = [g.metadata.name for g in groups]
    found = [layer_from_name(n) for n in names]
    stacks: dict[str, int] = {}
    for hit in found:
        if hit is not None:
            stacks[hit[0]] = max(stacks.get(hit[0], -1), hit[1])
    whole_model = any(hit is None and n for hit, n in zip(found, names, strict=True))  # embeddings, norms, lm_head too
    for stack, top in stacks.items():
        if top >= num_layers or (whole_model and top + 1 != num_layers):
            raise PartitionSlerpError(
                f"partition_slerp: num_layers = {num_layers}, but the tensors given hold {top + 1} layers of "
                f"{stack} (0 to {top}); pass num_layers={top + 1}. (A state dict holding only some layers, "
                "with no embeddings or head, is checked only for indices below num_layers.)"
            )


partition_slerp = _Method(partition_slerp.spec, partition_slerp.implementation)


def _warn_if_stale_record() -> None:
    """Under plain mergekit-yaml, say when OUT holds a partition.json from a run of another recipe
    (mergekit overwrites the weights and its own files, and leaves ours describing the wrong merge)."""
    import click

    ctx = click.get_current_context(silent=True)
    params = getattr(ctx, "params", None) or {}
    if ctx is not None and ctx.info_name == "mergekit-yaml" and "out_path" in params:
        _warn_stale_once(str(params.get("config_file")), str(params["out_path"]))


@lru_cache(maxsize=16)
def _warn_stale_once(config_file: str, out_path: str) -> None:
    import hashlib
    import json
    import os

    import click

    record = os.path.join(out_path, "partition.json")
    compiled = os.path.join(out_path, "mergekit_partition_compiled.yml")
    try:
        with open(record) as f:
            written = json.load(f).get("config_sha256")
        with open(config_file, "rb") as f:
            data = f.read()
        same_compiled = False
        if os.path.exists(compiled):
            with open(compiled, "rb") as f:
                same_compiled = f.read() == data
    except (OSError, ValueError, AttributeError):
        return
    if hashlib.sha256(data).hexdigest() != written and not same_compiled:
        click.echo(
            f"warning: {record} and mergekit_partition_compiled.yml are left from an earlier `mergekit-partition "
            "run` of another recipe and do not describe this merge; delete them (or merge into a new directory).",
            err=True,
        )


def register() -> None:
    """Add partition_slerp to mergekit's registry; harmless when repeated."""
    from mergekit.merge_methods import registry

    for existing in registry.registered_methods():
        if existing.spec.name == partition_slerp.spec.name:
            same = (
                existing is partition_slerp
                or getattr(getattr(existing, "implementation", None), "__module__", None) == __name__
            )
            if same:
                return
    registry.register(partition_slerp)


register()
