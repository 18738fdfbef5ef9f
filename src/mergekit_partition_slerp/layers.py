"""Which tensor is which layer (DESIGN §3.2).

On the YAML path the entry ids are ModelReferences and mergekit's own
architecture info for the base model decides. In the in-memory API the ids
are arbitrary, so the first integer component of the name is the layer index
and the caller says how many layers there are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache


class LayerError(ValueError):
    pass


@dataclass(frozen=True)
class LayerInfo:
    stack: str  # tensor name before ".{index}.", e.g. "model.layers"
    index: int
    num_layers: int


def stack_key(name: str, index: int) -> str:
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part == str(index):
            return ".".join(parts[:k])
    raise LayerError(f"tensor {name!r} does not contain its layer index {index}")


def layer_from_name(name: str | None) -> tuple[str, int] | None:
    """(stack, index) from the first dot-separated integer component."""
    parts = (name or "").split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:k]), int(part)
    return None


@cache
def _architecture_layers(base) -> tuple[dict[str, int], int, str]:
    """{output tensor name: layer index}, the layer count and the stack, from mergekit."""
    from mergekit_partition_slerp.architecture import ArchitectureError, for_model

    try:
        arch = for_model(base)
    except ArchitectureError as error:
        raise LayerError(str(error)) from None
    return arch.layer_index(), arch.num_layers, arch.stack


def locate(name: str | None, base_id, num_layers: int | None) -> LayerInfo | None:
    """The layer of output tensor `name`, or None for a non-layer tensor."""
    # Only look for ModelReference where one can exist: importing
    # mergekit.common pulls in peft and transformers (~2-3 s), which an
    # in-memory merge_tensors call must not pay on its first tensor.
    common = sys.modules.get("mergekit.common")
    if common is not None and isinstance(base_id, common.ModelReference):
        names, count, stack = _architecture_layers(base_id)
        if num_layers is not None and num_layers != count:
            raise LayerError(f"num_layers is {num_layers} but base model {base_id} has {count} layers")
        if name not in names:
            return None
        # the stack mergekit reports for the base is the partition key (the planner prints the same)
        return LayerInfo(stack, names[name], count)
    found = layer_from_name(name)
    if found is None:
        return None
    if num_layers is None:
        raise LayerError(
            f"tensor {name!r} looks like layer {found[1]}, but the layer count is "
            "unknown: pass num_layers=... when the inputs are not mergekit ModelReferences"
        )
    if not 0 <= found[1] < num_layers:
        raise LayerError(f"tensor {name!r} is layer {found[1]} but num_layers is {num_layers}")
    return LayerInfo(found[0], found[1], num_layers)
