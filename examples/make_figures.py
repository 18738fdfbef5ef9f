"""Regenerate the pictures in docs/images/ (offline, no weights, ~10 s).

    python examples/make_figures.py                 # writes docs/images/*.png
    python examples/make_figures.py --out /tmp/img  # somewhere else

eleusis-plan.png: the layer x donor heatmap of t for examples/eleusis.yml. The
recipe names hub models; `plan` reads only their config.json, so the script
writes stand-in directories holding nothing but a Mistral-7B config.json
(32 layers) and points the recipe at them. The rows keep the hub names.

one-layer.png: what partition_slerp does to one layer tensor: slerp from the
base toward the layer's donor at t, then a pinned random fraction of the
elements goes back to the base.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "eleusis.yml")
DEFAULT_OUT = os.path.join(HERE, "..", "docs", "images")

# config.json of mistralai/Mistral-7B-v0.1, the shape every Eleusis ingredient shares
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}


def stand_in_recipe(recipe: dict, root: str) -> tuple:
    """(recipe with every hub id pointing to a config-only directory, {local id: hub id})."""
    recipe = json.loads(json.dumps(recipe))  # deep copy, anchors already expanded
    names = {}

    def local(model_id: str) -> str:
        hub, _, rev = model_id.partition("@")
        path = os.path.join(root, hub.replace("/", "--"))
        if not os.path.isdir(path):
            os.makedirs(path)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(MISTRAL_7B, f, indent=2)
        new = path + ("@" + rev if rev else "")
        names[new] = model_id
        return new

    recipe["base_model"] = local(recipe["base_model"])
    for entry in recipe["models"]:
        entry["model"] = local(entry["model"])
    return recipe, names


def eleusis_plan(path: str, recipe_path: str = RECIPE) -> str:
    from mergekit_partition_slerp import plan

    with open(recipe_path) as f:
        recipe = yaml.safe_load(f)
    with tempfile.TemporaryDirectory() as root:
        local, names = stand_in_recipe(recipe, root)
        p = plan(local)
    fig = p.plot()
    ax = fig.axes[0]
    roles = []
    for entry in recipe["models"]:
        t = entry["parameters"]["t"]
        grad = t[-1]["value"] if isinstance(t, list) and isinstance(t[-1], dict) else t
        roles.append("input [1, 0]" if grad == [1, 0] else "output [0, 1]" if grad == [0, 1] else "")
    labels = [f"{names.get(d, d)}  ·  {role}" for d, role in zip(p.donors, roles)]
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.set_xlabel("layer (a blank cell: that layer belongs to another donor)", fontsize=10)
    ax.set_title(
        f"examples/eleusis.yml on base {names.get(p.base, p.base)}: {p.num_layers} layers dealt into {p.bins} bins (seed {p.seed}), one donor per layer\n"
        "colour = t of the MLP and norm tensors at that depth;  × = attention at t 0.03 with drop rate 0.28",
        fontsize=10,
    )
    t_of = {(r.donor_index, r.layer): r.t["mlp.up_proj.weight"] for r in p.layers}

    def ink(t: float) -> str:  # readable on viridis: dark text on the yellow end
        return "black" if t > 0.62 else "white"

    for text in ax.texts:  # plot()'s attention marks
        x, y = text.get_position()
        text.set_color(ink(t_of[(int(round(y)), int(round(x)))]))
    for (row, layer), t in t_of.items():
        ax.text(layer, row + 0.3, f"{t:.2f}", ha="center", va="center", fontsize=6, color=ink(t))
    fig.set_size_inches(15, 5.2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def one_layer(path: str) -> str:
    import torch
    from matplotlib.patches import Rectangle

    from mergekit.merge_methods import merge_tensors

    from mergekit_partition_slerp.partition import keep_mask

    name, seed, t, p = "model.layers.0.self_attn.q_proj.weight", 0, 0.5, 0.28
    rows, cols = 6, 8
    g = torch.Generator().manual_seed(4)
    base = torch.randn(rows, cols, generator=g)
    donor = -0.3 * base + torch.randn(rows, cols, generator=g)  # far from the base, so the slerp is visible

    def merged(drop_rate: float) -> torch.Tensor:  # the method itself, through mergekit's in-memory API
        params = {"t": t, "drop_rate": drop_rate, "seed": seed, "num_layers": 1}
        return merge_tensors([base, donor], "partition_slerp", parameters=params, base_index=0, name=name)

    slerped, result = merged(0.0), merged(p)
    keep = torch.from_numpy(keep_mask(name, seed, p, rows * cols)).view(rows, cols)
    assert torch.equal(result[~keep], base[~keep]) and torch.equal(result[keep], slerped[keep])

    fig, axes = plt.subplots(2, 3, figsize=(12.5, 8.2), gridspec_kw={"hspace": 0.32, "wspace": 0.12})

    # 1. the geometry: slerp walks the arc between the two (flattened) tensors
    ax = axes[0, 0]
    a, b = np.array([1.0, 0.12]), np.array([0.28, 1.0])
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b) * 1.15
    theta = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    def slerp2(s):
        return (np.sin((1 - s) * theta) * a + np.sin(s * theta) * b) / np.sin(theta)

    arc = np.array([slerp2(s) for s in np.linspace(0, 1, 50)])
    ax.plot(arc[:, 0], arc[:, 1], color="0.6", lw=1.5)
    ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=1, ls=":")
    ax.text(0.36, 0.74, "lerp", color="0.45", fontsize=9, rotation=-55)
    for vec, colour, label, xy in ((a, "tab:blue", "base a  (t = 0)", (0.62, -0.06)), (b, "tab:orange", "donor b  (t = 1)", (0.02, 1.2))):
        ax.annotate("", vec, (0, 0), arrowprops=dict(arrowstyle="-|>", color=colour, lw=2.2))
        ax.text(*xy, label, color=colour, fontsize=11)
    for s, label, xy in ((0.03, "t = 0.03\n(Eleusis attention)", (1.04, 0.17)), (0.5, "t = 0.5", (0.83, 0.86))):
        m = slerp2(s)
        ax.annotate("", m, (0, 0), arrowprops=dict(arrowstyle="-|>", color="tab:green", lw=1.6 if s < 0.1 else 2.4))
        ax.text(*xy, label, color="tab:green", fontsize=10)
    ax.set_xlim(-0.05, 1.6)
    ax.set_ylim(-0.12, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("1. slerp(t, a, b) follows the arc\nfrom the base to this layer's donor", fontsize=11)

    # 2-6. the same on a small tensor, element by element
    vmax = float(max(base.abs().max(), donor.abs().max()))
    panels = [
        (axes[0, 1], "2. base tensor a", base, None),
        (axes[0, 2], "3. donor tensor b\n(the owner of this layer's bin)", donor, None),
        (axes[1, 0], f"4. slerp(t = {t}, a, b)\n(one angle for the whole tensor)", slerped, None),
        (axes[1, 1], f"5. drop mask, drop_rate = {p}\n(pinned: seed {seed} + tensor name)", None, None),
        (axes[1, 2], "6. result: dropped elements are\nthe base's, bit for bit (outlined)", result, ~keep),
    ]
    for ax, title, values, marks in panels:
        if values is None:
            ax.imshow(keep.numpy(), cmap="Greys_r", vmin=-0.7, vmax=1, interpolation="nearest")
            for i, j in zip(*np.nonzero(~keep.numpy())):
                ax.text(j, i, "drop", ha="center", va="center", fontsize=8, color="white")
        else:
            ax.imshow(values.numpy(), cmap="coolwarm", vmin=-vmax, vmax=vmax, interpolation="nearest")
            if marks is not None:
                for i, j in zip(*np.nonzero(marks.numpy())):
                    ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="black", lw=2))
        ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
        ax.grid(which="minor", color="white", lw=1)
        ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        ax.set_title(title, fontsize=11)
    fig.suptitle("What partition_slerp does to one tensor of a layer, once the partition has picked the donor and t", fontsize=13)
    fig.text(
        0.5, 0.045,
        "t = 0 gives the base and t = 1 the donor, bit for bit.  The mask depends only on (seed, tensor name, shape, drop_rate),\n"
        "so it is the same on every machine; a higher drop_rate drops a superset of the elements.  Embeddings, final norm, lm_head: the base's.",
        ha="center", fontsize=10, color="0.25",
    )
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: docs/images)")
    parser.add_argument("--recipe", default=RECIPE, help="the recipe to picture (default: examples/eleusis.yml)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for written in (eleusis_plan(os.path.join(args.out, "eleusis-plan.png"), args.recipe), one_layer(os.path.join(args.out, "one-layer.png"))):
        print(f"wrote {os.path.normpath(written)}")


if __name__ == "__main__":
    main()
