"""Builds the hostile-input corpus in a directory: every file is made here, byte by byte; no blobs are committed.

Each ``Case`` knows how to write its file and what must happen when ``read_weights`` meets it:
- ``error``: a fragment of the one-line ``InputError`` message it must raise;
- otherwise it must read, and ``check(weights)`` states what was read.
``build_corpus(directory)`` writes them all (for the CLI / app / load tests that want the same files).

Several cases carry a pickle whose unpickling would run code: it creates the directory ``<dir>/PWNED-<case>``.
The tests prove that directory never appears.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save

from probex.weights import LoraFactors, ModelWeights, save_lora

# ------------------------------------------------------------------------------------------ SD-shaped layers
# (block, width, attention modules, transformer depth); cross-attention width per family.
SD_BLOCKS = [("down_blocks.0", 320, 2, 1), ("down_blocks.1", 640, 2, 1), ("down_blocks.2", 1280, 2, 1),
             ("mid_block", 1280, 1, 1), ("up_blocks.1", 1280, 3, 1), ("up_blocks.2", 640, 3, 1),
             ("up_blocks.3", 320, 3, 1)]
SDXL_BLOCKS = [("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10), ("mid_block", 1280, 1, 10),
               ("up_blocks.0", 1280, 3, 10), ("up_blocks.1", 640, 3, 2)]
FAMILY_LAYOUT = {"sd15": (SD_BLOCKS, 768), "sd2": (SD_BLOCKS, 1024), "sdxl": (SDXL_BLOCKS, 2048)}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def sd_attention_shapes(family: str = "sd15", blocks: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """The attention linears a typical UNet LoRA targets: canonical name → (d_out, d_in). ``blocks`` keeps a subset."""
    layout, cross = FAMILY_LAYOUT[family]
    shapes = {}
    for block, width, n_attentions, depth in layout:
        if blocks is not None and block not in blocks:
            continue
        for a in range(n_attentions):
            for t in range(depth):
                stem = f"{block}.attentions.{a}.transformer_blocks.{t}"
                for attn in ("attn1", "attn2"):
                    for proj in PROJECTIONS:
                        d_in = cross if attn == "attn2" and proj in ("to_k", "to_v") else width
                        shapes[f"{stem}.{attn}.{proj}"] = (width, d_in)
    return dict(sorted(shapes.items()))


def random_lora(shapes: dict[str, tuple[int, int]], rank: int | list[int] = 4, scale: float = 1.0,
                seed: int = 0) -> dict[str, LoraFactors]:
    """Nonzero random factors (a trained LoRA, not a zero-initialised one); a list of ranks cycles over modules."""
    gen = torch.Generator().manual_seed(seed)
    ranks = rank if isinstance(rank, list) else [rank]
    return {name: LoraFactors(torch.randn(d_out, ranks[i % len(ranks)], generator=gen) / 4,
                              torch.randn(ranks[i % len(ranks)], d_in, generator=gen) / d_in ** 0.5, scale)
            for i, (name, (d_out, d_in)) in enumerate(shapes.items())}


SMALL_SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 48),
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (32, 48)}


# ------------------------------------------------------------------------------------------- raw writers
def raw_safetensors(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    """Bytes of a safetensors file with exactly this header and data (no validation: that is the point)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensor_file(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """A well-formed safetensors file, written by the library itself."""
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def valid_lora_bytes(seed: int = 0) -> bytes:
    layers = random_lora(SMALL_SHAPES, rank=2, seed=seed)
    tensors = {}
    for name, f in layers.items():
        tensors[f"unet.{name}.lora_A.weight"], tensors[f"unet.{name}.lora_B.weight"] = f.down, f.up
    return tensor_file(tensors, {"class_name": "tabby cat", "lora_rank": "2"})


def lora_tensors(layers: dict[str, LoraFactors], dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, f in layers.items():
        out[f"unet.{name}.lora_A.weight"], out[f"unet.{name}.lora_B.weight"] = f.down.to(dtype), f.up.to(dtype)
    return out


class CodeRunner:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a malicious checkpoint runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def code_exec_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": {"w": [1.0, 2.0]}, "payload": CodeRunner(str(marker))}, protocol=2)


def torch_style_zip(payload: bytes) -> bytes:
    """What torch.save writes since 1.6: a zip holding archive/data.pkl (here: the code-running pickle)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buffer.getvalue()


def marker_for(directory: Path, case: str) -> Path:
    return directory / f"PWNED-{case}"


# ------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, str], bytes]  # (directory, case id) → file bytes
    filename: str = "model.safetensors"
    error: str | None = None  # message fragment of the InputError; None = must read
    check: Callable[[ModelWeights], None] | None = None
    max_bytes: int | None = None

    def write(self, directory: Path) -> Path:
        path = Path(directory) / f"{self.id}__{self.filename}"
        path.write_bytes(self.build(Path(directory), self.id))
        return path


def f32(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def overlapping(_d, _c):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    return raw_safetensors(header, bytes(24))


def out_of_range(_d, _c):
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [64, 80]}}
    return raw_safetensors(header, bytes(16))


def declared_2gb(_d, _c):
    header = {"w": {"dtype": "F32", "shape": [32768, 16384], "data_offsets": [0, 2**31]}}
    return raw_safetensors(header, bytes(64))


def declared_2gb_small_span(_d, _c):
    header = {"w": {"dtype": "F32", "shape": [32768, 16384], "data_offsets": [0, 64]}}
    return raw_safetensors(header, bytes(64))


def truncated(at: Callable[[bytes], int]):
    def build(_d, _c):
        whole = valid_lora_bytes()
        return whole[: at(whole)]
    return build


def header_len(whole: bytes) -> int:
    return struct.unpack("<Q", whole[:8])[0]


def with_header_text(text: bytes, length: int | None = None):
    return lambda _d, _c: struct.pack("<Q", len(text) if length is None else length) + text


def lora_with(dtype=torch.float32, poison: float | None = None, ranks=(2,)):
    def build(_d, _c):
        layers = random_lora(SMALL_SHAPES, rank=list(ranks), seed=1)
        tensors = lora_tensors(layers, dtype)
        if poison is not None:
            key = sorted(tensors)[1]
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[3] = poison
        return tensor_file(tensors)
    return build


def mismatched_ab(_d, _c):
    tensors = lora_tensors(random_lora(SMALL_SHAPES, rank=2))
    key = next(k for k in tensors if k.endswith("attn1.to_q.lora_A.weight"))
    tensors[key] = f32(3, 32)
    return tensor_file(tensors)


def missing_up(_d, _c):
    tensors = lora_tensors(random_lora(SMALL_SHAPES, rank=2))
    del tensors[next(k for k in tensors if k.endswith("attn2.to_k.lora_B.weight"))]
    return tensor_file(tensors)


def adapter(keys: dict[str, tuple[int, ...]]):
    return lambda _d, _c: tensor_file({k: f32(*s) for k, s in keys.items()})


def odd_metadata(_d, _c):
    header = {"__metadata__": {"epochs": 10, "name": "x"},
              "unet.a.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
              "unet.a.lora_B.weight": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]}}
    return raw_safetensors(header, bytes(16))


def int_tensor(dtype: str, itemsize: int):
    def build(_d, _c):
        header = {"unet.a.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
                  "unet.a.lora_B.weight": {"dtype": dtype, "shape": [2, 1], "data_offsets": [8, 8 + 2 * itemsize]}}
        return raw_safetensors(header, bytes(8 + 2 * itemsize))
    return build


def full_sd_checkpoint(_d, _c):
    """An SD 1.5 single-file checkpoint in miniature: LDM names, one attention block of real shapes, a conv, the
    VAE and CLIP entries, an integer position_ids buffer and 1-D schedules — what a Civitai full model holds."""
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": f32(320, 4, 3, 3),
               "model.diffusion_model.input_blocks.0.0.bias": f32(320),
               "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": f32(320, 320, 3, 3),
               "first_stage_model.encoder.conv_in.weight": f32(128, 3, 3, 3),
               "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": f32(768, 768),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
               "alphas_cumprod": torch.linspace(1, 0, 1000)}
    for name, shape in sd_attention_shapes("sd15", ["down_blocks.0"]).items():
        if name.startswith("down_blocks.0.attentions.0."):
            ldm = "input_blocks.1.1." + name.split(".attentions.0.", 1)[1]
            tensors[f"model.diffusion_model.{ldm}.weight"] = f32(*shape)
    return tensor_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()})


def sdxl_kohya_lora(_d, _c):
    """kohya (sd-scripts) SDXL LoRA: LDM block names (input_blocks.4.1 = down_blocks.1.attentions.0 …), fp16."""
    shapes = sd_attention_shapes("sdxl", ["down_blocks.1", "down_blocks.2"])
    tensors = {}
    for name, f in random_lora(shapes, rank=1).items():
        level, slot = int(name.split(".")[1]), int(name.split(".")[3])
        ldm = f"input_blocks.{1 + 3 * level + slot}.1." + name.split(".", 4)[4]
        stem = "lora_unet_" + ldm.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = f.down.half(), f.up.half()
        tensors[f"{stem}.alpha"] = torch.tensor(1.0).half()
    return tensor_file(tensors, {"ss_base_model_version": "sdxl_base_v1-0"})


def vit_like(_d, _c):
    tensors = {"patch_embed.proj.weight": f32(64, 3, 4, 4), "cls_token": f32(1, 1, 64),
               "blocks.0.attn.qkv.weight": f32(192, 64), "blocks.0.mlp.fc1.weight": f32(128, 64),
               "blocks.0.norm1.weight": f32(64), "head.weight": f32(10, 64),
               "stem.bn.num_batches_tracked": torch.tensor(7)}
    return tensor_file(tensors)


def text_encoder_only(_d, _c):
    tensors = {}
    for i in range(2):
        stem = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = f32(4, 768), f32(768, 4)
        tensors[f"{stem}.alpha"] = torch.tensor(4.0)
    return tensor_file(tensors)


def header_length_like_pickle_magic(_d, _c):
    """A valid file whose header is padded (with spaces, as the format allows) to 0x480 bytes: its first two bytes
    are 0x80 0x04, the protocol-4 pickle magic. It must read."""
    whole = valid_lora_bytes()
    text = whole[8: 8 + header_len(whole)].rstrip()
    assert len(text) <= 0x480
    return struct.pack("<Q", 0x480) + text.ljust(0x480) + whole[8 + header_len(whole):]


def lora_missing_layer(layer: str, shapes: dict[str, tuple[int, int]] | None = None, seed: int = 0):
    """Builder for the service-level case "the LoRA lacks the expert's layer": SD-shaped LoRA without ``layer``."""
    def build(directory: Path, case: str) -> bytes:
        layers = random_lora(shapes or sd_attention_shapes("sd15"), rank=2, seed=seed)
        del layers[layer]
        path = Path(directory) / f"{case}-tmp.safetensors"
        save_lora(path, layers, "modelj")
        data = path.read_bytes()
        path.unlink()
        return data
    return build


def expect(**facts):
    """A check that reads ``facts`` off the weights: kind, family, n_layers, n_text, dtype."""
    def check(w: ModelWeights):
        observed = {"kind": w.kind, "family": w.signature.family, "n_layers": len(w.layers),
                    "n_text": len(w.text_encoder)}
        for key, value in facts.items():
            assert observed[key] == value, f"{key}: {observed[key]!r} != {value!r}"
        for layer in [*w.layers.values(), *w.text_encoder.values()]:
            for t in (layer.up, layer.down) if isinstance(layer, LoraFactors) else (layer,):
                assert t.dtype == torch.float32 and t.dim() == 2
    return check


MB = 2**20
CASES = [
    # --- not safetensors at all
    Case("empty_file", lambda d, c: b"", error="empty"),
    Case("random_bytes", lambda d, c: random.Random(0).randbytes(4096), error="not a safetensors file"),
    Case("pickle_ckpt_runs_code", lambda d, c: code_exec_pickle(marker_for(d, c)), "model.ckpt", error="pickle"),
    Case("pickle_bin_state_dict", lambda d, c: pickle.dumps({"w": [0.5] * 8}, protocol=4), "pytorch_model.bin",
         error="pickle"),
    Case("pickle_pt_zip_runs_code", lambda d, c: torch_style_zip(code_exec_pickle(marker_for(d, c))), "model.pt",
         error="zip archive"),
    Case("pickle_renamed_safetensors", lambda d, c: code_exec_pickle(marker_for(d, c)), error="pickle"),
    Case("pickle_protocol0_renamed", lambda d, c: pickle.dumps({"w": 1.0}, protocol=0), error="text (protocol 0) Python pickle"),
    Case("zip_archive", lambda d, c: torch_style_zip(b"not a pickle"), error="zip archive"),
    Case("safetensors_named_pth", lambda d, c: valid_lora_bytes(), "model.pth", error=".pth files are pickles"),
    Case("gguf_file", lambda d, c: b"GGUF" + bytes(60), "model.gguf", error="GGUF"),
    # --- broken safetensors structure
    Case("truncated_header", truncated(lambda b: 8 + header_len(b) // 2), error="exceeds the file size"),
    Case("truncated_data", truncated(lambda b: len(b) - 10), error="truncated file"),
    Case("header_length_beyond_file", lambda d, c: struct.pack("<Q", 5000) + b'{"a": 1}', error="exceeds the file"),
    Case("header_too_short_file", lambda d, c: b"\x05\x00\x00", error="too short"),
    Case("header_not_json", with_header_text(b"{this is not json"), error="not valid JSON"),
    Case("header_not_utf8", with_header_text(b'{"\xff\xfe": 1}'), error="not UTF-8"),
    Case("header_huge_declared", with_header_text(b"{}", length=200 * MB), error="limit 100 MiB"),
    Case("header_json_list", with_header_text(b"[1, 2, 3]"), error="not an object"),
    Case("header_deeply_nested", with_header_text(b"[" * 200_000), error="not valid JSON"),
    Case("header_no_tensors", with_header_text(b"{}"), error="holds no tensors"),
    Case("offsets_overlapping", overlapping, error="overlap"),
    Case("offsets_out_of_range", out_of_range, error="data region"),
    Case("declared_2gb_tensor", declared_2gb, error="ends at byte 2,147,483,648"),
    Case("declared_2gb_shape_small_span", declared_2gb_small_span, error="declares 2,147,483,648 bytes"),
    Case("bytes_after_last_tensor", lambda d, c: raw_safetensors(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(12)), error="after the last tensor"),
    Case("negative_shape", lambda d, c: raw_safetensors(
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), error="invalid shape"),
    Case("unknown_dtype", lambda d, c: raw_safetensors(
        {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), error="unknown dtype"),
    # non-string metadata values are refused, not coerced: the format says str → str and the library refuses them too
    Case("metadata_odd_types", odd_metadata, error="not a string"),
    Case("metadata_not_object", lambda d, c: raw_safetensors(
        {"__metadata__": ["a"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        error="__metadata__ is a JSON list"),
    Case("over_size_limit", lambda d, c: valid_lora_bytes(), error="over the", max_bytes=1000),
    # --- bad values
    Case("nan_weights", lora_with(poison=float("nan")), error="NaN or Inf"),
    Case("inf_weights_fp16", lora_with(torch.float16, poison=float("inf")), error="NaN or Inf"),
    Case("f64_beyond_float32", lora_with(torch.float64, poison=1e300), error="beyond the float32 range"),
    Case("int_dtype", int_tensor("I32", 4), error="integer dtype I32"),
    Case("bool_dtype", int_tensor("BOOL", 1), error="boolean dtype BOOL"),
    # --- wrong adapters
    Case("lora_mismatched_ab", mismatched_ab, error="mismatched factors"),
    Case("lora_missing_up", missing_up, error="no up (B) factor"),
    Case("loha_adapter", adapter({"lora_unet_down_blocks_0_attn1_to_q.hada_w1_a": (32, 4),
                                  "lora_unet_down_blocks_0_attn1_to_q.hada_w1_b": (4, 32)}),
         error="LoHa adapter (hada_w1_a"),
    Case("lokr_adapter", adapter({"lora_unet_down_blocks_0_attn1_to_q.lokr_w1": (4, 4),
                                  "lora_unet_down_blocks_0_attn1_to_q.lokr_w2": (8, 8)}), error="LoKr adapter"),
    Case("dora_kohya", adapter({"lora_unet_x_to_q.lora_down.weight": (4, 32), "lora_unet_x_to_q.lora_up.weight":
                                (32, 4), "lora_unet_x_to_q.dora_scale": (1, 32)}), error="DoRA adapter"),
    Case("dora_peft", adapter({"unet.x.to_q.lora_A.weight": (4, 32), "unet.x.to_q.lora_B.weight": (32, 4),
                               "unet.x.to_q.lora_magnitude_vector": (32,)}), error="DoRA adapter"),
    Case("lora_with_unknown_key", adapter({"unet.x.to_q.lora_A.weight": (4, 32), "unet.x.to_q.lora_B.weight":
                                           (32, 4), "something_else": (3, 3)}), error="unrecognised key"),
    Case("only_1d_tensors", adapter({"a": (4,), "b": (8,)}), error="nothing to read"),
    # --- must WORK
    Case("length_prefix_like_pickle_magic", header_length_like_pickle_magic, check=expect(kind="lora", n_layers=3)),
    Case("fp16_lora", lora_with(torch.float16), check=expect(kind="lora", n_layers=3)),
    Case("bf16_lora", lora_with(torch.bfloat16), check=expect(kind="lora", n_layers=3)),
    Case("mixed_ranks", lora_with(ranks=(1, 4, 8)), check=expect(kind="lora", n_layers=3)),
    Case("text_encoder_only_lora", text_encoder_only, check=expect(kind="lora", n_layers=0, n_text=2)),
    Case("full_sd_checkpoint", full_sd_checkpoint, check=expect(kind="full", family="sd15", n_layers=10, n_text=1)),
    Case("sdxl_kohya_lora", sdxl_kohya_lora, check=expect(kind="lora", family="sdxl", n_layers=192)),
    Case("non_diffusion_model", vit_like, check=expect(kind="full", family=None, n_layers=5)),
    Case("lora_missing_expert_layer",
         lora_missing_layer("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"),
         check=expect(kind="lora", family="sd15", n_layers=127)),
]


def build_corpus(directory) -> dict[str, Path]:
    """Write every case into ``directory``: case id → path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {case.id: case.write(directory) for case in CASES}
