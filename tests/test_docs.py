"""Every command and code block in README.md and docs/*.md runs, on local stand-ins.

Fenced blocks are read in order, per document, and run in one temporary directory
per document:

- untagged, ```bash, ```sh, ```shell: each line is a command. `mergekit-partition`
  and `mergekit-yaml` run in-process through their click entry points (the console
  scripts are those functions; test_cli.py covers the scripts as subprocesses), each
  followed by checks of what it wrote. Other commands need a handler below or an
  entry in SKIPPED, so a new command cannot silently go untested.
- ```python: executed in one namespace per document, with `base_sd`, `sd_a`, `sd_b`
  (state dicts of stand-ins) provided.
- ```yaml starting with `# file: NAME`: written to NAME with hub ids swapped for
  stand-ins; starting with `# from: PATH`: must be a verbatim excerpt of PATH;
  otherwise it must parse.
- ```json must parse; ```text is output or illustration: plan samples, quoted error
  messages and the JSON schema are compared with what the tools really print.

Hub ids are swapped for a seeded family of tiny Mistral checkpoints with 32 layers
(the real depth) and a tokenizer; `examples/eleusis.yml` is copied into each
directory with its ids swapped the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from helpers import read_json, read_text, read_yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = ["README.md", "docs/cookbook.md", "docs/faq.md"]
LAYERS = 32

# Commands that are not run, by their text after comments are stripped. Each must
# still occur in the docs (test_skip_list_is_current), so the list cannot go stale.
SKIPPED = {
    "pip install torch==2.13.0": "install command",
    "pip install .[test]": "install command",
    "pip install torch==2.13.0 && pip install -e .[test,lint]": "install command",
    "python -m pytest tests -q -m slow": "the slow half of the test suite (long-running dev command)",
    "ruff check src tests benchmarks && ruff format --check src tests benchmarks && mypy src": "lint and types",
    "python -m pytest tests -q": "the test suite itself (long-running dev command)",
    "python benchmarks/kernel.py && python benchmarks/merge.py": "benchmarks (long-running dev command)",
    "python tests/upstream/run_mergekit_suite.py": "mergekit's own test suite (downloads its sdist, long-running)",
}

SHELL_TAGS = {"", "bash", "sh", "shell"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- extraction


def blocks(doc: str):
    """[(tag, first line number, text)] of the fenced blocks of a markdown file."""
    out, tag, start, lines = [], None, 0, []
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fence = re.match(r"^```(.*)$", line.rstrip("\n"))
            if tag is None and fence:
                tag, start, lines = fence.group(1).strip(), number + 1, []
            elif tag is not None and line.rstrip("\n") == "```":
                out.append((tag, start, "".join(lines)))
                tag = None
            elif tag is not None:
                lines.append(line)
    assert tag is None, f"{doc}: unclosed code fence opened at line {start - 1}"
    return out


def commands(text: str):
    """Shell lines, continuations joined, comments stripped, normalized by shlex."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


# ---------------------------------------------------------------- stand-ins


class StandIns:
    """Hub id -> a local tiny checkpoint, assigned on first use and kept for the session."""

    def __init__(self, pool):
        self.pool, self.map = list(pool), {}

    def local(self, hub: str) -> str:
        if hub not in self.map:
            assert len(self.map) < len(self.pool), (
                f"the docs name more hub models than there are stand-ins; raise the pool size (at {hub})"
            )
            self.map[hub] = self.pool[len(self.map)]
        return self.map[hub]

    def swap(self, text: str, cwd: str) -> str:
        """The recipe text with every hub model id replaced by its stand-in's path."""
        data = yaml.safe_load(text) or {}
        ids = [data.get("base_model")] + [m.get("model") for m in data.get("models") or []]
        ids += [s.get("model") for sl in data.get("slices") or [] for s in sl.get("sources") or []]
        hubs = set()
        for model in filter(None, ids):
            hub = str(model).split("@")[0]
            if os.path.isabs(hub) or os.path.exists(os.path.join(cwd, hub)):
                continue  # a local path, e.g. the demo's models
            assert HUB_ID.match(hub), f"model {model!r} is neither a local path nor a hub id"
            hubs.add(hub)
        for hub in sorted(hubs, key=len, reverse=True):
            text = re.sub(rf"(?<![\w./-]){re.escape(hub)}(?![\w.-])", self.local(hub), text)
        return text

    def hub_names(self, text: str) -> str:
        for hub, path in sorted(self.map.items(), key=lambda kv: -len(kv[1])):
            text = text.replace(path, hub)
        return text


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    from mergekit_partition_slerp.family import Shape, build_family

    paths = build_family(
        str(tmp_path_factory.mktemp("stand-ins")),
        donors=7,
        shape=Shape(num_hidden_layers=LAYERS),
        seed=11,
        tokenizer=True,
    )
    return StandIns(paths.values())


@pytest.fixture(scope="session")
def state_dicts(stand_ins):
    from mergekit_partition_slerp.family import load_state_dict

    base, a, b = stand_ins.pool[:3]
    return {"base_sd": load_state_dict(base), "sd_a": load_state_dict(a), "sd_b": load_state_dict(b)}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------- checks of outcomes


def weights(folder: str):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    assert out, f"no safetensors weights in {folder}"
    return out


def tensors_sha256(tensors) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        x = tensors[name].contiguous()
        h.update(f"{name} {x.dtype} {tuple(x.shape)}".encode())
        h.update(x.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_png(path: str, min_width: int = 500):
    from PIL import Image

    assert os.path.exists(path), f"{path} was not written"
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.width >= min_width and im.height >= 200, (path, im.size)


def check_plan_table(text: str, layers: int):
    lines = text.strip().splitlines()
    assert lines[0].startswith(f"partition_slerp plan: {layers} layers "), text[:300]
    assert lines[-1].startswith("base (bit for bit): "), text[-300:]
    rows = [line.split()[:2] for line in lines if re.match(r"^\d+\s+\d+\s+", line)]
    assert [int(r[0]) for r in rows] == list(range(layers)), text


def check_plan_json(data: dict):
    assert data["schema"] == "mergekit-partition/plan" and data["version"] == 1
    assert len(data["layers"]) == data["num_layers"]
    assert [r["layer"] for r in data["layers"]] == list(range(data["num_layers"]))
    for r in data["layers"]:
        assert r["donor"] == data["donors"][r["donor_index"]] and r["donor_index"] == r["bin"] % len(data["donors"])


def check_merged(folder: str, config: str, ctx) -> None:
    """A complete model: config, every tensor of the base, loadable by transformers.

    Also the same bits as any earlier merge of the same recipe in this document.
    """
    from transformers import AutoModelForCausalLM

    assert os.path.exists(os.path.join(folder, "config.json")), f"{folder} has no config.json"
    out = weights(folder)
    recipe_data = read_yaml(config)
    base = recipe_data["base_model"].split("@")[0]
    if base.startswith("./"):  # the demo's recipe: paths relative to its own folder
        base = os.path.join(os.path.dirname(config), base)
    expected = weights(base)
    assert set(out) == set(expected)
    for k in out:  # with tokenizer_source, mergekit sizes the vocabulary tensors to the tokenizer
        vocab = k in ("model.embed_tokens.weight", "lm_head.weight") and "tokenizer_source" in recipe_data
        assert out[k].shape[vocab:] == expected[k].shape[vocab:], (k, out[k].shape, expected[k].shape)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == read_json(os.path.join(base, "config.json"))["num_hidden_layers"]
    with open(config, "rb") as f:
        recipe = hashlib.sha256(f.read()).hexdigest()
    digest = tensors_sha256(out)
    earlier = ctx.merged.setdefault(recipe, (folder, digest))
    assert earlier[1] == digest, f"{folder} and {earlier[0]} merged the same recipe into different bits"


# ---------------------------------------------------------------- command handlers


class Context:
    def __init__(self, doc, cwd, stand_ins, namespace, figures):
        self.doc, self.cwd, self.stand_ins, self.ns, self.figures = doc, cwd, stand_ins, namespace, figures
        self.merged = {}  # recipe sha256 -> (folder, tensor sha256)


def split_redirect(words):
    if ">" in words:
        i = words.index(">")
        assert len(words) == i + 2, f"only `> FILE` redirection is supported: {words}"
        return words[:i], words[i + 1]
    return words, None


def invoke(command, args, where):
    from click.testing import CliRunner

    result = CliRunner().invoke(command, args, catch_exceptions=True)
    if result.exit_code != 0:
        import traceback

        tb = (
            "".join(traceback.format_exception(*result.exc_info))
            if result.exc_info and result.exception and not isinstance(result.exception, SystemExit)
            else ""
        )
        pytest.fail(f"{where}: exit code {result.exit_code}\n{result.output[-3000:]}\n{tb}")
    return result


def run_partition(ctx, args, where):
    from mergekit_partition_slerp.cli import main

    args, redirect = split_redirect(args)
    result = invoke(main, args, where)
    stdout = result.stdout
    if redirect:
        with open(redirect, "w") as f:
            f.write(stdout)
    sub, rest = args[0], args[1:]
    flags = [a for a in rest if a.startswith("-")]
    if sub == "plan":
        if "--json" in flags:
            check_plan_json(json.loads(stdout))
        else:
            check_plan_table(stdout, yaml_layers(rest[0]))
        if "--png" in rest:
            check_png(rest[rest.index("--png") + 1])
    elif sub == "compile":
        target = rest[rest.index("-o") + 1] if "-o" in rest else None
        text = read_text(target) if target else stdout
        compiled = yaml.safe_load(text)
        assert text.startswith("# Compiled by mergekit-partition")
        assert all(len(s["sources"]) == 2 for s in compiled["slices"])
        assert len(compiled["slices"]) == yaml_layers(rest[0])
    elif sub == "run":
        config, out = rest[0], rest[1]
        record = read_json(os.path.join(out, "partition.json"))
        check_plan_json(record)
        assert set(record["versions"]) >= {"mergekit-partition-slerp", "mergekit", "torch", "numpy"}
        assert os.path.exists(os.path.join(out, "mergekit_config.yml")) and os.path.exists(
            os.path.join(out, "mergekit_partition_compiled.yml")
        )
        check_merged(out, config, ctx)
    elif sub == "demo":
        out = rest[0] if rest and not rest[0].startswith("-") else "partition-slerp-demo"
        assert os.path.exists(os.path.join(out, "merged", "partition.json"))
        check_merged(os.path.join(out, "merged"), os.path.join(out, "eleusis-demo.yml"), ctx)
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(os.path.join(out, "merged"))("hello world").input_ids
    else:
        pytest.fail(f"{where}: no checks written for `mergekit-partition {sub}`; add them to run_partition")


def yaml_layers(config: str) -> int:
    base = read_yaml(config)["base_model"].split("@")[0]
    return read_json(os.path.join(base, "config.json"))["num_hidden_layers"]


def run_mergekit_yaml(ctx, args, where):
    from mergekit.scripts.run_yaml import main

    invoke(main, args, where)
    positional = [a for a in args if not a.startswith("-")]
    check_merged(positional[1], positional[0], ctx)


def run_make_figures(ctx, args, where):
    assert args[:2] == ["python", "examples/make_figures.py"], (
        f"{where}: no handler for `{' '.join(args)}`; add one or list it in SKIPPED"
    )
    out = ctx.figures(tuple(args[2:]))
    for name in ("eleusis-plan.png", "one-layer.png"):
        check_png(os.path.join(out, name), min_width=1000)


def run_ln(ctx, args, where):
    assert args[:2] == ["ln", "-s"] and len(args) == 4, f"{where}: only `ln -s TARGET LINK` is supported"
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isdir(args[3]) and os.path.exists(os.path.join(args[3], "config.json"))


HANDLERS = {
    "mergekit-partition": lambda ctx, w, where: run_partition(ctx, w[1:], where),
    "mergekit-yaml": lambda ctx, w, where: run_mergekit_yaml(ctx, w[1:], where),
    "python": run_make_figures,
    "ln": run_ln,
}


# ---------------------------------------------------------------- text blocks


def eleusis_plan_with_hub_names(ctx):
    from mergekit_partition_slerp import plan

    p = plan("examples/eleusis.yml")
    name = ctx.stand_ins.hub_names
    p.base, p.donors = name(p.base), [name(d) for d in p.donors]
    p.layers = [dataclasses.replace(row, donor=name(row.donor)) for row in p.layers]
    return p


def check_plan_sample(ctx, text, where):
    """A quoted plan table: every line shown is a line of the real output, in order."""
    assert text.startswith("partition_slerp plan: 32 layers of model.layers in 9 bins, seed 0"), (
        f"{where}: only Eleusis samples are checked"
    )
    actual = str(eleusis_plan_with_hub_names(ctx)).splitlines()
    at = 0
    for line in text.rstrip("\n").splitlines():
        if line.strip() == "...":
            continue
        assert line in actual[at:], f"{where}: `{line}` is not in the real plan output (after line {at})"
        at = actual.index(line, at) + 1


def check_schema_sample(ctx, text, where):
    """The README's JSON schema names only keys the real JSON has."""
    from mergekit_partition_slerp import plan

    data = plan("examples/eleusis.yml").to_dict()
    keys = set(data) | set(data["layers"][0]) | set(data["layers"][0]["t"])
    named = re.findall(r'"([\w.]+)":', text)
    assert {"schema", "version", "layers", "t", "drop_rate"} <= set(named), f"{where}: the sample names too few keys"
    for key in named:
        assert key in keys, f"{where}: schema key {key!r} is not in the plan JSON"
    assert data["layers"][0]["layer"] == 0 and data["non_layer"] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


def duplicate_donor_error(ctx):
    """cookbook §5: two-roles.yml with the symlinked entry replaced by a plain duplicate."""
    from mergekit_partition_slerp.planning import ConfigError, build_plan

    recipe = read_yaml("two-roles.yml")
    recipe["models"][2]["model"] = recipe["models"][1]["model"]
    with pytest.raises(ConfigError) as error:
        build_plan(recipe)
    return f"error: {error.value}"


def vocab_mismatch_error(ctx):
    """faq: Mistral-7B-v0.1 as base, OpenHermes (two added tokens) as donor, config.json only."""
    import importlib.util

    from mergekit_partition_slerp.planning import ConfigError, build_plan

    spec = importlib.util.spec_from_file_location("make_figures", os.path.join(REPO, "examples", "make_figures.py"))
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    paths = {}
    for hub, vocab in (("mistralai/Mistral-7B-v0.1", 32000), ("teknium/OpenHermes-2.5-Mistral-7B", 32002)):
        paths[hub] = os.path.join(ctx.cwd, "vocab-check", hub.replace("/", "--"))
        os.makedirs(paths[hub])
        with open(os.path.join(paths[hub], "config.json"), "w") as f:
            json.dump({**figures.MISTRAL_7B, "vocab_size": vocab}, f)
    recipe = {
        "merge_method": "partition_slerp",
        "base_model": paths["mistralai/Mistral-7B-v0.1"],
        "models": [{"model": paths["teknium/OpenHermes-2.5-Mistral-7B"], "parameters": {"t": 0.5}}],
    }
    with pytest.raises(ConfigError) as error:
        build_plan(recipe)
    message = f"error: {error.value}"
    for hub, path in paths.items():
        message = message.replace(path, hub)
    return message


QUOTED_ERRORS = {"is listed twice": duplicate_donor_error, "has vocab_size": vocab_mismatch_error}


def check_text(ctx, text, where):
    if text.startswith("partition_slerp plan:"):
        check_plan_sample(ctx, text, where)
    elif text.startswith('{"schema": "mergekit-partition/plan"'):
        check_schema_sample(ctx, text, where)
    elif text.startswith("error:"):
        keys = [k for k in QUOTED_ERRORS if k in text]
        assert len(keys) == 1, f"{where}: a quoted error message needs a reproducer in QUOTED_ERRORS"
        assert QUOTED_ERRORS[keys[0]](ctx) == text.strip(), f"{where}: the quoted message is not what the tool says"


# ---------------------------------------------------------------- per block


def run_block(ctx, tag, line, text):
    where = f"{ctx.doc}:{line}"
    if tag in SHELL_TAGS:
        for words in commands(text):
            normalized = " ".join(words)
            if normalized in SKIPPED:
                continue
            handler = HANDLERS.get(words[0])
            assert handler, f"{where}: no handler for `{normalized}`; add one to HANDLERS or list it in SKIPPED"
            handler(ctx, words, where)
    elif tag == "python":
        import matplotlib.pyplot as plt

        exec(compile(text, where, "exec"), ctx.ns)
        plt.close("all")
        if "merge_state_dicts" in text:
            merged, base = ctx.ns["merged"], ctx.ns["base_sd"]
            assert set(merged) == set(base) and all(merged[k].dtype == base[k].dtype for k in base)
    elif tag == "yaml":
        first = text.splitlines()[0]
        if first.startswith("# file: "):
            name = first[len("# file: ") :].strip()
            with open(name, "w") as f:
                f.write(ctx.stand_ins.swap(text, ctx.cwd))
            assert read_yaml(name)["merge_method"] == "partition_slerp"
        elif first.startswith("# from: "):
            source = read_text(os.path.join(REPO, first[len("# from: ") :].strip()))
            excerpt = text.split("\n", 1)[1]
            assert excerpt in source, f"{where}: not a verbatim excerpt of {first[8:]}"
        else:
            assert isinstance(yaml.safe_load(text), dict), where
    elif tag == "json":
        json.loads(text)
    elif tag == "text":
        check_text(ctx, text, where)
    else:
        pytest.fail(f"{where}: code fence tag {tag!r} is not known to tests/test_docs.py")


@pytest.fixture(scope="session")
def figures(tmp_path_factory):
    """Runs examples/make_figures.py once per argument list, into a temporary --out."""
    done = {}

    def make(args=()):
        if args not in done:
            out = str(tmp_path_factory.mktemp("images"))
            proc = subprocess.run(
                [sys.executable, os.path.join(REPO, "examples", "make_figures.py"), *args, "--out", out],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
                cwd=REPO,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("wrote ") == 2, proc.stdout
            done[args] = out
        return done[args]

    return make


@pytest.mark.slow  # merges and figures of 32-layer stand-ins
@pytest.mark.parametrize("doc", DOCS)
def test_every_block_runs(doc, tmp_path, monkeypatch, stand_ins, state_dicts, figures, offline):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    os.makedirs("examples")
    with open(os.path.join(REPO, "examples", "eleusis.yml")) as f:
        eleusis = stand_ins.swap(f.read(), str(tmp_path))
    with open("examples/eleusis.yml", "w") as f:
        f.write(eleusis)
    ctx = Context(doc, str(tmp_path), stand_ins, dict(state_dicts), figures)
    found = blocks(doc)
    assert found, f"{doc} has no code blocks"
    for tag, line, text in found:
        run_block(ctx, tag, line, text)


def test_skip_list_is_current():
    present = {" ".join(w) for doc in DOCS for tag, _, text in blocks(doc) if tag in SHELL_TAGS for w in commands(text)}
    assert set(SKIPPED) <= present, f"SKIPPED lists commands no doc has any more: {set(SKIPPED) - present}"


@pytest.mark.slow  # merges and figures of 32-layer stand-ins
def test_make_figures_writes_both_pngs(figures):
    out = figures()
    check_png(os.path.join(out, "eleusis-plan.png"), min_width=1500)
    check_png(os.path.join(out, "one-layer.png"), min_width=1000)


def test_committed_pictures_exist():
    for name in ("eleusis-plan.png", "one-layer.png"):
        check_png(os.path.join(REPO, "docs", "images", name), min_width=1000)


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose(path: str) -> str:
    """The markdown file without its fenced blocks."""
    kept, fenced = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced:
                kept.append(line)
    return "".join(kept)


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    """Relative links and images point to files that exist, and anchors to headings."""
    path = os.path.join(REPO, doc)
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path)):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(dest), f"{doc}: link to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", _prose(dest), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc}: no heading for #{anchor} in {file or doc}"
