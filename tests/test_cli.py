"""`python -m probex …`: JSON shapes, the train → eval round trip, and the contract for bad input — exit 2, ONE line
`error: …` on stderr, never a traceback — over the whole hostile corpus. Most calls run `cli.main` in this process
(fast, the same code path); a few run the real `python -m probex` to prove the process-level behaviour."""
from __future__ import annotations

import json
import sys

import pytest
from hostile.corpus import CASES, build_corpus

from probex import cli


def call(capsys, *args: str) -> tuple[int, str, str]:
    """cli.main in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as stop:  # argparse's --help and usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, expected_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------- JSON
def test_predict_json_shape(zoo_file, built, capsys):
    path = zoo_file(built["zoos"]["tree-a"], "test", "banana")
    code, out, err = call(capsys, "predict", str(path), "--bundle", str(built["bundle"]), "--top-k", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"tree", "layer", "router", "classes", "neighbors"} <= set(result)
    assert result["tree"] == "tree-a" and isinstance(result["layer"], str)
    assert set(result["router"]) >= {"distance", "confidence"}
    assert len(result["classes"]) == 3 and all(set(c) == {"name", "score", "known"} for c in result["classes"])
    assert "banana" in [c["name"] for c in result["classes"]]
    assert len(result["neighbors"]) == 3
    assert all({"id", "class", "score"} <= set(n) for n in result["neighbors"])


def test_predict_text_output_is_readable(zoo_file, built, capsys):
    path = zoo_file(built["zoos"]["tree-b"], "test", "apple")
    code, out, _ = call(capsys, "predict", str(path), "--bundle", str(built["bundle"]))
    assert code == 0 and "tree-b" in out and "apple" in out and "nearest known models" in out


def test_search_json_shape(built, capsys):
    code, out, err = call(capsys, "search", "tiger", "--bundle", str(built["bundle"]), "--top-k", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["models", "read_as"] and len(result["models"]) == 4
    assert all({"id", "class", "score", "found_by"} <= set(m) for m in result["models"])
    assert result["models"][0]["class"] == "tiger" and result["read_as"][0]["class"] == "tiger"


def test_route_and_zero_shot_json(zoo_file, built, capsys):
    path = str(zoo_file(built["zoos"]["tree-b"], "test", "lion"))
    code, out, _ = call(capsys, "route", path, "--bundle", str(built["bundle"]), "--json")
    assert code == 0 and json.loads(out)["tree"] == "tree-b"
    code, out, _ = call(capsys, "zero-shot", path, "apple", "lion", "--bundle", str(built["bundle"]), "--json")
    scores = json.loads(out)
    assert code == 0 and [s["name"] for s in scores][0] == "lion" and len(scores) == 2


def test_card_and_samples_write_files(zoo_file, built, capsys, tmp_path):
    path = str(zoo_file(built["zoos"]["tree-b"], "test", "rocket"))
    code, _, err = call(capsys, "card", path, "--bundle", str(built["bundle"]), "--out", str(tmp_path / "README.md"))
    assert code == 0, err
    assert (tmp_path / "README.md").read_text().startswith("---\n")
    code, out, err = call(capsys, "samples", path, "--bundle", str(built["bundle"]), "-n", "2",
                          "--out", str(tmp_path / "img"))
    assert code == 0, err
    assert len(list((tmp_path / "img").glob("*.png"))) == 2


def test_eval_scores_the_bundle_on_its_population(built, capsys, tmp_path):
    code, out, err = call(capsys, "eval", "--bundle", str(built["bundle"]), "--zoo", str(built["zoos"]["tree-b"]),
                          "--cache", str(tmp_path / "cache"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tree"] == "tree-b" and report["top1_test"] >= 0.75


def test_eval_on_ray_without_ray_installed_is_one_error_line(built, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` fails as if it were not installed
    code, _, err = call(capsys, "eval", "--bundle", str(built["bundle"]), "--zoo", str(built["zoos"]["tree-b"]),
                        "--cache", str(tmp_path / "cache"), "--ray")
    assert "pip install 'probex[cluster]'" in assert_one_error_line(code, err)


def test_modelj_download_is_mounted(capsys):
    code, out, _ = call(capsys, "modelj", "download", "--help")
    assert code == 0 and "--subset" in out


# ----------------------------------------------------------------------------------------------- bad input
def test_every_hostile_file_is_one_error_line(built, capsys, tmp_path):
    """The hostile corpus (tests/hostile) through `predict`: each file a one-line error, exit 2; pickles that would
    run code never do. Files the reader accepts (fp16, SD LoRAs…) are LoRAs of other bases: 'no tree expert'."""
    corpus = build_corpus(tmp_path / "corpus")
    for case in CASES:
        code, out, err = call(capsys, "predict", str(corpus[case.id]), "--bundle", str(built["bundle"]))
        line = assert_one_error_line(code, err)
        assert out == "", case.id
        if case.error and case.max_bytes is None:  # size-cap cases use a reader cap smaller than the CLI's
            assert case.error in line, f"{case.id}: {line}"
    assert not list((tmp_path / "corpus").glob("**/PWNED-*")), "a pickle ran code"


def test_process_level_bad_file_and_usage_errors(run_cli, built, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not safetensors at all" * 10)
    done = run_cli("predict", str(junk), "--bundle", str(built["bundle"]), "--json")
    assert_one_error_line(done.returncode, done.stderr)
    assert done.stdout == ""
    done = run_cli("predict")  # argparse: missing FILE
    assert "FILE" in assert_one_error_line(done.returncode, done.stderr).upper() or "file" in done.stderr


def test_missing_bundle_is_one_error_line(capsys, tmp_path):
    code, _, err = call(capsys, "search", "tiger", "--bundle", str(tmp_path / "no-bundle"))
    assert "no-bundle" in assert_one_error_line(code, err)


def test_unexpected_failures_are_one_line_with_exit_1(built, capsys, monkeypatch):
    from probex.service import Studio

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(Studio, "search", broken)
    code, _, err = call(capsys, "search", "tiger", "--bundle", str(built["bundle"]))
    assert "RuntimeError: disk on fire second line" in assert_one_error_line(code, err, expected_code=1)


@pytest.mark.parametrize("args", [["predict", "x.safetensors", "--top-k", "0"], ["frobnicate"],
                                  ["search", "tiger", "--unknown-flag"]])
def test_usage_errors_are_one_line(capsys, args):
    code, _, err = call(capsys, *args)
    assert_one_error_line(code, err)


def test_train_options_become_the_training_config():
    parse = cli.build_parser().parse_args
    from probex.config import RELEASE_OPTIMISER, ProbeXConfig

    default = cli.train_config(parse(["train", "--zoo", "z", "--out", "o"]))
    assert default.model == ProbeXConfig() and default.optimiser == RELEASE_OPTIMISER  # defaults read from one place
    paper = cli.train_config(parse(["train", "--zoo", "z", "--out", "o", "--paper-inputs", "--linear", "--r-t", "16",
                                    "--epochs", "7"]))
    m = paper.model
    assert not m.centre and m.init == "random" and not m.relu and m.r_t == 16 and paper.optimiser.epochs == 7


@pytest.mark.parametrize("verb", [["train", "--zoo", "z", "--out", "o"], ["eval", "--bundle", "b", "--zoo", "z"],
                                  ["zoo", "build"]])
def test_ray_takes_an_optional_address_and_tasks_one_thread_by_default(verb):
    parse = cli.build_parser().parse_args
    assert (parse(verb).ray, parse(verb).threads) == (False, 1)
    assert parse([*verb, "--ray"]).ray is True
    assert parse([*verb, "--ray", "head:6379", "--threads", "2"]).ray == "head:6379"


def test_parsing_arguments_loads_no_diffusion_library():
    """A bad file or a usage error is answered before diffusers / peft load (they take seconds): the parser lists
    the zoo presets, and the module that holds them must not import either at its top."""
    import subprocess

    probe = ("import sys; from probex.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('diffusers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
