"""Seeded families of small Mistral-architecture checkpoints, built offline.

Used by `mergekit-partition demo`, the tests and the benchmarks: a base and
donors that are the base plus seeded noise, written as safetensors with a
config.json (and, on request, a tokenizer so the merge can generate text).
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

# one string reads as the vocabulary it is; the list form would be one word per line
WORDS = (  # noqa: SIM905
    "the a merge model layer base donor slerp partition seed bin drop rate "
    "hermes eleusis input output attention gradient weight tensor token "
    "hello world you are helpful assistant user system chat template"
).split()


@dataclass
class Shape:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 128


def mistral_config(shape: Shape) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def mistral_state_dict(shape: Shape, generator: torch.Generator, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    h, m, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * (h // shape.num_attention_heads)

    def w(*size, scale=0.05):
        return (torch.randn(*size, generator=generator) * scale).to(dtype)

    sd = {
        "model.embed_tokens.weight": w(v, h),
        "model.norm.weight": (1 + w(h, scale=0.01).float()).to(dtype),
        "lm_head.weight": w(v, h),
    }
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": (1 + w(h, scale=0.01).float()).to(dtype),
                p + "post_attention_layernorm.weight": (1 + w(h, scale=0.01).float()).to(dtype),
                p + "self_attn.q_proj.weight": w(h, h),
                p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h),
                p + "self_attn.o_proj.weight": w(h, h),
                p + "mlp.gate_proj.weight": w(m, h),
                p + "mlp.up_proj.weight": w(m, h),
                p + "mlp.down_proj.weight": w(h, m),
            }
        )
    return sd


def write_checkpoint(path: str, config: dict, state_dict: dict[str, torch.Tensor], shards: int = 1) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = list(state_dict)
    if shards == 1:
        save_file(state_dict, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state_dict[n].contiguous() for n in names[s * per : (s + 1) * per]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level fast tokenizer with a ChatML-ready special-token set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in WORDS:
        if len(vocab) < vocab_size:
            vocab.setdefault(word, len(vocab))
    # fill up to the model's vocab_size so mergekit keeps every embedding row
    while len(vocab) < vocab_size:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.save_pretrained(path)


def build_family(
    root: str,
    donors: int = 3,
    shape: Shape | None = None,
    seed: int = 0,
    noise: float = 0.02,
    tokenizer: bool = False,
    dtype=torch.bfloat16,
    shards: int = 1,
) -> dict[str, str]:
    """Write base + donors under root; returns {"base": path, "donor0": path, ...}.

    Donor k is the base plus seeded Gaussian noise, so slerp sees realistic,
    highly correlated weights (cosines near 1, as between fine-tunes).
    """
    shape = shape or Shape()
    config = mistral_config(shape)
    g = torch.Generator().manual_seed(seed)
    base = mistral_state_dict(shape, g, dtype)
    paths = {"base": os.path.join(root, "base")}
    write_checkpoint(paths["base"], config, base, shards)
    for k in range(donors):
        gk = torch.Generator().manual_seed(seed * 1000 + k + 1)
        sd = {n: (x.float() + torch.randn(x.shape, generator=gk) * noise).to(dtype) for n, x in base.items()}
        name = f"donor{k}"
        paths[name] = os.path.join(root, name)
        write_checkpoint(paths[name], config, sd, shards)
    if tokenizer:
        for p in paths.values():
            write_tokenizer(p, shape.vocab_size)
    return paths


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fname)))
        elif fname.endswith(".bin"):
            out.update(torch.load(os.path.join(path, fname), weights_only=True))
    return out
