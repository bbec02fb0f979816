"""``read_weights``: a model file → ``ModelWeights``. The guard validates the file and reads its float tensors;
their keys say whether it is a LoRA (factors grouped by module, alpha turned into a scale) or a full checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from probex.errors import InputError
from probex.weights.canonical import MAX_UPDATE_NORM, LoraFactors, ModelWeights, Signature, update_norm
from probex.weights.guard import check_file, load_float_tensors, read_safetensors_header, refuse_non_safetensors
from probex.weights.keys import LDM_BLOCKS, full_checkpoint_name, ldm_to_diffusers, parse_lora_key
from probex.weights.messages import short

# Other parameterisations, found by one dotted component of a key. Reading them as LoRA would be silently wrong.
UNSUPPORTED_ADAPTERS = (
    (re.compile(r"^hada_"), "LoHa adapter"),
    (re.compile(r"^lokr_"), "LoKr adapter"),
    (re.compile(r"^(dora_scale|lora_magnitude_vector)"), "DoRA adapter"),
    (re.compile(r"^lora_mid$"), "LoCon/CP-decomposed LoRA"),
    (re.compile(r"^b?oft_"), "OFT adapter"),
    (re.compile(r"^ia3_"), "IA3 adapter"),
    (re.compile(r"^diff(_b)?$"), "full-difference patch"),
)


def read_weights(path, *, max_bytes: int | None = None) -> ModelWeights:
    """Read a ``.safetensors`` model or LoRA into canonical layers; every user-caused failure is an ``InputError``."""
    path = Path(path)
    size = check_file(path, max_bytes)
    refuse_non_safetensors(path)
    entries, metadata = read_safetensors_header(path, size)
    tensors = load_float_tensors(path, entries)
    return weights_from_tensors(tensors, metadata, source=path.name)


def weights_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> ModelWeights:
    """Interpret float tensors as a LoRA (any supported dialect) or a full checkpoint."""
    refuse_unsupported_adapters(source, tensors)
    parsed = {key: parse_lora_key(key) for key in tensors}
    if any(p is not None and p[2] != "alpha" for p in parsed.values()):  # a lone ".alpha" can be a real parameter
        layers, text_encoder = assemble_lora(source, tensors, parsed)
        kind = "lora"
    else:
        layers, text_encoder = full_checkpoint_layers(source, tensors)
        kind = "full"
    return ModelWeights(kind, layers, text_encoder, dict(metadata), Signature.of(layers), source)


def refuse_unsupported_adapters(source: str, keys) -> None:
    for key in keys:
        for component in key.split("."):
            for pattern, what in UNSUPPORTED_ADAPTERS:
                if pattern.match(component):
                    raise InputError(f"{source}: {what} ({component} …) is not supported; ProbeX reads LoRA (A/B) "
                                     "factors")


def assemble_lora(source: str, tensors: dict[str, torch.Tensor], parsed: dict):
    unknown = [key for key, p in parsed.items() if p is None]
    if unknown:
        raise InputError(f"{source}: unrecognised key {short(unknown[0])} next to LoRA factors")
    # kohya's SDXL files use LDM block names; renaming only when such names are present keeps other models' names
    ldm_named = any(p[0] == "unet" and p[1].startswith(LDM_BLOCKS) for p in parsed.values())
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        part, module, role = parsed[key]
        if part == "unet" and ldm_named:
            module = ldm_to_diffusers(module)
        roles = groups.setdefault((part, module), {})
        if role in roles:
            raise InputError(f"{source}: LoRA module {short(module)} appears twice ({short(roles[role][0])} and "
                             f"{short(key)})")
        roles[role] = (key, value)
    layers, text_encoder = {}, {}
    for (part, module), roles in groups.items():
        factors = lora_factors(source, module, roles)
        if part == "unet":
            layers[module] = factors
        else:
            text_encoder[module if part == "te" else f"text_encoder_2.{module}"] = factors
    return layers, text_encoder


def lora_factors(source: str, module: str, roles: dict[str, tuple[str, torch.Tensor]]) -> LoraFactors:
    where = f"{source}: LoRA module {short(module)}"
    missing = [r for r in ("up", "down") if r not in roles]
    if missing:
        names = {"up": "up (B)", "down": "down (A)"}
        present = ", ".join(names.get(r, r) for r in roles)
        raise InputError(f"{where} has {present} but no {names[missing[0]]} factor")
    up, down = roles["up"][1], roles["down"][1]
    # conv LoRAs (LoCon): up (out, r, 1, 1), down (r, in, kh, kw) → 2-D like the conv kernel itself, out first
    if up.dim() == 4 and up.shape[2:] == (1, 1) and down.dim() == 4:
        up, down = up.flatten(1), down.flatten(1)
    if up.dim() != 2 or down.dim() != 2:
        raise InputError(f"{where} has factors of unexpected shapes: up {tuple(up.shape)}, down {tuple(down.shape)}")
    if down.shape[0] == 0:
        raise InputError(f"{where} has rank-0 factors: up {tuple(up.shape)}, down {tuple(down.shape)}")
    if up.shape[1] != down.shape[0]:
        raise InputError(f"{where} has mismatched factors: up {tuple(up.shape)} vs down {tuple(down.shape)} "
                         f"(ranks {up.shape[1]} ≠ {down.shape[0]})")
    scale = 1.0
    if "alpha" in roles:
        alpha = roles["alpha"][1]
        if alpha.numel() != 1:
            raise InputError(f"{where} has an alpha of shape {tuple(alpha.shape)}; expected one number")
        scale = float(alpha.reshape(())) / down.shape[0]
    factors = LoraFactors(up.contiguous(), down.contiguous(), scale)
    norm = update_norm(factors)
    if not norm <= MAX_UPDATE_NORM:  # also catches inf: finite factors and alpha whose product overflows float32
        raise InputError(f"{where}: its weight update has norm {norm:.3g}, beyond anything trained (limit "
                         f"{MAX_UPDATE_NORM:.0e}); the values or alpha are corrupt or crafted")
    return factors


def full_checkpoint_layers(source: str, tensors: dict[str, torch.Tensor]):
    layers, text_encoder = {}, {}
    for key, value in tensors.items():
        if value.dim() < 2 or value.numel() == 0:
            continue  # biases, norms, schedules, empty placeholders: not weight matrices
        part, name = full_checkpoint_name(key)
        if part is None:
            continue
        matrix = value.flatten(1)  # conv kernels: output channels first
        (layers if part == "unet" else text_encoder)[name] = matrix
    if not layers and not text_encoder:
        raise InputError(f"{source}: no LoRA factors and no ≥2-D weight matrices found; nothing to read")
    return layers, text_encoder
