"""How a plan is shown: the text table `plan` prints and the layer x donor heatmap."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol


class Row(Protocol):
    """One layer of a plan (planning.LayerRow is one)."""

    @property
    def layer(self) -> int: ...
    @property
    def bin(self) -> int: ...
    @property
    def donor_index(self) -> int: ...
    @property
    def donor(self) -> str: ...
    @property
    def t(self) -> dict[str, float]: ...
    @property
    def drop_rate(self) -> dict[str, float]: ...


class Plan(Protocol):
    """What is drawn (planning.Plan, or a plan recovered from a merged model)."""

    seed: int
    bins: int
    stack: str
    num_layers: int
    base: str
    donors: list[str]
    non_layer: list[str]

    @property
    def layers(self) -> Sequence[Row]: ...


CLASSES = ("attn", "mlp", "other")


def tensor_class(key: str) -> str:
    """attn / mlp / other from the tensor name after "{stack}.{layer}."."""
    first = key.split(".")[0]
    if "attn" in first or first == "attention":
        return "attn"
    return "mlp" if first in ("mlp", "block_sparse_moe", "feed_forward") else "other"


def _classes(p: Plan) -> list[str]:
    present = {tensor_class(k) for r in p.layers[:1] for k in r.t}
    return [c for c in CLASSES if c in present]


def _by_class(values: dict[str, float], cls: str) -> str:
    return "/".join(f"{v:.4g}" for v in sorted({v for k, v in values.items() if tensor_class(k) == cls}))


def table(p: Plan) -> str:
    classes = _classes(p)
    head = ["layer", "bin", "donor"] + [f"t:{c}" for c in classes] + [f"drop:{c}" for c in classes]
    rows = [
        [str(r.layer), str(r.bin), r.donor]
        + [_by_class(r.t, c) for c in classes]
        + [_by_class(r.drop_rate, c) for c in classes]
        for r in p.layers
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]

    def fmt(row: list[str]) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()

    lines = [
        f"partition_slerp plan: {p.num_layers} layers of {p.stack} in {p.bins} bins, seed {p.seed}",
        f"base: {p.base}",
        fmt(head),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in rows),
        f"base (bit for bit): {', '.join(p.non_layer)}",
    ]
    return "\n".join(lines)


def heatmap(p: Plan, path: str | None = None, title: str | None = None):
    """Layer x donor heatmap of the non-attention t; × marks drop_rate > 0.

    With a path the figure is drawn off-screen (no pyplot, no backend switch) and
    saved; without one it is a pyplot figure for notebooks.
    """
    import numpy as np

    if path:
        from matplotlib.figure import Figure

        fig = Figure()
    else:
        import matplotlib.pyplot as plt

        fig = plt.figure()
    fig.set_size_inches(max(6, p.num_layers * 0.32 + 3), max(2.5, len(p.donors) * 0.42 + 1.4))
    ax = fig.add_subplot()
    grid = np.full((len(p.donors), p.num_layers), np.nan)
    dropped = np.zeros_like(grid)
    for r in p.layers:
        main = [v for k, v in r.t.items() if tensor_class(k) != "attn"] or list(r.t.values())
        grid[r.donor_index, r.layer] = max(main)
        dropped[r.donor_index, r.layer] = max(r.drop_rate.values(), default=0)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for d, layer in zip(*np.nonzero(dropped > 0), strict=True):
        # dark mark on the bright (yellow) end of viridis, light elsewhere
        ax.text(layer, d, "×", ha="center", va="center", color="black" if grid[d, layer] > 0.6 else "white", fontsize=8)
    labels = [os.path.basename(x.rstrip("/")) if os.path.isabs(x) or x.startswith(".") else x for x in p.donors]
    ax.set_yticks(range(len(p.donors)), labels, fontsize=8)
    ax.set_xticks(range(p.num_layers), [str(i) for i in range(p.num_layers)], fontsize=7)
    ax.set_xlabel("layer (empty cell: layer not assigned to that donor)")
    title = title or f"partition_slerp: donor t per layer ({p.bins} bins, seed {p.seed}); × = drop_rate > 0"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="t (0 = base, 1 = donor)", fraction=0.03)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=130)
    return fig


def human(n: float) -> str:
    """A byte count for people: 812 B, 1.7 MiB, 9.4 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
