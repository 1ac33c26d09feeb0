"""LoRA on the UNet's attention projections (Smooth-LoRA), and the three LoRA file layouts in use.

Smooth Diffusion fine-tunes SD-1.5 with rank-8 LoRA (paper Sec. 4.1): every attention module of the
UNet (attn1 and attn2 of all 16 transformer blocks) gets a low-rank update on to_q, to_k, to_v and
to_out.0, and nothing else trains. A LoRA layer computes (Eq. 6, W0 + B A with B = up, A = down)

    y = W0 x + b + scale * up(down(x)),    scale = multiplier * alpha / rank

with `down` random (N(0, 1/rank^2), as the official training script) and `up` zero, so the model is
unchanged at injection. Official files carry no alpha: alpha = rank, scale 1.

State-dict keys. A LoRA layer *is* the nn.Linear (or nn.Conv2d) it replaces and adopts its `weight`
and `bias` Parameters, so every base key keeps its name; injection only adds
`<module>.lora_down.weight` and `<module>.lora_up.weight`. Hence, after injection:
  - base weights still load: `model.load_state_dict(base, strict=False)` (the missing keys are
    exactly the LoRA ones);
  - the base model (with the update folded in, after `merge_lora`) is
    `{k: v for k, v in model.state_dict().items() if "lora" not in k}`.

File layouts (`save_lora` writes the first two; `load_lora` reads all three, detected from the keys):
  official  `<attn>.processor.to_q_lora.down.weight` / `.up.weight` for to_q, to_k, to_v and to_out
            (to_out_lora acts on to_out.0): the released smooth_lora.safetensors, written by
            diffusers 0.20 `save_attn_procs`; loaded by current diffusers' `load_lora_adapter`.
  peft      `unet.<module>.lora_A.weight` / `.lora_B.weight` (current diffusers); the alpha, if any,
            in the safetensors metadata `lora_adapter_metadata`.
  kohya     `lora_unet_<module with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
            (A1111, sd-scripts); may target any Linear or Conv2d (proj_in/out, ff, resnet convs).
Files we write are fp32 with alpha/rank folded into `up`, so every reader sees scale 1.

Tests (diffusers as the oracle): `.venv/bin/python -m pytest -q tests/test_lora.py` (~10 s on CPU).
"""
import json
import re
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _lora_dtype_device(base):
    """LoRA weights train in at least fp32, whatever the (possibly fp16/bf16) base weights."""
    return dict(device=base.weight.device, dtype=torch.promote_types(base.weight.dtype, torch.float32))


class LoRALayer:
    """The LoRA part shared by LoRALinear and LoRAConv2d (mixed in before the torch layer)."""

    def _init_lora(self, down, up, alpha):
        self.lora_down, self.lora_up = down, up
        self.rank = down.weight.shape[0]
        self.alpha = float(self.rank if alpha is None else alpha)
        self.multiplier = 1.0  # the user's strength, set_lora_scale / load_lora(scale=...)
        self.weight_before_merge = None  # set while merged, so unmerge restores bit for bit
        nn.init.normal_(down.weight, std=1.0 / self.rank)  # official init: N(0, 1/r^2)
        nn.init.zeros_(up.weight)  # output unchanged at injection

    @property
    def scale(self):
        return self.multiplier * self.alpha / self.rank

    @property
    def merged(self):
        return self.weight_before_merge is not None

    def forward(self, x):
        y = super().forward(x)  # the base nn.Linear / nn.Conv2d
        if self.merged:
            return y
        # In the LoRA's fp32 (under autocast in its dtype; the weights and their gradients stay fp32).
        update = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))
        return y + (self.scale * update).to(y.dtype)

    def delta_weight(self):
        """scale * up @ down in the base weight's shape (Eq. 6: Delta W = B A; a conv's up is 1x1)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        return (self.scale * (up.flatten(1) @ down.flatten(1))).view(self.weight.shape)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight_before_merge = self.weight.detach().clone()
            self.weight += self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.weight_before_merge)
            self.weight_before_merge = None

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, x{self.multiplier:g}"


class LoRALinear(LoRALayer, nn.Linear):
    """An nn.Linear (sharing the base layer's weight and bias) plus a rank-r update."""

    def __init__(self, base: nn.Linear, rank, alpha=None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # adopt the base Parameters: same keys, no copy
        kw = _lora_dtype_device(base)
        self._init_lora(nn.Linear(base.in_features, rank, bias=False, **kw),
                        nn.Linear(rank, base.out_features, bias=False, **kw), alpha)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """An nn.Conv2d plus a rank-r update: down is a conv like the base, up a 1x1 conv (kohya files)."""

    def __init__(self, base: nn.Conv2d, rank, alpha=None):
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride,
                         base.padding, base.dilation, base.groups, base.bias is not None,
                         base.padding_mode, device="meta")
        self.weight, self.bias = base.weight, base.bias
        kw = _lora_dtype_device(base)
        self._init_lora(nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, **kw),
                        nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw), alpha)


def lora_layers(model):
    """{module name: LoRA layer} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model):
    layers = lora_layers(model).values()
    return [p for layer in layers for p in (layer.lora_down.weight, layer.lora_up.weight)]


def freeze_all_but_lora(model):
    """Freeze the model except the LoRA weights (the official Smooth-LoRA setup); returns those."""
    model.requires_grad_(False)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    return params


def _inject(model, name, rank, alpha):
    """Replace module `name` by a fresh LoRA layer over the same base weights."""
    base = model.get_submodule(name)
    if isinstance(base, LoRALayer) and base.merged:
        raise ValueError(f"{name}: LoRA is merged into the weights; call unmerge_lora(model) first.")
    layer = (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base, rank, alpha)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def inject_lora(model, rank=8, alpha=None, targets=ATTENTION_TARGETS):
    """Put a rank-`rank` LoRA on every nn.Linear whose name ends in one of `targets` (default: the
    UNet's attention projections, the Smooth-LoRA set; None: every nn.Linear). Replaces any LoRA already
    there. Returns the LoRA parameters; freeze the rest with `freeze_all_but_lora(model)`."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and (targets is None or any(name == t or name.endswith("." + t) for t in targets))]
    if not names:
        raise ValueError(f"inject_lora: no nn.Linear named like {targets} in {type(model).__name__}.")
    for name in names:
        _inject(model, name, rank, alpha)
    return lora_parameters(model)


def merge_lora(model):
    """Fold scale * up @ down into the base weights (how a Smooth-LoRA is applied to another SD-1.5)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model):
    """Restore the exact base weights saved by merge_lora."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def set_lora_scale(model, scale):
    """Set the LoRA strength (multiplier on alpha / rank) of every LoRA layer; re-merges merged ones."""
    for layer in lora_layers(model).values():
        was_merged = layer.merged
        layer.unmerge()
        layer.multiplier = float(scale)
        if was_merged:
            layer.merge()


# ---------------------------------------------------------------- files


def _official_key(name):
    """`<attn>.to_q` -> (`<attn>.processor.to_q_lora`); to_out.0 is stored as to_out_lora."""
    for proj in ATTENTION_TARGETS:
        if name.endswith("." + proj):
            attn = name[: -len(proj) - 1]
            return f"{attn}.processor.{proj.split('.')[0]}_lora"
    raise ValueError(f"{name}: the official layout stores only the attention projections "
                     f"{ATTENTION_TARGETS}; save this LoRA with layout='peft'.")


def lora_state_dict(model, layout="official"):
    """The LoRA weights as a flat dict of fp32 CPU tensors, alpha/rank folded into up (scale 1)."""
    if layout not in ("official", "peft"):
        raise ValueError(f"layout must be 'official' or 'peft', not {layout!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call inject_lora or load_lora first.")
    sd = {}
    for name, layer in layers.items():
        down = layer.lora_down.weight.detach().float().cpu().contiguous()
        up = (layer.lora_up.weight.detach().float() * (layer.alpha / layer.rank)).cpu().contiguous()
        if layout == "official":
            prefix = _official_key(name)
            sd[f"{prefix}.down.weight"], sd[f"{prefix}.up.weight"] = down, up
        else:
            sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
    return sd


def save_lora(model, path, layout="official"):
    """Write the LoRA to a .safetensors file in the official Smooth-LoRA layout (or 'peft')."""
    save_file(lora_state_dict(model, layout), str(path), metadata={"format": "pt"})


def _read(path_or_dict):
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), {}
    path = str(path_or_dict)
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    try:  # random or truncated bytes make the unpickler fail in many ways (IndexError, EOFError, ...)
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as error:
        raise ValueError(f"{path} is not a readable LoRA file ({type(error).__name__}: {error}); "
                         "pickled files load only as tensors (weights_only=True)") from None


_OFFICIAL = re.compile(r"(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
                       r"\.(?P<part>down|up)\.weight")
_PEFT = re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B)\.weight")
_KOHYA = re.compile(r"lora_unet_(?P<module>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")


def _peft_alpha(metadata):
    """(lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata` (keys may carry `unet.`)."""
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    return config.get("lora_alpha"), config.get("alpha_pattern") or {}


def _parse(sd, metadata, model):
    """File keys -> ({module name: {"down", "up", "alpha", "keys": {part: file key}}}, ignored keys)."""
    entries, ignored = {}, []

    def put(module, part, value, key):
        entry = entries.setdefault(module, {"alpha": None, "keys": {}})
        entry[part], entry["keys"][part] = value, key

    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in sd):
        kohya_names = {name.replace(".", "_"): name for name, m in model.named_modules()
                       if isinstance(m, (nn.Linear, nn.Conv2d))}
        for key in sorted(sd):
            m = _KOHYA.fullmatch(key)
            if key.startswith("lora_te"):
                ignored.append(key)
            elif m is None:
                raise ValueError(f"{key}: not a kohya LoRA key (lora_unet_<module>.lora_down.weight / "
                                 f".lora_up.weight / .alpha).")
            elif m["module"] not in kohya_names:
                raise ValueError(f"{key}: the model has no Linear or Conv2d named like {m['module']!r} "
                                 f"(with . -> _); is this a LoRA for another architecture?")
            else:
                part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m["part"]]
                value = sd[key].item() if part == "alpha" else sd[key]
                put(kohya_names[m["module"]], part, value, key)
    elif any(_PEFT.fullmatch(k) for k in sd):
        lora_alpha, alpha_pattern = _peft_alpha(metadata)
        for key in sorted(sd):
            if key.startswith("text_encoder"):
                ignored.append(key)
                continue
            m = _PEFT.fullmatch(key.removeprefix("unet."))
            if m is None:
                raise ValueError(f"{key}: not a peft LoRA key (<module>.lora_A.weight / .lora_B.weight).")
            module = m["module"]
            put(module, "down" if m["part"] == "A" else "up", sd[key], key)
            matching = [a for p, a in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{p}", module)]
            entries[module]["alpha"] = matching[0] if matching else lora_alpha
    elif any(_OFFICIAL.fullmatch(k) for k in sd):
        for key in sorted(sd):
            m = _OFFICIAL.fullmatch(key)
            if m is None:
                raise ValueError(f"{key}: not an official Smooth-LoRA key "
                                 f"(<attn>.processor.to_q_lora.down.weight and the like).")
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            put(f"{m['attn']}.{proj}", m["part"], sd[key], key)
    else:
        some = ", ".join(sorted(sd)[:3]) or "none"
        raise ValueError(f"no LoRA keys found (first keys: {some}); expected the official "
                         f"(...processor.to_q_lora.down.weight), peft (...lora_A.weight) or kohya "
                         f"(lora_unet_...lora_down.weight) layout.")
    return entries, ignored


def _check(model, module, entry):
    """Raise, naming the file key, if `module` does not exist or the shapes do not fit it."""
    key = min(entry["keys"].values())
    try:
        base = model.get_submodule(module)
    except AttributeError:
        raise ValueError(f"{key}: the model has no module {module!r}; is this a LoRA for another "
                         f"architecture?") from None
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{key}: {module} is a {type(base).__name__}; LoRA applies to Linear or Conv2d.")
    if "down" not in entry or "up" not in entry:
        half = "down" if "down" in entry else "up"
        raise ValueError(f"{key}: the file has only the {half} half of {module}; it needs down and up.")
    r = entry["down"].shape[0]
    if isinstance(base, nn.Conv2d):
        want_down, want_up = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
    else:
        want_down, want_up = (r, base.in_features), (base.out_features, r)
    for part, want in (("down", want_down), ("up", want_up)):
        if tuple(entry[part].shape) != want:
            raise ValueError(f"{entry['keys'][part]}: {part} weight for {module} has shape "
                             f"{tuple(entry[part].shape)}, expected {want}; is this a LoRA for another "
                             f"architecture?")


def load_lora(model, path, scale=1.0):
    """Load a LoRA file (official, peft or kohya layout; a dict works too) into `model`, injecting
    LoRA layers with the file's rank where needed. Existing LoRA layers of that rank are overwritten
    in place, so an optimizer over them stays valid. Returns the names of the modules loaded."""
    sd, metadata = _read(path)
    entries, ignored = _parse(sd, metadata, model)
    if ignored:
        warnings.warn(f"load_lora: ignored {len(ignored)} text-encoder LoRA tensors (e.g. {ignored[0]}); "
                      f"only the UNet part is loaded.")
    if not entries:
        raise ValueError("no UNet LoRA keys in the file (only text-encoder ones).")
    for module, entry in entries.items():  # check everything before changing anything
        _check(model, module, entry)
    for module, entry in entries.items():
        rank = entry["down"].shape[0]
        layer = model.get_submodule(module)
        if not (isinstance(layer, LoRALayer) and layer.rank == rank and not layer.merged):
            layer = _inject(model, module, rank, None)
        with torch.no_grad():
            layer.lora_down.weight.copy_(entry["down"])
            layer.lora_up.weight.copy_(entry["up"])
        layer.alpha = float(rank if entry["alpha"] is None else entry["alpha"])  # no alpha: scale 1
        layer.multiplier = float(scale)
    return list(entries)
