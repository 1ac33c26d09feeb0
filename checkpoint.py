"""Load and save Stable Diffusion 1.x weights: diffusers folders and original (CompVis) single files.

`load_models(path)` returns our UNet and VAE, the transformers CLIP text encoder, its tokenizer and
the scheduler config, from either
  * a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), with
    `*.safetensors` or `*.bin` weights (fp16 variants too) — our modules use diffusers' parameter
    names, so these load as they are; or
  * an original single file (`v1-5-pruned-emaonly.safetensors` / `.ckpt`), whose CompVis names
    (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) are mapped
    by the short rule-based converter below (index arithmetic from the UNet config, both directions).
    Single files carry no configs (SD-1.5's are the default; pass `config=`) and no tokenizer (pass
    `tokenizer=` a folder with vocab.json + merges.txt, e.g. SD-1.5's tokenizer/).
`unet_from_config(d)` / `vae_from_config(d)` build our models from a diffusers config.json dict; the
key policy below refuses keys that ask for a feature we do not implement.
`save_models(models, folder)` writes the diffusers layout (readable by diffusers'
`StableDiffusionPipeline.from_pretrained` and by `load_models`); `save_single_file` writes CompVis.

Pickled files (.bin/.ckpt/.pt) are read with `torch.load(weights_only=True)` only, so a file holding
Python objects is refused instead of being executed. Nothing here touches the network, except
`resolve_model` for a Hugging Face repo id (only the files `load_models` reads, cached for offline use).

    models = load_models("stable-diffusion-v1-5", device="cuda", dtype=torch.float16)
    cond = models.encode_prompt(["a photo of a cat"])  # [1, 77, 768]
"""
import dataclasses
import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

# SD-1.5's text_encoder/config.json (the text tower of CLIP ViT-L/14) and scheduler_config.json,
# used for single files, which carry neither.
SD15_TEXT_ENCODER = dict(
    architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_SCHEDULER = dict(
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    clip_sample=False, trained_betas=None)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# CompVis prefixes of the three models inside a single file.
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


# ------------------------------------------------------------------------------------ reading files

def read_state_dict(path) -> dict:
    """{name: tensor} of a .safetensors file, or of a .bin/.ckpt/.pt read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        try:
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error type for a bad header or short file
            raise ValueError(f"cannot read {path}: {e}. The file is truncated or not a safetensors file; "
                             "download or write it again.") from e
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refuses any class or function it does not know
            raise ValueError(f"refusing to load {path}: the pickle holds Python objects besides tensors, and "
                             "unpickling them could run arbitrary code. Use a .safetensors version of this "
                             f"checkpoint, or convert it yourself if you trust its source. ({e})") from e
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}. The file is truncated or corrupt; download it again.") from e
    else:
        raise ValueError(f"unknown checkpoint type {path.suffix!r} ({path}): expected .safetensors, "
                         f"{', '.join(PICKLE_SUFFIXES)} or a diffusers folder")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # CompVis / Lightning wrapper
        sd = sd["state_dict"]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no tensors: not a model checkpoint")
    return tensors


# ------------------------------------------------------------------------------- diffusers configs
# Our UNetConfig / VAEConfig hold what we implement. A diffusers config.json holds many more keys; the
# policy below says which of them we accept and at which values, so that a config asking for a
# feature we lack fails loudly instead of loading weights into the wrong architecture.

# diffusers config keys whose feature we do not implement, with the values that mean "feature off".
# A config may carry them at these values; any other value raises ValueError.
UNET_OFF_VALUES = {
    "center_input_sample": (False,), "only_cross_attention": (False,), "dropout": (0, 0.0),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "use_linear_projection": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "upcast_attention": (False, None), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
}
# Keys that are harmless at any value: they only matter together with a feature that is off above.
UNET_IGNORED = {"addition_embed_type_num_heads"}
# Allowed values of keys we implement only partly.
UNET_CHOICES = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "act_fn": ("silu", "swish"),
}
# The same for the VAE.
VAE_OFF_VALUES = {"shift_factor": (None, 0, 0.0), "latents_mean": (None,), "latents_std": (None,),
                  "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,)}
VAE_IGNORED = {"force_upcast"}  # a hint for fp16 pipelines; no effect on the computation
VAE_CHOICES = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
               "act_fn": ("silu", "swish")}


def config_from_dict(cls, d, off_values, ignored=(), choices=None):
    """Build dataclass `cls` from a diffusers config.json dict (hand-written or save_pretrained).

    Keys starting with `_` (diffusers metadata) and `ignored` keys are skipped. Keys in `off_values`
    must hold a "feature off" value. Unknown keys raise: a typo or a newer diffusers feature would
    otherwise be silently dropped and the weights would load into the wrong architecture.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in off_values:
            if not any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in off_values[key]):
                raise ValueError(f"config key {key!r} = {value!r} asks for a feature this implementation "
                                 f"does not have; supported: {off_values[key]}")
        elif key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(f"unknown config key {key!r} = {value!r}; remove it or implement it "
                             f"(known keys: {sorted(fields | set(off_values) | set(ignored))})")
    for key, allowed in (choices or {}).items():
        value = kwargs.get(key, getattr(cls, key))
        for v in value if isinstance(value, tuple) else (value,):
            if v not in allowed:
                raise ValueError(f"config key {key!r} has unsupported value {v!r}; supported: {allowed}")
    return cls(**kwargs)


def unet_from_config(d: dict) -> UNet:
    """UNet from a diffusers unet/config.json dict (key policy: `config_from_dict`)."""
    return UNet(config_from_dict(UNetConfig, d, UNET_OFF_VALUES, UNET_IGNORED, UNET_CHOICES))


def vae_from_config(d: dict) -> VAE:
    """VAE from a diffusers vae/config.json dict (key policy: `config_from_dict`)."""
    return VAE(config_from_dict(VAEConfig, d, VAE_OFF_VALUES, VAE_IGNORED, VAE_CHOICES))


# --------------------------------------------------------------- CompVis <-> diffusers key converter
# Each model's map sends a CompVis module path to (diffusers module path, renames of its children);
# a key is renamed by its longest mapped prefix, so the same table read backwards converts the other
# way. Keys with no mapped prefix keep their names (conv_in, quant_conv, the transformer blocks' insides
# are the same on both sides); stray ones then show up as unexpected keys when loading.

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_module_map(config) -> dict:
    """CompVis UNet module -> (diffusers module, child renames), for any levels / layers_per_block.

    CompVis numbers the UNet's blocks flat: input_blocks.0 is conv_in, then each level has
    layers_per_block (resnet, attention) pairs and, except the last level, one downsampler; each
    output block level has layers_per_block + 1 pairs and, except the last, an upsampler placed after
    the attention (sub-index 2) or, in a level without attention, after the resnet (sub-index 1).
    """
    c = _as_dict(config)
    L, levels = c["layers_per_block"], len(c["block_out_channels"])
    m = {"time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
         "input_blocks.0.0": ("conv_in", {}), "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {}),
         "middle_block.0": ("mid_block.resnets.0", UNET_RESNET), "middle_block.1": ("mid_block.attentions.0", {}),
         "middle_block.2": ("mid_block.resnets.1", UNET_RESNET)}
    for b in range(levels):
        down_attention = "CrossAttn" in c["down_block_types"][b]
        up_attention = "CrossAttn" in c["up_block_types"][b]
        for j in range(L):
            n = 1 + b * (L + 1) + j  # input_blocks index of level b, layer j
            m[f"input_blocks.{n}.0"] = (f"down_blocks.{b}.resnets.{j}", UNET_RESNET)
            if down_attention:
                m[f"input_blocks.{n}.1"] = (f"down_blocks.{b}.attentions.{j}", {})
        for j in range(L + 1):
            n = b * (L + 1) + j  # output_blocks index of level b, layer j
            m[f"output_blocks.{n}.0"] = (f"up_blocks.{b}.resnets.{j}", UNET_RESNET)
            if up_attention:
                m[f"output_blocks.{n}.1"] = (f"up_blocks.{b}.attentions.{j}", {})
        if b < levels - 1:
            m[f"input_blocks.{(b + 1) * (L + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", {})
            m[f"output_blocks.{b * (L + 1) + L}.{1 + up_attention}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", {})
    return m


def vae_module_map(config) -> dict:
    """CompVis VAE module -> (diffusers module, child renames). The decoder's levels count down in
    CompVis (up.0 is the last, 128-channel level) and up in diffusers (up_blocks.0 is the first)."""
    c = _as_dict(config)
    L, levels = c["layers_per_block"], len(c["block_out_channels"])
    m = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.norm_out"] = (f"{part}.conv_norm_out", {})
        m[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET)
        m[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET)
        m[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION)
    for i in range(levels):
        up = levels - 1 - i  # diffusers' index of CompVis decoder level i
        for j in range(L):
            m[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        for j in range(L + 1):
            m[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET)
        if i < levels - 1:
            m[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", {})
        if i > 0:
            m[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    return m


def _invert(module_map):
    return {new: (old, {v: k for k, v in children.items()}) for old, (new, children) in module_map.items()}


def _rename(sd, module_map):
    """Rename every key by its longest prefix found in module_map (keys without one are kept)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if (prefix := ".".join(parts[:i])) in module_map:
                new, children = module_map[prefix]
                child = ".".join(parts[i:-1])
                key = ".".join(p for p in (new, children.get(child, child), parts[-1]) if p)
                break
        out[key] = value
    return out


def _vae_attention_weights(sd, to_linear):
    """CompVis' VAE attention uses 1x1 convs ([C, C, 1, 1]), diffusers' Linear layers ([C, C])."""
    out = {}
    for key, v in sd.items():
        if ".mid_block.attentions." in key or ".mid.attn_1." in key:
            if to_linear and v.ndim == 4:
                v = v.reshape(v.shape[:2])
            elif not to_linear and v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        out[key] = v
    return out


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _text_keys(sd, model_keys=()):
    """Text-encoder keys for the installed transformers: files from transformers 4 (and CompVis) say
    `text_model.encoder...`, transformers 5's CLIPTextModel says `encoder...`; position_ids is a buffer
    that newer versions no longer save."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    if any(k.startswith("text_model.") for k in model_keys):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def compvis_to_diffusers(sd, unet_config, vae_config=None):
    """(unet_sd, vae_sd, text_sd) in diffusers / transformers-5 names from a CompVis single-file state
    dict. Other keys (model_ema.*, the schedule buffers) are ignored. vae_config: SD-1.5's if None."""
    unet_sd = _rename(_strip(sd, UNET_PREFIX), unet_module_map(unet_config))
    vae_map = vae_module_map(vae_config or VAEConfig())
    vae_sd = _vae_attention_weights(_rename(_strip(sd, VAE_PREFIX), vae_map), to_linear=True)
    return unet_sd, vae_sd, _text_keys(_strip(sd, TEXT_PREFIX))


def diffusers_to_compvis(unet_sd, vae_sd, text_sd, unet_config, vae_config=None) -> dict:
    """One CompVis state dict from diffusers' UNet and VAE and a CLIP text encoder's state dicts."""
    unet = _rename(unet_sd, _invert(unet_module_map(unet_config)))
    vae = _rename(_vae_attention_weights(vae_sd, to_linear=False), _invert(vae_module_map(vae_config or VAEConfig())))
    text = {"text_model." + k: v for k, v in _text_keys(text_sd).items()}  # SD-1.5 files use transformers-4 names
    return ({UNET_PREFIX + k: v for k, v in unet.items()} | {VAE_PREFIX + k: v for k, v in vae.items()}
            | {TEXT_PREFIX + k: v for k, v in text.items()})


# ----------------------------------------------------------------------------------- hub model ids

# The files `load_models` reads from a diffusers repository; safetensors weights only, unless a part has none.
HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*.json", "tokenizer/merges.txt",
             "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]
HUB_PICKLES = {"unet": "unet/diffusion_pytorch_model.bin", "vae": "vae/diffusion_pytorch_model.bin",
               "text_encoder": "text_encoder/pytorch_model.bin"}  # read with weights_only=True


def _looks_like_repo_id(text):
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.endswith(
        (".safetensors", *PICKLE_SUFFIXES))


def resolve_model(path_or_repo_id) -> Path:
    """A local model path as it is, or a Hugging Face repo id (`org/name`, diffusers layout) as the
    folder of its files in the local hub cache: downloaded when online, the cached copy offline
    (HF_HUB_OFFLINE=1 or no network). Only the files `load_models` reads are fetched."""
    path = Path(path_or_repo_id)
    if path.exists() or not _looks_like_repo_id(str(path_or_repo_id)):
        return path
    import huggingface_hub  # comes with transformers; imported here so local paths never need it

    repo_id = str(path_or_repo_id)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
        missing = [file for part, file in HUB_PICKLES.items() if not any((folder / part).glob("*.safetensors"))]
        if missing:  # an older repository without safetensors: its pickles, read with weights_only
            folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES + missing))
    except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError,
            OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model not found: {repo_id} is no local path, and the Hugging Face hub gave no copy of it "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Check the id and your network, or "
            "download it once online (it is then cached for HF_HUB_OFFLINE=1), or pass a local folder.") from None
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{repo_id} has no model_index.json: not a diffusers Stable Diffusion repository")
    return folder


# ------------------------------------------------------------------------------------------ models

@dataclass
class Models:
    """The parts of Stable Diffusion 1.x that Smooth Diffusion uses (all frozen, in eval mode)."""
    unet: UNet
    vae: VAE
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict  # diffusers scheduler_config.json; sampler.make_schedule reads it

    @torch.no_grad()
    def encode_prompt(self, prompts) -> torch.Tensor:
        """CLIP's last hidden state of each prompt, padded to 77 tokens as SD does: [B, 77, D]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        if max(lengths) > max_length:
            long = prompts[lengths.index(max(lengths))]
            warnings.warn(f"prompt longer than CLIP's {max_length} tokens ({max(lengths)} with start/end); "
                          f"the text encoder sees only its first {max_length - 2} tokens: {long[:80]!r}", stacklevel=2)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state


def load_models(path, tokenizer=None, device="cpu", dtype=torch.float32, config=None) -> Models:
    """Models from a diffusers folder or a CompVis single file (.safetensors, .ckpt).

    tokenizer: a CLIPTokenizer or a folder holding one (vocab.json + merges.txt, or tokenizer.json);
      required for single files, overrides a folder's tokenizer/.
    config (single files only): a diffusers folder whose config files to use, or a dict with any of
      "unet", "vae", "text_encoder", "scheduler" (config dicts); SD-1.5's for what is not given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}. Pass a diffusers folder (with model_index.json) "
                                "or a single-file checkpoint (.safetensors or .ckpt).")
    if path.is_dir():
        if config is not None:
            raise ValueError("config= is for single-file checkpoints; a diffusers folder has its own configs")
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise ValueError(f"{path} is not a diffusers Stable Diffusion folder: it has no model_index.json "
                             "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/ inside)")
        configs = _read_configs(path)
        tokenizer = _read_tokenizer(path / "tokenizer" if tokenizer is None else tokenizer)
        unet_sd, vae_sd, text_sd = (read_state_dict(_weights_file(path / part))
                                    for part in ("unet", "vae", "text_encoder"))
    else:
        if tokenizer is None:
            raise ValueError(f"{path} is a single-file checkpoint, and those carry no tokenizer: pass "
                             "tokenizer=FOLDER, a folder with vocab.json and merges.txt (e.g. SD-1.5's tokenizer/).")
        tokenizer = _read_tokenizer(tokenizer)
        if isinstance(config, dict):
            configs = _read_configs() | config
        else:
            configs = _read_configs(None if config is None else Path(config))
        unet_sd, vae_sd, text_sd = compvis_to_diffusers(read_state_dict(path), configs["unet"], configs["vae"])
    with torch.device("meta"):  # shapes only: a random init of 860M weights would take half a minute
        unet, vae = unet_from_config(configs["unet"]), vae_from_config(configs["vae"])
    unet = _load_weights(unet, unet_sd, "unet", path)
    vae = _load_weights(vae, vae_sd, "vae", path)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    text_encoder = _load_weights(text_encoder, _text_keys(text_sd, text_encoder.state_dict()), "text_encoder", path)
    models = Models(unet, vae, text_encoder, tokenizer, dict(configs["scheduler"]))
    for model in (models.unet, models.vae, models.text_encoder):
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return models


def _as_dict(config) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _read_configs(folder=None) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} config dicts from a diffusers folder (a missing
    scheduler config means SD-1.5's); SD-1.5's configs when folder is None."""
    configs = {"unet": _as_dict(UNetConfig()), "vae": _as_dict(VAEConfig()),
               "text_encoder": dict(SD15_TEXT_ENCODER), "scheduler": dict(SD15_SCHEDULER)}
    if folder is None:
        return configs
    if not folder.is_dir():
        raise FileNotFoundError(f"config folder not found: {folder}")
    for part, name in (("unet", "config.json"), ("vae", "config.json"),
                       ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")):
        if (file := folder / part / name).is_file():
            configs[part] = json.loads(file.read_text())
        elif part != "scheduler":
            raise FileNotFoundError(f"{file} is missing: every model in a diffusers folder needs its config")
    return configs


def _weights_file(folder) -> Path:
    """A diffusers subfolder's weights: safetensors before .bin, full precision before the fp16 variant."""
    for variant in ("", ".fp16"):
        for suffix in (".safetensors", ".bin"):
            for name in ("diffusion_pytorch_model", "model", "pytorch_model"):
                if (file := folder / f"{name}{variant}{suffix}").is_file():
                    return file
    raise FileNotFoundError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors (unet/, vae/) "
                            "or model.safetensors (text_encoder/), or the .bin / .fp16 variants")


def _read_tokenizer(folder) -> CLIPTokenizer:
    """CLIPTokenizer from a folder (SD-1.5's tokenizer/ or one with tokenizer.json); passes one through."""
    if isinstance(folder, CLIPTokenizer):
        return folder
    folder = Path(folder)
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no CLIP tokenizer in {folder}: it needs vocab.json and merges.txt "
                                "(or tokenizer.json), like SD-1.5's tokenizer/ folder")
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.model_max_length > 10**6:  # a folder without tokenizer_config.json: CLIP's context
        tokenizer.model_max_length = 77
    return tokenizer


def _few(keys, n=10):
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _load_weights(model, sd, name, path):
    """load_state_dict(strict=True), with errors that say which model, which keys and which shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        problems = ([f"{len(missing)} missing: {_few(missing)}"] if missing else []) + \
                   ([f"{len(unexpected)} unexpected: {_few(unexpected)}"] if unexpected else [])
        raise ValueError(f"{path}: the {name} weights do not fit the {name} model; keys "
                         + "; ".join(problems) + ". Is this an SD-1.x checkpoint, with the configs that match it?")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: {name} weight {k} has shape {list(v.shape)} in the checkpoint but "
                             f"{list(expected[k].shape)} in the model: a checkpoint of another architecture? "
                             "Pass the configs that match it.")
    meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(sd, assign=meta)  # a model built on "meta" takes the loaded tensors themselves
    return model


# ------------------------------------------------------------------------------------------ saving

def save_models(models: Models, folder):
    """Write the diffusers layout, safetensors weights (readable by diffusers and by load_models)."""
    folder = Path(folder)
    scheduler = {"_class_name": "PNDMScheduler", **models.scheduler_config}  # SD-1.5 ships PNDM's config
    for part, model, class_name in (("unet", models.unet, "UNet2DConditionModel"),
                                    ("vae", models.vae, "AutoencoderKL")):
        (folder / part).mkdir(parents=True, exist_ok=True)
        config = {"_class_name": class_name, **_as_dict(model.config)}
        (folder / part / "config.json").write_text(json.dumps(config, indent=2))
        _save(model.state_dict(), folder / part / "diffusion_pytorch_model.safetensors")
    models.text_encoder.config.save_pretrained(folder / "text_encoder")
    # transformers-4 names (`text_model.` prefix): both transformers 4 and 5 read them
    text = {"text_model." + k: v for k, v in _text_keys(models.text_encoder.state_dict()).items()}
    _save(text, folder / "text_encoder" / "model.safetensors")
    models.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
             "safety_checker": [None, None], "requires_safety_checker": False,
             "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def save_single_file(models: Models, path):
    """Write an original-layout (CompVis) single file: .safetensors, or .ckpt as {"state_dict": ...}."""
    path = Path(path)
    sd = diffusers_to_compvis(models.unet.state_dict(), models.vae.state_dict(), models.text_encoder.state_dict(),
                              models.unet.config, models.vae.config)
    if path.suffix == ".safetensors":
        _save(sd, path)
    elif path.suffix in PICKLE_SUFFIXES:
        torch.save({"state_dict": {k: v.contiguous() for k, v in sd.items()}}, path)
    else:
        raise ValueError(f"unknown checkpoint type {path.suffix!r}: use .safetensors or .ckpt")


def _save(sd, file):
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, file, metadata={"format": "pt"})
