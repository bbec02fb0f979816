"""Key names → canonical diffusers module names: LoRA keys of every dialect (diffusers/peft, Model-J / old
diffusers, kohya-ss/A1111), full-checkpoint keys (SD single-file prefixes), kohya's flattened names and LDM UNet
paths. Names only: no tensors are looked at here."""
from __future__ import annotations

import re


# A LoRA key → (part, module, role); part "unet" | "te" | "te2", role "up" | "down" | "alpha".
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
LEGACY_KEY = re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>up|down)\.weight$")
PROCESSOR_KEY = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>\w+?)_lora\.(?P<role>up|down)\.weight$")
KOHYA_KEY = re.compile(r"^lora_(?P<part>unet|te|te1|te2)_(?P<flat>\w+?)\.(?:lora_(?P<role>up|down)\.weight|alpha)$")
ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")

PREFIXES = (("base_model.model.", None), ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))


def parse_lora_key(key: str) -> tuple[str, str, str] | None:
    kohya = KOHYA_KEY.match(key)
    if kohya:
        part = {"unet": "unet", "te": "te", "te1": "te", "te2": "te2"}[kohya["part"]]
        return part, unflatten_kohya_name(kohya["flat"]), kohya["role"] or "alpha"
    part, key = split_prefix(key)
    if m := PEFT_KEY.match(key):
        return part, m["module"], "down" if m["ab"] == "A" else "up"
    if m := PROCESSOR_KEY.match(key):
        projection = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return part, f"{m['module']}.{projection}", m["role"]
    if m := LEGACY_KEY.match(key):
        return part, m["module"], m["role"]
    if m := ALPHA_KEY.match(key):
        return part, m["module"], "alpha"
    return None


def split_prefix(key: str) -> tuple[str, str]:
    part = "unet"
    for prefix, prefix_part in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            part = prefix_part or part
    return part, key


SINGLE_FILE_PREFIXES = (("model.diffusion_model.", "unet"), ("unet.", "unet"), ("cond_stage_model.", "te"),
                        ("conditioner.", "te"), ("text_encoder.", "te"), ("text_encoder_2.", "te2"),
                        ("first_stage_model.", None), ("vae.", None), ("model_ema.", None))


def full_checkpoint_name(key: str) -> tuple[str | None, str]:
    """(part, canonical name) of a full-checkpoint weight; part None = dropped (VAE, EMA copies)."""
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    for prefix, part in SINGLE_FILE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            if prefix == "model.diffusion_model.":
                name = ldm_to_diffusers(name)
            return part, name if part != "te2" else f"text_encoder_2.{name}"
    return "unet", name


# ----------------------------------------------------------------------------------- names: kohya and LDM
# Diffusers / LDM / CLIP name segments that contain underscores. kohya flattens "." to "_"; the way back is a greedy
# longest match against these segments (every other "_" was a "."). save_lora checks a name survives the round trip.
UNDERSCORE_SEGMENTS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_in", "conv_out", "conv_shortcut", "conv_norm_out", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "encoder_hid_proj", "class_embedding", "input_blocks", "output_blocks", "middle_block", "in_layers",
    "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2", "final_layer_norm", "token_embedding",
    "position_embedding", "text_projection",
}
LONGEST_SEGMENT = max(s.count("_") + 1 for s in UNDERSCORE_SEGMENTS)


def unflatten_kohya_name(flat: str) -> str:
    tokens, out, i = flat.split("_"), [], 0
    while i < len(tokens):
        for length in range(min(LONGEST_SEGMENT, len(tokens) - i), 0, -1):
            candidate = "_".join(tokens[i: i + length])
            if length == 1 or candidate in UNDERSCORE_SEGMENTS:
                out.append(candidate)
                i += length
                break
    return ".".join(out)


RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP_RENAMES = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
LDM_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")
LDM_NAME = re.compile(
    r"^(?P<where>input_blocks|middle_block|output_blocks)\.(?:(?P<i>\d+)\.)?(?P<j>\d+)(?P<rest>(\..+)?)$")


def ldm_to_diffusers(name: str) -> str:
    """LDM UNet path (SD single-file checkpoints, kohya SDXL keys) → diffusers path; other names unchanged.

    Both SD 1.x/2.x and SDXL have two resnets per down level and three per up level, so input block i is level
    (i-1)//3, slot (i-1)%3 (slot 2 = the downsampler), and output block i is level i//3, slot i%3.
    """
    for old, new in TOP_RENAMES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    m = LDM_NAME.match(name)
    if not m or (m["where"] != "middle_block") != (m["i"] is not None):
        return name
    j, rest = int(m["j"]), m["rest"]
    if m["where"] == "middle_block":
        target = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}.get(j)
    elif m["where"] == "input_blocks":
        level, slot = divmod(int(m["i"]) - 1, 3)
        if rest.startswith(".op"):
            target, rest = f"down_blocks.{level}.downsamplers.0.conv", rest[len(".op"):]
        else:
            target = {0: f"down_blocks.{level}.resnets.{slot}", 1: f"down_blocks.{level}.attentions.{slot}"}.get(j)
    else:
        level, slot = divmod(int(m["i"]), 3)
        if rest.startswith(".conv") and j >= 1:
            target, rest = f"up_blocks.{level}.upsamplers.0.conv", rest[len(".conv"):]
        else:
            target = {0: f"up_blocks.{level}.resnets.{slot}", 1: f"up_blocks.{level}.attentions.{slot}"}.get(j)
    if target is None:
        return name
    if ".resnets." in target:
        for old, new in RESNET_RENAMES.items():
            if rest == "." + old or rest.startswith(f".{old}."):
                rest = "." + new + rest[len(old) + 1:]
                break
    return target + rest
