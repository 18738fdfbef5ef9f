"""`run`: preflight, compile, merge into a private directory, then move it to OUT.

What this module promises (README "Output directory"):
- it never replaces anything it did not check when the run started: OUT must be absent,
  empty, or (with force) a previous merge output; the recipe, the input models and the
  working directory are never inside OUT, whatever the flags;
- a failed, interrupted or killed merge never leaves an OUT that looks complete; the work
  happens in `.OUT.partial-*/OUT` beside OUT, which records its owner (pid, host, boot,
  process start) so the next run to the same OUT can remove what dead runs left behind;
- two runs to one OUT cannot both succeed: the second is refused while the first holds
  the lock file `.OUT.lock` beside OUT.
Errors are ConfigError (before anything is written) or MergeError (during the merge).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergekit_partition_slerp import __version__
from mergekit_partition_slerp.checkpoint import local_dir, tensor_sizes
from mergekit_partition_slerp.errors import ConfigError, MergeError
from mergekit_partition_slerp.planning import Plan, compile_config
from mergekit_partition_slerp.report import human

OWNER = "owner.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MERGE_MARKER = "mergekit_config.yml"  # mergekit writes it into every merge it finishes


@dataclass
class RunResult:
    out_path: str
    seconds: float
    bytes_read: int | None  # None when some input is not a local safetensors checkpoint
    output_bytes: int
    notes: list[str] = field(default_factory=list)  # what was cleaned up on the way


# ---------------------------------------------------------------- input checks


def local_model_dirs(p: Plan) -> list[tuple[str, str]]:
    """(as written, directory) of every input that is a local directory."""
    out = []
    tokenizer = p.raw.get("tokenizer") or {}
    extra = [p.raw.get("tokenizer_source"), tokenizer.get("source") if isinstance(tokenizer, dict) else None]
    for model in dict.fromkeys([p.base, *p.donors, *(str(x) for x in extra if isinstance(x, str))]):
        path = local_dir(model)
        if path is not None:
            out.append((str(model), path))
    return out


def check_pickle(p: Plan, allow: bool) -> list[str]:
    """Pickle checkpoints can run code when loaded: opt-in, and always said. Returns warnings."""
    warnings = []
    for model, path in local_model_dirs(p):
        files = os.listdir(path)
        if any(f.endswith(".safetensors") for f in files) or not any(f.endswith(WEIGHT_SUFFIXES[1:]) for f in files):
            continue
        if not allow:
            raise ConfigError(
                f"model {model} has only pickle weights (.bin), which can run arbitrary code when mergekit loads "
                "them. Convert it to safetensors, or pass --allow-pickle if you trust its source."
            )
        warnings.append(f"{model} has only pickle weights (.bin); loading them can run arbitrary code.")
    return warnings


def check_weights(p: Plan) -> None:
    """Every local checkpoint has complete weight files, before anything is written."""
    for model, path in local_model_dirs(p):
        if model not in (p.base, *p.donors):
            continue  # a tokenizer source needs no weights
        files = os.listdir(path)
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            raise ConfigError(f"model {model} ({path}) has a config.json but no weight files (*.safetensors or *.bin).")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"model {model}: cannot read {index}: {error}.") from None
            missing = sorted(s for s in shards if not os.path.exists(os.path.join(path, s)))
            if missing:
                raise ConfigError(f"model {model} is missing shard file(s) {', '.join(missing)} listed in {index}.")
        try:
            tensor_sizes(path)
        except ConfigError as error:
            raise ConfigError(f"model {model}: {error}; re-download or re-save that checkpoint.") from None


def bytes_to_read(p: Plan) -> int | None:
    """Bytes of the tensors the compiled recipe names: each layer from the base and its donor,
    the rest from the base. None when an input is not a local safetensors checkpoint."""
    sizes = {}
    for model in dict.fromkeys([p.base, *p.donors]):
        path = local_dir(model)
        if path is None or not any(f.endswith(".safetensors") for f in os.listdir(path)):
            return None
        sizes[model] = tensor_sizes(path)
    total = sum(sizes[p.base].get(name, 0) for name in p.non_layer)
    for row in p.layers:
        for suffix in row.t:
            name = f"{p.stack}.{row.layer}.{suffix}"
            total += sizes[p.base].get(name, 0) + sizes[row.donor].get(name, 0)
    return total


# ---------------------------------------------------------------- the output directory


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, folder: str) -> bool:
    """path is folder or lies below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _describe_contents(path: str) -> str:
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"it holds {shown}"


def merge_output_problem(path: str) -> str | None:
    """Why the existing directory `path` is not something a merge tool may replace, or None.

    Replaceable: empty, or a finished merge (mergekit's mergekit_config.yml beside plain files
    only). Anything else may be the user's work, and stays.
    """
    names = os.listdir(path)
    if not names:
        return None
    if MERGE_MARKER not in names:
        return f"it does not look like a merge output (no {MERGE_MARKER}); {_describe_contents(path)}"
    folders = [n for n in names if not os.path.isfile(os.path.join(path, n)) or os.path.islink(os.path.join(path, n))]
    if folders:
        return f"besides a merge it holds folders or links ({', '.join(sorted(folders)[:5])})"
    return None


def check_output(out: str, protected: list[tuple[str, str]], force: bool) -> os.stat_result | None:
    """Refuse an OUT that could destroy something; returns the stat of an OUT to be replaced.

    protected: (label, path) of the recipe and every local input.
    """
    out_abs = os.path.abspath(os.path.expanduser(out))
    out_real = _real(out_abs)
    if os.path.islink(out_abs):
        raise ConfigError(f"output {out} is a symbolic link (to {os.readlink(out_abs)}); give a real directory path.")
    cwd = _real(os.getcwd())
    if _inside(cwd, out_real):
        what = "the current directory" if cwd == out_real else f"a parent of the current directory ({cwd})"
        raise ConfigError(f"output {out} is {what}; a merge is written to a new directory of its own, never there.")
    for label, path in protected:
        real = _real(path)
        if _inside(real, out_real) or _inside(out_real, real):
            relation = "is" if real == out_real else "contains" if _inside(real, out_real) else "is inside"
            shown = f" ({real})" if real != _real(label.split(" ")[-1]) else ""
            raise ConfigError(
                f"output {out} {relation} {label}{shown}; the recipe and the input models are never "
                "overwritten. Choose an output directory outside them."
            )
    if not os.path.lexists(out_abs):
        return None
    if not os.path.isdir(out_abs):
        raise ConfigError(f"output {out} exists and is not a directory; it is left alone. Choose another path.")
    problem = merge_output_problem(out_abs)
    if problem:
        raise ConfigError(
            f"output {out} already exists and {problem}. Only an empty directory or a previous merge output can "
            "be replaced (with --force); choose a new path."
        )
    if not force:
        raise ConfigError(f"output {out} already exists; pass --force to replace it (it holds a previous merge).")
    return os.stat(out_abs)


class OutputLock:
    """An exclusive lock on `.OUT.lock` beside OUT, held for the whole run."""

    def __init__(self, out_abs: str):
        parent, name = os.path.split(out_abs)
        self.path = os.path.join(parent, f".{name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise ConfigError(f"cannot create the lock file {self.path}: {error.strerror}.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_owner_text(self.path)
                raise ConfigError(
                    f"another `mergekit-partition run` is writing the same output ({holder}); wait for it to "
                    f"finish or choose another output directory. (Lock: {self.path})"
                ) from None
            # the file may have been unlinked by its previous holder between our open and lock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_owner()).encode())
                return self
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _read_owner_text(path: str) -> str:
    try:
        with open(path) as f:
            owner = json.load(f)
        return f"pid {owner['pid']} on {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "start": _process_start(pid),
        "time": time.time(),
    }


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("boot") and owner["boot"] != _boot_id():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    start = _process_start(int(owner["pid"]))
    return start is None or owner.get("start") in (None, start)


def partials(out_abs: str) -> Iterator[str]:
    parent, name = os.path.split(out_abs)
    prefix = f".{name}.partial-"
    for entry in sorted(os.listdir(parent)):
        if entry.startswith(prefix) and os.path.isdir(os.path.join(parent, entry)):
            yield os.path.join(parent, entry)


def remove_stale_partials(out_abs: str) -> list[str]:
    """Remove partial directories of runs that died (called under the lock). Returns notes."""
    notes = []
    for path in partials(out_abs):
        try:
            with open(os.path.join(path, OWNER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            notes.append(f"left {path} alone: it has no readable {OWNER}, so its owner is unknown")
            continue
        if owner.get("host") != socket.gethostname():
            notes.append(f"left {path} alone: it belongs to a run on host {owner.get('host')}")
            continue
        if _alive(owner):
            continue
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path} ({human(size)}), left by run pid {owner.get('pid')}, which is no longer running")
    return notes


def _claim_and_rename(src: str, dst: str) -> None:
    """Move directory src to dst only if dst does not exist, whoever else is at work.

    mkdir is the atomic claim; rename() onto the empty directory we just made then
    succeeds, and fails (ENOTEMPTY) rather than replace anything put there meanwhile.
    """
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only if still empty
        raise


# ---------------------------------------------------------------- the run


def run(p: Plan, out: str, merge_options: Any, force: bool = False) -> RunResult:
    """Check, compile and merge `p` into OUT atomically. `merge_options` is mergekit's MergeOptions."""
    out_abs = os.path.abspath(os.path.expanduser(out))
    parent, name = os.path.split(out_abs)
    protected = [(f"the recipe {p.source}", p.source)] if p.source else []
    protected += [(f"input model {model.split('@')[0]}", path) for model, path in local_model_dirs(p)]
    check_output(out_abs, protected, force)
    check_weights(p)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create {parent} for the output: {error.strerror}.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {parent} (permission denied); choose another output directory.")
    compiled = compile_config(p, absolute_paths=True)
    with OutputLock(out_abs):
        notes = remove_stale_partials(out_abs)
        replaced = check_output(out_abs, protected, force)  # again, now that no other run can interfere
        work = os.path.join(parent, f".{name}.partial-{secrets.token_hex(4)}")
        os.mkdir(work)
        try:
            with open(os.path.join(work, OWNER), "w") as f:
                json.dump(_owner(), f)
            start = time.perf_counter()
            # merge into .OUT.partial-*/OUT: mergekit titles the model card after the directory's name
            merged = os.path.join(work, name)
            try:
                _merge(p, compiled, merged, merge_options)
            except MergeError as error:
                raise MergeError(f"{error} Nothing was written to {out_abs}.") from error.__cause__
            seconds = time.perf_counter() - start
            _publish(merged, out_abs, replaced, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out_abs, f)) for f in os.listdir(out_abs) if f.endswith(WEIGHT_SUFFIXES))
    return RunResult(out_abs, seconds, bytes_to_read(p), size, notes)


def _merge(p: Plan, compiled: str, merged: str, merge_options: Any) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    merge_config = MergeConfiguration.model_validate(yaml.safe_load(compiled))
    try:
        run_merge(merge_config, merged, options=merge_options, config_source=p.source_text)
        _write_record(p, compiled, merged)
    except Exception as error:  # mergekit's errors, a full disk, a NaN in a checkpoint
        lines = str(error).strip().splitlines()
        raise MergeError(f"the merge failed: {lines[0] if lines else type(error).__name__}") from error


def _write_record(p: Plan, compiled: str, merged: str) -> None:
    import mergekit
    import numpy
    import torch

    record = p.to_dict()
    record["versions"] = {
        "mergekit-partition-slerp": __version__,
        "mergekit": getattr(mergekit, "__version__", None) or _dist_version("mergekit"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    with open(os.path.join(merged, "partition.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(merged, "mergekit_partition_compiled.yml"), "w") as f:
        f.write(compiled)
    card = os.path.join(merged, "README.md")
    if os.path.exists(card):
        from mergekit_partition_slerp.report import table

        with open(card, "a") as f:
            f.write(
                f"\n### Partition plan\n\nSeed {p.seed}, {p.bins} bins. Rebuild this model from the recipe "
                "`mergekit_config.yml` in this repository: `mergekit-partition run mergekit_config.yml OUT` "
                "(or plain `mergekit-yaml mergekit_config.yml OUT`, which gives the same bits). `partition.json` "
                "records this plan, the seed and the library versions.\n\n"
                f"```\n{table(p)}\n```\n"
            )


def _publish(merged: str, out_abs: str, replaced: os.stat_result | None, work: str) -> None:
    """Move the finished merge to OUT, replacing only the directory checked at the start."""
    if replaced is not None:
        now = os.lstat(out_abs) if os.path.lexists(out_abs) else None
        if now is None or (now.st_dev, now.st_ino) != (replaced.st_dev, replaced.st_ino):
            raise _kept_aside(merged, out_abs, "was replaced by something else while the merge ran")
        os.rename(out_abs, os.path.join(work, "replaced"))  # removed with the work directory
    try:
        _claim_and_rename(merged, out_abs)
    except FileExistsError:
        raise _kept_aside(merged, out_abs, "appeared while the merge ran (this run did not create it)") from None
    except OSError as error:
        if replaced is not None:
            with contextlib.suppress(OSError):
                os.rename(os.path.join(work, "replaced"), out_abs)  # put the old merge back
        raise _kept_aside(merged, out_abs, f"could not be written ({error.strerror})") from None


def _kept_aside(merged: str, out_abs: str, why: str) -> MergeError:
    aside = f"{out_abs}.merged-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    try:
        _claim_and_rename(merged, aside)
    except OSError:
        return MergeError(f"output {out_abs} {why}; it was left untouched, and the finished merge could not be kept.")
    return MergeError(f"output {out_abs} {why}; it was left untouched. The finished merge is complete at {aside}.")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
