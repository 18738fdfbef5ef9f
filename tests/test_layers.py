"""Which tensor is which layer (DESIGN §3.2): names and in-memory ids, and mergekit's architecture info.

Expectations are written out by hand from DESIGN §3.2 ("the stack key is the tensor
name before `.{i}.`"; in memory, "the first dot-separated integer component").
"""

import pytest

from mergekit_partition_slerp.layers import LayerError, LayerInfo, layer_from_name, locate, stack_key

from helpers import MISTRAL_LAYER_TENSORS, MISTRAL_NON_LAYER


@pytest.mark.parametrize(
    "name,index,stack",
    [
        ("model.layers.0.self_attn.q_proj.weight", 0, "model.layers"),
        ("model.layers.31.mlp.down_proj.weight", 31, "model.layers"),
        ("transformer.h.11.attn.c_attn.weight", 11, "transformer.h"),
        ("gpt_neox.layers.3.attention.dense.weight", 3, "gpt_neox.layers"),
        # the index also appears further on: the stack ends at its first occurrence
        ("model.layers.2.block_sparse_moe.experts.2.w1.weight", 2, "model.layers"),
        # a smaller integer component after the index does not count
        ("model.layers.10.mlp.experts.1.w2.weight", 10, "model.layers"),
        ("0.weight", 0, ""),
    ],
)
def test_stack_key(name, index, stack):
    assert stack_key(name, index) == stack


@pytest.mark.parametrize(
    "name,index",
    [
        ("model.layers.3.mlp.up_proj.weight", 4),
        ("model.embed_tokens.weight", 0),
        ("model.layers.13.mlp.up_proj.weight", 1),  # "13" is not "1"
        ("model.layers.01.mlp.up_proj.weight", 1),  # nor is "01"
    ],
)
def test_stack_key_without_the_index_names_tensor_and_index(name, index):
    with pytest.raises(LayerError, match=rf"tensor '{name}' does not contain its layer index {index}"):
        stack_key(name, index)


def test_layer_error_is_a_value_error():
    # callers (and mergekit's error reporting) catch ValueError
    assert issubclass(LayerError, ValueError)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", ("model.layers", 0)),
        ("model.layers.27.post_attention_layernorm.weight", ("model.layers", 27)),
        ("transformer.h.5.mlp.c_fc.bias", ("transformer.h", 5)),
        ("model.layers.4.block_sparse_moe.experts.7.w3.weight", ("model.layers", 4)),
        ("12.weight", ("", 12)),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.norm.weight", None),
        ("model.layers.x1.weight", None),  # "x1" is not an integer component
        ("model.layers.-1.weight", None),  # nor is "-1"
        ("model.layers", None),
        ("", None),
        (None, None),
    ],
)
def test_layer_from_name(name, expected):
    assert layer_from_name(name) == expected


# ---------------------------------------------------------------- locate, in-memory ids


@pytest.mark.parametrize("base_id", ["base", 0, None])
def test_locate_in_memory_layer_tensor(base_id):
    got = locate("model.layers.3.mlp.up_proj.weight", base_id, 8)
    assert got == LayerInfo(stack="model.layers", index=3, num_layers=8)


@pytest.mark.parametrize("index", [0, 7])
def test_locate_in_memory_first_and_last_layer(index):
    assert locate(f"transformer.h.{index}.attn.c_proj.weight", "base", 8) == LayerInfo("transformer.h", index, 8)


@pytest.mark.parametrize("num_layers", [None, 8])
@pytest.mark.parametrize("name", [*MISTRAL_NON_LAYER, None])
def test_locate_in_memory_non_layer_tensor_is_none(name, num_layers):
    # outside any layer: the base's tensor, and no layer count needed
    assert locate(name, "base", num_layers) is None


def test_locate_in_memory_needs_num_layers():
    with pytest.raises(LayerError) as error:
        locate("model.layers.5.mlp.up_proj.weight", "base", None)
    message = str(error.value)
    assert "'model.layers.5.mlp.up_proj.weight'" in message and "layer 5" in message
    assert "num_layers=" in message
    assert "\n" not in message


@pytest.mark.parametrize("index,num_layers", [(8, 8), (9, 8), (1, 1)])
def test_locate_in_memory_index_out_of_range(index, num_layers):
    name = f"model.layers.{index}.mlp.up_proj.weight"
    with pytest.raises(LayerError, match=rf"tensor '{name}' is layer {index} but num_layers is {num_layers}$"):
        locate(name, "base", num_layers)


# ---------------------------------------------------------------- locate, ModelReference (mergekit's architecture)


@pytest.fixture(scope="module")
def base_ref(family):
    from mergekit.common import ModelReference

    return ModelReference.parse(family["base"])


def test_locate_model_reference_finds_every_layer_tensor(base_ref):
    # the family is 8-layer Mistral: every tensor of layer i is layer i of model.layers
    for i in range(8):
        for suffix in MISTRAL_LAYER_TENSORS:
            for num_layers in (None, 8):
                assert locate(f"model.layers.{i}.{suffix}", base_ref, num_layers) == LayerInfo("model.layers", i, 8)


@pytest.mark.parametrize("name", [*MISTRAL_NON_LAYER, "model.layers.8.mlp.up_proj.weight", "not.a.tensor.3"])
def test_locate_model_reference_other_names_are_not_layers(base_ref, name):
    # mergekit's architecture decides: a name it does not list as a layer weight is no layer,
    # even one that looks like layer 8 of an 8-layer model
    assert locate(name, base_ref, None) is None


def test_locate_model_reference_refuses_another_layer_count(base_ref):
    with pytest.raises(LayerError, match=rf"^num_layers is 6 but base model {base_ref} has 8 layers$"):
        locate("model.layers.0.mlp.up_proj.weight", base_ref, 6)


def test_locate_model_reference_refuses_multi_module_base(tmp_path):
    from mergekit.common import ModelReference
    from transformers import Mistral3Config

    Mistral3Config(architectures=["Mistral3ForConditionalGeneration"]).save_pretrained(tmp_path)
    ref = ModelReference.parse(str(tmp_path))
    with pytest.raises(LayerError) as error:
        locate("language_model.model.layers.0.mlp.up_proj.weight", ref, None)
    message = str(error.value)
    assert "multi-module" in message and str(ref) in message and "vision_tower" in message


def test_locate_model_reference_unknown_architecture(tmp_path):
    import json

    from mergekit.common import ModelReference

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["NoSuchModelForCausalLM"], "model_type": "llama"})
    )
    ref = ModelReference.parse(str(tmp_path))
    with pytest.raises(LayerError, match="NoSuchModelForCausalLM") as error:
        locate("model.layers.0.mlp.up_proj.weight", ref, None)
    assert str(ref) in str(error.value)
