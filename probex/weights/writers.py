"""``save_lora``: LoRA factors → a .safetensors file in diffusers/peft, Model-J or kohya form."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from probex.weights.canonical import LoraFactors
from probex.weights.keys import unflatten_kohya_name


def save_lora(path, layers: dict[str, LoraFactors], fmt: str = "diffusers", metadata: dict[str, str] | None = None,
              text_encoder: dict[str, LoraFactors] | None = None) -> None:
    """Write a LoRA as diffusers/peft (``lora_A/B`` + ``alpha`` when scale ≠ 1), Model-J (``lora.down/up``; the
    format has no alpha, so the scale is folded into ``up``) or kohya (``lora_unet_…``, ``.alpha`` = scale · rank)."""
    writers = {"diffusers": diffusers_keys, "modelj": modelj_keys, "kohya": kohya_keys}
    if fmt not in writers:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {sorted(writers)}")
    tensors = {}
    for part, group in (("unet", layers), ("te", text_encoder or {})):
        for name, factors in group.items():
            if part == "te" and name.startswith("text_encoder_2."):
                part_here, name = "te2", name[len("text_encoder_2."):]
            else:
                part_here = part
            tensors.update(writers[fmt](part_here, name, factors))
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path),
              metadata=metadata)


def diffusers_keys(part: str, name: str, f: LoraFactors) -> dict[str, torch.Tensor]:
    prefix = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}[part]
    keys = {f"{prefix}.{name}.lora_A.weight": f.down, f"{prefix}.{name}.lora_B.weight": f.up}
    if f.scale != 1.0:
        keys[f"{prefix}.{name}.alpha"] = torch.tensor(f.scale * f.rank)
    return keys


def modelj_keys(part: str, name: str, f: LoraFactors) -> dict[str, torch.Tensor]:
    prefix = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}[part]
    return {f"{prefix}.{name}.lora.down.weight": f.down, f"{prefix}.{name}.lora.up.weight": f.up * f.scale}


def kohya_keys(part: str, name: str, f: LoraFactors) -> dict[str, torch.Tensor]:
    flat = name.replace(".", "_")
    if unflatten_kohya_name(flat) != name:
        raise ValueError(f"module name {name!r} cannot be written in kohya format unambiguously")
    stem = f"lora_{part}_{flat}"
    return {f"{stem}.lora_down.weight": f.down, f"{stem}.lora_up.weight": f.up,
            f"{stem}.alpha": torch.tensor(f.scale * f.rank)}
