"""Shared test setup: one torch thread — the machine's 2 cores are shared with long training jobs — and the fixtures
several test modules use: ``built`` (the test bundle: a tiny random emoji root, two synthetic LoRA trees of the same
architecture with a planted class signal linear in MiniLM text embeddings, a different tree component each, trained
with the `python -m probex train` the user runs), ``zoo_file`` (a model file of a zoo by split and class),
``run_cli`` (`python -m probex …` as a process), ``running_app`` (`python app.py` as a process) and ``import_app``
(app.py imported in this process on a given bundle)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # data generators the tests import: synthetic.py, sd15_fixtures.py, …

from synthetic import make_lora_zoo, write_tree_json  # noqa: E402

CLASS_NAMES = ["tiger", "lion", "apple", "rocket", "house", "car", "banana", "fish", "snail", "tulip", "owl", "pizza"]
TREES = {  # name → (seed, training classes, held-out classes)
    "tree-a": (1, 10, 2),
    "tree-b": (2, 4, 0),
}
ROOT_TARGETS = ("attn2.to_k", "attn2.to_v")
REPO = Path(__file__).resolve().parent.parent


def build_test_bundle(base: Path) -> dict:
    """Root, zoos and bundle under ``base``; idempotent (a finished build is reused). Returns their paths."""
    base = Path(base)
    paths = {"base": base, "root": base / "root", "bundle": base / "bundle",
             "zoos": {name: base / "zoo" / name for name in TREES}}
    if (base / "done.json").exists():
        return paths
    from probex.jungle.root import RootRecipe, make_scheduler, make_unet
    from probex.text import load_text_encoder

    recipe = RootRecipe(name="tiny-root", block_out_channels=(32, 64))
    torch.manual_seed(0)
    unet = make_unet(recipe)  # random weights: samples are noise, but drawn through the real pipeline
    unet.save_pretrained(paths["root"] / "unet")
    make_scheduler(recipe).save_pretrained(paths["root"] / "scheduler")
    recipe.save(paths["root"] / "recipe.json")
    layers = {name: (m.out_features, m.in_features) for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith(ROOT_TARGETS)}
    text = load_text_encoder("minilm").embed([f"an emoji of {n}" for n in CLASS_NAMES])
    for name, (seed, n_train, n_hold) in TREES.items():
        zoo = make_lora_zoo(paths["zoos"][name], n_classes=n_train, per_class=6, layers=layers, ranks=(4,),
                            holdout_classes=n_hold, holdout_per_class=4, seed=seed, tree_component=3.0,
                            tree_seed=seed + 100, class_embeddings=text[: n_train + n_hold],
                            class_names=CLASS_NAMES[: n_train + n_hold])
        write_tree_json(zoo.root, name=name, root_model=str(paths["root"]), prompt_template="an emoji of {name}",
                        instance_prompt="an emoji of sks")
    # the bundle is trained by the CLI in its own process: what a user runs, and UMAP's numba start-up (which raises
    # torch's thread count and slows later diffusion steps 10-50× on 2 shared cores) stays out of the test process
    cli_process("train", "--zoo", *map(str, paths["zoos"].values()), "--out", str(paths["bundle"]),
                "--layers", sorted(layers)[-1], "--epochs", "80", "--r-u", "16", "--r-v", "16", "--r-t", "32",
                "--batch-size", "32", "--lr", "5e-3", "--profile", "emoji-mini", "--cache", str(base / "cache"),
                check=True)
    (base / "done.json").write_text(json.dumps({"layers": sorted(layers)}))
    return paths


def cli_process(*args: str, check: bool = False, timeout: float = 300, env: dict | None = None):
    """`python -m probex …` in a fresh process from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "probex", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"probex {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def find_zoo_file(zoo: Path, split: str, class_name: str) -> Path:
    """The first model file of ``split`` whose metadata names ``class_name``."""
    for path in sorted((zoo / split).glob("*/pytorch_lora_weights.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if f.metadata()["class_name"] == class_name:
                return path
    raise LookupError(f"no {split} model of {class_name} in {zoo}")


@dataclass
class RunningApp:
    url: str
    process: subprocess.Popen
    temp_dir: Path      # GRADIO_TEMP_DIR: where uploads land
    log: Path

    def uploads_left(self, wait_s: float = 20) -> list[Path]:
        """Uploads still on the server after the deletion grace time (3 s in these tests) and a margin."""
        deadline = time.monotonic() + wait_s
        while (left := list(self.temp_dir.rglob("*.safetensors"))) and time.monotonic() < deadline:
            time.sleep(0.25)
        return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_process(bundle: Path, workdir: Path, env: dict | None = None, timeout: float = 180):
    """`python app.py` in its own process; yields once the page answers, stops the process afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PROBEX_BUNDLE": str(bundle), "HF_HUB_OFFLINE": "1",
                "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "GRADIO_TEMP_DIR": str(workdir / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
                "PROBEX_UPLOAD_GRACE_S": "3", "PROBEX_WARM_SAMPLES": "0", **(env or {})}
    log = workdir / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full_env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"app.py exited with {process.returncode}: {log.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"app.py did not answer within {timeout} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield RunningApp(url, process, workdir / "gradio", log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def import_fresh_app(bundle: Path):
    """app.py imported anew on ``bundle``: the module loads its studio at import, so an earlier import on another
    bundle (sys.modules) must not be reused."""
    import importlib

    sys.modules.pop("app", None)
    os.environ["PROBEX_BUNDLE"] = str(bundle)
    try:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        return importlib.import_module("app")
    finally:
        del os.environ["PROBEX_BUNDLE"]


@pytest.fixture(scope="session")
def import_app():
    """``import_app(bundle)``: app.py's module, imported in this process on that bundle."""
    return import_fresh_app


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The test bundle, built once per session: its paths (base, root, bundle, zoos)."""
    return build_test_bundle(tmp_path_factory.getbasetemp() / "studio")


@pytest.fixture(scope="session")
def zoo_file():
    """``zoo_file(zoo, split, class_name)``: the first model file of that split whose metadata names the class."""
    return find_zoo_file


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, check=False, timeout=300, env=None)``: `python -m probex …` in a fresh process."""
    return cli_process


@pytest.fixture(scope="session")
def running_app():
    """``with running_app(bundle, workdir, env=None) as app``: `python app.py` on a free port until the block ends."""
    return app_process
