"""What a local checkpoint holds, from its safetensors headers; and, for `inspect`, its tensors
one at a time.

The header functions are standard library only: the run engine's preflight and byte count use
them before a weight is read. `Checkpoint` streams tensors through safetensors' own reader and
opens the file per tensor: a kept handle would keep every page read so far mapped, so a pass over
a whole model would end with the whole model resident.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_partition_slerp.errors import ConfigError

if TYPE_CHECKING:
    import torch


def model_path(model: str) -> tuple[str, str | None]:
    """(path, revision) of a model as a recipe writes it, split at its `@` as mergekit's ModelPath does."""
    path, sep, revision = str(model).partition("@")
    return path, (revision if sep else None)


def local_dir(model: str) -> str | None:
    """The local directory a model reference (path or path@revision) names, or None (a hub id or
    nothing). mergekit ignores the revision of a local path, and so do we."""
    path = os.path.expanduser(model_path(model)[0])
    return path if os.path.isdir(path) else None


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


@dataclass(frozen=True)
class Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class Checkpoint:
    """A safetensors checkpoint (one file or sharded) read one tensor at a time; counts the bytes read."""

    def __init__(self, model: str, label: str):
        self.spec, self.label = str(model), label
        self.path = _fetch(self.spec, label)
        self.bytes_read = 0
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as error:
                raise ConfigError(f"{label} {model}: cannot read {index} ({error}).") from None
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            pickles = any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(self.path))
            more = " It has only pickle weights (.bin): convert them to safetensors first." if pickles else ""
            raise ConfigError(
                f"{label} {model} ({self.path}) has no *.safetensors weights; inspect reads those only.{more}"
            )
        self.entries: dict[str, Entry] = {}
        for name in files:
            file = os.path.join(self.path, name)
            try:
                for tensor, info in safetensors_header(file).items():
                    start, end = info["data_offsets"]
                    self.entries[tensor] = Entry(file, info["dtype"], tuple(info["shape"]), end - start)
            except ConfigError as error:
                raise ConfigError(f"{label} {model}: {error}.") from None
            except OSError as error:
                raise ConfigError(f"{label} {model}: {file} cannot be read ({error.strerror}).") from None
            except (KeyError, TypeError, ValueError, AttributeError):
                raise ConfigError(f"{label} {model}: {file} is not a safetensors file (malformed header).") from None

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise ConfigError(f"{self.label} {self.spec} has no tensor {name}.")
        from safetensors import safe_open

        with safe_open(entry.file, framework="pt") as f:  # closed per tensor: see the module docstring
            tensor = f.get_tensor(name)
        self.bytes_read += entry.nbytes
        return tensor


class Checkpoints:
    """The models of one inspection, each directory opened once (a donor in two roles is one model)."""

    def __init__(self) -> None:
        self.by_path: dict[str, Checkpoint] = {}

    def open(self, model: str, label: str) -> Checkpoint:
        checkpoint = Checkpoint(model, label)
        return self.by_path.setdefault(os.path.realpath(checkpoint.path), checkpoint)

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.by_path.values())


def _fetch(model: str, label: str) -> str:
    """The local directory of a model: its path, or a hub id's snapshot (weights and JSON only)."""
    path = local_dir(model)
    if path is not None:
        return path
    repo, revision = model_path(model)
    if os.path.isabs(repo) or repo.startswith((".", "~")) or repo.count("/") != 1:
        raise ConfigError(f"{label} {model} is not a directory; give the model's local path (or a hub id).")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # offline, unknown repo, gated
        first = str(error).strip().splitlines()
        raise ConfigError(
            f"{label} {model} is not a local directory and could not be fetched from the hub "
            f"({first[0] if first else type(error).__name__})."
        ) from None
