"""unet.py against diffusers' UNet2DConditionModel (the oracle), on random perturbed weights."""
import json

import pytest
import torch
from conftest import TINY_UNET, TINY_UNET_3LEVEL, perturb_

import ops
from checkpoint import unet_from_config
from unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

# SD-1.5's unet/config.json as published (hand-written, diffusers 0.6.0 era: 17 keys + 2 metadata).
SD15_UNET_JSON = """{
  "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"""


def diffusers_and_ours(config, seed=0):
    torch.manual_seed(seed)
    ref = perturb_(diffusers.UNet2DConditionModel(**config), seed).eval()
    ours = unet_from_config(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("config", [TINY_UNET, TINY_UNET_3LEVEL], ids=["2level", "3level"])
def test_unet_matches_diffusers_for_every_timestep_form_on_non_square_batches(config):
    ref, ours = diffusers_and_ours(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 16, generator=g)  # non-square latents, batch 3
    text = torch.randn(3, 7, config["cross_attention_dim"], generator=g)
    for t in (17, torch.tensor(640), torch.tensor([1, 500, 999]), torch.tensor([3.0, 250.5, 981.0])):
        with torch.no_grad():
            expected = ref(x, t, text).sample
            got = ours(x, t, text)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_unet_matches_diffusers_on_odd_latent_sides():
    ref, ours = diffusers_and_ours(TINY_UNET)
    x, text = torch.randn(2, 4, 9, 13), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = ref(x, 5, text).sample
        torch.testing.assert_close(ours(x, 5, text), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_sd15_unet_has_diffusers_parameter_names_shapes_and_count():
    with torch.device("meta"):  # no memory, no time
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in json.loads(SD15_UNET_JSON).items()
                                                if not k.startswith("_")})
        ours = UNet()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964


def test_from_config_reads_a_diffusers_saved_config(tmp_path):
    with torch.device("meta"):
        diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_config(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert len(saved) > 45  # save_pretrained writes every __init__ argument
    with torch.device("meta"):  # building SD-1.5 for real would cost seconds and 3.4 GB
        assert unet_from_config(saved).config == UNetConfig()
    small = unet_from_config({**saved, **TINY_UNET}).config
    assert small.block_out_channels == (32, 64) and small.attention_head_dim == 2


def test_from_config_reads_the_hand_written_sd15_config():
    with torch.device("meta"):
        assert unet_from_config(json.loads(SD15_UNET_JSON)).config == UNetConfig()


@pytest.mark.parametrize("key, value", [
    ("use_linear_projection", True), ("class_embed_type", "timestep"), ("upcast_attention", True),
    ("transformer_layers_per_block", 2), ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("act_fn", "gelu"), ("not_a_unet_key", 1)])
def test_from_config_rejects_unimplemented_features_naming_key_and_value(key, value):
    with pytest.raises(ValueError) as err:
        unet_from_config({**TINY_UNET, key: value})
    assert key in str(err.value) and repr(value if not isinstance(value, list) else value[0]) in str(err.value)


def second_order_grads(unet, checkpointing):
    """grads of ||d/d eps sum(u * unet(x(eps)))|| w.r.t. the weights: the regularizer's pattern (Eq. 10)."""
    unet.enable_gradient_checkpointing(checkpointing)
    unet.zero_grad()
    calls = []
    hook = unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(3)
    x0, u = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    eps = torch.randn(2, 4, 4, 4, generator=g).requires_grad_()
    text = torch.randn(2, 5, 32, generator=g)
    with ops.double_backward():
        x_t = 0.8 * x0 + 0.6 * eps
        (grad,) = torch.autograd.grad((unet(x_t, torch.tensor([10, 700]), text) * u).sum(), eps,
                                      create_graph=True)
    grad.norm().backward()
    hook.remove()
    # biases that only shift the output (e.g. conv_out.bias) have no second-order gradient: None
    return {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}, len(calls)


def test_double_backward_gives_finite_nonzero_grads_and_checkpointing_does_not_change_them():
    torch.manual_seed(0)
    unet = perturb_(unet_from_config(TINY_UNET)).double().train()
    torch.set_default_dtype(torch.float64)
    try:
        plain, plain_calls = second_order_grads(unet, checkpointing=False)
        ckpt, ckpt_calls = second_order_grads(unet, checkpointing=True)
    finally:
        torch.set_default_dtype(torch.float32)
    assert plain_calls == 1 and ckpt_calls > 1  # checkpointing really recomputed the block
    for name, grad in plain.items():
        assert torch.isfinite(grad).all(), name
    # every layer on the eps path gets a second-order gradient (conv_in included)
    for name in ("conv_in.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.weight"):
        assert plain[name].abs().sum() > 0, name
    assert ckpt.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)
