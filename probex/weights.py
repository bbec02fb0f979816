"""Model files → canonical named layers, safely.

Only safetensors is ever parsed, and its header is validated here before the `safetensors` library sees the file:
length prefix vs file size, header size cap, UTF-8 JSON object, float dtypes, shape×dtype size == offset span, offsets
inside the data region, contiguous and non-overlapping. Pickles (.ckpt/.pt/.bin/.pth, zip checkpoints) are refused by
their bytes, not only their names; nothing is ever unpickled.

What comes out (``ModelWeights``) is the same whatever the file's dialect:
- LoRAs keep their factors, ``LoraFactors(up=B, down=A, scale)``, under canonical diffusers module names
  (``down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q``). Dialects read: diffusers/peft (``lora_A/lora_B``),
  Model-J / old diffusers (``.lora.down/.lora.up``, ``processor.to_q_lora``), kohya-ss/A1111 (``lora_unet_…``,
  ``.alpha``; LDM-named SDXL keys ``input_blocks_4_1_…`` are converted to diffusers names).
- Full checkpoints: every ≥2-D float weight as a 2-D matrix (conv kernels reshaped output-channels first);
  SD single-file checkpoints (``model.diffusion_model.…``) are renamed to diffusers UNet names, the VAE is dropped.
- Text-encoder entries go to ``text_encoder`` (first encoder: bare module name; second: ``text_encoder_2.`` prefix).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from probex.errors import InputError, first_line

MAX_HEADER_BYTES = 100 * 2**20  # real headers are kilobytes; anything near this is hostile or not safetensors

# Weights must be floats. Everything else the format can hold is named here so the error can say what it was.
FLOAT_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
OTHER_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
                  "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1, "C64": 8}
# Integer buffers that real checkpoints carry next to their weights (BatchNorm counters, CLIP position ids, EMA
# counters). They are bookkeeping, not weights: skipped instead of refused, so a ResNet or SD checkpoint still reads.
BOOKKEEPING_SUFFIXES = ("num_batches_tracked", "position_ids", "token_type_ids", "num_updates")

PICKLE_EXTENSIONS = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

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


# ----------------------------------------------------------------------------------------------------- reading
def read_weights(path, *, max_bytes: int | None = None) -> ModelWeights:
    """Read a ``.safetensors`` model or LoRA into canonical layers; every user-caused failure is an ``InputError``."""
    path = Path(path)
    size = check_file(path, max_bytes)
    refuse_non_safetensors(path)
    entries, metadata = read_safetensors_header(path, size)
    tensors = load_float_tensors(path, entries)
    return weights_from_tensors(tensors, metadata, source=path.name)


def check_file(path: Path, max_bytes: int | None) -> int:
    try:
        is_file = path.is_file()
    except (OSError, ValueError) as err:  # a name too long to look up, a NUL byte
        reason = getattr(err, "strerror", None) or first_line(err)
        raise InputError(f"{short(path.name)}: not a usable file name ({reason})") from None
    if not is_file:
        raise InputError(f"{short(path.name)}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name}: the file is empty (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{path.name}: {human_bytes(size)} is over the {human_bytes(max_bytes)} limit")
    return size


def refuse_non_safetensors(path: Path) -> None:
    """Refuse pickles, archives and other formats by their first bytes (a renamed pickle is still a pickle), then by
    extension."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
    # A safetensors length prefix can look like pickle magic (a 1,152-byte header starts 0x80 0x04); a "{" right
    # after a length that fits the file settles it.
    declared = int.from_bytes(head[:8], "little")
    if not (len(head) >= 9 and head[8:9] == b"{" and 8 + declared <= path.stat().st_size):
        refuse_by_magic(path.name, head)
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        raise InputError(f"{path.name}: {path.suffix} files are pickles, which ProbeX never opens (unpickling can "
                         "run code); convert it to .safetensors")


SNIFF_BYTES = 512
# first bytes of formats people upload by mistake (a saved error page, a compressed download, a text pickle)
MAGIC = ((b"GGUF", "a GGUF file"), (b"\x89HDF", "an HDF5 (Keras .h5) file"), (b"\x93NUMPY", "a NumPy .npy file"),
         (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"), (b"BZh", "a bzip2-compressed file"),
         (b"\xfd7zXZ\x00", "an xz-compressed file"), (b"7z\xbc\xaf", "a 7-Zip archive"),
         (b"(\xb5/\xfd", "a zstd-compressed file"), (b"\x7fELF", "an executable (ELF)"), (b"%PDF", "a PDF document"),
         (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
         (b"\x08\x01\x12", "an ONNX / protobuf file"))
# protocol 0–1 pickles are text-like: MARK then a dict/list/tuple, or a GLOBAL opcode "c<module>\n<name>\n"
TEXT_PICKLE = re.compile(rb"^(?:\((?:dp|lp|tp|I|S'|V|F|N)|c[A-Za-z_][\w.]*\n[A-Za-z_]\w*\n|[}\]]q?\x00?)")


def refuse_by_magic(name: str, head: bytes) -> None:
    if len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        raise InputError(f"{name}: this is a Python pickle (PyTorch .ckpt/.bin/.pt); ProbeX never unpickles "
                         "files because unpickling can run code — convert it to .safetensors")
    if TEXT_PICKLE.match(head):
        raise InputError(f"{name}: this is a text (protocol 0) Python pickle; ProbeX never unpickles files because "
                         "unpickling can run code — convert it to .safetensors")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise InputError(f"{name}: this is a zip archive (a PyTorch .pt/.ckpt checkpoint is a zip of pickles); "
                         "ProbeX only reads .safetensors")
    for magic, what in MAGIC:
        if head.startswith(magic):
            raise InputError(f"{name}: this is {what}; ProbeX only reads .safetensors")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise InputError(f"{name}: this is a tar archive; extract the .safetensors file from it first")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:200]:
        raise InputError(f"{name}: this is an HTML page, not a model (a download link that led to a web page?); "
                         "link the .safetensors file itself")
    if text.startswith(b"<?xml"):
        raise InputError(f"{name}: this is an XML document; ProbeX only reads .safetensors")
    if text[:1] in (b"{", b"[") and len(head) >= 9 and head[8:9] != b"{":
        raise InputError(f"{name}: this is a JSON text file, not a .safetensors model")
    if head and is_text(head):
        raise InputError(f"{name}: this is a text file, not a .safetensors model")


def is_text(data: bytes) -> bool:
    """Printable UTF-8 throughout (a safetensors file starts with an 8-byte length: NUL bytes)."""
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        try:  # the sniffed block may end inside a multi-byte character
            decoded = data[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in decoded)


def read_safetensors_header(path: Path, size: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the header and return ({tensor name: entry} for float tensors to read, metadata)."""
    name = path.name
    if size < 8:
        raise InputError(f"{name}: {size} bytes is too short to be a safetensors file")
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise InputError(f"{name}: declares a {header_len:,}-byte header (limit {human_bytes(MAX_HEADER_BYTES)}); "
                             "not a safetensors file")
        if 8 + header_len > size:
            raise InputError(f"{name}: header length {header_len:,} exceeds the file size {size:,}; truncated "
                             "download or not a safetensors file")
        raw = f.read(header_len)
    header = parse_header_json(name, raw)
    metadata = check_metadata(name, header.pop("__metadata__", None))
    if not header:
        raise InputError(f"{name}: the safetensors file holds no tensors")
    spans = {tensor: check_entry(name, tensor, entry) for tensor, entry in header.items()}
    check_offsets(name, spans, size - 8 - header_len)
    return select_float_entries(name, header), metadata


def parse_header_json(name: str, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: the header is not UTF-8 text; not a safetensors file") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested JSON from a hostile header
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise InputError(f"{name}: the header is not valid JSON ({reason}); truncated or not a safetensors "
                         "file") from None
    if not isinstance(header, dict):
        raise InputError(f"{name}: the header is a JSON {type(header).__name__}, not an object; not a safetensors "
                         "file")
    return header


def check_metadata(name: str, metadata) -> dict[str, str]:
    """safetensors metadata is str → str; other types are refused (the safetensors library refuses them too)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(f"{name}: __metadata__ is a JSON {type(metadata).__name__}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InputError(f"{name}: metadata value for {short(key)} is a JSON {type(value).__name__}, not a "
                             "string (safetensors metadata must be strings)")
    return metadata


def check_entry(name: str, tensor: str, entry) -> tuple[int, int]:
    """One header entry: known dtype, non-negative integer shape, offsets spanning exactly shape × itemsize bytes."""
    where = f"{name}: tensor {short(tensor)}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    itemsize = (FLOAT_ITEMSIZE.get(dtype) or OTHER_ITEMSIZE.get(dtype)) if isinstance(dtype, str) else None
    if itemsize is None:
        raise InputError(f"{where} has an unknown dtype {short(dtype)}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise InputError(f"{where} has an invalid shape {short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise InputError(f"{where} has invalid data offsets {short(offsets)}")
    declared = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != declared:
        raise InputError(f"{where} declares {declared:,} bytes ({dtype} {tuple(shape)}) but its offsets span "
                         f"{offsets[1] - offsets[0]:,} bytes")
    return offsets[0], offsets[1]


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_offsets(name: str, spans: dict[str, tuple[int, int]], data_len: int) -> None:
    """Tensors must tile the data region exactly: in range, no overlap, no holes, nothing trailing."""
    position, previous = 0, None
    for tensor, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if end > data_len:
            raise InputError(f"{name}: tensor {short(tensor)} ends at byte {end:,} of a {data_len:,}-byte data "
                             "region; truncated file")
        if begin < position:
            raise InputError(f"{name}: tensors {short(previous)} and {short(tensor)} overlap in the file")
        if begin > position:
            raise InputError(f"{name}: {begin - position:,} unused bytes before tensor {short(tensor)}; not a "
                             "well-formed safetensors file")
        position, previous = end, tensor
    if position != data_len:
        raise InputError(f"{name}: {data_len - position:,} bytes after the last tensor; not a well-formed "
                         "safetensors file")


def select_float_entries(name: str, header: dict[str, dict]) -> dict[str, dict]:
    selected = {}
    for tensor, entry in header.items():
        dtype = entry["dtype"]
        if dtype in FLOAT_ITEMSIZE:
            selected[tensor] = entry
        elif dtype.startswith(("I", "U")) and tensor.endswith(BOOKKEEPING_SUFFIXES):
            continue
        else:
            kind = {"B": "boolean", "I": "integer", "U": "integer"}.get(dtype[0], "unsupported")
            raise InputError(f"{name}: tensor {short(tensor)} has {kind} dtype {dtype}; ProbeX reads float weights "
                             "only (F16, BF16, F32, F64)")
    return selected


def load_float_tensors(path: Path, entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Read the validated tensors with the safetensors library; float32 out, NaN/Inf refused by tensor name."""
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for tensor in entries:
                value = f.get_tensor(tensor)
                if not torch.isfinite(value).all():
                    raise InputError(f"{path.name}: tensor {short(tensor)} contains NaN or Inf values")
                value = value.to(torch.float32)
                if not torch.isfinite(value).all():
                    raise InputError(f"{path.name}: tensor {short(tensor)} has values beyond the float32 range")
                tensors[tensor] = value
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path.name}: safetensors could not read the file ({first_line(err)})") from None
    return tensors


def human_bytes(n: int) -> str:
    """Sizes in binary units everywhere (the upload limit is set in MiB): 256 MiB, never "268.4 MB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:,} B"


def short(value, limit: int = 80) -> str:
    """A user-supplied name or value, quoted and clipped so messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------- tensors → canonical
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


# ------------------------------------------------------------------------------------------------- writing
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
