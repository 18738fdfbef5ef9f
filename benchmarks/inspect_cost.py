"""Cost of `mergekit-partition inspect` next to `mergekit-partition run` on the same family.

    python benchmarks/inspect_cost.py                # the whole-merge benchmark family (benchmarks/merge.py's SHAPE)
    python benchmarks/inspect_cost.py --small        # a 12-layer demo-sized family: a quick look
    python benchmarks/inspect_cost.py --cache DIR    # family + outputs elsewhere (default benchmarks/.cache/)

Each case is a fresh subprocess running the real console script; it reports wall time and the
child's peak RSS (ru_maxrss of the finished child). Bytes read: `run` prints what mergekit's loader
handed out; inspect reports bytes from the safetensors headers of the tensors it read (verify:
`bytes_read`; explain: `inspected.bytes_read`). Cases:
  run       mergekit-partition run RECIPE OUT           (the rebuild)
  verify    inspect OUT --recipe RECIPE --json           (default sample: 4 layers on large models)
  verify-all inspect OUT --recipe RECIPE --all --json
  explain   inspect OUT --base BASE --donor ... --json  (every donor, every tensor)
This is a script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
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
    rows = []

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

    run = isolated([exe, "run", recipe_path, out, "--force", "--no-copy-tokenizer"])
    if run["rc"] != 0:
        raise SystemExit(f"the rebuild failed:\n{run['err']}")
    m = re.search(r"read ([\d.]+) (\w+)", run["out"] + run["err"])
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    run_bytes = float(m.group(1)) * units[m.group(2)] if m else float("nan")
    rows.append(("run (rebuild)", run_bytes, run["rss"], run["wall"]))
    for label, extra in (("inspect verify (default sample)", []), ("inspect verify --all", ["--all"])):
        v = isolated([exe, "inspect", out, "--recipe", recipe_path, "--json", *extra])
        data = json.loads(v["out"])
        rows.append((f"{label}: {len(data['layers_checked'])} layers", data["bytes_read"], v["rss"], v["wall"]))
    e = isolated([exe, "inspect", out, "--base", paths["base"], *[x for d in donors for x in ("--donor", d)], "--json"])
    rows.append(("inspect explain", json.loads(e["out"])["inspected"]["bytes_read"], e["rss"], e["wall"]))

    print(f"family: {root} ({'small' if args.small else 'benchmark'}), {len(donors)} donors")
    print(f"{'case':45s} {'bytes read':>12s} {'peak RSS':>10s} {'wall s':>8s}")
    for label, nbytes, rss, wall in rows:
        print(f"{label:45s} {nbytes / 2**20:9.1f} MiB {rss / 2**20:6.0f} MiB {wall:8.1f}")


if __name__ == "__main__":
    main()
