"""mergekit-partition: plan, compile, run and demo for partition_slerp recipes.

This file only parses arguments and prints; the work happens in planning, runner and
demo, imported inside each command so that `--help` answers without loading mergekit.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from mergekit_partition_slerp import __version__
from mergekit_partition_slerp.errors import ConfigError, MergeError

EXIT_STATUS = """\b
Exit status: 0 on success; 2 for a usage or input error (bad recipe, unsafe
output path; nothing is written); 1 when the merge fails after it started."""


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure as one `error:` paragraph with its exit status, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ConfigError, MergeError) as error:
            _fail(str(error), error.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written to the output.", 130)
        except OSError as error:  # a file we were asked to write: missing folder, no permission, disk full
            target = f" {error.filename}" if error.filename else ""
            _fail(f"cannot write{target}: {error.strerror or error}.", 2)
        except Exception as error:
            if os.environ.get("MERGEKIT_PARTITION_DEBUG"):
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            _fail(
                f"unexpected {type(error).__name__}: {first} (set MERGEKIT_PARTITION_DEBUG=1 for the traceback, "
                "and please report it).",
                1,
            )

    return wrapper


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _plan(config: str, allow_pickle: bool):
    from mergekit_partition_slerp.planning import build_plan
    from mergekit_partition_slerp.runner import check_pickle

    p = build_plan(config)
    for warning in p.warnings + check_pickle(p, allow_pickle):
        click.echo(f"warning: {warning}", err=True)
    return p


def _writable_file(path: str, option: str) -> None:
    """Say before the work starts that an output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a directory; give a file name.")
    if not os.path.isdir(folder):
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path}: cannot write to {folder} (permission denied).")


ALLOW_PICKLE = click.option(
    "--allow-pickle", is_flag=True, help="Accept checkpoints that only have pickle (.bin) weights."
)


class _Group(click.Group):
    """click's usage errors in the same one-line `error:` form as ours (exit status 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            command = (error.ctx.command_path if getattr(error, "ctx", None) else None) or "mergekit-partition"
            _fail(f"{error.format_message()} (see `{command} --help`)", error.exit_code)
        except click.exceptions.Abort:
            _fail("aborted.", 130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, epilog=EXIT_STATUS)
@click.version_option(__version__, prog_name="mergekit-partition")
def main() -> None:
    """Plan, compile and run partition_slerp merges (the Eleusis 9-partition recipe)."""


@main.command("plan", epilog=EXIT_STATUS)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema mergekit-partition/plan v1).")
@click.option("--png", type=click.Path(dir_okay=False), help="Write a layer x donor heatmap of t.")
@ALLOW_PICKLE
@_friendly
def plan_cmd(config: str, as_json: bool, png: str, allow_pickle: bool) -> None:
    """Show what every layer gets, reading only the YAML and the config.json files."""
    if png:
        _writable_file(png, "--png")
    p = _plan(config, allow_pickle)
    click.echo(p.to_json() if as_json else str(p))
    if png:
        p.plot(png)
        click.echo(f"wrote {png}", err=True)


@main.command("compile", epilog=EXIT_STATUS)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@ALLOW_PICKLE
@_friendly
def compile_cmd(config: str, output: str, allow_pickle: bool) -> None:
    """Emit an equivalent plain mergekit config that reads base + one donor per layer."""
    from mergekit_partition_slerp.planning import compile_config

    if output:
        _writable_file(output, "--output")
    text = compile_config(_plan(config, allow_pickle))
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


def merge_options(args: list[str]):
    """mergekit-yaml's own options, parsed by mergekit's own click declarations."""
    from mergekit.options import add_merge_options

    parsed = {}

    @click.command()
    @add_merge_options
    def options(merge_options: Any) -> None:
        parsed["options"] = merge_options

    try:
        options.main(list(args), prog_name="mergekit-partition run", standalone_mode=False)
    except click.ClickException as error:
        raise ConfigError(f"mergekit option: {error.format_message()} (`mergekit-yaml --help` lists them).") from None
    except ValueError as error:  # some of mergekit's option types raise it instead of click's BadParameter
        raise ConfigError(
            f"mergekit options `{' '.join(args)}` are not valid ({error}); see `mergekit-yaml --help`."
        ) from None
    if "options" not in parsed:
        raise ConfigError("mergekit options: --help is not a merge option; see `mergekit-yaml --help`.")
    return parsed["options"]


@main.command(
    "run",
    epilog=EXIT_STATUS,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path())
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUT_PATH that holds a previous merge (or nothing). Anything else is never replaced.",
)
@ALLOW_PICKLE
@click.argument("mergekit_options", nargs=-1, type=click.UNPROCESSED)
@_friendly
def run_cmd(config: str, out_path: str, force: bool, allow_pickle: bool, mergekit_options: list[str]) -> None:
    """Validate, compile and merge atomically (same bits as mergekit-yaml CONFIG).

    Every mergekit-yaml option is passed through (--cuda, --out-shard-size,
    --copy-tokenizer, -j, ...; `mergekit-yaml --help` lists them).

    \b
    The merge is written to .OUT_PATH.partial-XXXX/ beside OUT_PATH and moved
    into place only when complete. A partial directory left by a killed run is
    removed by the next run to the same OUT_PATH. OUT_PATH is never the current
    directory, and never contains (or lies inside) the recipe or an input model.
    """
    from mergekit_partition_slerp import runner
    from mergekit_partition_slerp.report import human

    options = merge_options(mergekit_options)
    options.apply_global_options()
    p = _plan(config, allow_pickle)
    result = runner.run(p, out_path, options, force=force)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    read = f"read {human(result.bytes_read)}, " if result.bytes_read is not None else ""
    click.echo(
        f"merged {result.out_path} in {result.seconds:.1f}s: {read}wrote {human(result.output_bytes)} of weights"
    )


@main.command("demo", epilog=EXIT_STATUS)
@click.argument("out", type=click.Path(), default="partition-slerp-demo")
@click.option("--force", is_flag=True, help="Rebuild an existing demo directory (only one this command made).")
@_friendly
def demo_cmd(out: str, force: bool) -> None:
    """Build a tiny offline model family and run an Eleusis-shaped recipe on it."""
    from mergekit_partition_slerp.demo import run_demo

    run_demo(out, force=force, echo=click.echo)


@main.command(
    "inspect", epilog=EXIT_STATUS.replace("1 when the merge fails after it started", "1 when a checked tensor differs")
)
@click.argument("merged", type=click.Path())
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    help="Verify MERGED against this recipe (or, with --explain, use its models).",
)
@click.option("--base", help="Explain: the base model (path or hub id).")
@click.option("--donor", "donors", multiple=True, help="Explain: a donor; repeat, in the recipe's order if known.")
@click.option(
    "--explain",
    "explain_recipe",
    is_flag=True,
    help="Explain MERGED with the recipe's base and donors instead of verifying.",
)
@click.option("--layers", type=int, help="Verify: how many layers to sample (default: all on small models, else 4).")
@click.option("--all", "all_layers", is_flag=True, help="Verify: recompute every layer.")
@click.option("--sample-seed", type=int, help="Verify: seed of the layer sample (printed; random when not given).")
@click.option(
    "--rescale", is_flag=True, help="Explain: the merge used rescale: true (read from the recipe with --explain)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (explain: schema mergekit-partition/plan v1).")
@click.option("--png", type=click.Path(dir_okay=False), help="Explain: write the recovered layer x donor heatmap of t.")
@_friendly
def inspect_cmd(merged, recipe, base, donors, explain_recipe, layers, all_layers, sample_seed, rescale, as_json, png):
    """Verify a merge against its recipe, or recover the plan of a merge from its base and donors.

    \b
    verify:  mergekit-partition inspect MERGED --recipe RECIPE.yml [--layers K | --all] [--json]
    explain: mergekit-partition inspect MERGED --base BASE --donor D1 --donor D2 ... [--png FILE] [--json]
             mergekit-partition inspect MERGED --recipe RECIPE.yml --explain
    Exit status: 0 all checked tensors match, 1 something differs, 2 usage or input error.
    """
    from mergekit_partition_slerp.inspection import explain, inspect

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
    if png:
        _writable_file(png, "--png")
    if layers is not None and (layers < 1 or all_layers):
        also = " with --all" if all_layers else ""
        _fail(f"--layers takes a count of at least 1 and excludes --all; got {layers}{also}.")
    if explaining and recipe:
        result = inspect(merged, recipe, base=base, donors=list(donors) or None, rescale=rescale or None, explain=True)
    elif explaining:
        result = explain(merged, base, list(donors), rescale=rescale)
    else:
        result = inspect(merged, recipe, layers=layers, all_layers=all_layers, sample_seed=sample_seed)
    if png:
        result.plot(png)
    click.echo(result.to_json() if as_json else str(result))
    if png:
        click.echo(f"wrote {png}", err=True)
    if not explaining and not result.ok:
        click.echo(f"differs: {result.first_difference()}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
