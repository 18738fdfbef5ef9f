"""Bad input, faults and determinism, through the real console scripts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mergekit_partition_slerp.family import load_state_dict, write_checkpoint

from helpers import ENV, check_merge, cli, digest, eleusis_like, mergekit_yaml, read_json, write_config

pytestmark = pytest.mark.slow  # every test runs a console script in a subprocess


def clone(family, key, tmp_path, name=None):
    dst = tmp_path / (name or key)
    shutil.copytree(family[key], dst)
    return str(dst)


def edit_config(path, **changes):
    f = os.path.join(path, "config.json")
    c = read_json(f)
    c.update(changes)
    with open(f, "w") as out:
        json.dump(c, out)


def expect_exit2(tmp_path, cfg, *needles, command="plan", extra=()):
    before = set(os.listdir(tmp_path)) | {"r.yml"}
    args = (
        [command, write_config(tmp_path / "r.yml", cfg)]
        + ([tmp_path / "out"] if command == "run" else [])
        + list(extra)
    )
    proc = cli(*args)
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-2000:])
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") <= 2
    assert not (tmp_path / "out").exists()
    assert set(os.listdir(tmp_path)) == before, "a refused recipe must leave nothing behind"


def test_vocab_mismatch_without_tokenizer_setting(family, tmp_path):
    odd = clone(family, "donor1", tmp_path)
    edit_config(odd, vocab_size=130)
    fam = dict(family, donor1=odd)
    expect_exit2(tmp_path, eleusis_like(fam), "vocab_size", "tokenizer_source", odd)
    ok = eleusis_like(fam)
    ok["tokenizer_source"] = "base"
    assert cli("plan", write_config(tmp_path / "ok.yml", ok)).returncode == 0


def test_other_architecture(family, tmp_path):
    odd = clone(family, "donor2", tmp_path)
    edit_config(odd, architectures=["LlamaForCausalLM"], model_type="llama")
    expect_exit2(tmp_path, eleusis_like(dict(family, donor2=odd)), "LlamaForCausalLM", odd)


@pytest.mark.parametrize(
    "bad,where",
    [
        ({"a": 1}, "(parameters of models[1] ({donor1})) is a mapping"),
        (["x", "y"], "(parameters of models[1] ({donor1}), gradient point 1 of 2) is not a number"),
        ([{"filter": "self_attn"}], "(parameters of models[1] ({donor1})) has entry 1 without a `value:`"),
    ],
    ids=["dict", "strings", "no-value"],
)
def test_gradient_of_the_wrong_type(family, tmp_path, bad, where):
    cfg = eleusis_like(family)
    cfg["models"][1]["parameters"]["t"] = bad
    expect_exit2(tmp_path, cfg, "error:", where.format(donor1=family["donor1"]))


def test_multi_module_base_is_refused(family, tmp_path):
    from transformers import Mistral3Config

    mm = tmp_path / "mm"
    Mistral3Config(architectures=["Mistral3ForConditionalGeneration"]).save_pretrained(mm)
    cfg = eleusis_like(family)
    cfg["base_model"] = str(mm)
    expect_exit2(tmp_path, cfg, "multi-module", "vision_tower")


def test_unreadable_config_json(family, tmp_path):
    odd = clone(family, "donor3", tmp_path)
    with open(os.path.join(odd, "config.json"), "w") as f:
        f.write("{not json")
    expect_exit2(tmp_path, eleusis_like(dict(family, donor3=odd)), "config.json", odd)


def test_pickle_only_donor_needs_opt_in(family, tmp_path):
    odd = clone(family, "donor1", tmp_path)
    sd = load_state_dict(odd)
    os.remove(os.path.join(odd, "model.safetensors"))
    torch.save(sd, os.path.join(odd, "pytorch_model.bin"))
    cfg = eleusis_like(dict(family, donor1=odd))
    expect_exit2(tmp_path, cfg, "pickle", "--allow-pickle", command="run", extra=["--no-copy-tokenizer"])
    proc = cli("run", tmp_path / "r.yml", tmp_path / "out", "--no-copy-tokenizer", "--allow-pickle")
    assert proc.returncode == 0 and "warning" in proc.stderr, proc.stderr[-2000:]
    check_merge(str(tmp_path / "r.yml"), str(tmp_path / "out"), 8)


def test_missing_shard_and_corrupt_header(family, tmp_path):
    sharded = tmp_path / "sharded"
    write_checkpoint(
        str(sharded),
        read_json(os.path.join(family["donor0"], "config.json")),
        load_state_dict(family["donor0"]),
        shards=3,
    )
    os.remove(sharded / "model-00002-of-00003.safetensors")
    expect_exit2(
        tmp_path,
        eleusis_like(dict(family, donor0=str(sharded))),
        "missing shard",
        "model-00002-of-00003",
        command="run",
        extra=["--no-copy-tokenizer"],
    )
    garbage = clone(family, "donor1", tmp_path, "garbage")
    with open(os.path.join(garbage, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    expect_exit2(
        tmp_path,
        eleusis_like(dict(family, donor1=garbage)),
        "model.safetensors",
        command="run",
        extra=["--no-copy-tokenizer"],
    )


def nan_donor(family, tmp_path):
    odd = clone(family, "donor2", tmp_path, "nan")
    sd = load_state_dict(odd)
    sd["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    write_checkpoint(odd, read_json(os.path.join(odd, "config.json")), sd)
    return odd


def test_nan_is_refused_by_run_and_by_mergekit_yaml(family, tmp_path):
    odd = nan_donor(family, tmp_path)
    # every donor gets layer 3 in turn: one bin per layer
    cfg = eleusis_like(dict(family, donor2=odd), bins=8, alias=False)
    cfg["models"] = [m for m in cfg["models"] if m["model"] == odd]
    src = write_config(tmp_path / "r.yml", cfg)
    proc = cli("run", src, tmp_path / "out", "--no-copy-tokenizer")
    assert proc.returncode == 1 and "model.layers.3.mlp.up_proj.weight" in proc.stderr and odd in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    plain = mergekit_yaml(src, tmp_path / "plain")
    assert plain.returncode != 0 and "NaN or Inf" in plain.stderr and odd in plain.stderr
    assert not (tmp_path / "plain" / "config.json").exists()


def test_mergekit_yaml_rejects_out_of_range_at_plan_time(family, tmp_path):
    cfg = eleusis_like(family)
    cfg["models"][0]["parameters"]["t"] = 1.5
    proc = mergekit_yaml(write_config(tmp_path / "r.yml", cfg), tmp_path / "out")
    assert proc.returncode != 0 and "less than or equal to 1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_writer_failing_midway_leaves_no_output_and_rerun_succeeds(family, tmp_path):
    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    out = tmp_path / "out"
    code = (
        "import errno, sys\n"
        "from mergekit.io import tensor_writer as w\n"
        "orig = w.TensorWriter.save_tensor\n"
        "count = [0]\n"
        "def save(self, *a, **k):\n"
        "    count[0] += 1\n"
        "    if count[0] == 20:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device (simulated)')\n"
        "    return orig(self, *a, **k)\n"
        "w.TensorWriter.save_tensor = save\n"
        "from mergekit_partition_slerp.cli import main\n"
        f"main(['run', {str(src)!r}, {str(out)!r}, '--no-copy-tokenizer', '--out-shard-size', '20K'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1 and "No space left" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial" in p]
    again = cli("run", src, out, "--no-copy-tokenizer", "--out-shard-size", "20K")
    assert again.returncode == 0, again.stderr[-2000:]
    check_merge(src, str(out), 8)


def test_same_bits_across_runs_threads_and_paths(family, tmp_path):
    cfg = eleusis_like(family, rowwise=True)
    src = write_config(tmp_path / "r.yml", cfg)
    outs = []
    for k, threads in enumerate(("1", "2", "2")):
        proc = mergekit_yaml(src, tmp_path / f"o{k}", "--num-threads", threads)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(digest(tmp_path / f"o{k}"))
    proc = cli("run", src, tmp_path / "compiled", "--no-copy-tokenizer", "-j", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(digest(tmp_path / "compiled"))
    assert len(set(outs)) == 1, outs
