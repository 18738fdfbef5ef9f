"""`mergekit-partition demo`: the Eleusis recipe end to end on a tiny offline family.

The demo writes the recipe a person would write (named anchors, comments, paths relative
to the demo folder) and then runs exactly the commands it tells the user to run, from
that folder, in child processes: what the user sees is what they can repeat.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from mergekit_partition_slerp.errors import ConfigError, MergeError

MARKER = ".mergekit-partition-demo"  # says a folder is a demo this command built (and may rebuild)
RECIPE = "eleusis-demo.yml"
# (family member, role) per donor entry, as in examples/eleusis.yml: 6 models, 3 of them in two roles
DONORS = [(0, "output"), (1, "input"), (2, "output"), (3, "input"), (4, "output"), (5, "input"), (1, "output"),
          (4, "input"), (3, "output")]  # fmt: skip


def recipe_text(out: str) -> str:
    lines = [
        "# The Eleusis 9-partition recipe (examples/eleusis.yml) on the demo's tiny model family.",
        "# Model paths are relative to this folder: like mergekit, mergekit-partition reads them from the",
        "# current directory, so run from here:",
        f"#   cd {out}",
        f"#   mergekit-partition plan {RECIPE}",
        f"#   mergekit-partition run {RECIPE} merged --force     # or: mergekit-yaml {RECIPE} OUT",
        "merge_method: partition_slerp",
        "base_model: ./models/base",
        "parameters:",
        "  bins: 9          # the 12 layers dealt into 9 seeded random bins, one per donor entry",
        "  seed: 0          # fixes the bins and the drop masks",
        "  drop_rate:       # attention returns 28% of its change to the base; everything else keeps it all",
        "    - filter: self_attn",
        "      value: 0.28",
        "    - value: 0.0",
        "x-gradients:       # mergekit ignores x- keys; the anchors keep each donor entry short",
        "  input: &input    # 'input' donors: donor-heavy near the embeddings, base-heavy at the top",
        "    - filter: self_attn",
        "      value: 0.03",
        "    - value: [1, 0]",
        "  output: &output  # 'output' donors: base-heavy at the bottom, donor-heavy near the head",
        "    - filter: self_attn",
        "      value: 0.03",
        "    - value: [0, 1]",
        "models:            # config order is bin order: bin b belongs to donor entry b mod 9",
    ]
    seen = set()
    for member, role in DONORS:
        path = f"./models/donor{member}"
        note = f"# {role}"
        if member in seen:  # mergekit rejects an exact duplicate: the second role uses the @main alias
            path += "@main"
            note += f", second role of donor{member}"
        seen.add(member)
        lines += [f"  - model: {path:<24}{note}", f"    parameters: {{t: *{role}}}"]
    lines += ["tokenizer_source: base", "chat_template: chatml", "dtype: bfloat16", ""]
    return "\n".join(lines)


def run_demo(out: str, force: bool = False, echo: Callable[[str], None] = print) -> str:
    """Build the family and merge it into OUT/merged; returns that path."""
    out = os.path.abspath(out)
    _prepare(out, force)
    from mergekit_partition_slerp.family import Shape, build_family

    echo(f"building a seeded family of 7 tiny Mistral checkpoints in {out}/models (offline)...")
    build_family(os.path.join(out, "models"), donors=6, shape=Shape(num_hidden_layers=12), seed=0, tokenizer=True)
    with open(os.path.join(out, RECIPE), "w") as f:
        f.write(recipe_text(out))
    shown = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    echo(f"wrote {os.path.join(shown, RECIPE)}; running, from {shown}:\n")
    for args in (["plan", RECIPE], ["run", RECIPE, "merged", "--force"]):
        echo(f"$ mergekit-partition {' '.join(args)}")
        _child(args, out, echo)
    merged = os.path.join(out, "merged")
    echo(
        "\nLoad it:\n"
        "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"  model = AutoModelForCausalLM.from_pretrained({merged!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({merged!r})\n"
        f"Reproduce it: cd {shown} && mergekit-partition run {RECIPE} merged --force   "
        f"(or mergekit-yaml {RECIPE} OUT)"
    )
    return merged


def _prepare(out: str, force: bool) -> None:
    """A new folder, or (with force) one this command built before: never anything else."""
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(out)
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise ConfigError(f"demo folder {out} is the current directory or contains it; give a new folder name.")
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise ConfigError(f"demo folder {out} exists and is not a directory; choose another path.")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise ConfigError(
                f"demo folder {out} already exists and was not made by `mergekit-partition demo`; it is left alone. "
                "Choose another path."
            )
        if os.listdir(out) and not force:
            raise ConfigError(f"demo folder {out} already exists; pass --force to rebuild the demo there.")
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("Built by `mergekit-partition demo`; `demo --force` may delete and rebuild this folder.\n")


def _child(args, cwd: str, echo: Callable[[str], None]) -> None:
    env: dict[str, str] = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the demo never needs the network
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_partition_slerp.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if proc.stdout.strip():
        echo(proc.stdout.rstrip())
    if proc.returncode != 0:
        message = proc.stderr.strip().removeprefix("error: ")
        error = ConfigError if proc.returncode == 2 else MergeError
        raise error(f"the demo's `mergekit-partition {' '.join(args)}` failed: {message}")
