"""Whole-merge benchmark: mergekit slerp / linear vs partition_slerp, mergekit-yaml vs mergekit-partition run.

    python benchmarks/merge.py                 # builds the family once, then 5 cases x 3 reps
    python benchmarks/merge.py --reps 1        # a faster look
    python benchmarks/merge.py --keep-going    # on a busy machine: rerun cases until 3 clean runs each
    python benchmarks/merge.py --cold          # evict the checkpoints before each run; adds storage reads
    python benchmarks/merge.py --cache DIR     # family + outputs elsewhere (default benchmarks/.cache/)
    python benchmarks/merge.py --cases cde --baseline ../other/src   # side by side with another checkout

Cases (all bf16, CPU, tokenizer copying off, paths absolute):
  a  mergekit-yaml, slerp, base + 1 donor, t 0.5             (what one partition layer should cost)
  b  mergekit-yaml, linear, 10 models, weight 1.0            (plain mergekit reading all 10 models)
  c  mergekit-yaml, partition_slerp, base + 9 donors, Eleusis-shaped recipe
  d  mergekit-partition run, the same recipe                  (compiled: base + 1 donor per layer)
  e  mergekit-partition run, the same recipe without drop_rate

Every run is a FRESH subprocess (this file in --child mode) that counts the bytes
mergekit's loader hands out (LazyTensorLoader.get_tensor is wrapped: page-cache
hits make /proc/<pid>/io useless), samples its anonymous RSS, and reports its
own peak RSS (VmHWM) before exiting. Runs are interleaved (the case order
rotates every repetition) and we report medians of: the child's whole wall
time ("process s", what a user waits for, including ~5 s of Python/torch/
transformers imports), the wall time of the merge call alone ("merge s"),
and the child's CPU time ("cpu s", user + sys, less sensitive to neighbours).
The machine is shared, so every run first waits for other processes to go
quiet, and records whether anything else used CPU meanwhile; medians are over
the uncontended runs when there are any.

This is a script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _util import BackgroundLoad, CallMeter, proc_status_kib, wait_quiet  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
CASES = {
    "a": "mergekit-yaml slerp (base + 1 donor)",
    "b": "mergekit-yaml linear (10 models)",
    "c": "mergekit-yaml partition_slerp (base + 9)",
    "d": "mergekit-partition run (compiled)",
    "e": "mergekit-partition run, no drop_rate",
}
DONORS = 9
# Mistral-like at ~1/3.5 width. 8 layers (the brief's first guess) cannot take
# bins: 9 (partition_slerp refuses more bins than layers); 10 layers give
# uneven bins (2,2,1,...) as 32 layers / 9 bins do on Mistral-7B.
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=10,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8192,
)


# --------------------------------------------------------------------------- family


def params_per_model(shape: dict[str, int]) -> int:
    h, m, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * m + 2 * h
    return L * per_layer + 2 * v * h + h


def ensure_family(cache: str, shape: dict[str, int]) -> dict[str, str]:
    """Build base + 9 donors once; reuse them while the recorded shape matches."""
    from mergekit_partition_slerp.family import Shape, build_family

    root = os.path.join(cache, "family")
    stamp = os.path.join(root, "built.json")
    want = {"shape": shape, "donors": DONORS, "seed": 0}
    names = ["base"] + [f"donor{k}" for k in range(DONORS)]
    paths = {n: os.path.join(root, n) for n in names}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return paths
    need = (DONORS + 1 + len(CASES)) * params_per_model(shape) * 2  # family + one output per case
    free = shutil.disk_usage(cache).free
    print(
        f"building the family in {root}: {DONORS + 1} x {params_per_model(shape) * 2 / 2**30:.2f} GiB "
        f"(needs ~{need / 2**30:.1f} GiB with outputs; {free / 2**30:.0f} GiB free)",
        flush=True,
    )
    if need > 0.8 * free:
        sys.exit(f"not enough disk space under {cache}: need ~{need / 2**30:.1f} GiB")
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    built = build_family(root, donors=DONORS, shape=Shape(**shape), seed=0)
    assert sorted(built) == sorted(paths), built
    with open(stamp, "w") as f:
        json.dump(want, f)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def warm_page_cache(paths: dict[str, str]) -> None:
    """Read every checkpoint once so the first timed run does not pay for disk I/O
    the later ones skip (all cases then read from the page cache)."""
    for p in paths.values():
        for name in os.listdir(p):
            with open(os.path.join(p, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def evict_page_cache(paths: dict[str, str]) -> None:
    """Drop our checkpoints' pages from the page cache (clean pages, our files
    only; no global drop_caches), so the next run reads from storage."""
    for p in paths.values():
        for name in os.listdir(p):
            fd = os.open(os.path.join(p, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- recipes


def eleusis_recipe(paths: dict[str, str], drop: bool) -> dict:
    """The examples/eleusis.yml shape on the synthetic family: 9 bins, seed 0,
    donors alternating output [0,1] / input [1,0] gradients, attention at t 0.03
    and (if drop) attention drop_rate 0.28. No tokenizer keys: the family has none."""
    t_in = [{"filter": "self_attn", "value": 0.03}, {"value": [1, 0]}]
    t_out = [{"filter": "self_attn", "value": 0.03}, {"value": [0, 1]}]
    params = {"bins": 9, "seed": 0}
    if drop:
        params["drop_rate"] = [{"filter": "self_attn", "value": 0.28}, {"value": 0.0}]
    return {
        "merge_method": "partition_slerp",
        "base_model": paths["base"],
        "parameters": params,
        "models": [
            {"model": paths[f"donor{k}"], "parameters": {"t": t_out if k % 2 == 0 else t_in}} for k in range(DONORS)
        ],
        "dtype": "bfloat16",
    }


def write_configs(cache: str, paths: dict[str, str]) -> dict[str, str]:
    import yaml

    recipes = {
        "a": {
            "merge_method": "slerp",
            "base_model": paths["base"],
            "models": [{"model": paths["base"]}, {"model": paths["donor0"]}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        },
        "b": {
            "merge_method": "linear",
            "models": [{"model": paths[n], "parameters": {"weight": 1.0}} for n in paths],
            "dtype": "bfloat16",
        },
        "c": eleusis_recipe(paths, drop=True),
        "d": eleusis_recipe(paths, drop=True),
        "e": eleusis_recipe(paths, drop=False),
    }
    out = {}
    os.makedirs(os.path.join(cache, "configs"), exist_ok=True)
    for case, recipe in recipes.items():
        out[case] = os.path.join(cache, "configs", f"{case}.yml")
        with open(out[case], "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
    return out


# --------------------------------------------------------------------------- child


def child(case: str, config: str, out: str) -> None:
    """Run one merge in this process and print RESULT_TAG + JSON."""
    import torch  # noqa: F401  (import cost stays outside "merge s")
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    counter = {"bytes": 0, "tensors": 0}
    lock = threading.Lock()
    original = LazyTensorLoader.get_tensor

    def counting(self, *args, **kwargs):
        tensor = original(self, *args, **kwargs)
        if tensor is not None:
            with lock:
                counter["bytes"] += tensor.numel() * tensor.element_size()
                counter["tensors"] += 1
        return tensor

    LazyTensorLoader.get_tensor = counting

    # VmHWM counts file pages of the mmapped safetensors too (safe_open maps
    # the whole shard), so sample the anonymous part separately: that is the
    # memory the merge really allocates. safetensors hands out zero-copy,
    # mmap-backed tensors, so the checkpoint pages that the merge actually
    # touches (RssFile) can be far fewer than the bytes the loader hands out.
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in proc_status_kib(("RssAnon", "RssFile")).items():
                peak[k] = max(peak[k], v)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    if case in ("a", "b", "c"):
        from mergekit.scripts.run_yaml import main as entry

        argv = [config, out, "--no-copy-tokenizer", "--quiet"]
    else:
        try:
            from mergekit_partition_slerp.cli import main as entry
        except ImportError as error:
            print(RESULT_TAG + json.dumps({"skipped": f"CLI not available ({error})"}))
            return
        argv = ["run", config, out, "--no-copy-tokenizer", "--quiet", "--force"]
    baseline = proc_status_kib({"VmRSS", "RssFile"})
    sampler.start()
    t0 = time.perf_counter()
    try:
        entry(argv, standalone_mode=False)
    except SystemExit as error:  # the CLIs exit non-zero on failure
        if error.code not in (0, None):
            raise
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    status = proc_status_kib({"VmHWM", "RssAnon", "RssFile"})
    with open("/proc/self/io") as f:  # storage reads; only meaningful with --cold
        io = dict(line.split(": ") for line in f.read().splitlines())
    print(
        RESULT_TAG
        + json.dumps(
            {
                "inproc_s": wall,
                "bytes_read": counter["bytes"],
                "tensors_read": counter["tensors"],
                "vmhwm": status["VmHWM"] * 1024,
                "peak_anon": max(peak["RssAnon"], status["RssAnon"]) * 1024,
                "touched": (max(peak["RssFile"], status["RssFile"]) - baseline["RssFile"]) * 1024,
                "disk_read": int(io["read_bytes"]),
                "baseline_rss": baseline["VmRSS"] * 1024,
            }
        )
    )


# --------------------------------------------------------------------------- parent


def run_case(case: str, config: str, out: str, src: str | None = None) -> dict:
    """One merge in a fresh process; `src` puts another checkout's src/ first on its sys.path."""
    if os.path.exists(out):  # every run writes a fresh output, as a user's would
        shutil.rmtree(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, config, out]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src)) if src else None
    with CallMeter() as m:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result.update(proc_s=m.wall, cpu_s=m.own_cpu, other_cpu=m.other_cpu, contended=m.contended)
    return result


def compare_outputs(a: str, b: str) -> str:
    """Bitwise comparison of two merged checkpoints (tensor by tensor)."""
    import torch

    from mergekit_partition_slerp.family import load_state_dict

    x, y = load_state_dict(a), load_state_dict(b)
    if set(x) != set(y):
        return f"different tensor names ({len(set(x) ^ set(y))} differ)"

    def bits(t):  # compare bytes, not values: -0.0 == 0.0 and NaN != NaN would mislead
        return t.reshape(-1).view(torch.uint8)

    diff = [
        n for n in x if x[n].dtype != y[n].dtype or x[n].shape != y[n].shape or not torch.equal(bits(x[n]), bits(y[n]))
    ]
    return "identical bits" if not diff else f"{len(diff)} of {len(x)} tensors differ, e.g. {diff[0]}"


def median_of(runs: list[dict], key: str):
    """Median over uncontended runs when there are any, else over all runs."""
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    clean = [r for r in ok if not r["contended"]] or ok
    return statistics.median(r[key] for r in clean) if clean else None


def side_by_side(cases, configs, cache, baseline, reps, cold, paths) -> None:
    """Each case with the baseline package and with the installed one, back to back (which goes first
    alternates), so that drift of this shared machine hits both alike; ratios are medians of per-pair
    ratios over the pairs neither of which was contended (all pairs if none)."""
    keys = [("proc_s", "process s"), ("inproc_s", "merge s"), ("cpu_s", "cpu s"), ("vmhwm", "HWM GiB")]
    pairs: dict[str, list[tuple[dict, dict]]] = {c: [] for c in cases}
    outs = {(c, who): os.path.join(cache, "out", f"{c}-{who}") for c in cases for who in ("base", "new")}
    with BackgroundLoad() as load:
        for rep in range(reps):
            for c in cases:
                got = {}
                for who in ("base", "new") if rep % 2 == 0 else ("new", "base"):
                    if cold:
                        evict_page_cache(paths)
                    wait_quiet(timeout=20)  # back to back, so load that stays hits both runs alike
                    got[who] = run_case(c, configs[c], outs[c, who], baseline if who == "base" else None)
                pairs[c].append((got["base"], got["new"]))
                b, n = got["base"], got["new"]
                if "error" in b or "error" in n or "skipped" in b or "skipped" in n:
                    problem = [r.get("error") or r.get("skipped") for r in (b, n)]
                    print(f"  rep {rep + 1} case {c}: baseline {problem[0]} | installed {problem[1]}")
                    continue
                print(
                    f"  rep {rep + 1} case {c}: merge s {b['inproc_s']:.2f} (baseline) vs {n['inproc_s']:.2f}, "
                    f"others used {b['other_cpu'] + n['other_cpu']:.1f} CPU s"
                    f"{' (contended)' if b['contended'] or n['contended'] else ''}",
                    flush=True,
                )
    print(f"\n== side by side: baseline {baseline} vs installed, {reps} pairs per case, medians ==")
    print(f"{'case':<44}" + "".join(f"{label:>22}" for _, label in keys) + f"{'clean':>7}")
    print(f"{'':<44}" + "".join(f"{'base / new / ratio':>22}" for _ in keys))
    for c in cases:
        ok = [(b, n) for b, n in pairs[c] if not any(k in r for r in (b, n) for k in ("error", "skipped"))]
        if not ok:
            print(f"{c + ' ' + CASES[c]:<44}  no successful pair")
            continue
        clean = [(b, n) for b, n in ok if not b["contended"] and not n["contended"]]
        use = clean or ok
        cells = []
        for key, _ in keys:
            scale = 2**30 if key == "vmhwm" else 1
            base = statistics.median(b[key] for b, _ in use) / scale
            new = statistics.median(n[key] for _, n in use) / scale
            ratio = statistics.median(n[key] / b[key] for b, n in use)
            cells.append(f"{base:>8.2f} /{new:>6.2f} /{ratio:>5.2f}")
        print(f"{c + ' ' + CASES[c]:<44}" + "".join(f"{x:>22}" for x in cells) + f"{len(clean):>5}/{len(ok)}")
    for c in cases:
        print(f"  ({c}) outputs, baseline vs installed: {compare_outputs(outs[c, 'base'], outs[c, 'new'])}")
    print(f"\n{load.describe()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(HERE, ".cache"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="add reps (up to 3x --reps) until every case has --reps uncontended runs",
    )
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="num_hidden_layers (>= 9)")
    ap.add_argument("--cases", default="abcde")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict the checkpoints from the page cache before every run (posix_fadvise on "
        "our files only) and report storage reads",
    )
    ap.add_argument(
        "--baseline",
        metavar="SRC",
        help="side by side: run every case also with the package from SRC (another checkout's src/, "
        "put first on the child's PYTHONPATH), back to back, and report per-pair ratios and output bits",
    )
    ap.add_argument("--child", nargs=3, metavar=("CASE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return

    cache = os.path.abspath(args.cache)
    os.makedirs(cache, exist_ok=True)
    shape = dict(SHAPE, num_hidden_layers=args.layers)
    paths = ensure_family(cache, shape)
    configs = write_configs(cache, paths)
    if not args.cold:
        warm_page_cache(paths)
    model_bytes = params_per_model(shape) * 2
    print(f"family: base + {DONORS} donors, {shape}, {model_bytes / 2**30:.2f} GiB per model (bf16)")

    cases = list(args.cases)
    if args.baseline:
        side_by_side(cases, configs, cache, args.baseline, args.reps, args.cold, paths)
        return
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    outs = {c: os.path.join(cache, "out", c) for c in cases}
    skipped = set()

    def clean_runs(c):
        if c in skipped:
            return args.reps
        return sum(1 for r in runs[c] if "error" not in r and "skipped" not in r and not r["contended"])

    with BackgroundLoad() as load:
        rep = 0
        while rep < args.reps or (
            args.keep_going and rep < 3 * args.reps and any(clean_runs(c) < args.reps for c in cases)
        ):
            # Extra reps (--keep-going) rerun only the cases short of clean runs.
            todo = [c for c in cases if c not in skipped and (rep < args.reps or clean_runs(c) < args.reps)]
            if not todo:
                break
            order = todo[rep % len(todo) :] + todo[: rep % len(todo)]
            for c in order:
                if args.cold:
                    evict_page_cache(paths)
                waited = wait_quiet(timeout=120)
                r = run_case(c, configs[c], outs[c])
                r["waited"] = waited
                runs[c].append(r)
                brief = (
                    r.get("error")
                    or ("skipped: " + r["skipped"] if "skipped" in r else None)
                    or (
                        f"{r['proc_s']:.1f} s, read {r['bytes_read'] / 2**30:.2f} GiB, "
                        f"HWM {r['vmhwm'] / 2**30:.2f} GiB, others used {r['other_cpu']:.1f} CPU s"
                        f"{' (contended)' if r['contended'] else ''}"
                    )
                )
                print(f"  rep {rep + 1} case {c}: {brief}", flush=True)
                if "skipped" in r:  # no point repeating a case that cannot run
                    skipped.add(c)
            rep += 1

    print(f"\n== medians over {rep} interleaved reps (uncontended runs when any) ==")
    print(
        "   read = bytes mergekit's loader handed out (the brief's metric); touched = checkpoint pages"
        "\n   the merge actually accessed (mmap RssFile); disk = storage reads (--cold only)"
    )
    keys = ["proc_s", "inproc_s", "cpu_s", "bytes_read", "touched", "disk_read", "vmhwm", "peak_anon"]
    head = f"{'case':<44}{'process s':>10}{'merge s':>9}{'cpu s':>7}{'read GiB':>10}{'x model':>8}{'touched':>9}"
    head += f"{'disk GiB':>9}" if args.cold else ""
    print(head + f"{'HWM GiB':>9}{'anon GiB':>9}{'clean':>7}")
    med = {}
    for c in cases:
        rs = runs[c]
        problems = [r.get("error") or "skipped: " + r["skipped"] for r in rs if "error" in r or "skipped" in r]
        if len(problems) == len(rs):
            print(f"{c + ' ' + CASES[c]:<44}  {problems[0]}")
            continue
        med[c] = m = {k: median_of(rs, k) for k in keys}
        clean = sum(1 for r in rs if "error" not in r and not r["contended"])
        line = (
            f"{c + ' ' + CASES[c]:<44}{m['proc_s']:>10.2f}{m['inproc_s']:>9.2f}{m['cpu_s']:>7.1f}"
            f"{m['bytes_read'] / 2**30:>10.2f}{m['bytes_read'] / model_bytes:>8.2f}{m['touched'] / 2**30:>9.2f}"
        )
        line += f"{m['disk_read'] / 2**30:>9.2f}" if args.cold else ""
        print(line + f"{m['vmhwm'] / 2**30:>9.2f}{m['peak_anon'] / 2**30:>9.2f}{clean:>5}/{len(rs)}")
        for p in problems:
            print(f"    (one run failed: {p})")

    print("\n== ratios (target) ==")
    for label, num, den, key, target in [
        ("(d)/(a) wall, process", "d", "a", "proc_s", "<= 1.3"),
        ("(d)/(a) wall, merge only", "d", "a", "inproc_s", "<= 1.3"),
        ("(d)/(c) bytes read (loader)", "d", "c", "bytes_read", "<= 0.22"),
        ("(d)/(c) checkpoint pages touched", "d", "c", "touched", "(info)"),
        ("(c)/(b) wall, process", "c", "b", "proc_s", "<= 1.1"),
        ("(c)/(b) wall, merge only", "c", "b", "inproc_s", "<= 1.1"),
        ("(d)/(a) peak RSS (VmHWM)", "d", "a", "vmhwm", "<= 1.1"),
        ("(d)/(a) peak anonymous RSS", "d", "a", "peak_anon", "(info)"),
        ("(d)/(e) wall, process", "d", "e", "proc_s", "<= 1.25"),
        ("(d)/(e) wall, merge only", "d", "e", "inproc_s", "<= 1.25"),
        ("(d)/(e) CPU time, process", "d", "e", "cpu_s", "(info)"),
        ("(c)/(d) wall, process", "c", "d", "proc_s", "(info)"),
    ] + ([("(d)/(c) disk bytes read", "d", "c", "disk_read", "(info)")] if args.cold else []):
        if num in med and den in med:
            print(f"  {label:<34}{med[num][key] / med[den][key]:>7.2f}   target {target}")
        else:
            print(f"  {label:<34}    n/a   (case {num if num not in med else den} did not run)")

    # Same recipe, two routes: the CLI promises the bits of plain mergekit-yaml.
    if "c" in med and "d" in med:
        print(f"\n(c) vs (d) outputs: {compare_outputs(outs['c'], outs['d'])}")
    print(f"\n{load.describe()}")


if __name__ == "__main__":
    main()
