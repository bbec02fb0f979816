"""Model-J download against a local stand-in for the Hub, and the ImageNet class table.

`FakeHub` answers, on 127.0.0.1 only, the endpoints huggingface_hub's snapshot_download calls: repo info
(`/api/{models,datasets}/<repo>/revision/<rev>`), the recursive tree listing (`/api/…/tree/<rev>`), and file
HEAD / GET (`/<repo>/resolve/<rev>/<path>`, `/datasets/<repo>/resolve/…`) with the headers the client reads
(X-Repo-Commit, ETag, Content-Length) and byte ranges. It can fail a file's first GETs to exercise the retries.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from probex import modelj
from probex.errors import InputError, ProbexError
from probex.profiles import get_profile, resolve_bundle_dir
from probex.zoo import Zoo, imagenet_names


class FakeHub:
    def __init__(self, repos: dict[tuple[str, str], dict[str, bytes]]):
        self.repos = repos                      # (repo_type, repo_id) → {path: content}
        self.fail_gets: dict[str, int] = {}     # path → how many GETs of it still answer 500
        self.file_gets: list[str] = []          # every file GET served, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def sha(self, key) -> str:
        digest = hashlib.sha1()
        for path, content in sorted(self.repos[key].items()):
            digest.update(path.encode() + hashlib.sha1(content).digest())
        return digest.hexdigest()

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer(send_body=True)

            def do_HEAD(self):
                self.answer(send_body=False)

            def answer(self, send_body: bool):
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                if parts[0] == "api":       # api/<type>s/<owner>/<name>/(revision|tree)/<rev>[/<path>]
                    kind, repo_id, verb = parts[1][:-1], "/".join(parts[2:4]), parts[4]
                    return self.api(kind, repo_id, verb, "/".join(parts[6:]))
                kind = "dataset" if parts[0] == "datasets" else "model"
                parts = parts[1:] if kind == "dataset" else parts
                if len(parts) < 5 or parts[2] != "resolve":
                    return self.send_json({"error": "not found"}, 404, "RepoNotFound")
                return self.file(kind, "/".join(parts[:2]), "/".join(parts[4:]), send_body)

            def api(self, kind, repo_id, verb, path):
                files = hub.repos.get((kind, repo_id))
                if files is None:
                    return self.send_json({"error": f"Repository {repo_id} not found"}, 404, "RepoNotFound")
                sha = hub.sha((kind, repo_id))
                if verb == "revision":
                    return self.send_json({"id": repo_id, "sha": sha, "private": False,
                                           "siblings": [{"rfilename": p} for p in sorted(files)]})
                entries = [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                           for p, c in sorted(files.items()) if p.startswith(path)]
                return self.send_json(entries)

            def file(self, kind, repo_id, path, send_body):
                files = hub.repos.get((kind, repo_id))
                if files is None or path not in files:
                    return self.send_json({"error": "Entry not found"}, 404, "EntryNotFound")
                if send_body:
                    with hub.lock:
                        hub.file_gets.append(path)
                        failing = hub.fail_gets.get(path, 0)
                        hub.fail_gets[path] = max(0, failing - 1)
                    if failing:
                        return self.send_json({"error": "try again"}, 500)
                body = files[path]
                start = 0
                if send_body and (rng := self.headers.get("Range", "")).startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.sha((kind, repo_id)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if send_body:
                    self.wfile.write(body[start:])

            def send_json(self, payload, status=200, error_code=None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
        return Handler


def lora_bytes(tmp_path, wnid: str, seed: int) -> bytes:
    """A small Model-J-keyed LoRA file's bytes (the download does not care about shapes)."""
    gen = torch.Generator().manual_seed(seed)
    module = "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"
    path = tmp_path / f"lora_{seed}.safetensors"
    save_file({f"{module}.lora.down.weight": torch.randn(4, 16, generator=gen),
               f"{module}.lora.up.weight": torch.randn(16, 4, generator=gen)}, str(path),
              metadata={"imagenet_class_id": wnid, "learning_rate": "3e-05", "lora_rank": "4"})
    return path.read_bytes()


PLAN = {"train": ["n01440764", "n01440764", "n01530575"], "val": ["n01530575"], "test": ["n01440764"],
        "val_holdout": ["n02690373"], "test_holdout": ["n02690373"]}


@pytest.fixture()
def hub(tmp_path):
    files, idx = {}, 0
    for split, wnids in PLAN.items():
        for wnid in wnids:
            folder = f"{split}/model_idx_{idx:04d}"
            files[f"{folder}/pytorch_lora_weights.safetensors"] = lora_bytes(tmp_path, wnid, idx)
            files[f"{folder}/README.md"] = b"# model card\n"
            files[f"{folder}/training_images/0.png"] = b"\x89PNG not really"
            idx += 1
    meta = {"SD_200/train-00000-of-00001.parquet": b"PAR1 fake", "SD_1k/train-00000-of-00001.parquet": b"PAR1",
            "README.md": b"# Model-J"}
    server = FakeHub({("model", "ProbeX/Model-J__SD_200"): files, ("dataset", "ProbeX/Model-J"): meta})
    yield server
    server.close()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    # Other tests (and probex.text for MiniLM) switch the Hub client offline for the whole process.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_download_mirrors_the_lora_files_and_metadata(hub, tmp_path):
    out = modelj.download("SD_200", out=tmp_path / "zoo", endpoint=hub.url, max_workers=2)

    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    want = sorted(p for p in hub.repos[("model", "ProbeX/Model-J__SD_200")] if p.endswith(".safetensors"))
    assert got == want                                              # LoRAs only: no cards, no training images
    assert not list(out.rglob("*.png")) and not list(out.glob("*/*/README.md"))
    for path in want:
        assert (out / path).read_bytes() == hub.repos[("model", "ProbeX/Model-J__SD_200")][path]
    assert (out / "metadata/SD_200/train-00000-of-00001.parquet").read_bytes() == b"PAR1 fake"
    assert not (out / "metadata/SD_1k").exists()                    # only the subset's own config

    summary = json.loads((out / "modelj.json").read_text())
    assert summary["splits"]["train"] == {"models": 3, "classes": 2}
    assert summary["splits"]["test_holdout"] == {"models": 1, "classes": 1}
    assert summary["unlabeled"] == []
    tree = json.loads((out / "tree.json").read_text())
    assert tree["prompt_template"] == "a photo of a {name}" and tree["root_model"].endswith("stable-diffusion-v1-5")

    zoo = Zoo.scan(out)                                             # the zoo reader takes the mirror as it is
    assert {m.class_name for m in zoo.models} == {"tench", "brambling", "airliner"}
    assert [c["id"] for c in zoo.classes() if c["holdout"]] == ["n02690373"]


def test_download_resumes_and_retries(hub, tmp_path):
    out = tmp_path / "zoo"
    modelj.download("SD_200", splits=["train"], out=out, endpoint=hub.url, metadata_repo=None)
    first = len(hub.file_gets)
    assert first == 3

    # a rerun with more splits fetches only what is missing; one file fails twice before it arrives
    flaky = "val/model_idx_0003/pytorch_lora_weights.safetensors"
    hub.fail_gets[flaky] = 2
    modelj.download("SD_200", splits=["train", "val"], out=out, endpoint=hub.url, metadata_repo=None, retries=4)
    again = hub.file_gets[first:]
    assert set(again) == {flaky} and len(again) == 3              # two failures, one success, no train file
    assert (out / flaky).read_bytes() == hub.repos[("model", "ProbeX/Model-J__SD_200")][flaky]


def test_download_gives_up_with_one_line(hub, tmp_path):
    flaky = "train/model_idx_0000/pytorch_lora_weights.safetensors"
    hub.fail_gets[flaky] = 10
    with pytest.raises(ProbexError, match=r"failed 2 times.*rerun to resume") as err:
        modelj.download("SD_200", splits=["train"], out=tmp_path / "zoo", endpoint=hub.url, retries=2,
                        metadata_repo=None)
    assert "\n" not in str(err.value)

    with pytest.raises(ProbexError, match="cannot download ProbeX/nope") as err:
        modelj.download("SD_200", out=tmp_path / "zoo2", repo_id="ProbeX/nope", endpoint=hub.url, retries=3)
    assert "\n" not in str(err.value)


def test_missing_metadata_config_is_only_a_warning(hub, tmp_path, capsys):
    out = modelj.download("SD_200", splits=["val"], out=tmp_path / "zoo", endpoint=hub.url,
                          metadata_repo="ProbeX/absent")
    assert "warning: no Model-J metadata config" in capsys.readouterr().err
    assert json.loads((out / "modelj.json").read_text())["splits"]["val"] == {"models": 1, "classes": 1}


def test_download_checks_its_arguments_and_offline_mode(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="unknown Model-J subset"):
        modelj.download("SD_9", out=tmp_path)
    with pytest.raises(InputError, match="unknown Model-J split"):
        modelj.download("SD_200", splits=["train", "validation"], out=tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ProbexError, match="HF_HUB_OFFLINE"):
        modelj.download("SD_200", out=tmp_path)


def test_cli_download(hub, tmp_path, capsys):
    out = tmp_path / "zoo"
    code = modelj.main_modelj(["modelj", "download", "--subset", "SD_200", "--splits", "val_holdout", "test_holdout",
                               "--out", str(out), "--endpoint", hub.url, "--max-workers", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "val_holdout:     1 LoRAs,    1 classes" in printed and str(out) in printed
    assert sorted(p.parent.parent.name for p in out.rglob("*.safetensors") if "metadata" not in p.parts) == \
        ["test_holdout", "val_holdout"]

    code = modelj.main_modelj(["modelj", "download", "--out", str(tmp_path / "x"), "--endpoint", hub.url,
                               "--repo-id", "ProbeX/missing", "--retries", "1"])
    assert code == 2 and capsys.readouterr().err.startswith("error: cannot download ProbeX/missing")


def test_imagenet_table():
    names = imagenet_names()
    assert len(names) == 1000 and len(set(names.values())) == 1000   # every class named, names distinct
    assert list(names)[:3] == ["n01440764", "n01443537", "n01484850"]  # ImageNet-1k index order
    assert names["n02111277"] == "Newfoundland" and names["n04254680"] == "soccer ball"
    assert {names["n02012849"], names["n03126707"]} == {"crane, bird", "construction crane"}
    assert all(w.startswith("n") and len(w) == 9 for w in names)


def test_bundle_from_a_hub_repo(tmp_path, monkeypatch):
    """The sd15-modelj profile's bundle named by a Hub repo id arrives once (JSON + safetensors only, never a
    pickle) and resolves to a local dir; a repo that is missing or holds no bundle is one clear line."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    bundle = {"bundle.json": b'{"format": "probex-bundle"}', "router.safetensors": b"0", "tree/expert/config.json": b"{}",
              "training_args.bin": b"\x80\x04 pickle", "README.md": b"# bundle"}
    server = FakeHub({("model", "someone/probex-sd15"): bundle, ("model", "someone/not-a-bundle"): {"a.json": b"{}"}})
    try:
        profile = replace(get_profile("sd15-modelj"), bundle="someone/probex-sd15")
        local = resolve_bundle_dir(profile, endpoint=server.url)
        assert (local / "bundle.json").read_bytes() == bundle["bundle.json"]
        assert (local / "tree/expert/config.json").is_file() and not (local / "training_args.bin").exists()
        assert resolve_bundle_dir(replace(profile, bundle=str(local))) == local      # a local dir is taken as is

        with pytest.raises(InputError, match="holds no bundle.json"):
            resolve_bundle_dir(replace(profile, bundle="someone/not-a-bundle"), endpoint=server.url)
        with pytest.raises(InputError, match="cannot download bundle someone/gone") as err:
            resolve_bundle_dir(replace(profile, bundle="someone/gone"), endpoint=server.url)
        assert "\n" not in str(err.value)
        with pytest.raises(InputError, match="neither a local dir nor a Hub repo id"):
            resolve_bundle_dir(replace(profile, bundle="no/such/dir"))
    finally:
        server.close()
