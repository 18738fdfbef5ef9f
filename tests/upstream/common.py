"""Shared helpers for mergekit 0.1.5's own test-suite.

The mergekit 0.1.5 sdist ships ``tests/`` without ``tests/common.py``, which
six of its test modules import (``from tests.common import ...``, directly or
through ``tests.test_tokenizer``). This module is a from-scratch rebuild of the
helpers those tests call, written against what the tests expect:

* ``make_picollama(path, vocab_size=64)``: tiny random Llama causal LM, hidden
  size 32 (the embedding-truncation tests assert ``(vocab, 32)`` shapes),
  untied ``lm_head``, float32, one ``model.safetensors`` file. Returns the path
  as ``str``.
* ``make_picogranite(path)``: the same for Granite.
* ``make_gpt2size(path)``: a GPT-2 with GPT-2's layer count (12, the
  layer-stacking test relies on it) but tiny width, so it is fast.
* ``make_picoLlaVa(path)``: tiny LLaVA (CLIP vision tower + Llama text model);
  mergekit has no JSON definition for it, so merges use inferred architectures.
* ``run_and_check_merge(config, validate=None, auto_arch=False, ...)``: run a
  merge into a temporary directory, check that a config and weights were
  written, that every required tensor of the architecture is present and that
  no floating tensor is NaN/inf, then call ``validate(output_path)``.

Nothing here touches the network: every checkpoint is generated locally.
It is copied to ``<extracted sdist>/tests/common.py`` by
``run_mergekit_suite.py``.
"""

import itertools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union

import torch
from mergekit.architecture import ConfiguredModelArchitecture, arch_info_for_config
from mergekit.architecture.auto import infer_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

PathLike = Union[str, os.PathLike]  # noqa: UP007 (a runtime alias)

# Each generated checkpoint gets its own seed, so two fixtures built with the
# same helper hold different weights, yet a run is reproducible.
_SEEDS = itertools.count(1234)

# Small but not degenerate: several heads, a real MLP, two layers.
_TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _save_random_model(model_cls, config, path: PathLike) -> str:
    """Instantiate ``model_cls(config)`` with fresh random weights and save it
    as a float32 safetensors checkpoint (config.json + model.safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(next(_SEEDS))
        model = model_cls(config).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    if not (path / "config.json").exists():
        raise RuntimeError(f"{model_cls.__name__} checkpoint at {path} has no config")
    return str(path)


def make_picollama(path: PathLike, vocab_size: int = 64) -> str:
    config = LlamaConfig(vocab_size=vocab_size, **_TINY_DECODER)
    return _save_random_model(LlamaForCausalLM, config, path)


def make_picogranite(path: PathLike, vocab_size: int = 64) -> str:
    config = GraniteConfig(vocab_size=vocab_size, **_TINY_DECODER)
    return _save_random_model(GraniteForCausalLM, config, path)


def make_gpt2size(path: PathLike, vocab_size: int = 64) -> str:
    # GPT-2 (small)'s depth; a tiny width keeps it cheap. GPT-2 ties lm_head
    # to wte, so the checkpoint has no lm_head.weight.
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=12,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _save_random_model(GPT2LMHeadModel, config, path)


def make_picoLlaVa(path: PathLike, vocab_size: int = 64) -> str:
    text_config = LlamaConfig(vocab_size=vocab_size, **_TINY_DECODER)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=vocab_size - 1,
        projector_hidden_act="gelu",
    )
    return _save_random_model(LlavaForConditionalGeneration, config, path)


def _has_weights(out_path: str) -> bool:
    names = set(os.listdir(out_path))
    return any(
        name in names
        for name in (
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        )
    )


def _expected_architecture(out_path: str, auto_arch: bool):
    """The architecture the merged checkpoint should follow, with its config."""
    config = AutoConfig.from_pretrained(out_path)
    arch = None if auto_arch else arch_info_for_config(config)
    if arch is None:
        # Bypass the lru_cache: temporary output paths can be reused.
        infer = getattr(infer_architecture_info, "__wrapped__", infer_architecture_info)
        arch = infer((ModelReference.parse(out_path),), None, MergeOptions())
    return ConfiguredModelArchitecture(info=arch, config=config)


def check_output(
    out_path: str,
    *,
    check_nan: bool = True,
    check_tensors: bool = True,
    auto_arch: bool = False,
) -> None:
    assert os.path.exists(os.path.join(out_path, "config.json")), "merge wrote no config.json"
    assert _has_weights(out_path), "merge wrote no model weights"
    loader = LazyTensorLoader.from_disk(out_path)
    present = set(loader.index.tensor_paths)
    assert present, "merged checkpoint holds no tensors"

    if check_tensors:
        arch = _expected_architecture(out_path, auto_arch)
        missing = []
        for weight in arch.all_weights():
            if weight.optional:
                continue
            names = (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))
            if not any(name in present for name in names):
                missing.append(weight.name)
        assert not missing, f"merged checkpoint lacks tensors: {missing}"

    if check_nan:
        for name in sorted(present):
            tensor = loader.get_tensor(name)
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"non-finite values in {name}"


def run_and_check_merge(
    config: MergeConfiguration,
    validate: Callable[[str], None] | None = None,
    *,
    check_nan: bool = True,
    check_tensors: bool = True,
    auto_arch: bool = False,
    options: MergeOptions | None = None,
) -> None:
    """Run ``config`` into a temporary directory, check the result, then hand
    the output path to ``validate``. Merge errors propagate unchanged (some
    tests expect e.g. ``ValueError``)."""
    if options is None:
        options = MergeOptions(quiet=True)
    with tempfile.TemporaryDirectory(prefix="mergekit-out-") as out_path:
        run_merge(config, out_path=out_path, options=options)
        check_output(
            out_path,
            check_nan=check_nan,
            check_tensors=check_tensors,
            auto_arch=auto_arch,
        )
        if validate is not None:
            validate(out_path)
