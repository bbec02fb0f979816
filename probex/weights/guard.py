"""The safetensors guard: a file from anyone → validated float tensors, or one-line ``InputError``.

The header is validated here before the `safetensors` library sees the file: length prefix vs file size, header size
cap, UTF-8 JSON object, float dtypes, shape×dtype size == offset span, offsets inside the data region, contiguous and
non-overlapping. Pickles (.ckpt/.pt/.bin/.pth, zip checkpoints) are refused by their bytes, not only their names;
nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from probex.errors import InputError
from probex.weights.messages import first_line, human_bytes, over_limit, short

MAX_HEADER_BYTES = 100 * 2**20  # real headers are kilobytes; anything near this is hostile or not safetensors

# Weights must be floats. Everything else the format can hold is named here so the error can say what it was.
FLOAT_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
OTHER_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8,
                  "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1, "C64": 8}
# Integer buffers that real checkpoints carry next to their weights (BatchNorm counters, CLIP position ids, EMA
# counters). They are bookkeeping, not weights: skipped instead of refused, so a ResNet or SD checkpoint still reads.
BOOKKEEPING_SUFFIXES = ("num_batches_tracked", "position_ids", "token_type_ids", "num_updates")

PICKLE_EXTENSIONS = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


def check_file(path: Path, max_bytes: int | None) -> int:
    try:
        is_file = path.is_file()
    except (OSError, ValueError) as err:  # a name too long to look up, a NUL byte
        reason = getattr(err, "strerror", None) or first_line(err)
        raise InputError(f"{short(path.name)}: not a usable file name ({reason})") from None
    if not is_file:
        what = "a folder" if path.is_dir() else "not a regular file" if path.exists() else None
        raise InputError(f"{short(path.name)}: " + (f"{what}, not a model file" if what else "no such file"))
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name}: the file is empty (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{path.name}: {over_limit(size, max_bytes)}")
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
# protocol 0 pickles are text: after any MARKs "(", an opcode with its exact argument syntax — INT / LONG (torch's
# legacy format starts with the LONG magic number "L1195…L"), FLOAT, STRING, UNICODE (memoized: "p0"), NONE, GLOBAL /
# INST "c<module>\n<name>\n", DICT / LIST / TUPLE; protocol 1 starts with an empty dict / list / tuple. Strict enough
# that notes such as "(Note: …" or "(I think …" are not called pickles.
TEXT_PICKLE = re.compile(rb"""^\(*(?:
      [IL]-?\d+L?\n
    | F-?\d[\d.eE+-]*\n
    | S'[^\n]*'\n
    | V[^\n]*\n(?:p\d+\n|\.)
    | N(?:\.|(?=[NIFLSVc(tla]))
    | [ci][A-Za-z_][\w.]*\n[A-Za-z_]\w*\n
    | (?<=\()[dlt](?:p\d+\n|\.)
    | [}\]](?:q.|\.|\()
    | \)\.
)""", re.VERBOSE | re.DOTALL)


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
