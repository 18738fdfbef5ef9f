"""Cost of `mergekit-partition inspect` next to `mergekit-partition run` on the same family.

    python benchmarks/inspect_cost.py                # the whole-merge benchmark family (benchmarks/merge.py's SHAPE)
    python benchmarks/inspect_cost.py --small        # a 12-layer demo-sized family: a quick look
    python benchmarks/inspect_cost.py --cache DIR    # family + outputs elsewhere (default benchmarks/.cache/)
    python benchmarks/inspect_cost.py --reps 1       # one pass (default: 3, medians reported)

Each case is a fresh subprocess running the real console script; it reports wall time and the
child's peak RSS (ru_maxrss of the finished child). Bytes read: `run` prints what mergekit's loader
handed out; inspect reports bytes from the safetensors headers of the tensors it read (verify:
`bytes_read`; explain: `inspected.bytes_read`). Cases, interleaved per repetition:
  imports   python -c "import torch, mergekit.merge, ..."  (the floor under every peak RSS)
  run       mergekit-partition run RECIPE OUT              (the rebuild)
  verify    inspect OUT --recipe RECIPE --json --sample-seed 0   (default sample: 4 layers)
  verify-all inspect OUT --recipe RECIPE --all --json
  explain   inspect OUT --base BASE --donor ... --json     (every donor, every tensor)
This is a script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import yaml

    from mergekit_partition_slerp.demo import recipe_text

    def recipe_for(paths: dict[str, str], members: list[int]) -> dict:
        # the demo's Eleusis recipe (gradients, attention t and drop, seed), donor entry k -> family member members[k]
        recipe = yaml.safe_load(recipe_text("."))
        recipe.pop("x-gradients")
        recipe["base_model"] = paths["base"]
        for k, entry in enumerate(recipe["models"]):
            entry["model"] = paths[f"donor{members[k]}"] + ("@main" if members[k] in members[:k] else "")
        recipe.pop("chat_template", None)
        recipe.pop("tokenizer_source", None)
        return recipe

    if args.small:
        from mergekit_partition_slerp.demo import DONORS
        from mergekit_partition_slerp.family import Shape, build_family

        root = os.path.join(args.cache, "inspect-small")
        if not os.path.exists(os.path.join(root, "family", "donor5", "config.json")):
            build_family(os.path.join(root, "family"), donors=6, shape=Shape(num_hidden_layers=12), seed=0)
        paths = {k: os.path.join(root, "family", k) for k in ["base"] + [f"donor{i}" for i in range(6)]}
        recipe = recipe_for(paths, [member for member, _ in DONORS])
    else:
        from merge import SHAPE, ensure_family  # benchmarks/merge.py: the whole-merge benchmark family

        root = os.path.join(args.cache, "inspect")
        paths = ensure_family(args.cache, SHAPE)
        recipe = recipe_for(paths, list(range(9)))  # nine distinct donors, Eleusis-shaped gradients and drop
    os.makedirs(root, exist_ok=True)
    recipe_path = os.path.join(root, "recipe.yml")
    with open(recipe_path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    out = os.path.join(root, "merged")
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-partition")
    donors = sorted({m["model"].removesuffix("@main") for m in recipe["models"]})

    # peak RSS of children is a running maximum: run each case in its own python parent to isolate it
    def isolated(cmd):
        code = (
            "import json,resource,subprocess,sys,time,os;"
            "s=time.perf_counter();p=subprocess.run(sys.argv[1:],capture_output=True,text=True,"
            "env={**os.environ,'HF_HUB_OFFLINE':'1'});w=time.perf_counter()-s;"
            "print(json.dumps({'rc':p.returncode,'out':p.stdout,'err':p.stderr[-3000:],'wall':w,"
            "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024}))"
        )
        proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
        data = json.loads(proc.stdout)
        if data["rc"] not in (0, 1):
            raise SystemExit(f"{' '.join(cmd)} failed:\n{data['err']}")
        return data

    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    explain_args = ["--base", paths["base"], *[x for d in donors for x in ("--donor", d)]]
    cases = {  # label: (command, bytes read from its output)
        "imports only (torch + mergekit)": (
            [sys.executable, "-c", "import torch, mergekit.merge, mergekit_partition_slerp.explain"],
            lambda out: 0,
        ),
        "run (the rebuild)": (
            [exe, "run", recipe_path, out, "--force", "--no-copy-tokenizer"],
            lambda out: (lambda m: float(m.group(1)) * units[m.group(2)])(re.search(r"read ([\d.]+) (\w+)", out)),
        ),
        "inspect verify (default sample)": (
            [exe, "inspect", out, "--recipe", recipe_path, "--json", "--sample-seed", "0"],
            lambda out: json.loads(out)["bytes_read"],
        ),
        "inspect verify --all": (
            [exe, "inspect", out, "--recipe", recipe_path, "--json", "--all"],
            lambda out: json.loads(out)["bytes_read"],
        ),
        "inspect explain (all donors)": (
            [exe, "inspect", out, *explain_args, "--json"],
            lambda out: json.loads(out)["inspected"]["bytes_read"],
        ),
    }
    seen: dict[str, list[tuple[float, float, float]]] = {label: [] for label in cases}
    for rep in range(args.reps):  # cases interleaved, so a noisy spell hits every case alike
        for label, (cmd, nbytes) in cases.items():
            r = isolated(cmd)
            if r["rc"] != 0:
                raise SystemExit(f"{label} failed:\n{r['err']}")
            seen[label].append((nbytes(r["out"] + r["err"]), r["rss"], r["wall"]))
        print(f"rep {rep + 1}/{args.reps} done", flush=True)

    def med(label, k):
        return statistics.median(x[k] for x in seen[label])

    run = "run (the rebuild)"
    print(f"\nfamily: {root} ({'small' if args.small else 'benchmark'}), {len(donors)} donors; medians of {args.reps}")
    print(
        f"{'case':44s} {'bytes read':>12s} {'peak RSS':>10s} {'wall s':>7s} {'bytes/run':>10s} {'RSS/run':>8s} "
        f"{'wall/run':>9s}"
    )
    for label in cases:
        b, rss, wall = med(label, 0), med(label, 1), med(label, 2)
        print(
            f"{label:44s} {b / 2**20:8.1f} MiB {rss / 2**20:6.0f} MiB {wall:7.1f} {b / med(run, 0):10.2f} "
            f"{rss / med(run, 1):8.2f} {wall / med(run, 2):9.2f}"
        )


if __name__ == "__main__":
    main()
