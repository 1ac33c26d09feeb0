"""LoRA: exact at injection, the official file layout (diffusers loads our files and agrees), hand-merged
weights agree, kohya and peft files load, merge/unmerge round-trips, bad files say what is wrong."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from checkpoint import unet_from_config
from conftest import TINY_UNET, perturb_
from lora import (LoRALayer, freeze_all_but_lora, inject_lora, load_lora, lora_layers, lora_parameters,
                  lora_state_dict, merge_lora, save_lora, set_lora_scale, unmerge_lora)

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def reference():
    """(diffusers UNet2DConditionModel with random weights, our UNet holding the same weights)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    theirs = perturb_(UNet2DConditionModel(**TINY_UNET)).eval()
    ours = unet_from_config(TINY_UNET).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.fixture
def ours(reference):
    return copy.deepcopy(reference[1])


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 5, TINY_UNET["cross_attention_dim"], generator=g)
    return x, torch.tensor([10, 700]), cond


@torch.no_grad()
def run(model):
    out = model(*inputs())
    return getattr(out, "sample", out)  # diffusers returns an output object


def randomize_lora_(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def attention_modules(model):
    return [name for name, _ in model.named_modules() if name.endswith((".attn1", ".attn2"))]


def hand_merged(model, updates):
    """A copy of `model` (a model without LoRA layers) with W += scale * up @ down done by hand.
    updates: {module name: (down, up, scale)}; a conv's down/up are [r, in, kh, kw] / [out, r, 1, 1]."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, (down, up, scale) in updates.items():
            w = merged.get_submodule(name).weight
            delta = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)  # [out, in]
            w += delta.reshape(w.shape)
    return merged


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_injection_wraps_every_attention_projection_and_leaves_the_output_unchanged(ours):
    before = run(ours)
    params = inject_lora(ours, rank=4)
    layers = lora_layers(ours)
    want = {f"{attn}.{p}" for attn in attention_modules(ours) for p in PROJECTIONS}
    assert len(attention_modules(ours)) == 8  # TINY_UNET: 4 transformer blocks (1 down, 1 mid, 2 up)
    assert set(layers) == want
    assert len(params) == 2 * len(want) and all(p.dtype == torch.float32 for p in params)
    named = dict(ours.named_parameters())
    assert {n for n, p in named.items() if any(p is q for q in params)} == {
        n for n in named if "lora" in n}
    ups = torch.cat([layer.lora_up.weight.flatten() for layer in layers.values()])
    downs = torch.cat([layer.lora_down.weight.flatten() for layer in layers.values()])
    assert ups.abs().max() == 0
    assert downs.std().item() == pytest.approx(1 / 4, rel=0.05)  # official init N(0, 1/r^2)
    assert torch.equal(run(ours), before)


def test_base_state_dict_keys_survive_injection(ours):
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_lora(ours, rank=4)
    sd = ours.state_dict()
    lora_keys = {k for k in sd if "lora" in k}
    assert set(sd) - lora_keys == set(base)
    missing, unexpected = ours.load_state_dict(base, strict=False)
    assert set(missing) == lora_keys and not unexpected


def test_saved_file_has_exactly_the_official_key_set(ours, tmp_path):
    from safetensors import safe_open
    inject_lora(ours, rank=4)
    randomize_lora_(ours)
    save_lora(ours, tmp_path / "smooth_lora.safetensors")
    with safe_open(str(tmp_path / "smooth_lora.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    want = {f"{attn}.processor.{p}_lora.{part}.weight" for attn in attention_modules(ours)
            for p in ("to_q", "to_k", "to_v", "to_out") for part in ("down", "up")}
    assert set(saved) == want and all(t.dtype == torch.float32 for t in saved.values())
    for attn in attention_modules(ours):
        for proj in PROJECTIONS:
            base = ours.get_submodule(f"{attn}.{proj}")
            prefix = f"{attn}.processor.{proj.split('.')[0]}_lora"  # to_out.0 -> to_out_lora
            assert tuple(saved[f"{prefix}.down.weight"].shape) == (4, base.in_features)
            assert tuple(saved[f"{prefix}.up.weight"].shape) == (base.out_features, 4)


def test_diffusers_loads_our_official_file_and_gives_our_output(reference, ours, tmp_path):
    theirs = copy.deepcopy(reference[0])
    inject_lora(ours, rank=4)
    randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora.safetensors")
    theirs.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix=None)
    assert (run(theirs) - run(reference[0])).abs().max() > 1e-2  # the LoRA does something
    assert_close(run(ours), run(theirs))


def test_diffusers_loads_our_peft_file_with_alpha_and_gives_our_output(reference, ours, tmp_path):
    theirs = copy.deepcopy(reference[0])
    inject_lora(ours, rank=4, alpha=2.0)  # scale 0.5, folded into up in the file
    randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora.safetensors", layout="peft")
    theirs.load_lora_adapter(str(tmp_path / "lora.safetensors"), prefix="unet")
    assert_close(run(ours), run(theirs))


def test_hand_merged_weights_give_our_output(ours):
    inject_lora(ours, rank=4, alpha=8.0)
    randomize_lora_(ours)
    set_lora_scale(ours, 0.7)  # scale = 0.7 * 8 / 4
    updates = {name: (layer.lora_down.weight, layer.lora_up.weight, 0.7 * 8 / 4)
               for name, layer in lora_layers(ours).items()}
    plain = unet_from_config(TINY_UNET).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora" not in k})
    assert_close(run(ours), run(hand_merged(plain, updates)))


def test_merge_and_unmerge_round_trip_the_base_weights(ours):
    inject_lora(ours, rank=4)
    randomize_lora_(ours)
    base = {k: v.clone() for k, v in ours.state_dict().items() if "lora" not in k}
    with_lora = run(ours)
    merge_lora(ours)
    assert all(layer.merged for layer in lora_layers(ours).values())
    assert not torch.equal(ours.state_dict()["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                           base["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"])
    assert_close(run(ours), with_lora)
    set_lora_scale(ours, 0.0)  # re-merges at the new scale: back to the base model
    plain = unet_from_config(TINY_UNET).eval()
    plain.load_state_dict(base)
    assert_close(run(ours), run(plain))
    unmerge_lora(ours)
    for k, v in base.items():
        assert torch.equal(ours.state_dict()[k], v), k  # bit for bit


def test_freeze_all_but_lora_leaves_only_lora_trainable(ours):
    inject_lora(ours, rank=4)
    params = freeze_all_but_lora(ours)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(ours.named_parameters()) if "lora" in n}
    assert len(params) == len(trainable)


def test_official_file_round_trips_and_takes_its_rank_from_the_file(ours, reference, tmp_path):
    inject_lora(ours, rank=4)
    randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora.safetensors")
    fresh = copy.deepcopy(reference[1])
    loaded = load_lora(fresh, tmp_path / "lora.safetensors")
    assert set(loaded) == set(lora_layers(ours))
    assert all(layer.rank == 4 for layer in lora_layers(fresh).values())
    assert_close(run(fresh), run(ours))
    load_lora(fresh, tmp_path / "lora.safetensors", scale=0.0)
    assert_close(run(fresh), run(reference[1]))


def test_loading_into_injected_layers_of_the_same_rank_keeps_the_parameters(ours, tmp_path):
    params = inject_lora(ours, rank=4)
    randomize_lora_(ours)
    save_lora(ours, tmp_path / "lora.safetensors")
    want = run(ours)
    with torch.no_grad():
        for p in params:
            p.zero_()
    load_lora(ours, tmp_path / "lora.safetensors")
    assert all(a is b for a, b in zip(params, lora_parameters(ours)))  # an optimizer stays valid
    assert_close(run(ours), want)


def kohya_name(module):
    return "lora_unet_" + module.replace(".", "_")


def test_kohya_file_loads_with_alpha_convs_and_reports_text_encoder_keys(ours, tmp_path):
    g = torch.Generator().manual_seed(3)
    attn = "up_blocks.1.attentions.0.transformer_blocks.0"
    specs = {  # module: (rank, alpha or None)
        f"{attn}.attn1.to_q": (4, 2.0),
        f"{attn}.attn2.to_out.0": (2, None),  # no alpha: alpha = rank
        f"{attn}.ff.net.2": (3, 6.0),
        "up_blocks.1.attentions.0.proj_in": (4, 1.0),  # a 1x1 Conv2d in SD-1.5
        "down_blocks.0.resnets.0.conv1": (2, 3.0),  # a 3x3 Conv2d (LoCon): up stays 1x1
    }
    sd, updates = {}, {}
    for module, (r, alpha) in specs.items():
        base = ours.get_submodule(module)
        if isinstance(base, nn.Conv2d):
            down = torch.randn(r, base.in_channels, *base.kernel_size, generator=g) * 0.3
            up = torch.randn(base.out_channels, r, 1, 1, generator=g) * 0.3
        else:
            down = torch.randn(r, base.in_features, generator=g) * 0.3
            up = torch.randn(base.out_features, r, generator=g) * 0.3
        sd[kohya_name(module) + ".lora_down.weight"], sd[kohya_name(module) + ".lora_up.weight"] = down, up
        if alpha is not None:
            sd[kohya_name(module) + ".alpha"] = torch.tensor(alpha)
        updates[module] = (down, up, (r if alpha is None else alpha) / r)
    for i in range(3):
        sd[f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    save_file(sd, str(tmp_path / "kohya.safetensors"))

    want = run(hand_merged(ours, updates))
    with pytest.warns(UserWarning, match="ignored 3 text-encoder"):
        loaded = load_lora(ours, tmp_path / "kohya.safetensors")
    assert set(loaded) == set(specs)
    assert_close(run(ours), want)


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_peft_file_loads_with_or_without_prefix_and_alpha_from_metadata(ours, tmp_path, prefix):
    g = torch.Generator().manual_seed(4)
    names = [f"{attn}.{p}" for attn in attention_modules(ours)[:2] for p in PROJECTIONS]
    sd, updates = {}, {}
    for name in names:
        layer = ours.get_submodule(name)
        down = torch.randn(8, layer.in_features, generator=g) * 0.3
        up = torch.randn(layer.out_features, 8, generator=g) * 0.3
        sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = down, up
        updates[name] = (down, up, 16 / 8 if name.endswith("to_k") else 4 / 8)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    config = {"r": 8, "lora_alpha": 4, "alpha_pattern": {"to_k": 16}}
    if prefix:  # a pipeline-level save prefixes the metadata keys too
        config = {f"unet.{k}": v for k, v in config.items()}
    save_file(sd, str(tmp_path / "peft.safetensors"), metadata={"lora_adapter_metadata": json.dumps(config)})

    want = run(hand_merged(ours, updates))
    with pytest.warns(UserWarning, match="ignored 1 text-encoder"):
        load_lora(ours, tmp_path / "peft.safetensors")
    assert_close(run(ours), want)


def official_file(model, rank=4):
    m = copy.deepcopy(model)
    inject_lora(m, rank=rank)
    return lora_state_dict(m)


def test_unknown_module_path_names_the_key(ours):
    sd = official_file(ours)
    bad = "down_blocks.0.attentions.0.transformer_blocks.0.attn3.processor.to_q_lora.down.weight"
    sd[bad] = torch.zeros(4, 32)
    sd[bad.replace(".down.", ".up.")] = torch.zeros(32, 4)
    with pytest.raises(ValueError, match=r"attn3\.processor\.to_q_lora\.down\.weight: the model has no module"):
        load_lora(ours, sd)
    assert not lora_layers(ours)  # nothing was changed


def test_wrong_shape_names_the_key_and_the_expected_shape(ours):
    sd = official_file(ours)
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight"
    sd[key] = torch.zeros(4, 768)  # an SD-1.5 cross-attention LoRA on our tiny config
    with pytest.raises(ValueError, match=rf"{key}: down weight .* shape \(4, 768\), expected \(4, 32\)"):
        load_lora(ours, sd)
    sd = official_file(ours)
    key = key.replace(".down.", ".up.")
    sd[key] = torch.zeros(64, 8)
    with pytest.raises(ValueError, match=rf"{key}: up weight .* shape \(64, 8\), expected \(32, 4\)"):
        load_lora(ours, sd)


def test_file_without_lora_keys_says_so(ours):
    with pytest.raises(ValueError, match="no LoRA keys found"):
        load_lora(ours, {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="only text-encoder"):
        with pytest.warns(UserWarning):
            load_lora(ours, {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1)})


def test_kohya_key_for_a_missing_module_names_the_key(ours):
    with pytest.raises(ValueError, match=r"lora_unet_input_blocks_1_1_proj_in\.alpha: the model has no"):
        load_lora(ours, {"lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0)})


def test_official_layout_refuses_a_non_attention_lora(ours):
    inject_lora(ours, rank=2, targets=("ff.net.2",))
    with pytest.raises(ValueError, match="layout='peft'"):
        lora_state_dict(ours)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in lora_state_dict(ours, layout="peft"))


def test_lora_layer_keeps_the_torch_layer_interface():
    base = nn.Linear(6, 5)
    inject_parent = nn.Sequential(base)
    inject_lora(inject_parent, rank=2, targets=("0",))
    layer = inject_parent[0]
    assert isinstance(layer, nn.Linear) and isinstance(layer, LoRALayer)
    assert layer.weight is base.weight and layer.bias is base.bias


def test_lora_trains_in_fp32_over_a_bf16_base():
    model = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    params = inject_lora(model, rank=2, targets=("0",))
    randomize_lora_(model)
    assert all(p.dtype == torch.float32 for p in params) and model[0].weight.dtype == torch.bfloat16
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    with torch.no_grad():
        want = (x.float() @ (model[0].weight.float() + model[0].delta_weight()).T + model[0].bias.float())
        merge_lora(model)
        torch.testing.assert_close(model(x).float(), want, rtol=2e-2, atol=2e-2)  # bf16 rounding


def test_random_bytes_as_a_lora_file_are_a_value_error_whatever_the_bytes(tmp_path):
    """The unpickler fails in many ways on garbage (IndexError, EOFError, UnpicklingError, ...): all must
    reach the user as one ValueError naming the file (the CLIs turn it into `error:` lines)."""
    unet = torch.nn.Module()
    rng = np.random.default_rng(0)
    for k in range(20):
        path = tmp_path / f"rand{k}.bin"
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 400)), dtype=np.uint8).tobytes())
        with pytest.raises(ValueError, match="not a readable LoRA file"):
            load_lora(unet, path)
