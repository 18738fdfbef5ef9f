"""The `partition_slerp` merge method: mergekit glue and registration.

Each layer of the stack belongs to one donor, chosen by a seeded partition of
the layers into bins (bin b -> donor b mod N). A layer tensor is slerped
between the base and that donor at the donor's t, then a pinned random
fraction drop_rate of its elements goes back to the base. Tensors outside the
stack (embeddings, final norm, lm_head) are the base's, bit for bit.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple, Union

import torch
from pydantic import Field
from typing_extensions import Annotated

from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    OptionalTensorPolicy,
    PerNonBase,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method

from mergekit_partition_slerp import kernels, partition
from mergekit_partition_slerp.layers import LayerError, locate

Fraction = Annotated[float, Field(ge=0, le=1)]
DropRate = Annotated[float, Field(ge=0, lt=1)]
# Lists are gradients for the in-memory API; on the YAML path mergekit has
# already resolved them to the layer's float.
TValue = Union[Fraction, Annotated[List[Fraction], Field(min_length=1)]]
DropValue = Union[DropRate, Annotated[List[DropRate], Field(min_length=1)]]
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**64)]


class PartitionSlerpError(ValueError):
    pass


@lru_cache(maxsize=256)
def _bins(stack: str, num_layers: int, bins: int, seed: int) -> Tuple[int, ...]:
    return tuple(partition.layer_bins(stack, num_layers, bins, seed))


def _at(value, name: str, position: float) -> float:
    if isinstance(value, list):
        from mergekit.config import evaluate_setting

        return float(evaluate_setting(name, value, position, validate=float))
    return float(value)


@merge_method(
    name="partition_slerp",
    pretty_name="Partition SLERP",
    reference_url="https://pypi.org/project/mergekit-partition-slerp/",  # the README, semantics included
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
)
def partition_slerp(
    group: TensorGroup,
    t: PerNonBase[TValue],
    drop_rate: PerNonBase[DropValue] = 0.0,
    rescale: bool = False,
    bins: Optional[PositiveInt] = None,
    seed: Seed = 0,
    rowwise: bool = False,
    num_layers: Optional[PositiveInt] = None,
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

    n_bins = len(donors) if bins is None else bins
    if n_bins > layer.num_layers:
        raise PartitionSlerpError(
            f"partition_slerp (at {name}): bins is {n_bins} but {layer.stack} has only "
            f"{layer.num_layers} layers; use at most {layer.num_layers} bins"
        )
    if len(donors) == 1:
        # A compiled per-layer slice hands us only this layer's donor.
        donor = donors[0]
    else:
        if n_bins < len(donors):
            unused = ", ".join(str(d.id) for d in donors[n_bins:])
            raise PartitionSlerpError(
                f"partition_slerp (at {name}): bins is {n_bins} but there are {len(donors)} donors, "
                f"so these donors would never be used: {unused}. Set bins >= {len(donors)} "
                "or remove them"
            )
        donor = donors[_bins(layer.stack, layer.num_layers, n_bins, seed)[layer.index] % len(donors)]

    position = partition.layer_position(layer.index, layer.num_layers)
    t_value = _at(t[donor.id], name, position)
    p_value = _at(drop_rate[donor.id], name, position)

    def mask(start: int, size: int):
        return partition.keep_mask_range(name, seed, p_value, start, size)

    try:
        return kernels.merge(
            base.tensor,
            donor.tensor,
            t_value,
            drop_rate=p_value,
            rescale=rescale,
            rowwise=rowwise,
            mask=mask,
        )
    except kernels.NonFiniteError as error:
        entry, role = (base, "base") if error.which == 0 else (donor, "donor")
        raise _non_finite(entry.id, name, role) from None


def _non_finite(model, name, role) -> PartitionSlerpError:
    return PartitionSlerpError(
        f"partition_slerp: tensor {name} of {role} model {model} contains NaN or Inf; "
        "refusing to write a merged model from it. Check that checkpoint (a corrupt "
        "download or a broken fine-tune) before merging."
    )


def _require_finite(tensor: torch.Tensor, model, name, role) -> None:
    if tensor.is_floating_point() and not kernels.check_finite(tensor):
        raise _non_finite(model, name, role)


def register() -> None:
    """Add partition_slerp to mergekit's registry; harmless when repeated."""
    from mergekit.merge_methods import registry

    for existing in registry.registered_methods():
        if existing.spec.name == partition_slerp.spec.name:
            same = existing is partition_slerp or getattr(
                getattr(existing, "implementation", None), "__module__", None
            ) == __name__
            if same:
                return
    registry.register(partition_slerp)


register()
