"""The architecture matrix (issue 12): every model type mergekit 0.1.5 defines and transformers knows.

For each type, tiny seeded checkpoints built by transformers' own model class from
that type's config (base + two noisy donors), merged with a two-bin recipe with
depth gradients and an attention drop, through `run` (compiled) and plain mergekit
(the `models:` recipe). Checks, each against an independent computation:
- `plan` succeeds, or refuses in one paragraph and mergekit's own merge fails too;
- `run` and plain mergekit give bit-identical tensors;
- the output loads with the matching transformers class, forward pass finite, ties kept;
- non-layer tensors equal the base bit for bit (safetensors reads of the base);
- every layer tensor follows the partition (this file's own Fisher-Yates over Philox):
  t == 0 layers equal the base, t == 1 without drop equal the donor, other t within one
  bf16 ulp of the float64 slerp, dropped elements equal the base.

`python tests/test_architectures.py --write-docs` regenerates docs/architectures.md from
a full run; `test_docs_table_in_sync` (fast) and the slow matrix hold the table to it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.resources
import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from helpers import assert_close_to_ref, fnv, ref_keep, ref_slerp64  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architectures.md")
SEED = 5
ATTN_T, ATTN_DROP = 0.4, 0.3
# Types mergekit has no definition for but still merges (it infers the layout from the weights).
INFERRED = ("exaone4", "smollm3", "olmo3")


# --- the case list: from mergekit's own definitions, intersected with transformers ------------


@dataclass(frozen=True)
class Case:
    model_type: str
    architecture: str  # a class name in transformers
    definition: str  # mergekit's JSON file, or "" for an inferred layout

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.architecture}"


def mergekit_definitions() -> list[tuple[str, str, list[str], str]]:
    """(file, model_type, architectures, kind) of every JSON definition shipped with mergekit."""
    import mergekit._data.architectures as data

    out = []
    for f in sorted(importlib.resources.files(data).iterdir(), key=lambda f: f.name):
        if f.name.endswith(".json"):
            d = json.loads(f.read_text())
            out.append((f.name, d["model_type"], list(d["architectures"]), d.get("kind", "module")))
    return out


def cases() -> list[Case]:
    import transformers
    from transformers import CONFIG_MAPPING

    found = []
    for file, model_type, archs, kind in mergekit_definitions():
        if kind != "module" or model_type not in CONFIG_MAPPING:
            continue
        found += [Case(model_type, a, file) for a in archs if hasattr(transformers, a)]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in INFERRED:
        if model_type in CONFIG_MAPPING and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            found.append(Case(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], ""))
    return found


def not_in_matrix() -> list[tuple[str, str, str]]:
    """(model_type, architectures, why) for mergekit definitions the matrix cannot build."""
    import transformers
    from transformers import CONFIG_MAPPING

    out = []
    for _file, model_type, archs, kind in mergekit_definitions():
        if kind != "module":
            out.append(
                (
                    model_type,
                    ", ".join(archs),
                    "multi-module (encoder-decoder, or vision/audio + text): refused by design in v1",
                )
            )
        elif model_type not in CONFIG_MAPPING or not any(hasattr(transformers, a) for a in archs):
            out.append((model_type, ", ".join(archs), "not in transformers (remote code): not built here"))
        else:
            missing = [a for a in archs if not hasattr(transformers, a)]
            if missing:
                out.append((model_type, ", ".join(missing), "class not in transformers: not built here"))
    return out


# --- tiny checkpoints -------------------------------------------------------------------------

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "sliding_window": 64,
    "state_size": 8,
    "d_model": 64,
    "expand": 2,
    "dim": 64,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_layers": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "type_vocab_size": 2,
    "conv_L_cache": 3,
    "block_dim": 64,
    "block_ff_dim": 128,
    "full_attn_idxs": [1, 3],
}

# transformers' default for this type is all mamba layers, which its own forward pass cannot run
OVERRIDES = {
    "granitemoehybrid": {
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        "mamba_n_heads": 8,
        "mamba_d_state": 16,
        "mamba_d_head": 16,
    },
}


def tiny_config(case: Case):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[case.model_type]
    default = cls()
    kwargs = {k: v for k, v in {**TINY, **OVERRIDES.get(case.model_type, {})}.items() if _has(default, k)}
    config = cls(**kwargs)
    for k, v in kwargs.items():
        if getattr(config, k, None) != v:  # some configs take their legacy names only (n_embd, n_layer)
            with contextlib.suppress(AttributeError):  # derived read-only properties (falcon's head_dim)
                setattr(config, k, v)
    for key in ("layer_types",):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) != config.num_hidden_layers:
            setattr(config, key, (value * config.num_hidden_layers)[: config.num_hidden_layers])
    config.architectures = [case.architecture]
    return config


def _has(config, key: str) -> bool:
    if isinstance(getattr(type(config), key, None), property):
        return False  # derived from other fields (falcon's head_dim)
    return hasattr(config, key) or key in getattr(config, "attribute_map", {})


def build_models(case: Case, root: str) -> dict[str, str]:
    import transformers

    config = tiny_config(case)
    cls = getattr(transformers, case.architecture)
    torch.manual_seed(0)
    model = cls(config).eval()
    paths = {}
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, name in enumerate(("base", "d1", "d2")):
        if k:
            gen = torch.Generator().manual_seed(100 + k)
            noisy = {}
            for key, value in base_state.items():
                if value.is_floating_point():
                    scale = value.float().std().item() if value.numel() > 1 else 0.0
                    noise = torch.randn(value.shape, generator=gen) * (0.3 * scale + 0.02)
                    noisy[key] = (value.float() + noise).to(value.dtype)
                else:
                    noisy[key] = value
            model.load_state_dict(noisy, strict=False)
        paths[name] = os.path.join(root, name)
        model.save_pretrained(paths[name])
    return paths


def with_converted(case: Case, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors plus the ones transformers' own loading builds from them (fused MoE experts)."""
    import transformers

    model = getattr(transformers, case.architecture).from_pretrained(path)
    out = dict(tensors)
    for name, value in model.state_dict().items():
        out.setdefault(name, value.detach().clone())
    return out


def safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


# --- the tests' own partition (DESIGN §3.3, written out again) ----------------------------------


def ref_bins(stack: str, n: int, bins: int, seed: int) -> list[int]:
    raw = np.random.Philox(key=np.array([fnv(stack), seed], dtype=np.uint64)).random_raw(max(n - 1, 0))
    order = list(range(n))
    for k, i in enumerate(range(n - 1, 0, -1)):
        j = int(raw[k]) % (i + 1)
        order[i], order[j] = order[j], order[i]
    sizes = [n // bins + (1 if b < n % bins else 0) for b in range(bins)]
    out, at = [0] * n, 0
    for b, size in enumerate(sizes):
        for layer in order[at : at + size]:
            out[layer] = b
        at += size
    return out


def test_reference_partition_matches_design_vectors():
    assert ref_bins("model.layers", 32, 9, 0) == [
        8,
        7,
        3,
        0,
        1,
        0,
        4,
        2,
        1,
        8,
        6,
        5,
        6,
        0,
        3,
        4,
        5,
        2,
        4,
        6,
        5,
        8,
        0,
        7,
        1,
        3,
        1,
        2,
        7,
        3,
        2,
        4,
    ]
    assert ref_bins("model.layers", 8, 3, 7) == [2, 0, 1, 0, 1, 0, 1, 2]


# --- one case end to end ------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    status: str  # "verified" | "refused" | "failed"
    detail: str = ""
    stack: str = ""
    seconds: float = 0.0


def attention_word(base_names: list[str]) -> str | None:
    """The attention module's name, read from the checkpoint (the recipe's filter)."""
    for name in sorted(base_names):
        m = re.search(r"\.(\d+)\.([^.]+)", name)
        if m and "att" in m.group(2):
            return m.group(2)
    return None


def recipe(paths: dict[str, str], attn: str | None) -> dict:
    def t(gradient):
        return ([{"filter": attn, "value": ATTN_T}] if attn else []) + [{"value": gradient}]

    drop = ([{"filter": attn, "value": ATTN_DROP}] if attn else []) + [{"value": 0.0}]
    return {
        "merge_method": "partition_slerp",
        "base_model": paths["base"],
        "parameters": {"bins": 2, "seed": SEED, "drop_rate": drop},
        "models": [
            {"model": paths["d1"], "parameters": {"t": t([0, 1])}},
            {"model": paths["d2"], "parameters": {"t": t([1, 0])}},
        ],
        "dtype": "float32",
    }


def plain_merge(raw: dict, out: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(raw), out, options=MergeOptions(copy_tokenizer=False, quiet=True))


def run_cli_path(raw: dict, root: str, out: str) -> None:
    """`mergekit-partition run`, in process: plan, compile, merge."""
    from mergekit.options import MergeOptions

    from mergekit_partition_slerp.planning import build_plan
    from mergekit_partition_slerp.runner import run

    path = os.path.join(root, "recipe.yml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    run(build_plan(path), out, MergeOptions(copy_tokenizer=False, quiet=True))


def run_case(case: Case, root: str) -> Result:
    from mergekit_partition_slerp.planning import ConfigError, build_plan

    start = time.perf_counter()
    paths = build_models(case, root)
    with _quiet():  # output names mergekit converts to (fused experts) get transformers' own conversion
        base = with_converted(case, paths["base"], safetensors_dir(paths["base"]))
        donors = [with_converted(case, paths[d], safetensors_dir(paths[d])) for d in ("d1", "d2")]
    attn = attention_word(list(base))
    raw = recipe(paths, attn)
    with _quiet():
        try:
            plan = build_plan(raw)
        except ConfigError as error:
            message = str(error).replace(root + os.sep, "")  # the docs name models base/d1/d2
            assert "\n" not in message and "Traceback" not in message, message
            # never stricter than mergekit: its own merge must fail on this too
            try:
                plain_merge(raw, os.path.join(root, "plain"))
            except Exception:
                return Result(case, "refused", message, seconds=time.perf_counter() - start)
            raise AssertionError(f"plan refused {case.id} but plain mergekit merged it: {message}") from None
        plain_merge(raw, os.path.join(root, "plain"))
        run_cli_path(raw, root, os.path.join(root, "run"))
    plain, ran = safetensors_dir(os.path.join(root, "plain")), safetensors_dir(os.path.join(root, "run"))
    assert sorted(plain) == sorted(ran), f"{case.id}: run and mergekit write different tensor names"
    for k in plain:
        assert (
            plain[k].dtype == ran[k].dtype
            and torch.equal(plain[k].view(-1), ran[k].view(-1))
            or (plain[k].numel() == 0)
        ), f"{case.id}: {k} differs between run and plain mergekit"
    check_partition(case, plan, base, donors, plain)
    check_loads(case, os.path.join(root, "plain"))
    return Result(case, "verified", stack=plan.stack, seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _quiet():
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def check_partition(case: Case, plan, base, donors, out) -> None:
    # the stack: the prefix before the first ".N." of the checkpoint's layer tensors
    counts: dict[str, int] = {}
    for name in base:
        m = re.match(r"(.+?)\.(\d+)\.", name)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    stack = max(counts, key=lambda s: sum(n.startswith(s + ".") for n in base))
    n = counts[stack]
    assert plan.stack == stack and plan.num_layers == n, (case.id, plan.stack, plan.num_layers, stack, n)
    bins = ref_bins(stack, n, 2, SEED)
    gradients = ([0.0, 1.0], [1.0, 0.0])
    attn = attention_word(list(base))
    for name, tensor in out.items():
        m = re.match(re.escape(stack) + r"\.(\d+)\.", name)
        if not m:
            assert name in base, f"{case.id}: output {name} is neither in the base checkpoint nor in its model"
            assert torch.equal(tensor, base[name].to(tensor.dtype)), f"{case.id}: non-layer {name} is not the base's"
            continue
        i = int(m.group(1))
        k = bins[i] % 2
        a = base.get(name)
        b = donors[k].get(name)
        assert a is not None and b is not None, (
            f"{case.id}: output {name} is neither in the checkpoint nor in the model"
        )
        a, b = a.to(tensor.dtype), b.to(tensor.dtype)
        pos = i / (n - 1)
        lo, hi = gradients[k]
        is_attn = attn is not None and attn in name
        t = ATTN_T if is_attn else lo + (hi - lo) * pos
        p = ATTN_DROP if is_attn else 0.0
        if not tensor.is_floating_point():
            assert torch.equal(tensor, a), f"{case.id}: {name}"
            continue
        if t == 0.0:
            expected = a
        elif t == 1.0:
            expected = b
        else:
            expected = None
        if p == 0.0 and expected is not None:
            assert torch.equal(tensor, expected), f"{case.id}: {name} (layer {i}, t {t}) is not bit-exact"
            continue
        ref = ref_slerp64(a, b, t) if expected is None else expected.double()
        if p > 0:
            keep = torch.from_numpy(ref_keep(name, SEED, p, a.numel())).reshape(a.shape)
            assert torch.equal(tensor[~keep], a[~keep]), f"{case.id}: dropped elements of {name} are not the base's"
            ref = torch.where(keep, ref, a.double())
        assert_close_to_ref(tensor, ref, a, b, f"{case.id}: {name} (layer {i}, t {t:.4g}, drop {p})")


def check_loads(case: Case, path: str) -> None:
    import transformers

    cls = getattr(transformers, case.architecture)
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], f"{case.id}: output lacks {info['missing_keys'][:5]}"
    model.eval()
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    if "MultipleChoice" in case.architecture:
        ids = ids.unsqueeze(1).repeat(1, 2, 1)  # [batch, choices, tokens]
    with torch.no_grad():
        out = model(input_ids=ids)
    values = out.logits if getattr(out, "logits", None) is not None else out[0]
    assert torch.isfinite(values).all(), f"{case.id}: forward pass not finite"
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# --- pytest entry points --------------------------------------------------------------------


def table_rows() -> dict[str, tuple[str, str]]:
    """{case id: (status, detail)} as written in docs/architectures.md."""
    rows = {}
    with open(DOCS) as f:
        for line in f:
            m = re.match(r"\| `([^`]+)` \| `([^`]+)` \| (\w+) \| (.*) \|$", line.rstrip())
            if m:
                rows[f"{m.group(1)}-{m.group(2)}"] = (m.group(3), m.group(4))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_architecture(case, tmp_path):
    result = run_case(case, str(tmp_path))
    documented = table_rows().get(case.id)
    assert documented is not None, f"{case.id} is missing from docs/architectures.md; regenerate it"
    assert documented[0] == result.status, f"{case.id}: docs say {documented[0]}, the merge says {result.status}"


def test_docs_table_in_sync():
    """The table lists exactly the matrix's cases, for the installed versions (no merges: fast)."""
    import mergekit
    import transformers

    rows = table_rows()
    assert sorted(rows) == sorted(c.id for c in cases()), "docs/architectures.md does not list the matrix's cases"
    with open(DOCS) as f:
        text = f.read()
    assert f"mergekit {_version('mergekit', mergekit)}" in text and f"transformers {transformers.__version__}" in text


def _version(name, module) -> str:
    from importlib.metadata import version

    return getattr(module, "__version__", None) or version(name)


# --- docs generator ---------------------------------------------------------------------------


NOTES = [
    "## MoE, filters, buffers",
    "",
    "- **Fused experts.** mergekit 0.1.5 writes MoE experts fused (`mlp.experts.gate_up_proj`, "
    "`mlp.experts.down_proj`, one 3-D tensor per layer) whatever the input layout; transformers 5 still saves "
    "Mixtral and Qwen3-MoE per expert. `plan` says when the output names differ from the input's; `t`, `drop_rate`, "
    "filters and the drop masks apply to the output names. Slerp over a fused tensor treats all experts of the "
    "layer as one vector (one angle for the whole block); `rowwise: true` slerps each row of dim 0 on its own, "
    "which for a fused tensor of shape [experts, ...] means one slerp per expert.",
    "- **Filters.** mergekit matches a `filter:` as a substring of the output tensor name and silently ignores one "
    "that matches nothing (the Eleusis `self_attn` does not match GPT-2's `attn`); `plan` warns, with the closest "
    "real names.",
    "- **Buffers in layers** (a bool attention mask, `rotary_emb.inv_freq`): mergekit loads every tensor in the "
    "recipe's dtype, so a bool mask becomes 0.0/1.0 floats; equal in base and donor, it comes out unchanged. "
    "`plan` names such tensors when the checkpoint has them.",
    "- **No definition** (`exaone4`, `smollm3`, `olmo3` above): mergekit infers the layout from the weights when "
    "it merges; the method and `plan` use the same inferred layout, so they are never stricter than mergekit.",
    "",
]


def write_docs(results: list[Result], seconds: float) -> str:
    import mergekit
    import transformers

    from mergekit_partition_slerp import __version__

    lines = [
        "# Architectures",
        "",
        "Generated by `python tests/test_architectures.py --write-docs` from the architecture matrix "
        "(`tests/test_architectures.py`, marked `slow`); `pytest -m slow tests/test_architectures.py` holds this "
        "table to what actually happens.",
        "",
        f"Date {datetime.date.today().isoformat()}; mergekit-partition-slerp {__version__}, "
        f"mergekit {_version('mergekit', mergekit)}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}. "
        f"Full matrix: {seconds:.0f} s on 2 CPU cores.",
        "",
        "Each row: tiny checkpoints built by transformers' own class from that model type's config (hidden 64, "
        "4 layers), a base and two noisy donors, `bins: 2`, depth gradients, an attention filter with drop. "
        "**verified**: `plan` succeeds, `mergekit-partition run` and plain `mergekit-yaml` give bit-identical "
        "weights, the output loads with the class and runs a finite forward pass (tied embeddings stay tied), "
        "non-layer tensors are the base's bit for bit and every layer follows the partition. **refused**: `plan` "
        "refuses before any weight is read, with the reason below, and mergekit's own merge fails on the same "
        "checkpoints too.",
        "",
        "| model_type | class | status | stack / reason |",
        "|---|---|---|---|",
    ]
    for r in results:
        # the refusal's first sentence (tensor names hold no ". "); `plan` prints the whole paragraph
        what = (
            f"`{r.stack}`" if r.status == "verified" else r.detail.split(". ")[0].rstrip(".").replace("|", "\\|") + "."
        )
        if r.status == "verified" and not r.case.definition:
            what += " (no mergekit definition: the layout mergekit infers from the weights)"
        lines.append(f"| `{r.case.model_type}` | `{r.case.architecture}` | {r.status} | {what} |")
    lines += [
        "",
        "## Not in the matrix",
        "",
        "mergekit 0.1.5 definitions the matrix does not build:",
        "",
        "| model_type | architectures | why |",
        "|---|---|---|",
    ]
    for model_type, archs, why in not_in_matrix():
        lines.append(f"| `{model_type}` | {archs} | {why} |")
    lines.append("")
    lines += NOTES
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import tempfile

    only = [a for a in argv if not a.startswith("--")]
    results, start = [], time.perf_counter()
    for case in cases():
        if only and case.model_type not in only:
            continue
        with tempfile.TemporaryDirectory() as root:
            try:
                result = run_case(case, root)
            except Exception as error:  # the docs say what failed; the test fails on it
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                result = Result(case, "failed", f"{type(error).__name__}: {first[:300]}")
        results.append(result)
        print(f"{result.status:9s} {result.seconds:5.1f}s {case.id}  {result.stack or result.detail[:150]}", flush=True)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s")
    if "--write-docs" in argv and not only:
        with open(DOCS, "w") as f:
            f.write(write_docs(results, total))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --- plan-time answers (fast: tiny checkpoints, no merge) ----------------------------------------


def _case(architecture: str) -> Case:
    return next(c for c in cases() if c.architecture == architecture)


def _header_only(path: str) -> None:
    """Cut every safetensors file after its header: names stay readable, no tensor data is left."""
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            full = os.path.join(path, f)
            with open(full, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                head = fh.read(n)
            with open(full, "wb") as fh:
                fh.write(n.to_bytes(8, "little") + head)


def test_filter_matching_nothing_warns_with_real_names(tmp_path):
    from mergekit_partition_slerp.planning import build_plan

    paths = build_models(_case("GPT2LMHeadModel"), str(tmp_path))
    names = list(safetensors_dir(paths["base"]))
    raw = recipe(paths, "self_attn")  # the Eleusis filter; GPT-2 calls it `attn`
    for p in paths.values():
        _header_only(p)
    warnings = build_plan(raw).warnings
    hits = [w for w in warnings if "'self_attn'" in w]
    assert len(hits) == 2, warnings  # once for t, once for drop_rate
    suggested = re.findall(r"'([^']+)'", hits[0].split("Did you mean", 1)[1])
    assert suggested and all(any(s in n for n in names) for s in suggested), hits[0]
    assert any(s in ("attn", "c_attn") for s in suggested), hits[0]
    assert not [w for w in build_plan(recipe(paths, "attn")).warnings if "filter" in w]


def test_missing_tensors_refused_from_headers_alone(tmp_path):
    from mergekit_partition_slerp.planning import ConfigError, build_plan

    paths = build_models(_case("GPTNeoXForCausalLM"), str(tmp_path))
    names = set(safetensors_dir(paths["base"]))
    assert "gpt_neox.layers.0.attention.bias" not in names  # transformers 5 no longer saves the buffer
    for p in paths.values():
        _header_only(p)
    with pytest.raises(ConfigError) as error:
        build_plan(recipe(paths, "attention"))
    message = str(error.value)
    assert "\n" not in message and paths["base"] in message
    assert "gpt_neox.layers.0.attention.bias" in message and "required" in message


@pytest.mark.slow
def test_moe_per_expert_checkpoints_merge_under_fused_output_names(tmp_path):
    from mergekit_partition_slerp.planning import build_plan

    case = _case("MixtralForCausalLM")
    paths = build_models(case, str(tmp_path))
    on_disk = safetensors_dir(paths["base"])
    # transformers 5 saves Mixtral per expert (the hub layout) and fuses the experts when loading
    assert any(".block_sparse_moe.experts.0.w1." in n for n in on_disk)
    model_names = set(with_converted(case, paths["base"], {}))
    raw = recipe(paths, "self_attn")
    plan = build_plan(raw)
    converted = [w for w in plan.warnings if "gate_up_proj" in w]
    assert converted and "rowwise" in converted[0], plan.warnings
    assert not [w for w in plan.warnings if "does not know" in w], plan.warnings
    assert "experts.gate_up_proj" in plan.layers[0]["t"] or "mlp.experts.gate_up_proj" in plan.layers[0]["t"]
    with _quiet():
        plain_merge(raw, str(tmp_path / "plain"))
        run_cli_path(raw, str(tmp_path), str(tmp_path / "run"))
    plain, ran = safetensors_dir(str(tmp_path / "plain")), safetensors_dir(str(tmp_path / "run"))
    assert set(plain) == set(ran) and set(plain) <= model_names
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in plain)
    assert all(torch.equal(plain[k], ran[k]) for k in plain)
