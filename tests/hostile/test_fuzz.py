"""Hypothesis mutates valid LoRA files; read_weights must answer with a result or a one-line ProbexError — never
another exception, never a hang (deadline 2 s per example).

Bounded for the test suite: PROBEX_FUZZ_EXAMPLES examples per test (default 200). A longer run:
    PROBEX_FUZZ_EXAMPLES=20000 python -m pytest tests/hostile/test_fuzz.py -q
"""
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probex.errors import ProbexError
from probex.weights import ModelWeights, read_weights, save_lora

from hostile.corpus import SMALL_SHAPES, header_len, random_lora, valid_lora_bytes

FUZZ = settings(max_examples=int(os.environ.get("PROBEX_FUZZ_EXAMPLES", "200")), deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def kohya_lora_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.safetensors"
        save_lora(path, random_lora(SMALL_SHAPES, rank=[1, 2, 3], scale=0.5), "kohya", metadata={"ss_network_dim": "2"})
        return path.read_bytes()


BASES = {"diffusers": valid_lora_bytes(), "kohya": kohya_lora_bytes()}


def read_bytes(data: bytes):
    """read_weights on these bytes: the result, or the ProbexError it raised. Anything else fails the test."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.safetensors"
        path.write_bytes(data)
        try:
            return read_weights(path)
        except ProbexError as err:
            assert "\n" not in str(err)
            return err


def test_bases_are_valid():
    for data in BASES.values():
        assert isinstance(read_bytes(data), ModelWeights)


def header_end(data: bytes) -> int:
    return 8 + header_len(data)


@pytest.mark.parametrize("base", BASES)
@FUZZ
@given(data=st.data())
def test_header_byte_mutations(base, data):
    whole = bytearray(BASES[base])
    edits = data.draw(st.lists(st.tuples(st.integers(0, header_end(whole) - 1), st.integers(0, 255)),
                               min_size=1, max_size=8))
    for position, value in edits:
        whole[position] = value
    read_bytes(bytes(whole))


@pytest.mark.parametrize("base", BASES)
@FUZZ
@given(data=st.data())
def test_data_byte_mutations(base, data):
    whole = bytearray(BASES[base])
    edits = data.draw(st.lists(st.tuples(st.integers(header_end(whole), len(whole) - 1), st.integers(0, 255)),
                               min_size=1, max_size=16))
    for position, value in edits:
        whole[position] = value
    read_bytes(bytes(whole))


@FUZZ
@given(cut=st.integers(0, len(BASES["diffusers"])), tail=st.binary(max_size=64),
       length_delta=st.integers(-64, 64))
def test_truncation_padding_and_length_prefix(cut, tail, length_delta):
    whole = BASES["diffusers"]
    length = max(0, header_len(whole) + length_delta)
    read_bytes(struct.pack("<Q", length) + whole[8:cut] + tail)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["F16", "BF16", "F32", "F64", "I64", "BOOL", "F8_E4M3"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
PLAUSIBLE = st.lists(st.integers(-4, 2000), min_size=0, max_size=3) | JSON_VALUES


@pytest.mark.parametrize("base", BASES)
@FUZZ
@given(data=st.data())
def test_header_json_mutations(base, data):
    """Structure-aware: replace fields, entries, keys and metadata with arbitrary or plausible JSON values."""
    whole = BASES[base]
    header = json.loads(whole[8:header_end(whole)])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(header) + ["__metadata__", "new.lora_A.weight"]))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = data.draw(PLAUSIBLE)
        if field is None or not isinstance(header.get(key), dict):
            header[key] = value
        else:
            header[key][field] = value
    text = json.dumps(header).encode()
    read_bytes(struct.pack("<Q", len(text)) + text + whole[header_end(whole):])
