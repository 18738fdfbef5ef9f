"""Read a partition_slerp merge back: verify it against a recipe, or explain it.

verify: recompute sampled layers (or all) from the base and each layer's donor
with the method's own kernel and pinned masks, and compare bits with the merge.
explain: for every layer tensor, find the donor the merge moved toward, fit the
slerp t and measure the drop rate, without a recipe.

Tensors are read one at a time through `safetensors.safe_open`, so memory
stays at about one tensor per model; bytes are counted from the headers'
data_offsets. mergekit is only imported when a recipe is planned.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_partition_slerp import kernels, partition
from mergekit_partition_slerp.layers import layer_from_name

AUTO_ALL_BYTES = 64 * 2**20  # verify reads everything when the whole check costs less than this
DEFAULT_SAMPLE = 4  # layers verified by default on larger models
CHUNK_ROWS_ELEMENTS = 1 << 22  # float64 scratch per chunk while explaining
DOT_THRESHOLD = kernels.DOT_THRESHOLD
EPS = kernels.EPS
REFINE_SAMPLE = 1 << 15  # moved elements used to refine t
SCORE_SLACK = 0.002  # share of sampled elements t_range may miss
AMBIGUOUS = 0.5  # below this layer confidence, the donor is reported as unknown
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
_ST_SIZES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class InspectError(ValueError):
    """A usage or input problem, explained in one paragraph (CLI exit status 2)."""


# --------------------------------------------------------------------------- reading


def _resolve(spec: str, label: str) -> str:
    """A local directory for a model as written in a recipe (path, path@rev, hub id)."""
    spec = str(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return path
    head, sep, revision = spec.rpartition("@")
    if sep and os.path.isdir(os.path.expanduser(head)):
        return os.path.expanduser(head)  # a local path's revision means nothing (mergekit ignores it too)
    repo, rev = (head, revision) if sep else (spec, None)
    looks_local = os.path.isabs(path) or spec.startswith((".", "~")) or repo.count("/") != 1
    if looks_local:
        raise InspectError(f"{label} {spec} is not a directory; give the model's local path (or a hub id).")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=rev, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # offline, unknown repo, gated
        first = str(error).strip().splitlines()
        raise InspectError(
            f"{label} {spec} is not a local directory and could not be fetched from the hub "
            f"({first[0] if first else type(error).__name__})."
        ) from None


@dataclass
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class Checkpoint:
    """A safetensors checkpoint (single file or sharded), read one tensor at a time."""

    def __init__(self, spec: str, label: str):
        self.spec, self.label = str(spec), label
        self.path = _resolve(spec, label)
        self.entries: dict[str, _Entry] = {}
        self.bytes_read = 0
        self._handles: dict[str, Any] = {}
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as error:
                raise InspectError(f"{label} {spec}: cannot read {index} ({error}).") from None
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            has_pickle = any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(self.path))
            more = " It has only pickle weights (.bin): convert them to safetensors first." if has_pickle else ""
            raise InspectError(
                f"{label} {spec} ({self.path}) has no *.safetensors weights; inspect reads safetensors only.{more}"
            )
        for name in files:
            self._read_header(os.path.join(self.path, name))

    def _read_header(self, file: str) -> None:
        # only the JSON header (offsets, dtypes, shapes); tensors go through safe_open
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as error:
            raise InspectError(
                f"{self.label} {self.spec}: {file} is not a readable safetensors file ({error})."
            ) from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if 8 + n + end > size:
                raise InspectError(f"{self.label} {self.spec}: {file} is truncated (tensor {name} ends past the file).")
            self.entries[name] = _Entry(file, info["dtype"], tuple(info["shape"]), end - start)

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        return self.entries[name].nbytes

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise InspectError(f"{self.label} {self.spec} has no tensor {name}.")
        handle = self._handles.get(entry.file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[entry.file] = safe_open(entry.file, framework="pt")
        self.bytes_read += entry.nbytes
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


class _Models:
    """One Checkpoint per directory (a donor listed twice, as path and path@main, is read once per use)."""

    def __init__(self):
        self.by_path: dict[str, Checkpoint] = {}

    def open(self, spec: str, label: str) -> Checkpoint:
        ck = Checkpoint(spec, label)
        key = os.path.realpath(ck.path)
        return self.by_path.setdefault(key, ck)

    @property
    def bytes_read(self) -> int:
        return sum(c.bytes_read for c in self.by_path.values())

    def close(self):
        for c in self.by_path.values():
            c.close()


# --------------------------------------------------------------------------- the method, once more


def recompute_tensor(
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
    """One layer tensor exactly as `partition_slerp` computes it (the method's own function)."""
    from mergekit_partition_slerp.method import merge_layer_tensor

    out = merge_layer_tensor(name, base, donor, t, drop_rate, seed=seed, rescale=rescale, rowwise=rowwise)
    return out.clone()  # the kernel may hand back an input (t 0 or 1): the caller owns a private copy


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if not name:
        return None
    short = str(name).removeprefix("torch.")
    if short not in _DTYPES:
        raise InspectError(f"the recipe's {key} is {name!r}; inspect knows {', '.join(_DTYPES)}.")
    return _DTYPES[short]


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@dataclass
class TensorCheck:
    name: str
    status: str  # identical | differs | missing
    elements: int = 0
    differing: int = 0
    max_ulp: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "identical"

    def describe(self) -> str:
        if self.status == "identical":
            return "identical"
        if self.status == "differs" and self.elements and not self.detail:
            frac = self.differing / self.elements
            return f"DIFFERS: {self.differing} of {self.elements} elements ({frac:.3%}), max {self.max_ulp} ulp"
        return f"{self.status.upper()}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        frac = self.differing / self.elements if self.elements else None
        return {
            "name": self.name,
            "status": self.status,
            "elements": self.elements,
            "differing": self.differing,
            "fraction": frac,
            "max_ulp": self.max_ulp,
            "detail": self.detail or None,
        }


def compare(name: str, expected: torch.Tensor, actual: torch.Tensor) -> TensorCheck:
    """Bit comparison; ulp distance on the sign-magnitude integer line."""
    if expected.dtype != actual.dtype:
        return TensorCheck(
            name,
            "differs",
            expected.numel(),
            detail=f"dtype is {_dtype_name(actual.dtype)}, expected {_dtype_name(expected.dtype)}",
        )
    if tuple(expected.shape) != tuple(actual.shape):
        return TensorCheck(
            name, "differs", expected.numel(), detail=f"shape is {list(actual.shape)}, expected {list(expected.shape)}"
        )
    iv = _INT_VIEW.get(expected.dtype)
    if iv is None:  # integer or bool buffers: equal or not
        diff = int((expected != actual).sum())
        return TensorCheck(name, "identical" if diff == 0 else "differs", expected.numel(), diff, 0)
    e, a = expected.reshape(-1).view(iv), actual.reshape(-1).view(iv)
    bad = e != a
    diff = int(bad.sum())
    if diff == 0:
        return TensorCheck(name, "identical", e.numel())
    bits = torch.iinfo(iv).bits
    magnitude = (1 << (bits - 1)) - 1

    def ordered(x):
        x = x[bad].to(torch.int64)
        mag = x & magnitude
        return torch.where(x < 0, -mag, mag)

    ulp = int((ordered(e) - ordered(a)).abs().max())
    return TensorCheck(name, "differs", e.numel(), diff, ulp)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    merged: str
    recipe: str
    plan: Any
    layers_checked: list[int]
    sample_seed: int | None
    sampled: bool
    tensors: list[TensorCheck] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # tensor set, dtypes, partition.json, mergekit_config.yml
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    rebuild_bytes: int = 0
    full_check_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings and all(c.ok for c in self.tensors)

    def first_difference(self) -> str | None:
        for c in self.tensors:
            if not c.ok:
                return f"tensor {c.name}: {c.describe()}"
        return self.findings[0] if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "mergekit-partition/verify",
            "version": 1,
            "merged": self.merged,
            "recipe": self.recipe,
            "verdict": "identical" if self.ok else "differs",
            "first_difference": self.first_difference(),
            "seed": self.plan.seed,
            "bins": self.plan.bins,
            "num_layers": self.plan.num_layers,
            "layers_checked": self.layers_checked,
            "sampled": self.sampled,
            "sample_seed": self.sample_seed,
            "tensors": [c.to_dict() for c in self.tensors],
            "findings": self.findings,
            "notes": self.notes,
            "bytes_read": self.bytes_read,
            "rebuild_bytes": self.rebuild_bytes,
            "full_check_bytes": self.full_check_bytes,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        p = self.plan
        lines = [
            f"verify {self.merged}",
            f"  against {self.recipe}: seed {p.seed}, {p.bins} bins, {p.num_layers} layers of {p.stack}",
        ]
        if self.sampled:
            lines.append(
                f"  layers checked: {', '.join(map(str, self.layers_checked))} of {p.num_layers} "
                f"(sample seed {self.sample_seed}; --sample-seed {self.sample_seed} repeats it, "
                "--all checks every layer)"
            )
        else:
            lines.append(f"  layers checked: all {p.num_layers}")
        width = max((len(c.name) for c in self.tensors), default=0)
        for c in self.tensors:
            lines.append(f"  {c.name.ljust(width)}  {c.describe()}")
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  DIFFERS: {f}" for f in self.findings]
        lines.append(
            f"  read {_human(self.bytes_read)} (checking every layer reads {_human(self.full_check_bytes)}; "
            f"a full rebuild reads {_human(self.rebuild_bytes)})"
        )
        if self.ok:
            lines.append(
                "verdict: OK, every checked tensor is bit-identical to what the recipe produces "
                f"({len(self.tensors)} tensors)"
            )
        else:
            bad = sum(not c.ok for c in self.tensors) + len(self.findings)
            lines.append(f"verdict: DIFFERS ({bad} problem(s)); first: {self.first_difference()}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _layer_names(plan) -> dict[int, list[tuple[str, str]]]:
    """{layer: [(full tensor name, suffix), ...]} from the plan's rows."""
    return {r["layer"]: [(f"{plan.stack}.{r['layer']}.{s}", s) for s in r["t"]] for r in plan.layers}


def _plan(recipe):
    from mergekit_partition_slerp.planning import ConfigError, plan

    try:
        return plan(recipe)
    except ConfigError as error:
        raise InspectError(f"recipe {recipe}: {error}") from None


def verify(
    merged: str,
    recipe,
    *,
    layers: int | None = None,
    all_layers: bool = False,
    sample_seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Recompute layers of `merged` from the recipe's base and donors; compare bits.

    layers: how many layers to sample (seeded by sample_seed, random when None);
    default: every layer when that reads under AUTO_ALL_BYTES, else DEFAULT_SAMPLE.
    """
    p = _plan(recipe)
    raw = p.raw
    shared = raw.get("parameters") or {}
    rescale, rowwise = bool(shared.get("rescale", False)), bool(shared.get("rowwise", False))
    in_dtype, out_dtype = _dtype(raw.get("dtype"), "dtype"), _dtype(raw.get("out_dtype"), "out_dtype")
    models = _Models()
    try:
        out = models.open(merged, "merged model")
        base = models.open(p.base, "base model")
        donors = [models.open(d, f"donor {k}") for k, d in enumerate(p.donors)]
        names = _layer_names(p)
        report = VerifyReport(
            merged=merged, recipe=str(p.source or recipe), plan=p, layers_checked=[], sample_seed=None, sampled=False
        )

        # the tensor set mergekit writes: every architecture weight the base has
        expected = [n for n in p.non_layer if n in base.entries]
        expected += [n for i in sorted(names) for n, _ in names[i] if n in base.entries]
        missing = [n for n in expected if n not in out.entries]
        extra = sorted(set(out.entries) - set(expected))
        if missing:
            report.findings.append(f"tensor set: {len(missing)} tensor(s) missing from the merge, first {missing[0]}")
        if extra:
            report.findings.append(f"tensor set: {len(extra)} tensor(s) the recipe does not produce, first {extra[0]}")
        if not missing and not extra:
            report.notes.append(f"tensor set: {len(expected)} tensors, as the recipe produces")
        dtypes: dict[str, Any] = {}
        for n in expected:
            if n in out.entries:
                dtypes.setdefault(out.entries[n].dtype, n)
        report.notes.append(f"stored dtypes: {', '.join(sorted(dtypes))}")

        # cost of the alternatives, from the headers alone
        def layer_cost(i: int) -> int:
            row = p.layers[i]
            total = 0
            for n, s in names[i]:
                if n not in out.entries or n not in base.entries:
                    continue
                t, q = row["t"][s], row["drop_rate"][s]
                total += out.nbytes(n) + (base.nbytes(n) if not (t == 1 and q == 0) else 0)
                total += donors[row["donor_index"]].nbytes(n) if t != 0 else 0
            return total

        non_layer_cost = sum(
            out.nbytes(n) + base.nbytes(n) for n in p.non_layer if n in out.entries and n in base.entries
        )
        per_layer = [layer_cost(i) for i in range(p.num_layers)]
        report.full_check_bytes = non_layer_cost + sum(per_layer)
        report.rebuild_bytes = sum(base.nbytes(n) for n in expected) + sum(
            donors[r["donor_index"]].nbytes(n) for r in p.layers for n, _ in names[r["layer"]] if n in base.entries
        )

        # which layers
        if all_layers:
            chosen = list(range(p.num_layers))
        elif layers is None and report.full_check_bytes <= AUTO_ALL_BYTES:
            chosen = list(range(p.num_layers))
            report.notes.append(
                f"small model: every layer checked (the whole check reads under {_human(AUTO_ALL_BYTES)}; "
                "--layers K samples)"
            )
        else:
            k = DEFAULT_SAMPLE if layers is None else layers
            if k < 1:
                raise InspectError(f"--layers must be at least 1; got {k}.")
            report.sample_seed = random.SystemRandom().randrange(2**31) if sample_seed is None else sample_seed
            chosen = sorted(random.Random(report.sample_seed).sample(range(p.num_layers), min(k, p.num_layers)))
            report.sampled = len(chosen) < p.num_layers
        report.layers_checked = chosen

        # non-layer tensors: the base, after mergekit's load cast and save cast
        for n in p.non_layer:
            if n in out.entries and n in base.entries:
                want = _cast(_cast(base.get(n), in_dtype), out_dtype)
                report.tensors.append(compare(n, want, out.get(n)))
                del want

        for i in chosen:
            row = p.layers[i]
            donor = donors[row["donor_index"]]
            if log:
                log(f"layer {i}: donor {row['donor']}")
            for n, s in names[i]:
                if n not in base.entries:
                    continue
                if n not in out.entries:
                    report.tensors.append(TensorCheck(n, "missing", detail="not in the merged model"))
                    continue
                t, q = row["t"][s], row["drop_rate"][s]
                a = _cast(base.get(n), in_dtype) if not (t == 1 and q == 0) else None
                b = _cast(donor.get(n), in_dtype) if t != 0 else None
                try:
                    first, second = (a if a is not None else b), (b if b is not None else a)
                    assert first is not None and second is not None  # t == 0 reads the base, t == 1 the donor
                    want = recompute_tensor(
                        n,
                        first,
                        second,
                        t,
                        q,
                        seed=p.seed,
                        rescale=rescale,
                        rowwise=rowwise,
                    )
                except kernels.NonFiniteError as error:
                    who = "base model" if error.which == 0 else f"donor {row['donor']}"
                    raise InspectError(
                        f"tensor {n} of {who} contains NaN or Inf; the recipe cannot produce a merge from it."
                    ) from None
                del a, b
                report.tensors.append(compare(n, _cast(want, out_dtype), out.get(n)))
                del want

        _check_records(report, out.path, p)
        report.bytes_read = models.bytes_read
        return report
    finally:
        models.close()


def _check_records(report: VerifyReport, path: str, p) -> None:
    """partition.json and mergekit_config.yml written next to the weights, when present."""
    record = os.path.join(path, "partition.json")
    if os.path.exists(record):
        try:
            with open(record) as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            report.findings.append(f"partition.json is unreadable ({error})")
            data = None
        if data is not None:
            bad = []
            for key, want in (("seed", p.seed), ("bins", p.bins), ("num_layers", p.num_layers)):
                if data.get(key) != want:
                    bad.append(f"{key} is {data.get(key)!r}, the recipe gives {want!r}")
            got = [(r.get("donor"), r.get("t"), r.get("drop_rate")) for r in data.get("layers", [])]
            if not bad and got != [(r["donor"], r["t"], r["drop_rate"]) for r in p.layers]:
                bad.append("its per-layer donors/t/drop_rate differ from the recipe's plan")
            if bad:
                report.findings.append("partition.json: " + "; ".join(bad))
            elif data.get("config_sha256") == p.config_sha256:
                report.notes.append(
                    f"partition.json: seed {p.seed}, bins {p.bins}, config sha256 {p.config_sha256[:12]}..., same plan"
                )
            else:
                # a re-saved or re-indented copy of the recipe: different bytes, same plan
                report.notes.append(
                    f"partition.json: seed {p.seed}, bins {p.bins}, same plan; its config_sha256 "
                    f"{str(data.get('config_sha256'))[:12]}... is not this file's ({p.config_sha256[:12]}...)"
                )
    card = os.path.join(path, "mergekit_config.yml")
    if os.path.exists(card):
        import hashlib

        import yaml

        with open(card, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() == p.config_sha256:
            report.notes.append("mergekit_config.yml: byte-identical to the recipe")
        else:
            try:
                same = yaml.safe_load(data) == p.raw
            except yaml.YAMLError:
                same = False
            if same:
                report.notes.append("mergekit_config.yml: the same recipe (formatting differs)")
            else:
                report.findings.append(
                    "mergekit_config.yml: the merge says it was made from a different recipe "
                    "(sha256 and content differ)"
                )
    if not os.path.exists(record) and not os.path.exists(card):
        report.notes.append("no partition.json or mergekit_config.yml next to the weights (checked the tensors only)")


# --------------------------------------------------------------------------- explain


def _slerp_coefficients(t: float, dot: torch.Tensor, lerp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb) per row, the kernel's rule: lerp where flagged, slerp elsewhere (float64)."""
    theta = torch.arccos(dot.clamp(-1, 1))
    s = torch.sin(theta)
    safe = torch.where(lerp | (s == 0), torch.ones_like(s), s)
    ca = torch.where(lerp, torch.full_like(s, 1 - t), torch.sin((1 - t) * theta) / safe)
    cb = torch.where(lerp, torch.full_like(s, t), torch.sin(t * theta) / safe)
    return ca, cb


def _invert(ca: torch.Tensor, cb: torch.Tensor, dot: torch.Tensor, lerp: torch.Tensor) -> torch.Tensor:
    """t from slerp coefficients: tan(t theta) = cb sin(theta) / (ca + cb cos(theta))."""
    theta = torch.arccos(dot.clamp(-1, 1))
    slerp_t = torch.atan2(cb * torch.sin(theta), ca + cb * torch.cos(theta)) / torch.where(theta == 0, 1.0, theta)
    return torch.where(lerp | (theta == 0), cb, slerp_t)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


@dataclass
class _TensorFit:
    moved: int  # elements where the merge differs from the base
    numel: int
    residual: dict[int, float]  # donor -> least-squares residual of merged - base on (base, donor - base)
    cosine: dict[int, float]  # donor -> cos(merged - base, donor - base)
    t: dict[int, float | None] = field(default_factory=dict)
    drop: dict[int, float | None] = field(default_factory=dict)
    explained: dict[int, float] = field(default_factory=dict)  # share of elements equal to the prediction or the base
    rowwise: dict[int, bool | None] = field(default_factory=dict)
    t_range: dict[int, tuple[float, float]] = field(default_factory=dict)  # t values reproducing the most elements
    informative: dict[int, int] = field(default_factory=dict)  # elements the slerp moves: the drop rate's sample


def _stats(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, moved: torch.Tensor):
    """Per-row sums in float64 over row chunks (bounded scratch)."""
    m2, a2, b2, mv = _rows(m), _rows(a), _rows(b), _rows(moved)
    rows, cols = a2.shape
    step = max(1, CHUNK_ROWS_ELEMENTS // max(cols, 1))
    keys = ("aa", "bb", "ab", "ye", "ee", "yy", "m_aa", "m_ae", "m_ee", "m_ay", "m_ey", "m_yy")
    out = {k: torch.zeros(rows, dtype=torch.float64) for k in keys}
    for r0 in range(0, rows, step):
        x, z, w = a2[r0 : r0 + step].double(), b2[r0 : r0 + step].double(), m2[r0 : r0 + step].double()
        k = mv[r0 : r0 + step].double()
        e, y = z - x, w - x
        sl = slice(r0, r0 + step)
        out["aa"][sl], out["bb"][sl], out["ab"][sl] = (x * x).sum(1), (z * z).sum(1), (x * z).sum(1)
        out["ye"][sl], out["ee"][sl], out["yy"][sl] = (y * e).sum(1), (e * e).sum(1), (y * y).sum(1)
        xk, ek, yk = x * k, e * k, y * k
        out["m_aa"][sl], out["m_ae"][sl], out["m_ee"][sl] = (xk * x).sum(1), (xk * e).sum(1), (ek * e).sum(1)
        out["m_ay"][sl], out["m_ey"][sl], out["m_yy"][sl] = (xk * y).sum(1), (ek * y).sum(1), (yk * y).sum(1)
    return out


def _solve(saa, sae, see, say, sey, syy):
    """Least squares of y on (a, e): coefficients (gamma, beta) and the residual, elementwise over rows."""
    det = saa * see - sae * sae
    ok = det > 1e-300
    safe = torch.where(ok, det, torch.ones_like(det))
    gamma = torch.where(ok, (say * see - sey * sae) / safe, torch.zeros_like(det))
    beta = torch.where(
        ok, (sey * saa - say * sae) / safe, torch.where(see > 0, sey / torch.where(see > 0, see, 1.0), 0.0)
    )
    residual = (
        syy - 2 * gamma * say - 2 * beta * sey + gamma * gamma * saa + 2 * gamma * beta * sae + beta * beta * see
    ).clamp_min(0)
    return gamma, beta, residual


def _predict(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """ca * a + cb * b in float32 (the kernel's precision), rounded once to a's dtype; ca/cb per row."""
    wd = torch.float64 if a.dtype == torch.float64 else torch.float32
    a2, b2 = _rows(a), _rows(b)
    out = (b2.to(wd) * cb.to(wd)[:, None]).add_(a2.to(wd) * ca.to(wd)[:, None])
    return out.to(a.dtype).reshape(a.shape)


def _predict_at(t, x, y, rows, dot, lerp, rowwise: bool, p_hat: float | None) -> torch.Tensor:
    """The method's output at t for flat elements x (base), y (donor) in rows `rows`."""
    ca, cb = _slerp_coefficients(t, dot, lerp)
    if rowwise:
        ca, cb = ca.index_select(0, rows), cb.index_select(0, rows)  # ~50x faster than ca[rows] on CPU
    else:  # one pair for the whole tensor: Python floats, no gather
        ca, cb = float(ca[0]), float(cb[0])  # type: ignore[assignment]
    out = _predict_flat(x, y, ca, cb)
    if p_hat:
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = (x.to(wd) + (out.to(wd) - x.to(wd)) / (1 - p_hat)).to(x.dtype)
    return out


def _moves_far(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x at least 2 ulps away from a: a 1-ulp move may round to either side in the kernel,
    so only these elements measure the drop rate without bias (the mask ignores values)."""
    iv = _INT_VIEW.get(a.dtype)
    if iv is None:
        return x != a
    bits = torch.iinfo(iv).bits
    magnitude = (1 << (bits - 1)) - 1

    def ordered(v):
        v = v.reshape(-1).view(iv).to(torch.int64)
        return torch.where(v < 0, -(v & magnitude), v & magnitude)

    return ((ordered(x) - ordered(a)).abs() >= 2).reshape(a.shape)


def _predict_flat(x: torch.Tensor, y: torch.Tensor, ca, cb) -> torch.Tensor:
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(ca, torch.Tensor):
        ca, cb = ca.to(wd), cb.to(wd)
    return (y.to(wd) * cb).add_(x.to(wd) * ca).to(x.dtype)


def _refine(score: Callable[[float], int], t0: float, n_sample: int) -> tuple[float, tuple[float, float]]:
    """The middle of the widest run of t values that reproduce the most sampled elements exactly.

    Least squares on rounded outputs is biased where few elements move (norm weights);
    counting exact reproductions is not. Five zooms of an 11-point grid: resolution ~1e-6.
    """
    lo, hi = max(0.0, t0 - 0.03), min(1.0, t0 + 0.03)
    for _ in range(5):
        grid = [lo + (hi - lo) * k / 10 for k in range(11)]
        scores = [score(t) for t in grid]
        # within a few elements of the best: the kernel's float32 coefficients round a handful of
        # borderline elements differently from this float64 prediction, even at the true t
        top = max(scores) - max(1, math.ceil(SCORE_SLACK * n_sample))
        runs, start = [], None
        for k, sc in enumerate(scores + [None]):
            if sc is not None and sc >= top and start is None:
                start = k
            elif (sc is None or sc < top) and start is not None:
                runs.append((k - start, start, k - 1))
                start = None
        _, first, last = max(runs)
        step = (hi - lo) / 10
        edges = (grid[first], grid[last])
        lo, hi = max(0.0, grid[first] - step), min(1.0, grid[last] + step)
    return (edges[0] + edges[1]) / 2, edges


def _fit_tensor(m: torch.Tensor, a: torch.Tensor, donors: Sequence[torch.Tensor], rescale: bool) -> _TensorFit:
    moved = m != a
    n_moved = int(moved.sum())
    fit = _TensorFit(moved=n_moved, numel=m.numel(), residual={}, cosine={})
    if n_moved == 0:
        return fit
    per = []
    for d, b in enumerate(donors):
        s = _stats(m, a, b, moved)
        g = {k: v.sum() for k, v in s.items()}
        _, _, res = _solve(g["m_aa"], g["m_ae"], g["m_ee"], g["m_ay"], g["m_ey"], g["m_yy"])
        fit.residual[d] = float(res)
        denom = math.sqrt(float(g["yy"]) * float(g["ee"]))
        fit.cosine[d] = float(g["ye"]) / denom if denom > 0 else 0.0
        per.append(s)
    best = min(fit.residual.values())
    for d, b in enumerate(donors):
        if fit.residual[d] <= 4 * best + 1e-30:  # candidates (identical donors tie)
            _t_and_drop(fit, d, m, a, b, moved, per[d], rescale)
    return fit


def _t_and_drop(fit: _TensorFit, d: int, m, a, b, moved, s, rescale: bool) -> None:
    """Fit t under the whole-tensor and the rowwise slerp; keep the one that explains more bits."""
    if bool((a == b).all()):
        fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d] = None, None, 0.0, None
        return
    if bool((m[moved] == b[moved]).all()):
        # every moved element is the donor's: the method's t == 1 shortcut (exact, no rounding)
        informative = _moves_far(b, a)
        n_inf = int(informative.sum())
        fit.t[d], fit.t_range[d], fit.rowwise[d] = 1.0, (1.0, 1.0), None
        fit.drop[d] = int((informative & ~moved).sum()) / n_inf if n_inf else None
        fit.explained[d], fit.informative[d] = 1.0, n_inf
        return
    hypotheses = []
    for rowwise in (False, True):
        if rowwise and (a.ndim < 2 or a.shape[0] == 1):
            continue
        if rowwise:
            aa, bb, ab = s["aa"], s["bb"], s["ab"]
            sums = [s[k] for k in ("m_aa", "m_ae", "m_ee", "m_ay", "m_ey", "m_yy")]
        else:
            aa, bb, ab = s["aa"].sum()[None], s["bb"].sum()[None], s["ab"].sum()[None]
            sums = [s[k].sum()[None] for k in ("m_aa", "m_ae", "m_ee", "m_ay", "m_ey", "m_yy")]
        na, nb = aa.sqrt(), bb.sqrt()
        lerp = (na < EPS) | (nb < EPS)
        dot = torch.where(lerp, torch.zeros_like(ab), ab / torch.where(lerp, 1.0, na * nb)).clamp(-1, 1)
        lerp = lerp | (dot.abs() > DOT_THRESHOLD)
        gamma, beta, _ = _solve(*sums)
        ca, cb = 1 + gamma - beta, beta
        weights = sums[2]  # information per row: sum of (donor - base)^2 over moved elements
        if rowwise and float(weights.sum()) == 0:
            continue
        t_rows = _invert(ca, cb, dot, lerp)
        t = float((t_rows * weights).sum() / weights.sum()) if rowwise else float(t_rows[0])
        hypotheses.append((rowwise, t, dot, lerp))
    rows_of = torch.arange(_rows(a).shape[0]).repeat_interleave(_rows(a).shape[1])
    sample = moved.reshape(-1).nonzero().squeeze(1)
    if sample.numel() > REFINE_SAMPLE:  # evenly spread, deterministic
        sample = sample[torch.linspace(0, sample.numel() - 1, REFINE_SAMPLE).long()]
    a_s, b_s, m_s = a.reshape(-1)[sample], b.reshape(-1)[sample], m.reshape(-1)[sample]
    r_s = rows_of[sample]
    best = None
    for rowwise, t_eff, dot, lerp in hypotheses:
        n_rows = _rows(a).shape[0]

        p_hat = None
        if rescale:
            # kept = a + (slerp - a) / (1 - p): p from the informative elements, then t of the slerp itself
            ca, cb = _slerp_coefficients(min(max(t_eff, 0.0), 1.0), dot, lerp)
            pred = _predict(a, b, ca.expand(n_rows), cb.expand(n_rows))
            informative = pred != a
            n_inf = int(informative.sum())
            p_hat = int((informative & ~moved).sum()) / n_inf if n_inf else None
            t_eff = t_eff * (1 - (p_hat or 0.0))
        hyp = (dot, lerp, rowwise, p_hat)

        def score(t, hyp=hyp):
            return int((_predict_at(t, a_s, b_s, r_s, *hyp) == m_s).sum())

        t, t_range = _refine(score, min(max(t_eff, 0.0), 1.0), int(sample.numel()))
        pred = _predict_at(t, a.reshape(-1), b.reshape(-1), rows_of, *hyp).reshape(a.shape)
        informative = _moves_far(pred, a)
        n_inf = int(informative.sum())
        if not rescale:
            p_hat = int((informative & ~moved).sum()) / n_inf if n_inf else None
        explained = float(((m == pred) | (m == a)).sum()) / m.numel()
        key = (explained, not rowwise)
        if best is None or key > best[0]:
            best = (key, t, p_hat, explained, rowwise, t_range, n_inf)
    if best is None:
        fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d] = None, None, 0.0, None
        return
    _, fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d], fit.t_range[d], fit.informative[d] = best
    if len(hypotheses) < 2:
        fit.rowwise[d] = None  # 1-D tensors are slerped whole either way


@dataclass
class Inspection:
    """A plan recovered from a merge: `str()` is the table, `to_json()` the plan JSON, `plot()` the heatmap."""

    merged: str
    base: str
    donors: list[str]
    stack: str
    num_layers: int
    layers: list[dict[str, Any]]
    non_layer: list[str]
    non_layer_equal_base: dict[str, bool]
    bytes_read: int = 0
    recipe: Any | None = None  # the recipe's Plan when explaining with a recipe's models

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "mergekit-partition/plan",
            "version": 1,
            "seed": None,
            "bins": None,
            "stack": self.stack,
            "num_layers": self.num_layers,
            "base": self.base,
            "donors": self.donors,
            "layers": self.layers,
            "non_layer": self.non_layer,
            "inspected": {
                "merged": self.merged,
                "non_layer_equal_base": self.non_layer_equal_base,
                "bytes_read": self.bytes_read,
            },
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def as_plan(self):
        """The recovered rows as a planning.Plan (unknown donors and t left out), for plotting."""
        from mergekit_partition_slerp.planning import LayerRow, Plan

        rows = []
        for r in self.layers:
            known = {k: v for k, v in r["t"].items() if v is not None}
            if r["donor_index"] is None or not known:
                continue
            drops = {k: v for k, v in r["drop_rate"].items() if v is not None}
            rows.append(
                LayerRow(
                    layer=r["layer"],
                    bin=r["donor_index"],
                    donor_index=r["donor_index"],
                    donor=r["donor"],
                    position=r.get("position", 0.0),
                    t=known,
                    drop_rate=drops,
                )
            )
        return Plan(
            seed=-1,
            bins=len(self.donors),
            stack=self.stack,
            num_layers=self.num_layers,
            base=self.base,
            donors=list(self.donors),
            layers=rows,
            non_layer=self.non_layer,
        )

    def plot(self, path: str | None = None):
        """The same layer x donor heatmap as `plan --png`, from the recovered values."""
        fig = self.as_plan().plot(path)
        fig.axes[0].set_title(
            "recovered by mergekit-partition inspect: t per layer; × = drop > 0; empty = unknown", fontsize=9
        )
        if path:
            fig.savefig(path, dpi=130)  # again, with the title that says where the values come from
        return fig

    def __str__(self) -> str:
        from mergekit_partition_slerp.report import CLASSES, tensor_class

        classes = [c for c in CLASSES if any(tensor_class(k) == c for r in self.layers[:1] for k in r["t"])]

        def by_class(values, cls, digits):
            vals = [v for k, v in values.items() if tensor_class(k) == cls]
            if not vals:
                return ""
            known = sorted({round(v, digits) for v in vals if v is not None})
            text = "/".join(f"{v:.{digits}f}" for v in known)
            return text + ("/?" if None in vals and known else "?" if None in vals else "")

        head = (
            ["layer", "donor"] + [f"t:{c}" for c in classes] + [f"drop:{c}" for c in classes] + ["confidence", "note"]
        )
        rows = []
        for r in self.layers:
            donor = (
                r["donor"]
                if r["donor"] is not None
                else ("? (" + " | ".join(r.get("candidates") or []) + ")" if r.get("candidates") else "?")
            )
            conf = "" if r["confidence"] is None else f"{r['confidence']:.3f}"
            rows.append(
                [str(r["layer"]), donor]
                + [by_class(r["t"], c, 3) for c in classes]
                + [by_class(r["drop_rate"], c, 3) for c in classes]
                + [conf, r.get("note") or ""]
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

        def fmt(row):
            return "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()

        equal = [n for n, v in self.non_layer_equal_base.items() if v]
        moved = [n for n, v in self.non_layer_equal_base.items() if not v]
        lines = [
            f"recovered plan of {self.merged}: {self.num_layers} layers of {self.stack}",
            f"base: {self.base}",
            fmt(head),
            fmt(["-" * w for w in widths]),
        ] + [fmt(r) for r in rows]
        if equal:
            lines.append(f"base (bit for bit): {', '.join(equal)}")
        if moved:
            lines.append(f"NOT the base: {', '.join(moved)} (partition_slerp keeps these from the base)")
        lines.append(f"donors (index: model): {'; '.join(f'{k}: {d}' for k, d in enumerate(self.donors))}")
        lines.append(
            "t: fitted slerp t per tensor class (a/b when the class's tensors differ); drop: share of moved-by-slerp "
            "elements left at the base; ?: cannot know (see docs/inspect.md)"
        )
        return "\n".join(lines)


def _infer_layers(names: Sequence[str]) -> tuple[str, int, dict[int, list[str]], list[str]]:
    stacks: dict[str, dict[int, list[str]]] = {}
    other = []
    for n in names:
        found = layer_from_name(n)
        if found is None:
            other.append(n)
        else:
            stacks.setdefault(found[0], {}).setdefault(found[1], []).append(n)
    if not stacks:
        raise InspectError(
            "the merged model has no layer tensors (no name with a layer index such as model.layers.0.*)."
        )
    if len(stacks) > 1:
        raise InspectError(
            f"the merged model has several layer stacks ({', '.join(sorted(stacks))}); "
            "inspect handles single-module models only, like partition_slerp v1."
        )
    ((stack, layers),) = stacks.items()
    return stack, max(layers) + 1, layers, other


def explain(
    merged: str,
    base: str,
    donors: Sequence[str],
    *,
    rescale: bool = False,
    log: Callable[[str], None] | None = None,
) -> Inspection:
    """Recover, per layer, the donor the merge moved toward, the slerp t and the drop rate per tensor."""
    if not donors:
        raise InspectError(
            "explain needs at least one donor (--donor PATH, repeatable, in the recipe's order if known)."
        )
    models = _Models()
    try:
        out = models.open(merged, "merged model")
        b = models.open(base, "base model")
        ds = [models.open(d, f"donor {k} ({d})") for k, d in enumerate(donors)]
        stack, L, layer_map, other = _infer_layers(out.names())
        for ck in [b, *ds]:
            absent = [n for n in out.names() if n not in ck.entries]
            if absent:
                raise InspectError(
                    f"{ck.label} {ck.spec} has no tensor {absent[0]} (and {len(absent) - 1} more) of the merged "
                    "model; pass the models the merge was made from."
                )
            wrong = [n for n in out.names() if ck.entries[n].shape != out.entries[n].shape]
            if wrong:
                raise InspectError(
                    f"{ck.label} {ck.spec}: tensor {wrong[0]} has shape {list(ck.entries[wrong[0]].shape)}, "
                    f"the merge's is {list(out.entries[wrong[0]].shape)}; not the same architecture."
                )
        equal = {}
        for n in other:
            x, y = out.get(n), b.get(n)
            equal[n] = (
                x.shape == y.shape and bool((x.to(y.dtype) == y).all()) if x.dtype != y.dtype else compare(n, y, x).ok
            )
            del x, y
        rows = []
        for i in range(L):
            if log:
                log(f"layer {i}")
            fits: dict[str, _TensorFit] = {}
            for n in sorted(layer_map.get(i, [])):
                m, a = out.get(n), b.get(n)
                a = _cast(a, m.dtype)
                dts = [_cast(ck.get(n), m.dtype) for ck in ds]
                fits[n[len(stack) + len(str(i)) + 2 :]] = _fit_tensor(m, a, dts, rescale)
                del m, a, dts
            rows.append(_layer_row(i, L, fits, donors))
        return Inspection(
            merged=str(merged),
            base=str(base),
            donors=[str(d) for d in donors],
            stack=stack,
            num_layers=L,
            layers=rows,
            non_layer=other,
            non_layer_equal_base=equal,
            bytes_read=models.bytes_read,
        )
    finally:
        models.close()


def _layer_row(i: int, L: int, fits: dict[str, _TensorFit], donors: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "layer": i,
        "bin": None,
        "donor_index": None,
        "donor": None,
        "position": partition.layer_position(i, L),
        "t": {s: None for s in fits},
        "drop_rate": {s: None for s in fits},
        "confidence": None,
        "t_range": {s: None for s in fits},
        "drop_elements": {s: 0 for s in fits},
    }
    moved = {s: f for s, f in fits.items() if f.moved}
    if not moved:
        row["note"] = "nothing moved: every tensor equals the base (t = 0, or t below the dtype's resolution)"
        return row
    totals = {d: sum(f.residual[d] for f in moved.values()) for d in range(len(donors))}
    order = sorted(totals, key=lambda d: totals[d])
    best = order[0]
    second = totals[order[1]] if len(order) > 1 else math.inf
    confidence = (
        1.0
        if second == math.inf or second == 0 and totals[best] == 0
        else 1 - totals[best] / second
        if second > 0
        else 0.0
    )
    row["confidence"] = round(confidence, 6)
    ties = [d for d in order if totals[d] <= totals[best] / (1 - AMBIGUOUS) + 1e-30]
    explained = [f.explained[best] for f in moved.values() if best in f.explained]
    row["explained"] = round(min(explained), 6) if explained else None
    if len(ties) > 1:
        row["candidates"] = [donors[d] for d in ties]
        row["candidate_indices"] = ties
        row["note"] = (
            f"donors {', '.join(map(str, ties))} explain this layer about equally well (identical or nearly "
            "identical models): the donor cannot be known"
        )
    else:
        row["donor_index"], row["donor"] = best, donors[best]
    rowwise = {f.rowwise.get(best) for f in moved.values()} - {None}
    if rowwise == {True}:
        row["rowwise"] = True
    for s, f in fits.items():
        if not f.moved:
            continue  # unmoved tensor: t is 0 or too small to show; its drop mask is invisible
        t_fit, drop_fit = f.t.get(best), f.drop.get(best)
        row["t"][s] = None if t_fit is None else round(t_fit, 6)
        row["drop_rate"][s] = None if drop_fit is None else round(drop_fit, 6)
        row["drop_elements"][s] = f.informative.get(best, 0)
        if best in f.t_range:
            row["t_range"][s] = [round(f.t_range[best][0], 6), round(f.t_range[best][1], 6)]
    if row.get("explained") is not None and row["explained"] < 0.9:
        row["note"] = (
            row.get("note") or ""
        ) + f"only {row['explained']:.0%} of elements fit a partition_slerp of base and donor"
    return row


def inspect(
    merged: str,
    recipe=None,
    *,
    base: str | None = None,
    donors: Sequence[str] | None = None,
    rescale: bool | None = None,
    **verify_options,
):
    """Notebook entry: `inspect(merged, recipe)` verifies; `inspect(merged, base=..., donors=[...])` explains.

    With a recipe and explicit `donors=[]`... use `explain_recipe=True` to explain with the recipe's models.
    """
    explain_with_recipe = verify_options.pop("explain", False)
    if recipe is not None and base is None and donors is None and not explain_with_recipe:
        return verify(merged, recipe, **verify_options)
    plan = None
    if recipe is not None:
        plan = _plan(recipe)
        base = base or plan.base
        donors = donors or plan.donors
        if rescale is None:
            rescale = bool((plan.raw.get("parameters") or {}).get("rescale", False))
    if base is None or not donors:
        raise InspectError("inspect needs a recipe (to verify) or a base and donors (to explain).")
    result = explain(merged, base, donors, rescale=bool(rescale), log=verify_options.get("log"))
    result.recipe = plan
    return result
