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

from helpers import BIN, check_merge, config_only_copy, digest, eleusis_like, write_config
from helpers import ref_layer_bins as layer_bins  # the independent reference, pinned in test_partition.py

pytestmark = pytest.mark.slow  # every test runs the console script in a subprocess

CLI = os.path.join(BIN, "mergekit-partition")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args, **kw):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=ENV, **kw)


def test_plan_reads_no_weights_and_matches_reference(family, tmp_path):
    # a copy of the family with every weight file removed
    bare = config_only_copy(family, tmp_path)
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
    card = (out / "README.md").read_text()
    assert "Partition plan" in card and "mergekit-partition run mergekit_config.yml OUT" in card
    # the card is titled after OUT, not the temporary directory the merge was written into
    assert [line for line in card.splitlines() if line.startswith("# ")] == ["# out"]
    # the recipe the card names rebuilds the model
    rebuilt = cli("run", out / "mergekit_config.yml", tmp_path / "rebuilt", "--no-copy-tokenizer")
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert digest(out) == digest(tmp_path / "rebuilt")
    # the mode a plain mkdir gives under this umask (mergekit-yaml's), not a temporary directory's 0700
    os.mkdir(tmp_path / "plain-mkdir")
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain-mkdir").st_mode
    again = cli("run", src, out, "--no-copy-tokenizer")
    assert again.returncode == 2 and "--force" in again.stderr
    forced = cli("run", src, out, "--no-copy-tokenizer", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no partial, no lock file


def test_force_never_deletes_the_working_directory_or_inputs(family, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(os.path.dirname(family["base"]), work / "models")
    local = {k: str(work / "models" / k) for k in family}
    write_config(work / "r.yml", eleusis_like(local))
    (work / "notes.txt").write_text("mine")
    before = sorted(str(p) for p in work.rglob("*"))
    for out in (".", "models", "models/base", str(tmp_path)):
        proc = cli("run", "r.yml", out, "--no-copy-tokenizer", "--force", cwd=work)
        assert proc.returncode == 2, (out, proc.stderr)
        assert proc.stderr.startswith("error: output") and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(str(p) for p in work.rglob("*")) == before


def test_concurrent_run_is_refused_while_the_first_holds_the_lock(family, tmp_path):
    from mergekit_partition_slerp.runner import OutputLock

    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    with OutputLock(str(tmp_path / "out")):
        proc = cli("run", src, tmp_path / "out", "--no-copy-tokenizer")
    assert proc.returncode == 2 and "another `mergekit-partition run` is writing the same output" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_mergekit_yaml_over_an_old_run_warns_about_its_partition_record(family, tmp_path):
    from helpers import mergekit_yaml

    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    assert cli("run", src, tmp_path / "out", "--no-copy-tokenizer").returncode == 0
    same = mergekit_yaml(src, tmp_path / "out")
    assert same.returncode == 0 and "left from an earlier" not in same.stderr
    other = write_config(tmp_path / "other.yml", eleusis_like(family, seed=8))
    proc = mergekit_yaml(other, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "left from an earlier" in line]
    assert len(warnings) == 1 and "partition.json" in warnings[0]


def test_hub_models_offline_fail_fast_naming_them(tmp_path, family):
    cfg = eleusis_like(family)
    cfg["models"][1]["model"] = "someorg/not-cached-7b"
    cfg["models"][3]["model"] = "otherorg/also-missing"
    src = write_config(tmp_path / "r.yml", cfg)
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    offline = {**ENV, **empty_cache}
    unreachable = {**os.environ, **empty_cache, "HF_ENDPOINT": "http://127.0.0.1:9"}
    unreachable.pop("HF_HUB_OFFLINE", None)
    for env in (offline, unreachable):
        start = time.time()
        proc = subprocess.run([CLI, "plan", src], capture_output=True, text=True, env=env)
        assert time.time() - start < 20
        assert proc.returncode == 2 and "someorg/not-cached-7b, otherorg/also-missing" in proc.stderr, proc.stderr
        assert "mergekit-partition demo" in proc.stderr and proc.stderr.count("\n") == 1


def test_output_files_that_cannot_be_written_are_one_line_errors(family, tmp_path):
    src = write_config(tmp_path / "r.yml", eleusis_like(family))
    (tmp_path / "adir").mkdir()
    for args in (
        ("plan", src, "--png", tmp_path / "nodir" / "x.png"),
        ("plan", src, "--png", tmp_path / "adir"),
        ("compile", src, "-o", tmp_path / "nodir" / "c.yml"),
        ("run", src, tmp_path / "out", "--out-shard-size", "lots"),
        ("demo", tmp_path / "adir" / ".." / "r.yml"),
    ):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)


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
    proc = subprocess.Popen(
        [CLI, "run", src, str(tmp_path / "out"), "--no-copy-tokenizer"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not [p for p in os.listdir(tmp_path) if ".partial" in p]:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    (stale,) = [p for p in os.listdir(tmp_path) if ".partial" in p]
    rerun = cli("run", src, tmp_path / "out", "--no-copy-tokenizer")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"removed {tmp_path / stale}" in rerun.stderr and "no longer running" in rerun.stderr
    assert [p for p in os.listdir(tmp_path) if ".partial" in p] == []
    check_merge(src, str(tmp_path / "out"), 8)


BAD = [
    ("typo", lambda c: c["parameters"].update({"drop-rate": 0.1}), "did you mean 'drop_rate'"),
    ("unknown donor key", lambda c: c["models"][0]["parameters"].update({"weight": 1}), "unknown parameter 'weight'"),
    ("t out of range", lambda c: c["models"][1]["parameters"].update({"t": 1.5}), "t = 1.5 (parameters of models[1]"),
    (
        "t not a number",
        lambda c: c["models"][1]["parameters"].update({"t": "half"}),
        "t = 'half' (parameters of models[1]",
    ),
    (
        "drop 1",
        lambda c: c["parameters"].update({"drop_rate": 1.0}),
        "drop_rate = 1.0 (top-level parameters) is out of range: it must be a number in [0, 1)",
    ),
    (
        "num_layers wrong",
        lambda c: c["parameters"].update({"num_layers": 32}),
        "num_layers = 32 (top-level parameters) does not match",
    ),
    (
        "filter without catch-all",
        lambda c: c["models"][1]["parameters"].update({"t": [{"filter": "mlp", "value": 0.5}]}),
        "no value of t / drop_rate applies to tensor model.layers.",
    ),
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


def test_demo_builds_a_model_that_generates(tmp_path, monkeypatch):
    proc = cli("demo", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = tmp_path / "demo" / "merged"
    text = (tmp_path / "demo" / "eleusis-demo.yml").read_text()
    # written as a person would: named anchors, relative paths, no absolute path of this machine
    assert (
        "&input" in text
        and "*output" in text
        and "id001" not in text
        and str(tmp_path) not in text.split("merge_method")[1]
    )
    monkeypatch.chdir(tmp_path / "demo")  # the recipe's paths are relative to its folder
    assert (merged / "partition.json").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tok("hello world", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    cfg = str(tmp_path / "demo" / "eleusis-demo.yml")
    with open(cfg) as f:
        assert len(yaml.safe_load(f)["models"]) == 9
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
