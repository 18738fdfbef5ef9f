"""The method through mergekit's in-memory API, and its registration."""

import os
import subprocess
import sys

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from helpers import (
    assert_close_to_ref,
    check_merge,
    eleusis_like,
    load_state_dict,
    mergekit_yaml,
    ref_layer_bins,
    ref_slerp64,
    write_config,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_single_donor_matches_mergekit_slerp():
    a, b = rand(64, 32), rand(64, 32, seed=1)
    ours = merge_tensors(
        [a, b],
        "partition_slerp",
        parameters={"t": 0.5, "num_layers": 1},
        base_index=0,
        name="model.layers.0.mlp.up_proj.weight",
    )
    theirs = merge_tensors([a, b], "slerp", parameters={"t": 0.5}, base_index=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gradient_lists_use_mergekit_interpolation_and_partition():
    a, b, c = rand(16, 8), rand(16, 8, seed=1), rand(16, 8, seed=2)
    L, seed = 6, 4
    bins = ref_layer_bins("model.layers", L, 2, seed)
    for layer in range(L):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        out = merge_tensors(
            [a, b, c],
            "partition_slerp",
            base_index=0,
            name=name,
            parameters={"t": {1: [1, 0], 2: [0.2, 0.6, 1.0]}, "num_layers": L, "seed": seed},
        )
        pos = layer / (L - 1)
        if bins[layer] == 0:
            donor, t = b, 1 - pos
        else:
            scaled = pos * 2
            i0 = int(scaled)
            t = [0.2, 0.6, 1.0][i0] * (1 - (scaled - i0)) + [0.2, 0.6, 1.0][min(2, i0 + 1)] * (scaled - i0)
            donor = c
        assert_close_to_ref(out, ref_slerp64(a, donor, t), a, donor, name)


def test_non_layer_tensor_is_the_base_bit_for_bit():
    a, b = rand(10, 4).bfloat16(), rand(10, 4, seed=1).bfloat16()
    out = merge_tensors(
        [a, b], "partition_slerp", parameters={"t": 0.7}, base_index=0, name="model.embed_tokens.weight"
    )
    assert torch.equal(out.view(torch.int16), a.view(torch.int16))


@pytest.mark.parametrize(
    "params,name,match",
    [
        ({"t": 0.5}, "model.layers.0.mlp.up_proj.weight", "num_layers"),
        ({"t": 0.5, "num_layers": 2, "bins": 3}, "model.layers.0.mlp.up_proj.weight", "bins is 3"),
        ({"t": 0.5, "num_layers": 2}, "model.layers.5.mlp.up_proj.weight", "layer 5"),
        ({"t": 1.5, "num_layers": 2}, "model.layers.0.mlp.up_proj.weight", "less than or equal to 1"),
        ({"t": 0.5, "drop_rate": 1.0, "num_layers": 2}, "model.layers.0.mlp.up_proj.weight", "less than 1"),
        ({"t": 0.5, "seed": -1, "num_layers": 2}, "model.layers.0.mlp.up_proj.weight", "greater than or equal to 0"),
    ],
)
def test_bad_parameters_are_refused(params, name, match):
    a, b = rand(4, 4), rand(4, 4, seed=1)
    with pytest.raises(Exception, match=match):
        merge_tensors([a, b], "partition_slerp", parameters=params, base_index=0, name=name)


def test_nan_in_donor_names_model_and_tensor():
    a, b = rand(4, 4), rand(4, 4, seed=1)
    b[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight of donor model donor-x"):
        merge_tensors(
            [a, b],
            "partition_slerp",
            ids=["base", "donor-x"],
            parameters={"t": 0.5, "num_layers": 1},
            base_index=0,
            name="model.layers.0.mlp.up_proj.weight",
        )


@pytest.mark.slow  # mergekit-yaml in a subprocess
def test_merge_state_dicts_matches_yaml_path(family, tmp_path):
    cfg = eleusis_like(family, alias=False, bins=4, seed=2)
    path = write_config(tmp_path / "r.yml", cfg)
    proc = mergekit_yaml(path, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_merge(path, str(tmp_path / "out"), 8)  # the YAML path against the float64 reference
    yaml_out = load_state_dict(str(tmp_path / "out"))
    sds = {"base": load_state_dict(family["base"])}
    for k in range(4):
        sds[f"d{k}"] = load_state_dict(family[f"donor{k}"])
    copies = {k: {n: t.clone() for n, t in sd.items()} for k, sd in sds.items()}
    t_attn = 0.03
    # per-donor gradient lists, resolved by the method; self_attn tensors get 0.03
    out = {}
    for name in sds["base"]:
        t = [t_attn] * 4 if "self_attn" in name else [[0, 1], [1, 0], [0, 1], [1, 0]]
        p = 0.28 if "self_attn" in name else 0.0
        out.update(
            merge_state_dicts(
                {k: {name: sd[name]} for k, sd in sds.items()},
                "partition_slerp",
                base="base",
                parameters={"t": t, "drop_rate": p, "bins": 4, "seed": 2, "num_layers": 8},
            )
        )
    for name, x in yaml_out.items():
        assert torch.equal(out[name].view(torch.int16), x.view(torch.int16)), name
    for k, sd in sds.items():  # inputs never mutated
        assert all(torch.equal(sd[n], copies[k][n]) for n in sd)


def run_py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_plain_mergekit_finds_method_without_import():
    proc = run_py("from mergekit.merge_methods import get; print(get('partition_slerp').spec.pretty_name)")
    assert proc.returncode == 0 and proc.stdout.strip() == "Partition SLERP", proc.stderr


def test_startup_imports_neither_torch_nor_mergekit():
    proc = run_py(
        "import sys\n"
        "print(any(m.split('.')[0] in ('torch', 'mergekit', 'numpy') for m in sys.modules),"
        " 'mergekit_partition_slerp._autoload' in sys.modules)"
    )
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_in_memory_merge_imports_no_peft_or_transformers():
    # mergekit.common imports peft and transformers (2-3 s); mergekit's own
    # merge_tensors does not need it, and neither may the first tensor we merge
    code = (
        "import sys, torch\n"
        "from mergekit.merge_methods import merge_tensors\n"
        "a = torch.randn(64, 64).bfloat16()\n"
        "merge_tensors([a, a + 1], 'partition_slerp', parameters={'t': 0.5, 'num_layers': 2},"
        " base_index=0, name='model.layers.1.mlp.up_proj.weight')\n"
        "print([m for m in ('mergekit.common', 'peft', 'transformers') if m in sys.modules])\n"
    )
    proc = run_py(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_import_package_registers_and_twice_is_harmless():
    code = (
        "import mergekit.merge_methods as mm, importlib\n"
        "import mergekit_partition_slerp\n"
        "from mergekit_partition_slerp import method\n"
        "method.register(); method.register()\n"
        "names = [m.spec.name for m in mm.registered_methods()]\n"
        "print(names.count('partition_slerp'))\n"
    )
    proc = run_py(code)
    assert proc.stdout.strip() == "1", proc.stderr


def test_method_module_imported_first_still_registers():
    proc = run_py(
        "import mergekit_partition_slerp.method\n"
        "from mergekit.merge_methods import get\n"
        "get('partition_slerp')\n"
        "print('ok')"
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_installed_distribution_ships_the_pth_hook():
    from importlib.metadata import files

    pth = [f for f in files("mergekit-partition-slerp") if f.name == "mergekit_partition_slerp.pth"]
    assert pth, "the wheel must install mergekit_partition_slerp.pth at site-packages root"
    assert pth[0].read_text().strip() == "import mergekit_partition_slerp._autoload"


def test_in_memory_num_layers_is_checked_against_the_tensors():
    from mergekit_partition_slerp.family import Shape, mistral_state_dict

    g = torch.Generator().manual_seed(0)
    base = mistral_state_dict(Shape(num_hidden_layers=3), g)
    donor = {k: v + 0.01 for k, v in base.items()}
    models = {"base": base, "a": donor}
    for wrong in (32, 2):
        with pytest.raises(
            Exception, match=f"num_layers = {wrong}, but the tensors given hold 3 layers of model.layers"
        ):
            merge_state_dicts(models, "partition_slerp", base="base", parameters={"t": 0.5, "num_layers": wrong})
    # a state dict holding only some layers (no embeddings or head) may have fewer layers than num_layers
    part = {k: v for k, v in base.items() if k.startswith("model.layers.0.")}
    merged = merge_state_dicts(
        {"base": part, "a": {k: donor[k] for k in part}},
        "partition_slerp",
        base="base",
        parameters={"t": 1.0, "num_layers": 3},
    )
    assert all(torch.equal(merged[k], donor[k]) for k in part)
