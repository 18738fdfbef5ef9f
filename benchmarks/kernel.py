"""Per-tensor kernel benchmark: partition_slerp vs mergekit slerp vs bandwidth floors.

    python benchmarks/kernel.py            # 4 Mistral-7B shapes, 7 reps (~4-5 min on 2 quiet cores)
    python benchmarks/kernel.py --quick    # [14336,4096] only, 3 reps
    python benchmarks/kernel.py --baseline ../other/src   # kernels.merge side by side with another checkout's
    python benchmarks/kernel.py --memory ps --shape 14336,4096   # one memory probe (used internally)

Timing runs every kernel in ONE process, interleaved (round-robin inside each
repetition, with the order rotated every repetition) so that slow drift of the
machine (page-cache or THP state) hits every kernel alike; we report medians.
The machine is shared, so each repetition first waits for the other
processes to go quiet, and each call records whether another process used
CPU meanwhile; medians are over the uncontended ("clean") calls, and ratios
are medians of per-repetition ratios (a pair ran seconds apart).

Memory is measured per kernel in a FRESH subprocess, because the peak RSS of
a process only ever goes up and allocator caches of one kernel would
otherwise hide or inflate the next one's.

This is a script, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import BackgroundLoad, CallMeter, proc_status_kib, wait_quiet  # noqa: E402

THREADS = 2
SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
SHAPE_NOTES = {
    (14336, 4096): "mlp up/gate",
    (4096, 14336): "mlp down",
    (4096, 4096): "attn q/o",
    (1024, 4096): "attn k/v",
}
ONEPASS_CHUNK = 256 * 1024  # elements; same order as the package's CHUNK
MLP_NAME = "model.layers.0.mlp.up_proj.weight"
ATTN_NAME = "model.layers.0.self_attn.q_proj.weight"  # drop is realistic on attention

# Kernels that are timed and memory-probed, in table order.
KERNELS = ["floor_add", "floor_onepass", "mk_slerp", "mk_slerp_rowwise", "ps", "ps_rowwise", "ps_drop"]
# Diagnostics, timed only, to show where ps's time goes: its pass 1 alone, the
# drop-mask draws alone, the one-pass floor when it must allocate a fresh
# output each call like ps does (first-touch page faults are not free), and ps
# under torch.set_float32_matmul_precision("medium").
DIAGNOSTICS = ["ps_pass1_stats", "ps_mask_draw", "floor_onepass_newout", "ps_knob"]

# With --baseline: the package's kernels.merge against another checkout's, called directly.
BASELINE_KERNELS = [f"{k}{who}" for k in ("kern", "kern_rowwise", "kern_drop", "kern_knob") for who in ("", "_base")]
BASELINE_RATIOS = [
    (f"{k}: installed/baseline", k, f"{k}_base") for k in ("kern", "kern_rowwise", "kern_drop", "kern_knob")
]

RATIOS = [  # (label, numerator, denominator)
    ("mk_slerp/ps (speed-up)", "mk_slerp", "ps"),
    ("mk_slerp_rowwise/ps_rowwise", "mk_slerp_rowwise", "ps_rowwise"),
    ("ps/floor_onepass", "ps", "floor_onepass"),
    ("ps/floor_onepass_newout", "ps", "floor_onepass_newout"),
    ("ps/floor_add", "ps", "floor_add"),
    ("ps_drop/ps", "ps_drop", "ps"),
    ("ps_pass1_stats/ps", "ps_pass1_stats", "ps"),
    ("ps_mask_draw(1 thread)/ps", "ps_mask_draw", "ps"),
    ("ps_knob/ps (precision knob)", "ps_knob", "ps"),
]


# --------------------------------------------------------------------------- inputs


def make_inputs(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """base ~ N(0, 0.02^2) in bf16; donor = base + noise with 5% of the weights' std.

    5% relative noise gives cosine ~0.9988, i.e. below slerp's 0.9995 linear
    fallback threshold, so the real spherical branch is exercised (2% would
    give ~0.9998 and silently benchmark lerp). Generated in row blocks straight
    into bf16 so that building the inputs never holds a full fp32 copy: the
    memory probe wants a clean baseline.
    """
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(shape, dtype=torch.bfloat16)
    b = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 20) // cols)
    w = torch.empty(min(step, rows), cols)
    n = torch.empty_like(w)
    for r in range(0, rows, step):
        k = min(step, rows - r)
        wk, nk = w[:k], n[:k]
        torch.randn(wk.shape, generator=g, out=wk).mul_(0.02)
        torch.randn(nk.shape, generator=g, out=nk).mul_(0.05 * 0.02).add_(wk)
        a[r : r + k].copy_(wk)
        b[r : r + k].copy_(nk)
    return a, b


# --------------------------------------------------------------------------- kernels


def _onepass(fa, fb, fo, x, y) -> None:
    """fo = 0.5*fa + 0.5*fb, chunk by chunk: read both bf16 inputs once, combine
    in fp32 scratch, write bf16 once. The least any fp32-accurate merge kernel
    can do (ps does this plus a read-only pass 1 for the norms and the dot)."""
    n = fa.numel()
    for s in range(0, n, ONEPASS_CHUNK):
        e = min(s + ONEPASS_CHUNK, n)
        xs, ys = x[: e - s], y[: e - s]
        xs.copy_(fa[s:e])
        ys.copy_(fb[s:e])
        xs.mul_(0.5).add_(ys, alpha=0.5)
        fo[s:e].copy_(xs)


def load_baseline_kernels(src: str) -> types.ModuleType:
    """The kernels module of another checkout (its src/ directory), imported beside the installed
    one: a bare package object stands in for the other checkout's (whose __init__ would register
    the method with mergekit again) while its kernels module and their siblings load."""
    pkg_name = "mergekit_partition_slerp"

    def ours():
        return [k for k in sys.modules if k == pkg_name or k.startswith(pkg_name + ".")]

    saved = {k: sys.modules.pop(k) for k in ours()}
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [os.path.join(os.path.abspath(src), pkg_name)]
    sys.modules[pkg_name] = pkg
    try:
        return importlib.import_module(pkg_name + ".kernels")
    finally:
        for k in ours():
            del sys.modules[k]
        sys.modules.update(saved)


def build_kernel(kind: str, a: torch.Tensor, b: torch.Tensor, baseline=None) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running `kind` on (a, b). Output buffers that the
    floors write into are allocated here, outside the timed call."""
    from mergekit.merge_methods import merge_tensors
    from mergekit.merge_methods.slerp import slerp

    from mergekit_partition_slerp import kernels, partition

    rows = a.shape[0]
    fa, fb = a.view(-1), b.view(-1)
    if kind == "floor_add":
        out = torch.empty_like(a)
        return lambda: torch.add(a, b, out=out)
    if kind in ("floor_onepass", "floor_onepass_newout"):
        x = torch.empty(ONEPASS_CHUNK, dtype=torch.float32)
        y = torch.empty(ONEPASS_CHUNK, dtype=torch.float32)
        if kind == "floor_onepass":
            out = torch.empty_like(a)

            def onepass():
                _onepass(fa, fb, out.view(-1), x, y)
                return out

            return onepass

        def onepass_newout():
            # A new output per call, allocated the way ps allocates its own
            # (torch.empty): first-touch page faults included.
            fo = torch.empty(fa.numel(), dtype=a.dtype)
            _onepass(fa, fb, fo, x, y)
            return fo.view(a.shape)

        return onepass_newout
    if kind == "mk_slerp":
        return lambda: merge_tensors([a, b], "slerp", parameters={"t": 0.5}, base_index=0)
    if kind == "mk_slerp_rowwise":
        t = torch.tensor([0.5] * rows)
        return lambda: slerp(t, a, b)
    if kind in ("ps", "ps_rowwise", "ps_drop"):
        params = {"t": 0.5, "num_layers": 1}
        name = MLP_NAME
        if kind == "ps_rowwise":
            params["rowwise"] = True
        if kind == "ps_drop":
            params["drop_rate"] = 0.28
            name = ATTN_NAME
        return lambda: merge_tensors([a, b], "partition_slerp", parameters=params, base_index=0, name=name)
    if kind.startswith("kern"):
        mod = baseline if kind.endswith("_base") else kernels
        variant = kind.removesuffix("_base")

        def mask(start, size):
            return partition.keep_mask_range(ATTN_NAME, 0, 0.28, start, size)

        kw = {"kern_rowwise": {"rowwise": True}, "kern_drop": {"drop_rate": 0.28, "mask": mask}}.get(variant, {})

        def kern():
            knob = torch.get_float32_matmul_precision()
            if variant == "kern_knob":
                torch.set_float32_matmul_precision("medium")
            try:
                return mod.merge(a, b, 0.5, **kw)
            finally:
                torch.set_float32_matmul_precision(knob)

        return kern
    if kind == "ps_knob":
        # ps while torch.set_float32_matmul_precision("medium") is set (common in GPU scripts):
        # pass 1 then sums in float64 instead of float32 block partials
        def knob():
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("medium")
            try:
                return merge_tensors(
                    [a, b], "partition_slerp", parameters={"t": 0.5, "num_layers": 1}, base_index=0, name=MLP_NAME
                )
            finally:
                torch.set_float32_matmul_precision(before)

        return knob
    if kind == "ps_pass1_stats":
        # Pass 1 of ps alone: |a|^2, |b|^2, a.b of the whole tensor.
        a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
        return lambda: kernels.row_stats(a2, b2)
    if kind == "ps_mask_draw":
        # The Philox keep-mask draws of ps_drop, serially on this thread (ps_drop runs them on 2
        # worker threads, in turns with the arithmetic).
        n = a.numel()
        spans = [(s, min(kernels.CHUNK, n - s)) for s in range(0, n, kernels.CHUNK)]
        return lambda: [partition.keep_mask_range(ATTN_NAME, 0, 0.28, s, k) for s, k in spans]
    raise ValueError(f"unknown kernel {kind!r}")


# --------------------------------------------------------------------------- timing


def time_shape(shape, reps: int, kinds: list[str], baseline=None):
    """{kernel: [(ms, contended), ...]}, {kernel: [page faults, ...]}, and the
    seconds spent waiting for quiet."""
    a, b = make_inputs(shape)
    fns = {k: build_kernel(k, a, b, baseline) for k in kinds}
    for fn in fns.values():  # warm-up: imports, first-touch page faults, allocator
        fn()
    samples: dict[str, list[tuple[float, bool]]] = {k: [] for k in kinds}
    faults: dict[str, list[int]] = {k: [] for k in kinds}
    waited = 0.0
    for rep in range(reps):
        waited += wait_quiet(timeout=30)  # bounded: the whole run should stay ~5 min
        # Rotate the order each rep so no kernel always follows the same one.
        order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
        for k in order:
            gc.collect()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with CallMeter() as m:
                result = fns[k]()
            # Page faults show when a call got fresh memory from the kernel
            # (a 2 MiB huge page counts as one fault), which is slow on this VM.
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            del result  # free the output before the next kernel allocates its own
            samples[k].append((m.wall * 1e3, m.contended))
    return samples, faults, waited


def robust_median(samples: list[tuple[float, bool]]) -> tuple[float, int]:
    """Median over the samples no other process competed with, if at least
    one exists; else over all. Returns (median ms, number of samples used)."""
    clean = [ms for ms, contended in samples if not contended]
    use = clean or [ms for ms, _ in samples]
    return statistics.median(use), len(clean)


def print_timing(shape, samples, faults, ratio_list=RATIOS):
    med = {k: robust_median(v)[0] for k, v in samples.items()}
    numel = shape[0] * shape[1]
    reps = len(next(iter(samples.values())))
    print(
        f"\n== shape {list(shape)} ({SHAPE_NOTES.get(tuple(shape), '')}), "
        f"{numel * 2 / 2**20:.0f} MiB per bf16 tensor, {reps} reps =="
    )
    print(f"{'kernel':<22}{'median ms':>10}{'min ms':>9}{'max ms':>10}{'clean':>7}{'GB/s*':>7}{'faults':>16}")
    for k, v in samples.items():
        # GB/s*: one read of both inputs + one write of the output, per second.
        # faults: fewest..most page faults in one call.
        gbs = 3 * numel * 2 / (med[k] / 1e3) / 1e9
        all_ms = [ms for ms, _ in v]
        clean = robust_median(v)[1]
        fl = sorted(faults[k])
        print(
            f"{k:<22}{med[k]:>10.1f}{min(all_ms):>9.1f}{max(all_ms):>10.1f}{clean:>4}/{reps:<2}{gbs:>7.2f}"
            f"{str(fl[0]) + '..' + str(fl[-1]):>16}"
        )
    # Ratios are medians of per-rep ratios: the two kernels of a pair ran within
    # a second or two of each other, so drift of the machine cancels out. The
    # ratio of minimums is shown too: on this VM a call that must fault in a
    # fresh output (new 2 MiB pages) can take 2-3x longer than one that reuses
    # mapped memory, and which one happens depends on allocator history; the
    # minimum is each kernel's cost without that tax.
    mins = {k: min(ms for ms, _ in v) for k, v in samples.items()}
    print(f"  {'ratio':<34}{'per-rep':>8}{'medians':>9}{'minimums':>10}")
    ratios = {}
    for label, num, den in ratio_list:
        if num in samples and den in samples:
            pairs = list(zip(samples[num], samples[den], strict=True))
            clean = [x / y for (x, cx), (y, cy) in pairs if not cx and not cy]
            ratios[label] = statistics.median(clean or [x / y for (x, _), (y, _) in pairs])
            print(f"  {label:<34}{ratios[label]:>7.2f}x{med[num] / med[den]:>8.2f}x{mins[num] / mins[den]:>9.2f}x")
    return med, ratios


# --------------------------------------------------------------------------- memory


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    return {k: v * 1024 for k, v in proc_status_kib(("VmRSS", "VmHWM", "RssAnon", "RssFile")).items()}


def _malloc_trim() -> None:
    """Give freed heap back to the OS so it cannot vanish from RSS mid-kernel
    (which would make a kernel's extra memory look negative)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(kind: str, shape: tuple[int, int]) -> dict:
    """Run in a fresh process: peak RSS the kernel adds beyond inputs and output."""
    torch.set_num_threads(THREADS)
    # Warm up on a tiny tensor first: the first merge_tensors call imports
    # modules and builds mergekit's registry; that is not the kernel's memory.
    ta, tb = make_inputs((64, 64), seed=1)
    build_kernel(kind, ta, tb)()
    del ta, tb
    a, b = make_inputs(shape)
    fn = build_kernel(kind, a, b)  # floors allocate (but do not touch) their out here
    gc.collect()
    _malloc_trim()
    reset = _reset_peak()
    before = _status()
    result = fn()
    after = _status()
    out_bytes = a.numel() * a.element_size()  # every kernel produces one bf16 output
    peak = after["VmHWM"]
    return {
        "kernel": kind,
        "shape": list(shape),
        "peak_reset": reset,
        # Without a reset, VmHWM may still hold the input-building peak, so the
        # number is only an upper bound on the kernel's own peak.
        "extra_bytes": peak - before["VmRSS"] - out_bytes,
        "out_bytes": out_bytes,
        "result_ok": tuple(result.shape) == tuple(shape) if isinstance(result, torch.Tensor) else True,
    }


def run_memory_probes(shapes, kinds) -> dict[tuple, dict[str, dict]]:
    """Fresh probes per (shape, kernel), run two at a time (memory is per
    process, so running side by side does not change it; it halves the wall
    time). mergekit's slerp gets two trials: its peak depends on how glibc's
    per-thread arenas happen to recycle its per-chunk temporaries, and varies
    from run to run by up to ~30x; our kernels reuse preallocated scratch."""
    jobs = [(tuple(shape), k) for shape in shapes for k in kinds for _ in range(2 if k.startswith("mk_") else 1)]
    res: dict[tuple, dict[str, dict]] = {tuple(s): {k: {"trials": [], "errors": []} for k in kinds} for s in shapes}
    for i in range(0, len(jobs), 2):
        procs = []
        for shape, k in jobs[i : i + 2]:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory", k, "--shape", f"{shape[0]},{shape[1]}"]
            procs.append((shape, k, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for shape, k, p in procs:
            out, err = p.communicate()
            cell = res[shape][k]
            if p.returncode != 0:
                cell["errors"].append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
            else:
                cell["trials"].append(json.loads(out.strip().splitlines()[-1]))
    return res


def print_memory(mem):
    print("\n== extra peak RSS per kernel, MiB: peak minus (inputs + one output), fresh process per trial ==")
    print("   (max over trials; 'lo-hi' when trials differ by > 10%; '(ub)' = peak could not be reset)")
    kinds = list(next(iter(mem.values())))
    print(f"{'shape':<16}" + "".join(f"{k:>18}" for k in kinds))
    for shape, row in mem.items():
        cells = []
        for k in kinds:
            trials = row[k]["trials"]
            if not trials:
                cells.append("error")
                continue
            vals = [t["extra_bytes"] / 2**20 for t in trials]
            lo, hi = min(vals), max(vals)
            text = f"{hi:.1f}" if hi - lo <= 0.1 * max(abs(hi), 1.0) else f"{lo:.0f}-{hi:.0f}"
            if not all(t["peak_reset"] for t in trials):
                text += " (ub)"
            cells.append(text)
        print(f"{str(list(shape)):<16}" + "".join(f"{c:>18}" for c in cells))
    for shape, row in mem.items():
        for k, cell in row.items():
            for e in cell["errors"]:
                print(f"  {k} {list(shape)} failed: {e}")


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only [14336,4096], 3 reps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-kernel memory subprocesses")
    ap.add_argument("--no-diagnostics", action="store_true", help="skip the ps pass-1 / mask-draw breakdown")
    ap.add_argument(
        "--baseline",
        metavar="SRC",
        help="time kernels.merge (whole, rowwise, drop, under the precision knob) against the one in SRC, "
        "another checkout's src/ directory, interleaved; no memory probes",
    )
    ap.add_argument("--memory", metavar="KERNEL", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory:
        shape = tuple(int(x) for x in args.shape.split(","))
        print(json.dumps(memory_probe(args.memory, shape)))
        return

    torch.set_num_threads(THREADS)
    shapes = SHAPES[:1] if args.quick else SHAPES
    reps = args.reps or (3 if args.quick else 7)
    kinds = KERNELS + ([] if args.no_diagnostics else DIAGNOSTICS)
    baseline = load_baseline_kernels(args.baseline) if args.baseline else None
    if baseline is not None:
        kinds = BASELINE_KERNELS
        print(f"baseline: {baseline.__file__}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 inputs, {reps} interleaved reps, medians"
    )
    t_start = time.perf_counter()
    summary = {}
    for shape in shapes:
        with BackgroundLoad() as load:
            samples, faults, waited = time_shape(shape, reps, kinds, baseline)
        summary[shape] = print_timing(shape, samples, faults, BASELINE_RATIOS if baseline else RATIOS)[1]
        print(f"  ({load.describe()}; waited {waited:.0f} s for quiet)")
    if baseline is not None:
        print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")
        return
    print("\n== targets (median of per-rep ratios) ==")
    for shape, r in summary.items():
        speed, floor = r["mk_slerp/ps (speed-up)"], r["ps/floor_onepass"]
        print(
            f"  {str(list(shape)):<15} mk_slerp/ps {speed:5.2f}x (>= 3: {'met' if speed >= 3 else 'MISSED'})"
            f"   ps/floor_onepass {floor:5.2f}x (<= 2.2: {'met' if floor <= 2.2 else 'MISSED'})"
        )
    if not args.no_memory:
        mem = run_memory_probes(shapes, KERNELS)
        print_memory(mem)
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
