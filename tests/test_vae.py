"""vae.py against diffusers' AutoencoderKL (the oracle), on random perturbed weights."""
import pytest
import torch
from conftest import TINY_VAE, perturb_

from checkpoint import vae_from_config
from vae import VAE, VAEConfig

diffusers = pytest.importorskip("diffusers")

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)


def close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_vae_encode_and_decode_match_diffusers_on_non_square_images():
    torch.manual_seed(0)
    ref = perturb_(diffusers.AutoencoderKL(**TINY_VAE), scale=0.02).eval()
    ours = vae_from_config(dict(ref.config)).eval()  # diffusers' full config: every key must be accepted
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        mean, logvar = ours.encode(images)
        close(mean, posterior.mean)
        close(logvar, posterior.logvar)
        latents = mean + 0.5 * torch.randn_like(mean)
        close(ours.decode(latents), ref.decode(latents).sample)
    assert mean.shape == (2, 4, 8, 12)


def test_vae_logvar_is_clamped_like_diffusers():
    vae = vae_from_config(TINY_VAE)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 100.0  # logvar channels far above the clamp
    assert vae.encode(torch.zeros(1, 3, 8, 8))[1].max().item() == 20.0


def test_sd_vae_has_diffusers_parameter_names_shapes_and_count():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**SD_VAE)
        ours = VAE()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert ours.scaling_factor == 0.18215


def test_vae_from_config_reads_diffusers_saved_config_and_rejects_unimplemented_features(tmp_path):
    import json
    with torch.device("meta"):
        diffusers.AutoencoderKL(**SD_VAE).save_config(tmp_path)
    assert vae_from_config(json.loads((tmp_path / "config.json").read_text())).config == VAEConfig()
    for key, value in (("use_quant_conv", False), ("shift_factor", 0.1159), ("up_block_types", ["UpBlock2D"])):
        with pytest.raises(ValueError, match=f"{key}.*{value if not isinstance(value, list) else value[0]}"):
            vae_from_config({**TINY_VAE, key: value})
