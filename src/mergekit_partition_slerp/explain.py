"""`inspect --base --donor`: recover the plan of a merge whose recipe is lost.

For each layer tensor, with m the merge, a the base and b a donor, partition_slerp leaves every
kept element at round(ca * a + cb * b) and every dropped one at a (kernels.py). So:

  donor  m - a lies in the span of (a, b - a) for the true donor: a least-squares fit over the
         moved elements (m != a) leaves only rounding. A layer has one donor, so the residuals of
         its tensors are added; the smallest wins, and its margin over the next is the confidence.
  t      the fitted coefficients invert through the slerp geometry to a first t; then t moves to
         the middle of the run of t values that reproduce the most sampled elements bit for bit,
         using the kernel's own angle and coefficients. The whole-tensor and the rowwise slerp
         are both tried; the one that explains more elements wins.
  drop   the kernel's own output at both ends of that run says which elements the slerp moves
         whichever t it was; the share of those the merge left at the base estimates the drop rate
         (the mask ignores values: binomial).

Where a value cannot be known (nothing moved, identical donors) the row says so instead of guessing.
Tensors are read one at a time: about one tensor per model in memory, plus float64 blocks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergekit_partition_slerp import kernels, partition
from mergekit_partition_slerp.bits import compare, ulp_distance
from mergekit_partition_slerp.checkpoint import Checkpoints
from mergekit_partition_slerp.errors import ConfigError
from mergekit_partition_slerp.layers import layer_from_name

BLOCK = 1 << 19  # elements per float64 block of the donor fit (a few MiB per operand)
REFINE_SAMPLE = 1 << 15  # moved elements that score each candidate t
AMBIGUOUS = 0.5  # below this confidence the layer's donor is reported as unknown
CANDIDATE = 4  # donors within this factor of the best residual get a t fit too (identical donors tie)


@dataclass
class TensorFit:
    """What one merged tensor says about each donor."""

    moved: int  # elements where the merge differs from the base
    numel: int
    residual: dict[int, float] = field(default_factory=dict)  # donor -> least-squares residual
    t: dict[int, float | None] = field(default_factory=dict)
    t_range: dict[int, tuple[float, float]] = field(default_factory=dict)  # t values reproducing the sample
    drop: dict[int, float | None] = field(default_factory=dict)
    informative: dict[int, int] = field(default_factory=dict)  # elements the slerp moves: the drop's sample
    explained: dict[int, float] = field(default_factory=dict)  # share equal to the prediction or the base
    rowwise: dict[int, bool | None] = field(default_factory=dict)


def fit_tensor(m: torch.Tensor, a: torch.Tensor, donors: Sequence[torch.Tensor], rescale: bool) -> TensorFit:
    moved = m != a
    fit = TensorFit(moved=int(moved.sum()), numel=m.numel())
    if fit.moved == 0:
        return fit
    g = _moved_gram(m, a, donors, moved)  # rows/cols: a, y = m - a, then e_d = b_d - a per donor
    for d in range(len(donors)):
        e = 2 + d
        gamma, beta = _lstsq(g[0, 0], g[0, e], g[e, e], g[0, 1], g[e, 1])
        fit.residual[d] = max(0.0, float(g[1, 1] - gamma * g[0, 1] - beta * g[e, 1]))
    best = min(fit.residual.values())
    for d, b in enumerate(donors):
        if fit.residual[d] <= CANDIDATE * best + 1e-30:
            try:
                _fit_t_and_drop(fit, d, m, a, b, moved, g, rescale)
            except kernels.NonFiniteError:  # a NaN or Inf in base or donor: no slerp made this tensor
                fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d] = None, None, 0.0, None
    return fit


def _moved_gram(m, a, donors, moved) -> torch.Tensor:
    """Gram matrix, in float64, of [a, m - a, b_0 - a, b_1 - a, ...] over the moved elements
    (the others are zeroed: m - a is zero there already)."""
    flat = [x.reshape(-1) for x in (a, m, *donors)]
    keep = moved.reshape(-1)
    g = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    v = torch.empty(len(flat), min(BLOCK, keep.numel()), dtype=torch.float64)
    k = torch.empty(v.shape[1], dtype=torch.float64)
    for s in range(0, keep.numel(), BLOCK):
        n = min(BLOCK, keep.numel() - s)
        vs, ks = v[:, :n], k[:n]
        for row, x in zip(vs, flat, strict=True):
            row.copy_(x[s : s + n])
        vs[1:].sub_(vs[0])
        ks.copy_(keep[s : s + n])
        vs[0].mul_(ks)
        vs[2:].mul_(ks)
        g.addmm_(vs, vs.T)
    return g


def _lstsq(saa, sae, see, say, sey):
    """(gamma, beta) minimising |y - gamma a - beta e|^2 from the sums; elementwise over rows.
    Where a and e are parallel, y is fitted on e alone (gamma 0)."""
    det = saa * see - sae * sae
    ok = det > 1e-300
    safe = torch.where(ok, det, 1.0)
    gamma = torch.where(ok, (say * see - sey * sae) / safe, 0.0)
    beta = torch.where(
        ok, (sey * saa - say * sae) / safe, torch.where(see > 0, sey / torch.where(see > 0, see, 1.0), 0.0)
    )
    return gamma, beta


def _fit_t_and_drop(fit: TensorFit, d: int, m, a, b, moved, g, rescale: bool) -> None:
    if torch.equal(a, b):  # the donor is the base here: no t to see
        fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d] = None, None, 0.0, None
        return
    sample = _sample(moved)
    if bool((m[moved] == b[moved]).all()):
        # the method's t == 1 (an exact select, no blend), reported as 1. A t just below 1 can round
        # to the donor's bits as well (few elements, a norm weight): t_range says how far down
        x, y, want = (v.reshape(-1)[sample] for v in (a, b, m))
        sums = kernels.row_stats(a.reshape(1, -1), b.reshape(1, -1))
        _, fit.t_range[d] = _refine(lambda t: _blend_sample(x, y, sums, t, None, None), want, 1.0)
        fit.t[d], fit.rowwise[d], fit.explained[d] = 1.0, None, 1.0
        fit.drop[d], fit.informative[d] = _drop_rate(a, b, moved, fit.t_range[d], False)
        return
    shape = a.shape
    best = None
    both = a.ndim >= 2 and shape[0] > 1
    for rowwise in (False, True) if both else (False,):
        rows = shape[0] if rowwise else 1
        a2, b2, m2 = a.reshape(rows, -1), b.reshape(rows, -1), m.reshape(rows, -1)
        sums = kernels.row_stats(a2, b2)  # the kernel's own pass 1: the same angle, bit for bit
        theta, linear = kernels.angle(sums)
        if rowwise:
            s = _row_sums(a2, b2, m2, moved.reshape(rows, -1))
        else:  # the whole tensor is one row: its sums are in the gram already
            e = 2 + d
            s = torch.stack([g[0, 0], g[0, e], g[e, e], g[0, 1], g[e, 1]]).view(5, 1)
        gamma, beta = _lstsq(*s)
        weight = s[2]  # how much each row says: |b - a|^2 over its moved elements
        if float(weight.sum()) == 0:
            continue
        t_rows = _invert(1 + gamma - beta, beta, theta, linear)
        t0 = min(max(float((t_rows * weight).sum() / weight.sum()), 0.0), 1.0)
        x, y, want = (v.reshape(-1)[sample] for v in (a, b, m))
        sample_rows = sample // a2.shape[1] if rowwise else None

        def refine(t, p, sums=sums, sample_rows=sample_rows, x=x, y=y, want=want):
            return _refine(lambda t: _blend_sample(x, y, sums, t, sample_rows, p), want, t)

        if rescale:
            # kept = a + (slerp - a) / (1 - p), so the fit saw about t / (1 - p). p and t are found in
            # turn, p from the elements the prediction moves by 2 ulps or more (a 1-ulp move may
            # round either way when t is not yet exact)
            p = _drop_share(kernels.merge(a, b, t0, rowwise=rowwise), a, moved)[0]
            t, t_range = refine(t0 * (1 - (p or 0.0)), p)
            for _ in range(2):
                p, n = _drop_share(_predict(a, b, t, rowwise, p), a, moved)
                t, t_range = refine(t, p)
            pred, drop = _predict(a, b, t, rowwise, p), p
        else:
            t, t_range = refine(t0, None)
            pred = kernels.merge(a, b, t, rowwise=rowwise)
            drop, n = _drop_rate(a, b, moved, t_range, rowwise)
        explained = float(((m == pred) | (m == a)).sum()) / m.numel()
        if best is None or (explained, not rowwise) > best[0]:
            best = ((explained, not rowwise), t, t_range, drop, n, explained, rowwise if both else None)
        del pred
    if best is None:
        fit.t[d], fit.drop[d], fit.explained[d], fit.rowwise[d] = None, None, 0.0, None
        return
    _, fit.t[d], fit.t_range[d], fit.drop[d], fit.informative[d], fit.explained[d], fit.rowwise[d] = best


def _row_sums(a2, b2, m2, moved2) -> torch.Tensor:
    """[5, rows] float64, per row over the moved elements: a.a, a.e, e.e, a.y, e.y (e = b - a, y = m - a)."""
    rows, cols = a2.shape
    out = torch.empty(5, rows, dtype=torch.float64)
    step = max(1, BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        r = slice(r0, r0 + step)
        k = moved2[r]
        x = a2[r].double()
        y = m2[r].double() - x  # zero where nothing moved
        e = (b2[r].double() - x) * k
        x *= k
        out[:, r] = torch.stack([(x * x).sum(1), (x * e).sum(1), (e * e).sum(1), (x * y).sum(1), (e * y).sum(1)])
    return out


def _invert(ca, cb, theta, linear):
    """t from slerp coefficients: ca + cb cos(theta) = cos(t theta) and cb sin(theta) = sin(t theta)."""
    t = torch.atan2(cb * torch.sin(theta), ca + cb * torch.cos(theta)) / torch.where(theta == 0, 1.0, theta)
    return torch.where(linear | (theta == 0), cb, t)


def _sample(moved: torch.Tensor) -> torch.Tensor:
    """Flat positions of up to REFINE_SAMPLE moved elements, evenly spread, without indexing them all."""
    flat = moved.reshape(-1)
    stride = max(1, flat.numel() // (8 * REFINE_SAMPLE))
    pos = torch.arange(0, flat.numel(), stride)
    pos = pos[flat[pos]]
    if pos.numel() < REFINE_SAMPLE // 8:  # few moved elements: all of them (there are few)
        pos = flat.nonzero().squeeze(1)
    if pos.numel() > REFINE_SAMPLE:
        pos = pos[torch.linspace(0, pos.numel() - 1, REFINE_SAMPLE).long()]
    return pos


def _blend_sample(x, y, sums, t: float, sample_rows, p) -> torch.Tensor:
    """The kernel's pass 2 at t on sampled elements: the same coefficients and operations."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    ca, cb = kernels.coefficients(sums, t)
    ca, cb = ca.to(work), cb.to(work)
    xs, ys = x.to(work), y.to(work)
    if t == 1:
        pass
    elif sample_rows is None:
        ys = ys.mul(float(cb[0])).add_(xs, alpha=float(ca[0]))
    else:
        ys = ys.mul(cb.index_select(0, sample_rows)).addcmul_(xs, ca.index_select(0, sample_rows))
    if p:
        ys = ys.sub_(xs).div_(1.0 - p).add_(xs)
    return ys.to(x.dtype)


def _drop_rate(a, b, moved, t_range: tuple[float, float], rowwise: bool) -> tuple[float | None, int]:
    """(share left at the base, count) of the elements the kernel's output moves at every t of
    t_range: whichever t made the merge, those moved unless dropped (the mask ignores values)."""
    informative = None
    for t in dict.fromkeys(t_range):  # one kernel call when the range is a point
        moves = kernels.merge(a, b, t, rowwise=rowwise) != a
        informative = moves if informative is None else informative & moves
    assert informative is not None
    n = int(informative.sum())
    return (int((informative & ~moved).sum()) / n if n else None), n


def _drop_share(pred: torch.Tensor, a: torch.Tensor, moved: torch.Tensor) -> tuple[float | None, int]:
    """(share left at the base, count) of the elements `pred` moves by 2 ulps or more; None when
    there are none (or all were left: no slerp output to rescale)."""
    far = ulp_distance(pred, a) >= 2
    n = int(far.sum())
    share = int((far & ~moved).sum()) / n if n else None
    return (share if share is not None and share < 1 else None), n


def _predict(a, b, t: float, rowwise: bool, p) -> torch.Tensor:
    """The kernel's output at t with nothing dropped (with rescale by p: every element kept and scaled)."""
    if not p:
        return kernels.merge(a, b, t, rowwise=rowwise)
    return kernels.merge(a, b, t, drop_rate=p, rescale=True, rowwise=rowwise, mask=lambda _, n: np.ones(n, bool))


def _refine(predict: Callable[[float], torch.Tensor], want: torch.Tensor, t0: float):
    """The t that reproduces the sampled elements best: (middle of that run of t, its two ends).

    Least squares on rounded outputs is biased where few elements move (norm weights); the bits
    are not. Each element is reproduced on an interval of t around the truth, and its distance in
    ulps grows away from it, so the summed distance falls to a minimum run that holds the truth
    (with holes a few float32 roundings wide). An 11-point grid around t0 zooms onto the widest run
    of least distance until its step is below 1e-12 (a float32 merge reproduces only within ~1e-8
    of the truth) or the run fills the grid and a 101-point grid finds nothing lower between its
    points (a wide run: few elements moved); then both ends of the run are bisected.
    """

    def distance(t: float) -> int:
        return int(ulp_distance(predict(t), want).sum())

    lo, hi = max(0.0, t0 - 0.03), min(1.0, t0 + 0.03)
    for _ in range(200):
        grid = [lo + (hi - lo) * k / 10 for k in range(11)]
        costs = [distance(t) for t in grid]
        least = min(costs)
        runs, start = [], None
        for k, c in enumerate([*costs, None]):
            if c == least and start is None:
                start = k
            elif c != least and start is not None:
                runs.append((k - start, start, k - 1))
                start = None
        _, first, last = max(runs)
        step = (hi - lo) / 10
        if first == 0 and lo > 0 or last == 10 and hi < 1:  # the least may lie beyond the grid: widen
            lo, hi = (max(0.0, lo - 10 * step) if first == 0 else lo), (min(1.0, hi + 10 * step) if last == 10 else hi)
            continue
        new_lo, new_hi = max(0.0, grid[first] - step), min(1.0, grid[last] + step)
        if step < 1e-12:
            break
        if new_hi - new_lo > 0.5 * (hi - lo):  # a wide run: once, look for a lower one between the points
            fine = [lo + (hi - lo) * k / 100 for k in range(101)]
            costs = [distance(t) for t in fine]
            if min(costs) >= least:
                break
            k = costs.index(min(costs))
            new_lo, new_hi = fine[max(k - 1, 0)], fine[min(k + 1, 100)]
        lo, hi = new_lo, new_hi

    def end(inside: float, outside: float) -> float:
        while abs(outside - inside) > 1e-12:
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if distance(middle) == least else (inside, middle)
        return inside

    low = end(grid[first], grid[first - 1]) if first > 0 else grid[first]
    high = end(grid[last], grid[last + 1]) if last < 10 else grid[last]
    return (low + high) / 2, (low, high)


# --------------------------------------------------------------------------- the recovered plan


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
                    position=r["position"],
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
        from mergekit_partition_slerp.report import heatmap

        title = "recovered by mergekit-partition inspect: t per layer; × = drop > 0; empty = unknown"
        return heatmap(self.as_plan(), path, title=title)

    def __str__(self) -> str:
        from mergekit_partition_slerp.report import CLASSES, tensor_class

        classes = [c for c in CLASSES if any(tensor_class(k) == c for r in self.layers[:1] for k in r["t"])]

        def by_class(values, cls):
            vals = [v for k, v in values.items() if tensor_class(k) == cls]
            if not vals:
                return ""
            known = sorted({round(v, 3) for v in vals if v is not None})
            text = "/".join(f"{v:.3f}" for v in known)
            return text + ("/?" if None in vals and known else "?" if None in vals else "")

        head = ["layer", "donor", *(f"t:{c}" for c in classes), *(f"drop:{c}" for c in classes), "confidence", "note"]
        rows = []
        for r in self.layers:
            donor = r["donor"] if r["donor"] is not None else "?"
            if r["donor"] is None and r.get("candidates"):
                donor = "? (" + " | ".join(r["candidates"]) + ")"
            rows.append(
                [str(r["layer"]), donor]
                + [by_class(r["t"], c) for c in classes]
                + [by_class(r["drop_rate"], c) for c in classes]
                + ["" if r["confidence"] is None else f"{r['confidence']:.3f}", r.get("note") or ""]
            )
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

        def fmt(row):
            return "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()

        equal = [n for n, v in self.non_layer_equal_base.items() if v]
        moved = [n for n, v in self.non_layer_equal_base.items() if not v]
        lines = [
            f"recovered plan of {self.merged}: {self.num_layers} layers of {self.stack}",
            f"base: {self.base}",
            fmt(head),
            fmt(["-" * w for w in widths]),
            *(fmt(r) for r in rows),
        ]
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
        raise ConfigError(
            "explain needs at least one donor (--donor PATH, repeatable, in the recipe's order if known)."
        )
    models = Checkpoints()
    out = models.open(merged, "merged model")
    b = models.open(base, "base model")
    ds = [models.open(d, f"donor {k} ({d})") for k, d in enumerate(donors)]
    stack, num_layers, layer_map, other = _layer_stack(list(out.entries))
    for ck in [b, *ds]:
        absent = [n for n in out.entries if n not in ck.entries]
        if absent:
            raise ConfigError(
                f"{ck.label} {ck.spec} has no tensor {absent[0]} (and {len(absent) - 1} more) of the merged "
                "model; pass the models the merge was made from."
            )
        wrong = [n for n in out.entries if ck.entries[n].shape != out.entries[n].shape]
        if wrong:
            raise ConfigError(
                f"{ck.label} {ck.spec}: tensor {wrong[0]} has shape {list(ck.entries[wrong[0]].shape)}, "
                f"the merge's is {list(out.entries[wrong[0]].shape)}; not the same architecture."
            )
    equal = {}
    for n in other:
        x, y = out.get(n), b.get(n)
        equal[n] = (
            compare(n, y, x).ok if x.dtype == y.dtype else x.shape == y.shape and bool((x.to(y.dtype) == y).all())
        )
    rows = []
    for i in range(num_layers):
        if log:
            log(f"layer {i}")
        fits: dict[str, TensorFit] = {}
        for n in sorted(layer_map.get(i, [])):
            m = out.get(n)
            a = b.get(n).to(m.dtype)
            fits[n[len(f"{stack}.{i}.") :]] = fit_tensor(m, a, [ck.get(n).to(m.dtype) for ck in ds], rescale)
        rows.append(_layer_row(i, num_layers, fits, donors))
    return Inspection(
        merged=str(merged),
        base=str(base),
        donors=[str(d) for d in donors],
        stack=stack,
        num_layers=num_layers,
        layers=rows,
        non_layer=other,
        non_layer_equal_base=equal,
        bytes_read=models.bytes_read,
    )


def _layer_stack(names: Sequence[str]) -> tuple[str, int, dict[int, list[str]], list[str]]:
    """(stack, number of layers, {layer: tensor names}, other names) of a merged model's tensors."""
    stacks: dict[str, dict[int, list[str]]] = {}
    other = []
    for n in names:
        found = layer_from_name(n)
        if found is None:
            other.append(n)
        else:
            stacks.setdefault(found[0], {}).setdefault(found[1], []).append(n)
    if not stacks:
        raise ConfigError(
            "the merged model has no layer tensors (no name with a layer index such as model.layers.0.*)."
        )
    if len(stacks) > 1:
        raise ConfigError(
            f"the merged model has several layer stacks ({', '.join(sorted(stacks))}); "
            "inspect handles single-module models only, like partition_slerp v1."
        )
    ((stack, layers),) = stacks.items()
    return stack, max(layers) + 1, layers, other


def _layer_row(i: int, num_layers: int, fits: dict[str, TensorFit], donors: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "layer": i,
        "bin": None,
        "donor_index": None,
        "donor": None,
        "position": partition.layer_position(i, num_layers),
        "t": dict.fromkeys(fits),
        "drop_rate": dict.fromkeys(fits),
        "confidence": None,
        "t_range": dict.fromkeys(fits),
        "drop_elements": dict.fromkeys(fits, 0),
    }
    moved = [f for f in fits.values() if f.moved]
    if not moved:
        row["note"] = "nothing moved: every tensor equals the base (t = 0, or t below the dtype's resolution)"
        return row
    totals = {d: sum(f.residual[d] for f in moved) for d in range(len(donors))}
    order = sorted(totals, key=lambda d: totals[d])
    best = order[0]
    second = totals[order[1]] if len(order) > 1 else math.inf
    if second == math.inf or (second == 0 and totals[best] == 0):
        confidence = 1.0  # one donor, or a perfect fit nothing else matches... or two perfect ones (ties below)
    else:
        confidence = 1 - totals[best] / second if second > 0 else 0.0
    row["confidence"] = round(confidence, 6)
    ties = [d for d in order if totals[d] <= totals[best] / (1 - AMBIGUOUS) + 1e-30]
    explained = [f.explained[best] for f in moved if best in f.explained]
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
    if {f.rowwise.get(best) for f in moved} - {None} == {True}:
        row["rowwise"] = True
    for s, f in fits.items():
        if not f.moved:
            continue  # unmoved tensor: t is 0 or too small to show; its drop mask is invisible
        t, drop = f.t.get(best), f.drop.get(best)
        row["t"][s] = None if t is None else round(t, 6)
        row["drop_rate"][s] = None if drop is None else round(drop, 6)
        row["drop_elements"][s] = f.informative.get(best, 0)
        if best in f.t_range:
            row["t_range"][s] = [round(f.t_range[best][0], 6), round(f.t_range[best][1], 6)]
    if row["explained"] is not None and row["explained"] < 0.9:
        row["note"] = (
            row.get("note") or ""
        ) + f"only {row['explained']:.0%} of elements fit a partition_slerp of base and donor"
    return row
