"""The real `mergekit-partition` console script, in subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from mergekit_partition_slerp.family import load_state_dict

from helpers import BIN, check_merge, eleusis_like, write_config
from helpers import ref_layer_bins as layer_bins  # the independent reference, pinned in test_partition.py

pytestmark = pytest.mark.slow  # every test runs the console script in a subprocess

CLI = os.path.join(BIN, "mergekit-partition")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args, **kw):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=ENV, **kw)


def test_plan_reads_no_weights_and_matches_reference(family, tmp_path):
    # a copy of the family with every weight file removed
    bare = {}
    for k, path in family.items():
        bare[k] = str(tmp_path / k)
        os.makedirs(bare[k])
        shutil.copy(os.path.join(path, "config.json"), bare[k])
    cfg = eleusis_like(bare, bins=6, seed=11)
    proc = cli("plan", write_config(tmp_path / "r.yml", cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["schema"] == "mergekit-partition/plan" and data["version"] == 1
    bins = layer_bins("model.layers", 8, 6, 11)
    donors = [m["model"] for m in cfg["models"]]
    for row in data["layers"]:
        i = row["layer"]
        assert row["bin"] == bins[i] and row["donor"] == donors[bins[i] % 5]
        grad = cfg["models"][bins[i] % 5]["parameters"]["t"][1]["value"]
        pos = i / 7
        assert row["t"]["mlp.up_proj.weight"] == (pos if grad == [0, 1] else 1 - pos)
        assert row["t"]["self_attn.q_proj.weight"] == 0.03
        assert row["drop_rate"]["self_attn.k_proj.weight"] == 0.28 and row["drop_rate"]["mlp.down_proj.weight"] == 0.0
    assert data["non_layer"] == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    table = cli("plan", tmp_path / "r.yml")
    assert table.returncode == 0 and "layer" in table.stdout and "base (bit for bit)" in table.stdout


def test_plan_png(family, tmp_path):
    proc = cli("plan", write_config(tmp_path / "r.yml", eleusis_like(family)), "--png", tmp_path / "p.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def count_reads(config, out):
    """Run mergekit-yaml in-process-style in a subprocess, counting tensors read per model."""
    code = (
        "import collections, json, sys\n"
        "from mergekit.io import lazy_tensor_loader as l\n"
        "counts = collections.Counter()\n"
        "orig = l.LazyTensorLoader.get_tensor\n"
        "def get(self, key, *a, **k):\n"
        "    counts[self.index.base_path.rstrip('/').split('/')[-1]] += 1\n"
        "    return orig(self, key, *a, **k)\n"
        "l.LazyTensorLoader.get_tensor = get\n"
        "from mergekit.scripts.run_yaml import main\n"
        "try:\n"
        f"    main([{str(config)!r}, {str(out)!r}, '--no-copy-tokenizer'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(counts))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_is_bit_identical_and_reads_two_models_per_layer(family, tmp_path):
    src = write_config(tmp_path / "r.yml", eleusis_like(family, bins=5, seed=3))
    compiled = tmp_path / "compiled.yml"
    proc = cli("compile", src, "-o", compiled)
    assert proc.returncode == 0, proc.stderr
    text = compiled.read_text()
    assert text.startswith("# Compiled by mergekit-partition") and "sha256" in text
    cc = yaml.safe_load(text)
    assert all(len(s["sources"]) == 2 for s in cc["slices"]) and len(cc["slices"]) == 8
    plain_reads = count_reads(src, tmp_path / "plain")
    compiled_reads = count_reads(compiled, tmp_path / "compiled")
    a, b = load_state_dict(str(tmp_path / "plain")), load_state_dict(str(tmp_path / "compiled"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
    per_model = 3 + 8 * 9  # non-layer + 9 tensors per layer
    assert plain_reads["base"] == per_model and all(plain_reads[f"donor{k}"] >= per_model for k in range(4))
    assert compiled_reads["base"] == per_model
    donor_reads = sum(v for k, v in compiled_reads.items() if k != "base")
    # one donor per layer; mergekit also reads the embeddings of the first slice's donor
    # and the final norm + lm_head of the last slice's donor (the method returns the base's)
    assert donor_reads == 8 * 9 + 3
    check_merge(src, str(tmp_path / "compiled"), 8)


def test_run_writes_atomically_and_refuses_clobber(family, tmp_path):
    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    out = tmp_path / "out"
    proc = cli("run", src, out, "--no-copy-tokenizer")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merged" in proc.stdout and "read" in proc.stdout
    check_merge(src, str(out), 8)
    record = json.loads((out / "partition.json").read_text())
    assert record["seed"] == 7 and set(record["versions"]) >= {"mergekit-partition-slerp", "mergekit", "torch", "numpy"}
    assert "Partition plan" in (out / "README.md").read_text()
    again = cli("run", src, out, "--no-copy-tokenizer")
    assert again.returncode == 2 and "--force" in again.stderr
    forced = cli("run", src, out, "--no-copy-tokenizer", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert [p for p in os.listdir(tmp_path) if ".partial" in p] == []


def test_run_with_corrupt_donor_leaves_no_output(family, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(family["donor2"], bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated shard
    fam = dict(family, donor2=str(bad))
    src = write_config(tmp_path / "r.yml", eleusis_like(fam))
    proc = cli("run", src, tmp_path / "out", "--no-copy-tokenizer")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if ".partial" in p] == []


def test_killed_run_leaves_no_output(family, tmp_path):
    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    proc = subprocess.Popen([CLI, "run", src, str(tmp_path / "out"), "--no-copy-tokenizer"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not [p for p in os.listdir(tmp_path) if ".partial" in p]:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    rerun = cli("run", src, tmp_path / "out", "--no-copy-tokenizer")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    check_merge(src, str(tmp_path / "out"), 8)


BAD = [
    ("typo", lambda c: c["parameters"].update({"drop-rate": 0.1}), "did you mean 'drop_rate'"),
    ("unknown donor key", lambda c: c["models"][0]["parameters"].update({"weight": 1}), "unknown parameter 'weight'"),
    ("t out of range", lambda c: c["models"][1]["parameters"].update({"t": 1.5}), "less than or equal to 1"),
    ("t not a number", lambda c: c["models"][1]["parameters"].update({"t": "half"}), "donor"),
    ("drop 1", lambda c: c["parameters"].update({"drop_rate": 1.0}), "less than 1"),
    ("negative seed", lambda c: c["parameters"].update({"seed": -3}), "seed"),
    ("bins 0", lambda c: c["parameters"].update({"bins": 0}), "bins"),
    ("bins > layers", lambda c: c["parameters"].update({"bins": 9}), "only 8 layers"),
    ("bins < donors", lambda c: c["parameters"].update({"bins": 2}), "would never be used"),
    ("missing base", lambda c: c.pop("base_model"), "base_model is missing"),
    ("missing path", lambda c: c["models"][2].update({"model": "/nonexistent/model"}), "/nonexistent/model"),
    ("duplicate", lambda c: c["models"].append(dict(c["models"][1])), "@main"),
    ("empty models", lambda c: c.update({"models": []}), "models is missing or empty"),
    ("shared per donor", lambda c: c["models"][0]["parameters"].update({"seed": 1}), "shared"),
    ("top-level typo", lambda c: c.update({"tokenizer_sorce": "base"}), "did you mean 'tokenizer_source'"),
]


@pytest.mark.parametrize("label,mutate,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_exit_2_with_one_paragraph(family, tmp_path, label, mutate, needle):
    cfg = eleusis_like(family)
    mutate(cfg)
    proc = cli("plan", write_config(tmp_path / "r.yml", cfg))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle.lower() in proc.stderr.lower(), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") <= 2


def test_yaml_syntax_error(tmp_path):
    (tmp_path / "r.yml").write_text("merge_method: partition_slerp\nmodels: [\n")
    proc = cli("plan", tmp_path / "r.yml")
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "line" in proc.stderr


def test_donor_with_other_shape_is_refused(family, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(family["donor1"], odd)
    c = json.loads((odd / "config.json").read_text())
    c["intermediate_size"] = 256
    (odd / "config.json").write_text(json.dumps(c))
    proc = cli("plan", write_config(tmp_path / "r.yml", eleusis_like(dict(family, donor1=str(odd)))))
    assert proc.returncode == 2 and "intermediate_size" in proc.stderr and str(odd) in proc.stderr


def test_demo_builds_a_model_that_generates(tmp_path):
    proc = cli("demo", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = tmp_path / "demo" / "merged"
    assert (merged / "partition.json").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok("hello world", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    cfg = str(tmp_path / "demo" / "eleusis-demo.yml")
    assert len(yaml.safe_load(open(cfg))["models"]) == 9
    check_merge(cfg, str(merged), 12)


def test_run_with_relative_one_slash_paths_stays_offline(family, tmp_path):
    # mergekit's card writer asks the hub about ids like "m/base"; run writes absolute paths
    (tmp_path / "m").mkdir()
    rel = {}
    for k, path in family.items():
        os.symlink(path, tmp_path / "m" / k)
        rel[k] = f"m/{k}"
    src = write_config(tmp_path / "r.yml", eleusis_like(rel, alias=False, bins=4))
    proc = cli("run", "r.yml", "out", "--no-copy-tokenizer", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "partition.json").read_text())["base"] == "m/base"
    os.chdir(tmp_path)
    try:
        check_merge(src, "out", 8)
    finally:
        os.chdir(os.path.dirname(__file__))
