"""What a local checkpoint holds, read from its safetensors headers only (no tensor data).

Pure standard library: the run engine's preflight and byte count use it, and so can
anything else that needs tensor names or sizes before a weight is read.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mergekit_partition_slerp.errors import ConfigError


def safetensors_header(path: str, check_length: bool = True) -> dict[str, Any]:
    """The JSON header of one safetensors file, checked against the file's length (truncation)
    unless only the names are wanted."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n) if size >= 8 and n <= size - 8 else None
    except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror})") from None
    if raw is None:
        raise ConfigError(f"{path} is truncated or not a safetensors file (header longer than the file)")
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise ConfigError(f"{path} has an unreadable header ({error})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if check_length and 8 + n + end > size:
        raise ConfigError(f"{path} is truncated ({size} bytes, its header describes {8 + n + end})")
    return header


def tensor_sizes(path: str) -> dict[str, int]:
    """{tensor name: bytes} of a local checkpoint, from its safetensors headers only."""
    sizes: dict[str, int] = {}
    for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        for tensor, info in safetensors_header(os.path.join(path, name)).items():
            sizes[tensor] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def tensor_dtypes(path: str) -> dict[str, str] | None:
    """{tensor name: dtype} from the files mergekit would read in this order: model.safetensors
    (.index.json), then pytorch_model.bin(.index.json). Dtypes are known for safetensors only ("" for
    pickles). None when the names cannot be read without unpickling or a file is broken (the run's
    preflight names broken files)."""
    for stem in ("model.safetensors", "pytorch_model.bin"):
        file, index = os.path.join(path, stem), os.path.join(path, stem + ".index.json")
        try:
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                out = dict.fromkeys(weight_map, "")
                if stem.endswith("safetensors"):
                    for shard in sorted(set(weight_map.values())):
                        for name, info in safetensors_header(os.path.join(path, shard), False).items():
                            if name in out:
                                out[name] = str(info.get("dtype", ""))
                return out
            if os.path.exists(file):
                if not stem.endswith("safetensors"):
                    return None
                return {name: str(info.get("dtype", "")) for name, info in safetensors_header(file, False).items()}
        except (OSError, ValueError, KeyError, TypeError):  # ConfigError is a ValueError
            return None
    return None
