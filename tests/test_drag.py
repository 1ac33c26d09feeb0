"""drag.py: motion supervision, point tracking, mutual self-attention and a null drag, on tiny models."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import drag
import lora
import sampler
from conftest import TINY_UNET, TINY_UNET_3LEVEL, TINY_VAE, perturb_


def tiny_unet(config=TINY_UNET_3LEVEL, seed=0):
    torch.manual_seed(seed)
    return perturb_(checkpoint.unet_from_config(config), seed).eval().requires_grad_(False)


def bump_features(centre, size=16):
    """A synthetic feature map [1, 2, size, size]: two Gaussian bumps of different widths at `centre` (x, y)."""
    coords = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2
    return torch.stack([torch.exp(-r2 / (2 * 1.5 ** 2)), torch.exp(-r2 / (2 * 3.0 ** 2))])[None]


@pytest.mark.parametrize("angle", [0, 45, 90, 160, 225, 300])
def test_motion_supervision_gradient_moves_the_feature_patch_toward_the_target(angle):
    """The bump sits on the handle; descending the loss must move it along d = (t - h) / |t - h|."""
    centre = torch.tensor([8.0, 8.0], requires_grad=True)
    handle = torch.tensor([8.0, 8.0])
    d = torch.tensor([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    loss = drag.motion_supervision_loss(bump_features(centre), [handle], [handle + 5 * d])
    grad, = torch.autograd.grad(loss, centre)
    step = -grad / grad.norm()
    assert loss.item() > 0
    assert (step @ d).item() > 0.95  # the descent direction is (nearly) d itself


def test_motion_supervision_ignores_handles_that_have_arrived_and_stops_gradients_at_the_source_patch():
    features = bump_features(torch.tensor([8.0, 8.0])).requires_grad_()
    handle = torch.tensor([8.0, 8.0])
    arrived = drag.motion_supervision_loss(features, [handle], [handle + torch.tensor([1.5, 0.0])])
    assert arrived.item() == 0
    loss = drag.motion_supervision_loss(features, [handle], [handle + torch.tensor([6.0, 0.0])])
    grad, = torch.autograd.grad(loss, features)
    # only the shifted patch (x + 1 in 7..10, bilinear on columns 8..10, rows 7..9) gets a gradient
    touched = grad.abs().sum(dim=(0, 1)).nonzero().tolist()
    assert {tuple(p) for p in touched} <= {(r, c) for r in range(7, 10) for c in range(8, 11)}


def test_point_tracking_finds_a_planted_feature_inside_its_window_only():
    g = torch.Generator().manual_seed(0)
    features0, features = torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 8, 16, 16, generator=g)
    original = torch.tensor([[5.0, 6.0]])  # (x, y) where the handle started
    features[:, :, 4, 7] = features0[:, :, 6, 5]  # planted at (x 7, y 4): within 3 of the current handle
    features[:, :, 14, 14] = features0[:, :, 6, 5]  # an exact copy far outside the window is not searched
    moved = drag.track_points(features0, features, torch.tensor([[6.0, 5.0]]), original, radius=3)
    assert moved.tolist() == [[7.0, 4.0]]
    corner = torch.tensor([[0.0, 0.0]])  # the window is clipped at the border
    features[:, :, 1, 2] = features0[:, :, 6, 5]
    assert drag.track_points(features0, features, corner, original, radius=3).tolist() == [[2.0, 1.0]]


def test_mutual_self_attention_with_identical_branches_equals_plain_attention():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    z, other = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 24, generator=g)
    t, cond2 = torch.tensor([500]), cond.expand(2, -1, -1)
    plain = unet(z, t, cond)
    with drag.mutual_self_attention(unet, blocks=2):
        same = unet(torch.cat([z, z]), t, cond2)
        mixed = unet(torch.cat([z, other]), t, cond2)
    torch.testing.assert_close(same, torch.cat([plain, plain]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[:1], plain, rtol=1e-5, atol=1e-5)  # the reference branch is unchanged
    alone = unet(other, t, cond)  # the hooks are gone on exit ...
    assert (mixed[1:] - alone).abs().max() > 1e-3  # ... and inside they changed the edited branch
    torch.testing.assert_close(unet(torch.cat([z, other]), t, cond2)[1:], alone, rtol=1e-5, atol=1e-5)


def test_features_are_the_chosen_up_blocks_output_resized():
    unet = tiny_unet()
    z, cond = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 24)
    eps, features = drag.eps_and_features(unet, z, torch.tensor([10]), cond, block=-2, size=(32, 32))
    torch.testing.assert_close(eps, unet(z, torch.tensor([10]), cond))
    assert features.shape == (1, unet.config.block_out_channels[1], 32, 32)  # up_blocks[-2] is the middle level


def test_bake_lora_folds_a_smooth_lora_into_plain_weights_of_a_copy():
    unet = tiny_unet()
    lora.inject_lora(unet, rank=4)
    for layer in lora.lora_layers(unet).values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.05)
    z, cond, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 24), torch.tensor([300])
    baked = drag.bake_lora(unet)
    assert not lora.lora_layers(baked) and lora.lora_layers(unet)  # the original keeps its LoRA, unmerged
    assert not any(layer.merged for layer in lora.lora_layers(unet).values())
    torch.testing.assert_close(baked(z, t, cond), unet(z, t, cond), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    vae = perturb_(checkpoint.vae_from_config(TINY_VAE), 2, scale=0.02).eval().requires_grad_(False)
    return tiny_unet(TINY_UNET), vae


def test_a_drag_whose_handles_are_on_their_targets_returns_the_ddim_round_trip(tiny_models):
    """Nothing to move: no latent step, and mutual self-attention with identical branches is plain DDIM."""
    unet, vae = tiny_models
    g = torch.Generator().manual_seed(3)
    image, cond = torch.rand(1, 3, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    cfg = drag.DragConfig(lora_steps=0, steps=10, lam=1e3)
    result = drag.drag(unet, vae, image, cond, [(10, 12), (20, 20)], [(10, 12), (20, 20)], mask, cfg=cfg,
                       progress=False)
    z_0 = sampler.encode_images(vae, image)
    z_t = sampler.ddim_inversion_trajectory(unet, z_0, cond, steps=10, progress=False)[7]  # 0.7 * 10 steps
    round_trip = sampler.ddim_sample(unet, z_t, cond, steps=10, guidance=1.0, start=3, progress=False)
    assert result.iterations == 0 and result.handles == [(10.0, 12.0), (20.0, 20.0)]
    torch.testing.assert_close(result.latents, round_trip, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.image, sampler.decode_latents(vae, round_trip), rtol=1e-4, atol=1e-4)


def test_a_drag_trains_its_lora_on_a_copy_and_moves_the_latent(tiny_models):
    unet, vae = tiny_models
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    image, cond = torch.rand(1, 3, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    cfg = drag.DragConfig(lora_steps=2, steps=10, max_iterations=3)
    result = drag.drag(unet, vae, image, cond, [(8, 16)], [(24, 16)], cfg=cfg, progress=False)
    assert result.iterations == 3 and result.image.shape == (1, 3, 32, 32)
    assert unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match="one target per handle"):
        drag.drag(unet, vae, image, cond, [(8, 16)], [], cfg=cfg, progress=False)


# ------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """A 32 px toy image, a mask of its size, one of another size, and a file that is no image."""
    from toy import world

    folder = tmp_path_factory.mktemp("drag-cli")
    images, _ = world.make_images(1, seed=7001, split="heldout")
    Image.fromarray(images[0]).save(folder / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 4:28] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(mask[:16, :16]).save(folder / "mask16.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--image", "{f}/broken.png", "--points", "1,1:2,2"], r"--image: cannot read the image"),
    (["--image", "{f}/image.png", "--points", "1,1:40,2"], r"--points 1,1:40,2 leaves the 32x32 image"),
    (["--image", "{f}/image.png", "--points", "5,1:4,-2"], r"--points 5,1:4,-2 leaves the 32x32 image"),
    (["--image", "{f}/image.png", "--points", "1,1:4,2", "--mask", "{f}/mask16.png"],
     r"--mask is 16x16 but --image is 32x32"),
    (["--image", "{f}/image.png", "--points", "1,1:4,2", "--mask", "{f}/nope.png"], r"--mask not found"),
    (["--image", "{f}/image.png", "--points", "1,1:4,2", "--guidance", "7.5"], r"guidance 1"),
])
def test_cli_drag_refuses_bad_input_in_one_line_and_writes_nothing(toy_files, tmp_path, extra, message):
    import demos.cli

    out = tmp_path / "out"
    argv = ["drag", "--out", str(out), *[a.format(f=toy_files) for a in extra]]
    with pytest.raises(SystemExit) as exit_:
        demos.cli.main(argv)
    text = str(exit_.value.code)
    assert text.startswith("sampler.py: error: ") and "\n" not in text and re.search(message, text)
    assert not out.exists()


def test_cli_drag_points_must_be_pairs(capsys):
    import demos.cli

    with pytest.raises(SystemExit) as exit_:
        demos.cli.main(["drag", "--image", "x.png", "--points", "1,1:2"])
    assert exit_.value.code == 2 and "a drag is HX,HY:TX,TY" in capsys.readouterr().err


def test_cli_drag_on_the_toy_model_writes_the_edit_the_arrows_and_the_final_handles(toy_files, tmp_path):
    import demos.cli

    out = tmp_path / "out"
    assert demos.cli.main(["drag", "--image", str(toy_files / "image.png"), "--prompt", "a triangle",
                           "--points", "16,16:20,16", "10,10:10,10", "--mask", str(toy_files / "mask.png"),
                           "--lora-steps", "2", "--steps", "10", "--out", str(out)]) == 0
    assert Image.open(out / "drag.png").size == (32, 32)
    assert Image.open(out / "drag_side_by_side.png").size == (2 * 256 + 4, 256)  # enlarged 8x to show arrows
    report = json.loads((out / "metrics.json").read_text())
    assert report["targets"] == [[20.0, 16.0], [10.0, 10.0]] and len(report["final_handles"]) == 2
    assert all(0 <= v <= 31 for point in report["final_handles"] for v in point)
