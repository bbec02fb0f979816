"""The canonical form every model file is read into: LoRA factors or 2-D matrices under diffusers module names,
the architecture's signature (with the SD family it is recognised as) and a one-line description for people."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch

FAMILY_NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL"}


# ---------------------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class LoraFactors:
    """One LoRA'd linear: W' = W + scale · up @ down. ``up`` is B (d_out, r), ``down`` is A (r, d_in), float32."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1])

    def dense(self) -> torch.Tensor:
        return self.scale * self.up @ self.down


@dataclass(frozen=True)
class Signature:
    modules: tuple[tuple[str, tuple[int, int]], ...]  # sorted (canonical name, (d_out, d_in))
    family: str | None  # "sd15" | "sd2" | "sdxl" | None
    digest: str  # sha256 over `modules`: equal digests = same architecture

    @classmethod
    def of(cls, layers: dict[str, LoraFactors | torch.Tensor]) -> "Signature":
        modules = tuple(sorted((name, layer_shape(layer)) for name, layer in layers.items()))
        digest = hashlib.sha256(json.dumps(modules).encode()).hexdigest()
        return cls(modules, detect_family(modules), digest)


@dataclass
class ModelWeights:
    kind: str  # "lora" | "full"
    layers: dict[str, LoraFactors | torch.Tensor]
    text_encoder: dict[str, LoraFactors | torch.Tensor]
    metadata: dict[str, str]
    signature: Signature
    source: str


def layer_shape(layer: LoraFactors | torch.Tensor) -> tuple[int, int]:
    return layer.shape if isinstance(layer, LoraFactors) else tuple(layer.shape)


# Frobenius norms of a LoRA's update scale·B·A. Trained LoRAs sit near 1e-3…1e2; beyond MAX the arithmetic of any
# reader overflows float32, below NEGLIGIBLE the file changes nothing a reader could see.
MAX_UPDATE_NORM = 1e8
NEGLIGIBLE_UPDATE_NORM = 1e-6


def update_norm(f: LoraFactors) -> float:
    """‖scale · up @ down‖_F in float64 from the r×r Gram matrices, without forming the d_out × d_in update."""
    up, down = f.up.double(), f.down.double()
    gram = ((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt()
    return abs(f.scale) * float(gram)


def negligible(weights: "ModelWeights") -> bool:
    """A LoRA whose every update is (almost) zero: all-zero or untrained (B = 0) factors, alpha 0, denormals."""
    layers = [*weights.layers.values(), *weights.text_encoder.values()]
    return weights.kind == "lora" and all(update_norm(f) < NEGLIGIBLE_UPDATE_NORM for f in layers
                                          if isinstance(f, LoraFactors))


# ------------------------------------------------------------------------------------------------ families
SD_WIDTHS = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280,
             "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}
SDXL_WIDTHS = {"down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280, "up_blocks.0": 1280,
               "up_blocks.1": 640}
ATTENTION_MODULE = re.compile(
    r"^(?P<block>(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.(?P<depth>\d+)\."
    r"(?P<attn>attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


def detect_family(modules) -> str | None:
    """SD 1.5 / SD 2.x / SDXL UNet from attention module names and shapes (LoRA or full), else None.

    Cross-attention width (attn2.to_k/to_v in_features) 768 / 1024 / 2048 tells the base; the per-block widths
    (320/640/1280, SDXL without level-0 and level-3 attention) and transformer depth (1 vs up to 10) confirm it.
    """
    cross, widths, depth = set(), {}, 0
    for name, (d_out, d_in) in modules:
        m = ATTENTION_MODULE.match(name)
        if not m:
            continue
        if m["attn"] == "attn2" and m["proj"] in ("to_k", "to_v"):
            cross.add(d_in)
        widths.setdefault(m["block"], set()).add(d_out)
        depth = max(depth, int(m["depth"]))
    if len(cross) != 1:
        return None
    expected, max_depth = {768: (SD_WIDTHS, 0), 1024: (SD_WIDTHS, 0), 2048: (SDXL_WIDTHS, 9)}.get(next(iter(cross)),
                                                                                                  (None, 0))
    if expected is None or depth > max_depth:
        return None
    if not all(block in expected and seen == {expected[block]} for block, seen in widths.items()):
        return None
    return {768: "sd15", 1024: "sd2", 2048: "sdxl"}[next(iter(cross))]


def describe(weights: ModelWeights) -> str:
    """One line for people: e.g. "LoRA, 128 modules, rank 4–8, SD 1.5 UNet (+ 24 text-encoder modules)"."""
    family = FAMILY_NAMES.get(weights.signature.family)
    if weights.kind == "lora":
        ranks = [f.rank for f in [*weights.layers.values(), *weights.text_encoder.values()]]
        low, high = min(ranks), max(ranks)
        modules = f"{len(weights.layers)} modules" if weights.layers else "text encoder only"
        parts = [f"LoRA, {modules}", f"rank {low}" if low == high else f"rank {low}–{high}"]
    else:
        parts = [f"full checkpoint, {len(weights.layers)} weight matrices"]
    if family:
        parts.append(f"{family} UNet")
    text = ", ".join(parts)
    if weights.text_encoder:
        text += f" (+ {len(weights.text_encoder)} text-encoder {'modules' if weights.kind == 'lora' else 'weights'})"
    return text
