"""Answers to hostile but readable files are finite or one-line refusals; file metadata is inert in the card; bad
arguments are refused at the edge. Files are built here from the shipped bundle's own examples, then damaged.

Runs against the committed bundle that `python app.py` serves (checkpoints/emoji-mini).
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from probex.errors import InputError
from probex.service import MAX_TOP_K, Studio, check_top_k
from probex.weights import read_weights

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "checkpoints" / "emoji-mini"
EXAMPLE = sorted((BUNDLE / "examples").glob("emoji-root-1__test__*.safetensors"))[0]


@pytest.fixture(scope="module")
def studio():
    return Studio.load(BUNDLE, warm=False)


def damaged(tmp_path: Path, name: str, change, metadata: dict | None = None) -> Path:
    """The example LoRA with ``change(key, tensor) → tensor`` applied to every tensor (and extra metadata)."""
    with safe_open(str(EXAMPLE), "pt") as f:
        meta = {**f.metadata(), **(metadata or {})}
    tensors = {k: change(k, v) for k, v in load_file(str(EXAMPLE)).items()}
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(path), metadata=meta)
    return path


def add_alpha(tensors_path: Path, alpha: float) -> Path:
    tensors = load_file(str(tensors_path))
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        tensors[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(alpha)
    with safe_open(str(tensors_path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tensors_path), metadata=meta)
    return tensors_path


def one_line_refusal(call, fragment: str) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message and len(message) < 400
    return message


# ------------------------------------------------------------------------------------------ extreme values
def test_huge_factor_values_are_refused_naming_the_layer(tmp_path):
    path = damaged(tmp_path, "huge.safetensors", lambda k, v: v * 1e30 if k.endswith("lora_B.weight") else v)
    message = one_line_refusal(lambda: read_weights(path), "beyond anything trained")
    assert "attn" in message  # the layer is named


def test_kohya_alpha_near_float32_max_is_refused(tmp_path):
    from probex.weights import save_lora

    weights = read_weights(EXAMPLE)
    path = tmp_path / "kohya.safetensors"
    save_lora(path, weights.layers, "kohya")
    tensors = load_file(str(path))
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert alphas
    for key in alphas:
        tensors[key] = torch.tensor(3e38)
    save_file(tensors, str(path))
    one_line_refusal(lambda: read_weights(path), "beyond anything trained")


def test_large_but_plausible_values_give_a_finite_strict_json_answer(studio, tmp_path):
    path = damaged(tmp_path, "loud.safetensors", lambda k, v: v * 1e3 if k.endswith("lora_B.weight") else v)
    result = studio.predict(str(path))
    text = json.dumps(result, allow_nan=False)  # raises on NaN / Inf
    assert result["classes"] and result["notice"] is None
    assert all(math.isfinite(c["score"]) for c in json.loads(text)["classes"])


def test_cli_json_of_an_overflowing_file_is_exit_2_and_one_line(tmp_path):
    path = damaged(tmp_path, "huge.safetensors", lambda k, v: v * 1e30 if k.endswith("lora_B.weight") else v)
    out = run_cli("predict", str(path), "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error:") and out.stderr.count("\n") == 1 and "beyond anything trained" in out.stderr


# ----------------------------------------------------------------------------------- LoRAs that change nothing
NEGLIGIBLE = {
    "all_zeros": lambda k, v: torch.zeros_like(v),
    "untrained_peft_b_zero": lambda k, v: torch.zeros_like(v) if k.endswith("lora_B.weight") else v,
    "denormal_values": lambda k, v: torch.full_like(v, 1e-40),
}


@pytest.mark.parametrize("case", [*NEGLIGIBLE, "alpha_zero"])
def test_a_lora_that_changes_nothing_gets_a_notice_not_a_concept(studio, tmp_path, case):
    if case == "alpha_zero":
        path = add_alpha(damaged(tmp_path, "a0.safetensors", lambda k, v: v), 0.0)
    else:
        path = damaged(tmp_path, f"{case}.safetensors", NEGLIGIBLE[case])
    result = studio.predict(str(path))
    assert result["notice"] and "changes (almost) nothing" in result["notice"]
    assert result["classes"] == [] and result["neighbors"] == []
    json.dumps(result, allow_nan=False)
    card = studio.model_card(str(path))
    assert "changes (almost) nothing" in card and "Most likely concept" not in card
    assert "changes (almost) nothing" in studio.route(str(path))["notice"]
    one_line_refusal(lambda: studio.zero_shot(str(path), ["cat", "dog"]), "changes (almost) nothing")


def test_a_real_example_is_not_negligible(studio):
    assert studio.predict(str(EXAMPLE))["notice"] is None


# ---------------------------------------------------------------------------------------- metadata in the card
INJECTED = {
    "base_model": "x\n\n# Injected heading\n<img src=x onerror=alert(1)>",
    "prompt": "---\nlicense: evil\n---\n<script>alert(1)</script>",
    "ss_training_comment": "[click](javascript:alert(1)) ![i](http://e/x.png) | a | b |\n" + "A" * 10_000_000,
    "ss_output_name": "`code` **bold** <b>raw</b>\r\n## another heading",
}


def test_file_metadata_is_inert_in_the_card(studio, tmp_path):
    path = damaged(tmp_path, "meta.safetensors", lambda k, v: v, metadata=INJECTED)
    card = studio.model_card(str(path))
    assert len(card) < 20_000  # the 10 MB comment is capped
    assert "<img" not in card and "<script" not in card and "<b>" not in card
    assert not re.search(r"^#+ (Injected|another)", card, re.MULTILINE)
    assert not re.search(r"(?<!\\)\]\(", card.split("Training metadata")[-1])  # every link bracket escaped
    assert "\\[click\\](javascript:" in card
    assert "&lt;img" in card  # shown, as text
    front, _body = card.split("\n---\n", 1)
    data = yaml.safe_load(front.removeprefix("---\n"))
    assert "license" not in data and "\n" not in data["instance_prompt"]
    assert data["instance_prompt"].startswith("--- license: evil")


def test_a_long_file_name_is_capped_in_the_card(studio, tmp_path):
    path = damaged(tmp_path, "n" * 200 + ".safetensors", lambda k, v: v)
    headline = next(line for line in studio.model_card(str(path)).splitlines() if line.startswith("# "))
    assert len(headline) < 300


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("value", [0, -1, -1000, True, False, "abc", None, [1], 1.5, MAX_TOP_K + 1, float("nan"),
                                   float("inf"), "5"])
def test_top_k_is_checked(value):
    one_line_refusal(lambda: check_top_k(value), "top_k must be a whole number")


@pytest.mark.parametrize("value, expected", [(1, 1), (5, 5), (5.0, 5), (MAX_TOP_K, MAX_TOP_K)])
def test_top_k_accepts_whole_numbers(value, expected):
    assert check_top_k(value) == expected


def test_predict_and_search_refuse_bad_top_k(studio):
    one_line_refusal(lambda: studio.predict(str(EXAMPLE), top_k=-1), "top_k")
    one_line_refusal(lambda: studio.search("a cat", top_k=0), "top_k")


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probex", *argv], capture_output=True, text=True, cwd=REPO,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(REPO)}, timeout=300)


LONG = "x" * 500


@pytest.mark.parametrize("argv", [
    ("predict", LONG), ("route", LONG), ("card", LONG), ("zero-shot", LONG, "cat", "dog"),
    ("predict", str(EXAMPLE), "--top-k", "0"), ("predict", str(EXAMPLE), "--top-k", "abc"),
    ("search", "a cat", "--top-k", "-3"), ("predict", "/no/such/dir/" + LONG + ".safetensors"),
])
def test_bad_cli_arguments_are_exit_2_and_one_error_line(argv):
    out = run_cli(*argv)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and out.stderr.count("\n") == 1, out.stderr
    assert len(out.stderr) < 500


def test_cli_route_of_an_empty_lora_says_so(tmp_path):
    path = damaged(tmp_path, "zeros.safetensors", NEGLIGIBLE["all_zeros"])
    out = run_cli("route", str(path))
    assert out.returncode == 0 and "changes (almost) nothing" in out.stdout, out.stderr


def test_card_out_in_a_missing_folder_is_exit_2(tmp_path):
    out = run_cli("card", str(EXAMPLE), "--out", str(tmp_path / "missing" / "card.md"))
    assert out.returncode == 2 and out.stderr.startswith("error:") and out.stderr.count("\n") == 1, out.stderr
    assert "missing" in out.stderr


# --------------------------------------------------------------------------------------- naming what a file is
@pytest.mark.parametrize("data, fragment", [
    (b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>", "an HTML page"),
    (b"\n  <html lang=en><body>Sign in to continue</body></html>", "an HTML page"),
    (__import__("gzip").compress(b"\x00" * 4096), "gzip-compressed"),
    (b"(dp0\nVw\np1\nF1.0\ns.", "text (protocol 0) Python pickle"),
    (b"cos\nsystem\n(S'echo pwned'\ntR.", "text (protocol 0) Python pickle"),
    (b"These are my LoRA training notes.\nsteps: 1000\n" * 4, "a text file"),
    (b'{"error": "Repository not found", "status": 404}' + b" " * 64, "a JSON text file"),
    (b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>", "an XML document"),
])
def test_non_safetensors_files_are_named(tmp_path, data, fragment):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data)
    message = one_line_refusal(lambda: read_weights(path), fragment)
    assert "-byte header" not in message


def test_protocol_0_pickles_are_named_whatever_they_start_with(tmp_path):
    """torch.save's legacy (non-zip) format with pickle_protocol=0 starts with the LONG magic number "L1195…L\n.";
    bare scalars and strings start with INT / FLOAT / UNICODE. Written here, never loaded."""
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, buffer, pickle_protocol=0, _use_new_zipfile_serialization=False)
    for name, data in {"torch_legacy": buffer.getvalue(), "int": pickle.dumps(123456789, protocol=0),
                       "float": pickle.dumps(1.5, protocol=0), "string": pickle.dumps("hello", protocol=0),
                       "none": pickle.dumps(None, protocol=0), "tuple": pickle.dumps((1, 2), protocol=0)}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        message = one_line_refusal(lambda: read_weights(path), "Python pickle")
        assert "-byte header" not in message


@pytest.mark.parametrize("text", ["(Note: these are my training notes)\n", "(I think this is rank 4)\n",
                                  "(Version 2)\nsteps: 100\n", "(NASA)\n", "Version 1\nNotes\n"])
def test_text_notes_are_not_called_pickles(tmp_path, text):
    path = tmp_path / "notes.safetensors"
    path.write_text(text * 4)
    one_line_refusal(lambda: read_weights(path), "a text file")


def test_a_folder_or_device_is_named_not_missing(tmp_path):
    one_line_refusal(lambda: read_weights(tmp_path), "a folder, not a model file")
    one_line_refusal(lambda: read_weights("/dev/null"), "not a regular file")


def test_one_byte_over_the_cap_shows_exact_sizes(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # sparse
        f.truncate(256 * 2**20 + 1)
    message = one_line_refusal(lambda: read_weights(path, max_bytes=256 * 2**20), "is over the")
    assert "268,435,457 bytes is over the 268,435,456-byte (256 MiB) limit" in message, message


def test_size_cap_message_uses_one_unit_system(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # sparse: 300 MiB on paper, nothing on disk
        f.truncate(300 * 2**20)
    message = one_line_refusal(lambda: read_weights(path, max_bytes=256 * 2**20), "is over the")
    assert "300 MiB is over the 256 MiB limit" in message, message
