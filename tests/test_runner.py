"""The run engine's promises, in-process: nothing it did not create is ever replaced.

The merge itself is stubbed where the test is about the output directory (a fake
mergekit writes a few files), so each case runs in milliseconds; tests/test_cli.py
drives real merges through the console script.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from mergekit_partition_slerp import runner
from mergekit_partition_slerp.errors import ConfigError, MergeError
from mergekit_partition_slerp.planning import plan

from helpers import eleusis_like, write_config


@pytest.fixture
def recipe(family, tmp_path):
    return write_config(tmp_path / "r.yml", eleusis_like(family))


@pytest.fixture
def p(recipe):
    return plan(recipe)


def fake_merge(p, compiled, merged, options, during=None):
    """What mergekit leaves behind: a folder with weights, config and its own recipe copy."""
    os.makedirs(merged)
    for name in ("model.safetensors", "config.json", "mergekit_config.yml"):
        with open(os.path.join(merged, name), "w") as f:
            f.write(name)
    if during:
        during()


def protected(p):
    return [(f"the recipe {p.source}", p.source)] + [(m, path) for m, path in runner.local_model_dirs(p)]


@pytest.mark.parametrize("force", [False, True])
def test_never_the_working_directory_or_a_parent_of_it(p, tmp_path, monkeypatch, force):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path / "work"), str(tmp_path)):
        with pytest.raises(ConfigError, match="current directory"):
            runner.check_output(out, protected(p), force)
    assert work.exists()


@pytest.mark.parametrize("force", [False, True])
def test_never_an_input_or_the_recipe(p, family, tmp_path, force):
    models = os.path.dirname(family["base"])
    link = tmp_path / "linked-donor"
    os.symlink(family["donor1"], link)
    cases = [
        models,  # contains every input
        family["donor2"],  # is an input
        os.path.join(family["base"], "sub"),  # inside an input
        str(tmp_path),  # contains the recipe
        os.path.join(str(link), "sub"),  # inside an input, reached through a symlink
    ]
    for out in cases:
        with pytest.raises(ConfigError, match="never overwritten"):
            runner.check_output(out, protected(p), force)


def test_only_empty_or_merge_outputs_are_replaced(p, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="does not look like a merge output.*precious.txt"):
        runner.check_output(str(mine), protected(p), True)
    merge = tmp_path / "old-merge"
    fake_merge(None, None, str(merge), None)
    with pytest.raises(ConfigError, match="--force"):
        runner.check_output(str(merge), protected(p), False)
    assert runner.check_output(str(merge), protected(p), True) is not None
    (merge / "checkpoints").mkdir()  # someone's training run inside an old merge
    with pytest.raises(ConfigError, match="folders or links"):
        runner.check_output(str(merge), protected(p), True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.check_output(str(empty), protected(p), True) is not None
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        runner.check_output(str(a_file), protected(p), True)
    os.symlink(merge, tmp_path / "link")
    with pytest.raises(ConfigError, match="symbolic link"):
        runner.check_output(str(tmp_path / "link"), protected(p), True)


def test_output_that_appears_during_the_merge_is_left_alone(p, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def someone_else():
        out.mkdir()
        (out / "precious.txt").write_text("not yours")

    monkeypatch.setattr(runner, "_merge", lambda *a: fake_merge(*a, during=someone_else))
    with pytest.raises(MergeError, match="appeared while the merge ran.*finished merge is complete at") as info:
        runner.run(p, str(out), None)
    assert (out / "precious.txt").read_text() == "not yours" and os.listdir(out) == ["precious.txt"]
    kept = str(info.value).split("complete at ")[1].rstrip(".")
    assert sorted(os.listdir(kept)) == ["config.json", "mergekit_config.yml", "model.safetensors"]
    assert not list(runner.partials(str(out)))


def test_forced_output_swapped_during_the_merge_is_left_alone(p, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_merge(None, None, str(out), None)

    def swap():
        os.rename(out, tmp_path / "moved")
        out.mkdir()
        (out / "precious.txt").write_text("not yours")

    monkeypatch.setattr(runner, "_merge", lambda *a: fake_merge(*a, during=swap))
    with pytest.raises(MergeError, match="was replaced by something else"):
        runner.run(p, str(out), None, force=True)
    assert os.listdir(out) == ["precious.txt"]


def test_forced_replacement_of_a_previous_merge(p, tmp_path, monkeypatch):
    out = tmp_path / "out"
    fake_merge(None, None, str(out), None)
    (out / "old-only.txt").write_text("from the old merge")
    monkeypatch.setattr(runner, "_merge", fake_merge)
    result = runner.run(p, str(out), None, force=True)
    assert result.out_path == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "mergekit_config.yml", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["out", "r.yml"]  # no partial, no lock file, no backup


def test_output_gets_the_mode_of_a_plain_mkdir(p, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_merge", fake_merge)
    old = os.umask(0o027)
    try:
        runner.run(p, str(tmp_path / "out"), None)
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode == os.stat(tmp_path / "plain").st_mode


def test_second_run_to_the_same_output_is_refused(p, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setattr(runner, "_merge", fake_merge)
    with runner.OutputLock(out):
        with pytest.raises(
            ConfigError, match=f"another `mergekit-partition run` is writing the same output \\(pid {os.getpid()}"
        ):
            runner.run(p, out, None)
        assert not os.path.exists(out)
    runner.run(p, out, None)  # the lock is gone with its holder
    assert os.path.exists(os.path.join(out, "config.json"))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_partial(out, suffix, owner):
    path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{suffix}")
    os.makedirs(os.path.join(path, os.path.basename(out)))
    with open(os.path.join(path, os.path.basename(out), "model.safetensors"), "wb") as f:
        f.write(b"\0" * 4096)
    if owner is not None:
        with open(os.path.join(path, "owner.json"), "w") as f:
            json.dump(owner, f)
    return path


def test_partials_of_dead_runs_are_removed_and_said(p, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    me = runner._owner()
    dead = make_partial(out, "dead", dict(me, pid=dead_pid(), start=None))
    reused = make_partial(out, "reused", dict(me, start="1"))  # our pid, but another process start
    rebooted = make_partial(out, "rebooted", dict(me, boot="another-boot"))
    alive = make_partial(out, "alive", me)
    remote = make_partial(out, "remote", dict(me, host=socket.gethostname() + "-elsewhere"))
    unknown = make_partial(out, "unknown", None)
    monkeypatch.setattr(runner, "_merge", fake_merge)
    result = runner.run(p, out, None)
    for gone in (dead, reused, rebooted):
        assert not os.path.exists(gone)
        assert any(gone in note and "removed" in note and "KiB" in note for note in result.notes), result.notes
    for kept in (alive, remote, unknown):
        assert os.path.exists(kept)
    assert any(remote in note and "elsewhere" in note for note in result.notes)
    assert any(unknown in note and "owner is unknown" in note for note in result.notes)


def test_claim_and_rename_never_replaces(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_text("new")
    dst.mkdir()  # even an empty directory is not ours to replace
    with pytest.raises(FileExistsError):
        runner._claim_and_rename(str(src), str(dst))
    assert (src / "a").exists() and os.listdir(dst) == []


def test_bytes_to_read_are_base_plus_one_donor_per_layer(p, family):
    from safetensors import safe_open

    def nbytes(model, name):
        with safe_open(os.path.join(model.split("@")[0], "model.safetensors"), "pt") as f:
            t = f.get_tensor(name)
        return t.numel() * t.element_size()

    expected = sum(nbytes(p.base, n) for n in p.non_layer)
    for row in p.layers:
        for suffix in row.t:
            name = f"{p.stack}.{row.layer}.{suffix}"
            expected += nbytes(p.base, name) + nbytes(row.donor, name)
    assert runner.bytes_to_read(p) == expected


# sha256 (helpers.digest) of the session family merged by the 0.1.0-era kernel (commit 11fcd2a); computed with
# `runner.run(plan(eleusis_like(family, **params)), out, MergeOptions(copy_tokenizer=False, quiet=True))`.
# The kernel may be rewritten and re-laid out, but these bits must not move.
PINNED = [
    ({}, "59e418f3c5154429697d14e67081477de96d392a65eb33f68e7590ab742a96f4"),  # gradients, attention drop, alias
    (
        {"rowwise": True, "rescale": True, "seed": 2**64 - 1},
        "a9daf8ff1a0450a7db2946e1b46219250388879ca29079279c81fe4a050364b4",
    ),
]


@pytest.mark.parametrize("params,expected", PINNED, ids=["eleusis-like", "rowwise-rescale"])
def test_merged_family_bits_are_pinned(family, tmp_path, params, expected):
    from mergekit.options import MergeOptions

    from helpers import digest

    out = tmp_path / "out"
    runner.run(plan(eleusis_like(family, **params)), str(out), MergeOptions(copy_tokenizer=False, quiet=True))
    assert digest(out) == expected
