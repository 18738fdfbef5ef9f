"""mergekit-partition: plan, compile, run and demo for partition_slerp recipes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import click

from mergekit_partition_slerp import __version__


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _plan_or_exit(config: str, allow_pickle: bool = False):
    from mergekit_partition_slerp.planning import ConfigError, build_plan

    try:
        p = build_plan(config)
    except ConfigError as error:
        _fail(str(error))
    _check_pickle(p, allow_pickle)
    return p


def _check_pickle(p, allow: bool) -> None:
    """Pickle checkpoints can run code when loaded: opt-in, and always said."""
    for model in dict.fromkeys([p.base] + p.donors):
        path = model.split("@")[0]
        if os.path.isdir(path):
            files = os.listdir(path)
            if not any(f.endswith(".safetensors") for f in files) and any(f.endswith((".bin", ".pt", ".pth")) for f in files):
                if not allow:
                    _fail(f"model {model} has only pickle weights (.bin), which can run arbitrary code when mergekit loads them. Convert it to safetensors, or pass --allow-pickle if you trust its source.")
                click.echo(f"warning: {model} has only pickle weights (.bin); loading them can run arbitrary code.", err=True)


ALLOW_PICKLE = click.option("--allow-pickle", is_flag=True, help="Accept checkpoints that only have pickle (.bin) weights.")


@click.group()
@click.version_option(__version__, prog_name="mergekit-partition")
def main():
    """Plan, compile and run partition_slerp merges (the Eleusis 9-partition recipe)."""


@main.command("plan")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema mergekit-partition/plan v1).")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a layer x donor heatmap of t.")
@ALLOW_PICKLE
def plan_cmd(config, as_json, png, allow_pickle):
    """Show what every layer gets, reading only the YAML and the config.json files."""
    p = _plan_or_exit(config, allow_pickle)
    click.echo(p.to_json() if as_json else str(p))
    if png:
        p.plot(png)
        click.echo(f"wrote {png}", err=True)


@main.command("compile")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@ALLOW_PICKLE
def compile_cmd(config, output, allow_pickle):
    """Emit an equivalent plain mergekit config that reads base + one donor per layer."""
    from mergekit_partition_slerp.planning import compile_config

    text = compile_config(_plan_or_exit(config, allow_pickle))
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


def _merge_options(f):
    from mergekit.options import add_merge_options

    return add_merge_options(f)


def _check_weights(p) -> None:
    """Every checkpoint has weight files before anything is written."""
    from mergekit.common import ModelReference

    for model in dict.fromkeys([p.base] + p.donors):
        ref = ModelReference.model_validate(model)
        path = ref.model.path
        if os.path.isdir(path):
            files = os.listdir(path)
            if not any(f.endswith((".safetensors", ".bin", ".pt", ".pth")) for f in files):
                _fail(f"model {model} ({path}) has a config.json but no weight files (*.safetensors or *.bin).")
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                try:
                    shards = set(json.load(open(index))["weight_map"].values())
                except Exception as error:
                    _fail(f"model {model}: cannot read {index}: {error}.")
                missing = sorted(s for s in shards if not os.path.exists(os.path.join(path, s)))
                if missing:
                    _fail(f"model {model} is missing shard file(s) {', '.join(missing)} listed in {index}.")
            for name in sorted(f for f in files if f.endswith(".safetensors")):
                problem = _safetensors_problem(os.path.join(path, name))
                if problem:
                    _fail(f"model {model}: {os.path.join(path, name)} {problem}; re-download or re-save that checkpoint.")


def _safetensors_problem(path: str):
    """Check the header and the file length (truncation) without reading tensors."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return "is truncated or not a safetensors file (header longer than the file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as error:
        return f"has an unreadable header ({error})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        return f"is truncated ({size} bytes, its header describes {8 + n + max(ends)})"
    return None


def run_plan(p, out_path: str, merge_options, force: bool = False, quiet: bool = False) -> dict:
    """Compile, merge into a temporary sibling of out_path, rename on success."""
    import mergekit
    import numpy
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import run_merge

    from mergekit_partition_slerp.planning import compile_config

    out_path = os.path.abspath(out_path)
    if os.path.exists(out_path) and not force:
        _fail(f"output {out_path} already exists; pass --force to replace it.")
    compiled = compile_config(p, absolute_paths=True)
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(compiled))
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.partial-", dir=parent)

    read = {"bytes": 0}
    original = LazyTensorLoader.get_tensor

    def counting(self, *args, **kwargs):
        tensor = original(self, *args, **kwargs)
        read["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    start = time.perf_counter()
    LazyTensorLoader.get_tensor = counting
    try:
        run_merge(merge_config, work, options=merge_options, config_source=p.source_text)
        record = p.to_dict()
        record["versions"] = {
            "mergekit-partition-slerp": __version__, "mergekit": getattr(mergekit, "__version__", _dist_version("mergekit")),
            "torch": torch.__version__, "numpy": numpy.__version__,
        }
        with open(os.path.join(work, "partition.json"), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(work, "mergekit_partition_compiled.yml"), "w") as f:
            f.write(compiled)
        card = os.path.join(work, "README.md")
        if os.path.exists(card):
            with open(card, "a") as f:
                f.write(f"\n### Partition plan\n\nSeed {p.seed}, {p.bins} bins, reproduced by `mergekit-partition run` from `partition.json`.\n\n```\n{p}\n```\n")
        if os.path.exists(out_path):
            backup = out_path + f".replaced-{os.getpid()}"
            os.replace(out_path, backup)
            os.replace(work, out_path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(work, out_path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        LazyTensorLoader.get_tensor = original
    size = sum(os.path.getsize(os.path.join(out_path, f)) for f in os.listdir(out_path) if f.endswith((".safetensors", ".bin")))
    summary = {"seconds": time.perf_counter() - start, "bytes_read": read["bytes"], "output_bytes": size}
    if not quiet:
        click.echo(f"merged {out_path} in {summary['seconds']:.1f}s: read {_human(read['bytes'])}, wrote {_human(size)} of weights")
    return summary


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


@main.command("run", context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@ALLOW_PICKLE
@_merge_options
def run_cmd(merge_options, config, out_path, force, allow_pickle):
    """Validate, compile and merge atomically (same bits as mergekit-yaml CONFIG)."""
    merge_options.apply_global_options()
    p = _plan_or_exit(config, allow_pickle)
    _check_weights(p)
    try:
        run_plan(p, out_path, merge_options, force=force)
    except SystemExit:
        raise
    except Exception as error:
        message = str(error).strip().splitlines()
        _fail(f"the merge failed and nothing was written to {out_path}: {message[0] if message else type(error).__name__}", code=1)


@main.command("demo")
@click.argument("out", type=click.Path(), default="partition-slerp-demo")
@click.option("--force", is_flag=True, help="Replace an existing demo directory.")
def demo_cmd(out, force):
    """Build a tiny offline model family and run an Eleusis-shaped recipe on it."""
    from mergekit_partition_slerp.demo import run_demo

    run_demo(out, force=force)


@main.command("inspect")
@click.argument("merged", type=click.Path())
@click.option("--recipe", type=click.Path(dir_okay=False), help="Verify MERGED against this recipe (or, with --explain, use its models).")
@click.option("--base", help="Explain: the base model (path or hub id).")
@click.option("--donor", "donors", multiple=True, help="Explain: a donor; repeat, in the recipe's order if known.")
@click.option("--explain", "explain_recipe", is_flag=True, help="Explain MERGED with the recipe's base and donors instead of verifying.")
@click.option("--layers", type=int, help="Verify: how many layers to sample (default: all on small models, else 4).")
@click.option("--all", "all_layers", is_flag=True, help="Verify: recompute every layer.")
@click.option("--sample-seed", type=int, help="Verify: seed of the layer sample (printed; random when not given).")
@click.option("--rescale", is_flag=True, help="Explain: the merge used rescale: true (read from the recipe with --explain).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (explain: schema mergekit-partition/plan v1).")
@click.option("--png", type=click.Path(dir_okay=False), help="Explain: write the recovered layer x donor heatmap of t.")
def inspect_cmd(merged, recipe, base, donors, explain_recipe, layers, all_layers, sample_seed, rescale, as_json, png):
    """Verify a merge against its recipe, or recover the plan of a merge from its base and donors.

    \b
    verify:  mergekit-partition inspect MERGED --recipe RECIPE.yml [--layers K | --all] [--json]
    explain: mergekit-partition inspect MERGED --base BASE --donor D1 --donor D2 ... [--png FILE] [--json]
             mergekit-partition inspect MERGED --recipe RECIPE.yml --explain
    Exit status: 0 all checked tensors match, 1 something differs, 2 usage or input error.
    """
    from mergekit_partition_slerp.inspection import InspectError, explain, inspect

    explaining = bool(base or donors or explain_recipe)
    if explaining and (layers is not None or all_layers or sample_seed is not None):
        _fail("--layers, --all and --sample-seed apply to verify (--recipe without --base/--donor/--explain).")
    if not explaining and (png or rescale):
        _fail("--png and --rescale apply to explain (--base and --donor, or --recipe with --explain).")
    if not explaining and not recipe:
        _fail("give --recipe RECIPE.yml to verify MERGED, or --base BASE and --donor D (repeatable) to explain it.")
    if explaining and not recipe and not (base and donors):
        _fail("explain needs --base BASE and at least one --donor D (or --recipe RECIPE.yml --explain).")
    if not os.path.isdir(merged):
        _fail(f"merged model {merged} is not a directory with safetensors weights.")
    if layers is not None and (layers < 1 or all_layers):
        _fail(f"--layers takes a count of at least 1 and excludes --all; got {layers}{' with --all' if all_layers else ''}.")
    try:
        if explaining:
            if recipe:
                result = inspect(merged, recipe, base=base, donors=list(donors) or None, rescale=rescale or None, explain=True)
            else:
                result = explain(merged, base, list(donors), rescale=rescale)
        else:
            result = inspect(merged, recipe, layers=layers, all_layers=all_layers, sample_seed=sample_seed)
        if png:
            result.plot(png)
    except InspectError as error:
        _fail(str(error))
    click.echo(result.to_json() if as_json else str(result))
    if png:
        click.echo(f"wrote {png}", err=True)
    if not explaining and not result.ok:
        click.echo(f"differs: {result.first_difference()}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
