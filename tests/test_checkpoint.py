"""checkpoint.py against diffusers (the oracle): folders, CompVis single files, the key converter,
saving, and the errors a user meets with a wrong or hostile file."""
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
from checkpoint import (compvis_to_diffusers, diffusers_to_compvis, load_models, read_state_dict, save_models,
                        save_single_file)
from conftest import TINY_UNET, TINY_UNET_3LEVEL, TINY_VAE

# SD-1.5's unet/ and vae/ config.json values that differ from diffusers' class defaults.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(sample_size=512, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
PROMPTS = ["a photo of a cat", "", "a red circle on blue background"]


def assert_rel_close(ours, theirs, tol=1e-5):
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err <= tol, f"relative error {err:.2e}"


def assert_same_state(a, b):
    """Same keys, and bit-identical tensors."""
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def models(tiny_sd):
    return load_models(tiny_sd[0])


@pytest.fixture(scope="module")
def single_file(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_single_file(models, path)
    return path


# Module names that exist only on the diffusers side: diffusers' converters pass them through unchanged,
# so their agreement alone would not catch a key we forgot to rename.
DIFFUSERS_ONLY = {"model.diffusion_model.": {"resnets", "attentions", "downsamplers", "upsamplers", "down_blocks",
                                             "up_blocks", "mid_block", "time_embedding", "time_emb_proj", "conv1",
                                             "conv2", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out"},
                  "first_stage_model.": {"resnets", "attentions", "downsamplers", "upsamplers", "down_blocks",
                                         "up_blocks", "mid_block", "conv_shortcut", "conv_norm_out", "group_norm",
                                         "to_q", "to_k", "to_v", "to_out"}}


def assert_compvis_names_only(sd):
    for prefix, words in DIFFUSERS_ONLY.items():
        keys = [k for k in sd if k.startswith(prefix)]
        assert keys and not [k for k in keys if words & set(k.split("."))]


def public(config):
    """A diffusers config without its bookkeeping entries (_class_name, _use_default_values, ...)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # tuples -> lists


def meta_state_dicts(unet_config, vae_config):
    """Key -> empty tensor of diffusers' UNet and VAE and a CLIP text encoder (SD-1.5's), cheaply."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(unet_config).state_dict(),
                AutoencoderKL.from_config(vae_config).state_dict(),
                CLIPTextModel(CLIPTextConfig.from_dict(checkpoint.SD15_TEXT_ENCODER)).state_dict())


# ----------------------------------------------------------------------------- loading a folder

def test_folder_load_matches_diffusers_text_unet_and_vae(models, tiny_sd):
    _, pipe = tiny_sd
    theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert_rel_close(models.encode_prompt(PROMPTS), theirs)
    assert models.encode_prompt(PROMPTS).shape == (3, 77, 32)

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        assert_rel_close(models.unet(x, t, context), pipe.unet(x, t, context).sample)

        images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        mean, logvar = models.vae.encode(images)
        posterior = pipe.vae.encode(images).latent_dist
        assert_rel_close(mean, posterior.mean)
        assert_rel_close(logvar, posterior.logvar)
        latents = torch.randn(2, 4, 16, 16, generator=g)
        assert_rel_close(models.vae.decode(latents), pipe.vae.decode(latents).sample)
    assert models.vae.scaling_factor == pipe.vae.config.scaling_factor
    assert models.scheduler_config["steps_offset"] == 1 and not models.scheduler_config["set_alpha_to_one"]


def test_loaded_models_are_frozen_eval_and_in_the_requested_dtype(tiny_sd):
    models = load_models(tiny_sd[0], dtype=torch.bfloat16)
    for model in (models.unet, models.vae, models.text_encoder):
        assert not model.training
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())


def test_long_prompt_is_truncated_to_77_tokens_with_a_warning(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 75 words + start/end = 77 tokens: fits, no warning
        fits = models.encode_prompt([" ".join(["cat"] * 75)])
    with pytest.warns(UserWarning, match="longer than CLIP's 77 tokens"):
        long = models.encode_prompt([" ".join(["cat"] * 75 + ["dog"] * 30)])
    assert torch.equal(long, fits)


def test_other_file_formats_load_bin_text_model_prefix_and_fp16_variant(tiny_sd, tmp_path):
    """transformers-4 text encoder (`text_model.` names, position_ids, pytorch_model.bin), a .bin UNet
    and an fp16-only VAE all load."""
    folder, pipe = tiny_sd
    alt = shutil.copytree(folder, tmp_path / "alt")
    text = load_file(alt / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in text)  # saved by transformers 5
    text = {"text_model." + k: v for k, v in text.items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(text, alt / "text_encoder" / "pytorch_model.bin")
    (alt / "text_encoder" / "model.safetensors").unlink()
    unet_file = alt / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet_file), unet_file.with_suffix(".bin"))
    unet_file.unlink()
    vae_file = alt / "vae" / "diffusion_pytorch_model.safetensors"
    fp16 = {k: v.half() for k, v in load_file(vae_file).items()}
    save_file(fp16, alt / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    vae_file.unlink()

    models = load_models(alt)
    assert_same_state(models.text_encoder, pipe.text_encoder)
    assert_same_state(models.unet, pipe.unet)
    for k, v in models.vae.state_dict().items():
        assert torch.equal(v, pipe.vae.state_dict()[k].half().float()), k


# ------------------------------------------------------------------- CompVis single files, converter

def test_converter_matches_diffusers_single_file_conversion_on_the_full_sd15_key_set():
    """Our CompVis names are the ones diffusers' own converters read (keys and shapes, 686 + 248 + 196
    tensors), diffusers recognises the result as SD v1, and converting back is the identity."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, infer_diffusers_model_type)
    unet, vae, text = meta_state_dicts(SD15_UNET, SD15_VAE)
    assert (len(unet), len(vae), len(text)) == (686, 248, 196)
    sd = diffusers_to_compvis(unet, vae, text, SD15_UNET, SD15_VAE)
    assert infer_diffusers_model_type(sd) == "v1"
    assert_compvis_names_only(sd)
    # a few names as they are in v1-5-pruned-emaonly (upsampler after the attention in output_blocks.5)
    assert sd["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["model.diffusion_model.input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert sd["model.diffusion_model.input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert sd["model.diffusion_model.output_blocks.11.0.emb_layers.1.weight"].shape == (320, 1280)
    assert sd["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd

    for theirs, ours in ((convert_ldm_unet_checkpoint(sd, SD15_UNET), unet),
                         (convert_ldm_vae_checkpoint(sd, SD15_VAE), vae),
                         (convert_ldm_clip_checkpoint(sd), {"text_model." + k: v for k, v in text.items()})):
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    back = compvis_to_diffusers(sd, SD15_UNET, SD15_VAE)
    for ours, original in zip(back, (unet, vae, text)):
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in original.items()}


@pytest.mark.parametrize("unet_config", [TINY_UNET, TINY_UNET_3LEVEL], ids=["2-levels-1-layer", "3-levels-2-layers"])
def test_converter_follows_the_unet_topology_like_diffusers(unet_config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet, vae, text = meta_state_dicts(unet_config, TINY_VAE)
    sd = diffusers_to_compvis(unet, vae, text, unet_config, TINY_VAE)
    assert_compvis_names_only(sd)
    theirs = convert_ldm_unet_checkpoint(sd, unet_config)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in unet.items()}
    assert compvis_to_diffusers(sd, unet_config, TINY_VAE)[0].keys() == unet.keys()


def test_an_sd15_single_file_fits_the_default_models():
    """Without config=, a single file is read as SD-1.5: SD-1.5's full CompVis key set, converted with the
    default configs, has exactly the names and shapes of our default UNet, VAE and text encoder (on meta)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    sd = diffusers_to_compvis(*meta_state_dicts(SD15_UNET, SD15_VAE), SD15_UNET, SD15_VAE)
    defaults = checkpoint._read_configs()
    converted = compvis_to_diffusers(sd, defaults["unet"], defaults["vae"])
    with torch.device("meta"):
        ours = (checkpoint.unet_from_config(defaults["unet"]), checkpoint.vae_from_config(defaults["vae"]),
                CLIPTextModel(CLIPTextConfig.from_dict(defaults["text_encoder"])))
    for weights, model in zip(converted, ours):
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_single_file_round_trip_gives_identical_models_and_diffusers_reads_it_exactly(models, single_file, tiny_sd,
                                                                                      tmp_path):
    folder, pipe = tiny_sd
    bare_tokenizer = tmp_path / "tokenizer"  # only vocab.json + merges.txt, no tokenizer_config.json
    bare_tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(folder / "tokenizer" / name, bare_tokenizer)
    for path, tokenizer in ((single_file, folder / "tokenizer"), (tmp_path / "tiny-sd.ckpt", bare_tokenizer)):
        if path.suffix == ".ckpt":
            save_single_file(models, path)
        again = load_models(path, tokenizer=tokenizer, config=folder)
        for part in ("unet", "vae", "text_encoder"):
            assert_same_state(getattr(again, part), getattr(models, part))
        assert torch.equal(again.encode_prompt(PROMPTS), models.encode_prompt(PROMPTS))

    from diffusers import StableDiffusionPipeline
    theirs = StableDiffusionPipeline.from_single_file(single_file, config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(theirs, part), getattr(pipe, part))
    parts = tuple(m.state_dict() for m in (models.unet, models.vae, models.text_encoder))
    back = compvis_to_diffusers(diffusers_to_compvis(*parts, TINY_UNET, TINY_VAE), TINY_UNET, TINY_VAE)
    for ours, original in zip(back, parts):
        assert ours.keys() == original.keys() and all(torch.equal(ours[k], original[k]) for k in original)


def test_single_file_ignores_ema_and_schedule_keys(models, single_file, tiny_sd, tmp_path):
    sd = read_state_dict(single_file)
    sd |= {"model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.ones(1000),
           "model_ema.diffusion_modelconv_in_weight": torch.zeros(1)}
    save_file(sd, tmp_path / "with-ema.safetensors")
    again = load_models(tmp_path / "with-ema.safetensors", tokenizer=tiny_sd[0] / "tokenizer", config=tiny_sd[0])
    assert_same_state(again.unet, models.unet)


# ------------------------------------------------------------------------------------------ saving

def test_saved_folder_loads_in_diffusers_and_back(models, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    folder, pipe = tiny_sd
    save_models(models, tmp_path / "saved")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(theirs, part), getattr(pipe, part))
    for part in ("unet", "vae", "scheduler"):  # diffusers reads our configs as the ones it wrote
        assert type(getattr(theirs, part)) is type(getattr(pipe, part))
        assert public(getattr(theirs, part).config) == public(getattr(pipe, part).config)
    assert theirs.text_encoder.config.to_diff_dict() == pipe.text_encoder.config.to_diff_dict()
    assert theirs.tokenizer(PROMPTS).input_ids == pipe.tokenizer(PROMPTS).input_ids
    text = load_file(tmp_path / "saved" / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in text)  # the names transformers 4 and 5 both read

    again = load_models(tmp_path / "saved")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(again, part), getattr(models, part))
    assert torch.equal(again.encode_prompt(PROMPTS), models.encode_prompt(PROMPTS))


# -------------------------------------------------------------------------------------- bad input

def test_nonexistent_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found: .*nowhere"):
        load_models(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.safetensors"):
        read_state_dict(tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion folder"):
        load_models(tmp_path)


def test_truncated_files_are_reported_by_name(single_file, tmp_path, tiny_sd):
    data = single_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.safetensors.*truncated"):
        load_models(tmp_path / "cut.safetensors", tokenizer=tiny_sd[0] / "tokenizer", config=tiny_sd[0])
    torch.save({"state_dict": read_state_dict(single_file)}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*cut\.ckpt.*truncated or corrupt"):
        read_state_dict(tmp_path / "cut.ckpt")


def test_missing_keys_are_listed_with_the_model_name(single_file, tmp_path, tiny_sd):
    sd = read_state_dict(single_file)
    dropped = sorted(k for k in sd if k.startswith("model.diffusion_model.output_blocks"))[:12]
    save_file({k: v for k, v in sd.items() if k not in dropped}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError) as error:
        load_models(tmp_path / "partial.safetensors", tokenizer=tiny_sd[0] / "tokenizer", config=tiny_sd[0])
    message = str(error.value)
    assert "unet weights do not fit" in message and "12 missing" in message and "(12 in all)" in message
    first = compvis_to_diffusers({dropped[0]: sd[dropped[0]]}, TINY_UNET, TINY_VAE)[0]
    assert next(iter(first)) in message  # named as the model names it


def test_checkpoint_of_another_architecture_names_a_key_and_both_shapes(single_file, tiny_sd):
    folder, _ = tiny_sd
    configs = {part: json.loads((folder / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder")}
    configs["unet"]["cross_attention_dim"] = 48  # a model for another text encoder
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight has shape \[32, 32\] in the checkpoint but "
                                         r"\[32, 48\] in the model: a checkpoint of another architecture"):
        load_models(single_file, tokenizer=folder / "tokenizer", config=configs)


class Payload:
    """Unpickling this creates the file `marker` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_with_code_is_refused_without_running_it(tmp_path, tiny_sd):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1), "y": Payload(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt.*could run arbitrary code"):
        load_models(tmp_path / "evil.ckpt", tokenizer=tiny_sd[0] / "tokenizer")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_single_file_without_tokenizer_asks_for_one(single_file, tmp_path):
    with pytest.raises(ValueError, match=re.escape("carry no tokenizer: pass tokenizer=FOLDER")):
        load_models(single_file)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer in .* it needs vocab.json and merges.txt"):
        load_models(single_file, tokenizer=tmp_path)
