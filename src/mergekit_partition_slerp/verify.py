"""`inspect --recipe`: is this merge what its recipe produces?

Recompute sampled layers (or all) from the recipe's base and each layer's donor with the method's
own per-tensor function and pinned masks, and compare bits with the merge; check the non-layer
tensors against the base, the tensor set, and the records `run` leaves beside the weights.
Tensors are read one at a time, so memory stays at about one tensor per model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_partition_slerp import kernels
from mergekit_partition_slerp.bits import TensorCheck, compare
from mergekit_partition_slerp.checkpoint import Checkpoint, Checkpoints
from mergekit_partition_slerp.errors import ConfigError
from mergekit_partition_slerp.report import human

AUTO_ALL_BYTES = 64 * 2**20  # without --layers, verify checks every layer when that reads less than this
DEFAULT_SAMPLE = 4  # layers checked by default on larger models


@dataclass
class VerifyReport:
    merged: str
    recipe: str
    plan: Any
    layers_checked: list[int]
    sample_seed: int | None
    sampled: bool
    tensors: list[TensorCheck] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # tensor set, partition.json, mergekit_config.yml
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
        lines += [f"  {c.name.ljust(width)}  {c.describe()}" for c in self.tensors]
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  DIFFERS: {f}" for f in self.findings]
        lines.append(
            f"  read {human(self.bytes_read)} (checking every layer reads {human(self.full_check_bytes)}; "
            f"a full rebuild reads {human(self.rebuild_bytes)})"
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
    p = plan_of(recipe)
    shared = p.raw.get("parameters") or {}
    rescale, rowwise = bool(shared.get("rescale", False)), bool(shared.get("rowwise", False))
    from mergekit.common import dtype_from_name  # how mergekit reads them (the recipe check vetted the names)

    in_dtype, out_dtype = (dtype_from_name(p.raw.get(k) and str(p.raw[k])) for k in ("dtype", "out_dtype"))
    models = Checkpoints()
    out = models.open(merged, "merged model")
    base = models.open(p.base, "base model")
    donors = [models.open(d, f"donor {k}") for k, d in enumerate(p.donors)]
    names = {r.layer: [(f"{p.stack}.{r.layer}.{s}", s) for s in r.t] for r in p.layers}
    report = VerifyReport(
        merged=merged, recipe=str(p.source or recipe), plan=p, layers_checked=[], sample_seed=None, sampled=False
    )
    expected = _check_tensor_set(report, p, names, out, base)
    _count_costs(report, p, names, out, base, donors, expected)
    report.layers_checked = _choose_layers(report, p.num_layers, layers, all_layers, sample_seed)

    # non-layer tensors: the base, after mergekit's load cast and save cast
    for n in p.non_layer:
        if n in out.entries and n in base.entries:
            report.tensors.append(compare(n, _cast(_cast(base.get(n), in_dtype), out_dtype), out.get(n)))

    for i in report.layers_checked:
        row = p.layers[i]
        donor = donors[row.donor_index]
        if log:
            log(f"layer {i}: donor {row.donor}")
        for n, s in names[i]:
            if n not in base.entries:
                continue
            if n not in out.entries:
                report.tensors.append(TensorCheck(n, "missing", detail="not in the merged model"))
                continue
            t, q = row.t[s], row.drop_rate[s]
            # t == 0 needs only the base, t == 1 without drop only the donor: read no more than the method
            a = _cast(base.get(n), in_dtype) if not (t == 1 and q == 0) else None
            b = _cast(donor.get(n), in_dtype) if t != 0 else None
            try:
                want = recompute_tensor(
                    n,
                    a if a is not None else b,
                    b if b is not None else a,
                    t,
                    q,
                    seed=p.seed,
                    rescale=rescale,
                    rowwise=rowwise,
                )
            except kernels.NonFiniteError as error:
                who = "base model" if error.which == 0 else f"donor {row.donor}"
                raise ConfigError(
                    f"tensor {n} of {who} contains NaN or Inf; the recipe cannot produce a merge from it."
                ) from None
            del a, b
            report.tensors.append(compare(n, _cast(want, out_dtype), out.get(n)))
            del want

    _check_records(report, out.path, p)
    report.bytes_read = models.bytes_read
    return report


def recompute_tensor(name: str, base, donor, t: float, drop_rate: float, *, seed: int, rescale=False, rowwise=False):
    """One layer tensor exactly as `partition_slerp` computes it (the method's own function)."""
    from mergekit_partition_slerp.method import merge_layer_tensor

    out = merge_layer_tensor(name, base, donor, t, drop_rate, seed=seed, rescale=rescale, rowwise=rowwise)
    return out.clone()  # the kernel may hand back an input (t 0 or 1): the caller owns a private copy


def plan_of(recipe):
    """The recipe's plan; its problems as one input error."""
    from mergekit_partition_slerp.planning import plan

    try:
        return plan(recipe)
    except ConfigError as error:
        raise ConfigError(f"recipe {recipe}: {error}") from None


def _check_tensor_set(report: VerifyReport, p, names, out: Checkpoint, base: Checkpoint) -> list[str]:
    """mergekit writes every architecture weight the base has; returns those names."""
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
    dtypes = sorted({out.entries[n].dtype for n in expected if n in out.entries})
    report.notes.append(f"stored dtypes: {', '.join(dtypes)}")
    return expected


def _count_costs(report: VerifyReport, p, names, out, base, donors, expected) -> None:
    """Bytes of a whole check and of a rebuild, from the headers alone."""

    def layer_cost(i: int) -> int:
        row, total = p.layers[i], 0
        for n, s in names[i]:
            if n in out.entries and n in base.entries:
                t, q = row.t[s], row.drop_rate[s]
                total += out.entries[n].nbytes + (base.entries[n].nbytes if not (t == 1 and q == 0) else 0)
                total += donors[row.donor_index].entries[n].nbytes if t != 0 else 0
        return total

    shared = [n for n in p.non_layer if n in out.entries and n in base.entries]
    report.full_check_bytes = sum(out.entries[n].nbytes + base.entries[n].nbytes for n in shared)
    report.full_check_bytes += sum(layer_cost(i) for i in range(p.num_layers))
    report.rebuild_bytes = sum(base.entries[n].nbytes for n in expected) + sum(
        donors[r.donor_index].entries[n].nbytes for r in p.layers for n, _ in names[r.layer] if n in base.entries
    )


def _choose_layers(report: VerifyReport, num_layers: int, k: int | None, all_layers: bool, seed: int | None):
    if all_layers:
        return list(range(num_layers))
    if k is None and report.full_check_bytes <= AUTO_ALL_BYTES:
        report.notes.append(
            f"small model: every layer checked (the whole check reads under {human(AUTO_ALL_BYTES)}; "
            "--layers K samples)"
        )
        return list(range(num_layers))
    k = DEFAULT_SAMPLE if k is None else k
    if k < 1:
        raise ConfigError(f"--layers must be at least 1; got {k}.")
    # a fresh seed unless given; always printed, so any sample can be repeated
    report.sample_seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    chosen = sorted(random.Random(report.sample_seed).sample(range(num_layers), min(k, num_layers)))
    report.sampled = len(chosen) < num_layers
    return chosen


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
            bad = [
                f"{key} is {data.get(key)!r}, the recipe gives {want!r}"
                for key, want in (("seed", p.seed), ("bins", p.bins), ("num_layers", p.num_layers))
                if data.get(key) != want
            ]
            got = [(r.get("donor"), r.get("t"), r.get("drop_rate")) for r in data.get("layers", [])]
            if not bad and got != [(r.donor, r.t, r.drop_rate) for r in p.layers]:
                bad.append("its per-layer donors/t/drop_rate differ from the recipe's plan")
            if bad:
                report.findings.append("partition.json: " + "; ".join(bad))
            elif data.get("config_sha256") == p.config_sha256:
                report.notes.append(
                    f"partition.json: seed {p.seed}, bins {p.bins}, config sha256 {p.config_sha256[:12]}..., same plan"
                )
            else:  # a re-saved or re-indented copy of the recipe: different bytes, same plan
                report.notes.append(
                    f"partition.json: seed {p.seed}, bins {p.bins}, same plan; its config_sha256 "
                    f"{str(data.get('config_sha256'))[:12]}... is not this file's ({p.config_sha256[:12]}...)"
                )
    card = os.path.join(path, "mergekit_config.yml")
    if os.path.exists(card):
        import yaml

        with open(card, "rb") as f:
            text = f.read()
        if hashlib.sha256(text).hexdigest() == p.config_sha256:
            report.notes.append("mergekit_config.yml: byte-identical to the recipe")
        else:
            try:
                same = yaml.safe_load(text) == p.raw
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


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)
