"""`mergekit-partition demo`: the Eleusis recipe end to end on a tiny offline family."""

from __future__ import annotations

import os
import shutil

import click
import yaml

ROLES = ["out", "in", "out", "in", "out", "in", "out", "in", "out"]
# donor entry -> family member, as in examples/eleusis.yml: 6 models, 3 of them in two roles
MEMBERS = [0, 1, 2, 3, 4, 5, 1, 4, 3]


def demo_recipe(paths) -> dict:
    grad = {
        "in": [{"filter": "self_attn", "value": 0.03}, {"value": [1, 0]}],
        "out": [{"filter": "self_attn", "value": 0.03}, {"value": [0, 1]}],
    }
    models, seen = [], set()
    for role, k in zip(ROLES, MEMBERS):
        path = paths[f"donor{k}"]
        models.append({"model": path + "@main" if path in seen else path, "parameters": {"t": grad[role]}})
        seen.add(path)
    return {
        "merge_method": "partition_slerp",
        "base_model": paths["base"],
        "parameters": {"bins": 9, "seed": 0, "drop_rate": [{"filter": "self_attn", "value": 0.28}, {"value": 0.0}]},
        "models": models,
        "tokenizer_source": "base",
        "chat_template": "chatml",
        "dtype": "bfloat16",
    }


def run_demo(out: str, force: bool = False) -> str:
    from mergekit.options import MergeOptions

    from mergekit_partition_slerp.cli import run_plan
    from mergekit_partition_slerp.family import Shape, build_family
    from mergekit_partition_slerp.planning import build_plan

    out = os.path.abspath(out)
    if os.path.exists(out):
        if not force:
            raise click.ClickException(f"{out} already exists; pass --force to rebuild the demo there.")
        shutil.rmtree(out)
    os.makedirs(out)
    click.echo(f"building a seeded family of 7 tiny Mistral checkpoints in {out}/models (offline)...")
    paths = build_family(os.path.join(out, "models"), donors=6, shape=Shape(num_hidden_layers=12), seed=0, tokenizer=True)
    recipe = os.path.join(out, "eleusis-demo.yml")
    with open(recipe, "w") as f:
        f.write("# The Eleusis 9-partition recipe (examples/eleusis.yml) on the demo family.\n")
        yaml.safe_dump(demo_recipe(paths), f, sort_keys=False)
    p = build_plan(recipe)
    click.echo(f"\n{p}\n")
    merged = os.path.join(out, "merged")
    run_plan(p, merged, MergeOptions(quiet=True), force=True)
    click.echo(
        "\nLoad it:\n"
        "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"  model = AutoModelForCausalLM.from_pretrained({merged!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({merged!r})\n"
        f"Reproduce it: mergekit-partition run {recipe} {merged} --force   (or mergekit-yaml {recipe} OUT)"
    )
    return merged
