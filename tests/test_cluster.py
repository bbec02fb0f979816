"""probex.cluster: jobs on a local Ray instance give exactly what they give here — the layer sweep (rows and experts),
the layer cache (every tensor and the index), a LoRA population (every tensor and its metadata) — and a run that
cannot use Ray says why in one line."""
import json
import socket
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from probex.cluster import check_reachable, map_jobs
from probex.errors import InputError, ProbexError
from probex.train import TrainConfig, sweep_layers
from probex.zoo import build_cache, select_layers
from synthetic import make_lora_zoo

LAYERS = {"down_blocks.0.attn2.to_k": (12, 10), "down_blocks.1.attn2.to_q": (12, 12), "up_blocks.0.attn2.to_v": (10, 12)}
CONFIG = TrainConfig.of(epochs=15, batch_size=16, lr=1e-2, r_u=8, r_v=8, r_t=8)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_lora_zoo(tmp_path_factory.mktemp("cluster") / "zoo", n_classes=5, per_class=6, layers=LAYERS,
                         ranks=(2, 3), informative=[*LAYERS][1:2], signal=0.6, seed=3)


def test_a_sweep_on_ray_equals_the_local_sweep(ray_instance, zoo, tmp_path):
    cache = build_cache(zoo.root, tmp_path / "cache")
    here = sweep_layers(cache, "all", "multiclass", config=CONFIG, out_dir=tmp_path / "here", progress=False)
    there = sweep_layers(cache, "all", "multiclass", config=CONFIG, out_dir=tmp_path / "there", progress=False,
                         ray=True)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert timeless(there.rows) == timeless(here.rows) and len(here.rows) == 3
    assert there.best_layer == here.best_layer
    for key, value in here.best.expert.state_dict().items():
        assert torch.equal(there.best.expert.state_dict()[key], value), key
    written = [json.loads((tmp_path / side / "sweep.json").read_text())["layers"] for side in ("here", "there")]
    assert timeless(written[0]) == timeless(written[1])


def test_a_cache_built_on_ray_equals_the_local_cache(ray_instance, zoo, tmp_path):
    # a tiny memory budget: one pass, and so one Ray task, per layer
    here = build_cache(zoo.root, tmp_path / "here", memory_budget_gb=1e-9)
    there = build_cache(zoo.root, tmp_path / "there", memory_budget_gb=1e-9, ray=True)
    assert there.index == here.index
    for layer in LAYERS:
        a, b = load_file(tmp_path / "here" / f"{layer}.safetensors"), load_file(tmp_path / "there" / f"{layer}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layer


def test_lora_passes_on_ray_write_the_local_files(ray_instance, tmp_path):
    from safetensors import safe_open

    from probex.jungle.atlas import load_atlas
    from probex.jungle.lora import LoraJob, build_population
    from probex.jungle.root import RootRecipe, pretrain_root

    _, classes = load_atlas()   # the real atlas: Ray's workers read it themselves
    cls = classes[0]
    root = pretrain_root(tmp_path / "root", RootRecipe(name="tiny", classes=[cls["id"], classes[1]["id"]],
                                                       block_out_channels=(32, 32), steps=2, batch_size=4))
    jobs = [LoraJob(model_id=f"train/model_idx_{i:04d}", class_id=cls["id"], class_name=cls["name"], root="tiny",
                    rank=4, lr=5e-3, steps=2 + i, seed=i, n_images=5) for i in range(3)]
    build_population(root, jobs, tmp_path / "here", adapters_per_pass=2)    # two passes: 2 LoRAs, then 1
    build_population(root, jobs, tmp_path / "there", adapters_per_pass=2, ray=True)
    for job in jobs:
        files = [tmp_path / side / job.model_id / "pytorch_lora_weights.safetensors" for side in ("here", "there")]
        a, b = load_file(files[0]), load_file(files[1])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job.model_id
        metadata = []
        for file in files:   # equal as dicts (safetensors writes metadata in a per-process hash order)
            with safe_open(str(file), framework="pt") as f:
                metadata.append(f.metadata())
        assert metadata[0] == metadata[1]


def test_ray_jobs_come_back_in_order_and_a_failing_job_raises_its_own_error(ray_instance):
    pick = partial(select_layers, ["a", "b", "c"])   # a probex function: Ray's workers import it by name
    order = ["2", "0", "1", "1", "0", "2", "2"]   # more jobs than the window of submitted tasks
    assert list(map_jobs(pick, order, ray=True, progress=False)) == [[["a", "b", "c"][int(i)]] for i in order]
    for _ in range(10):   # an error with tasks still in flight leaves the driver alive (Ray's cancel race aborted it)
        with pytest.raises(InputError, match="^layer index 7 is out of range: this zoo has 3 layers"):
            list(map_jobs(pick, ["0", "7", "1", "2", "1", "0"], ray=True, progress=False))
    assert list(map_jobs(pick, ["1"], ray=True, progress=False)) == [["b"]]


def test_asking_for_ray_without_it_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now fails as if it were not installed
    assert list(map_jobs(abs, [-1, 2], progress=False)) == [1, 2]   # not asked for: not needed
    with pytest.raises(ProbexError, match=r"pip install 'probex\[cluster\]'") as err:
        list(map_jobs(abs, [-1], ray="head:6379", progress=False))
    assert "\n" not in str(err.value)


def test_an_address_nothing_answers_fails_fast_in_one_line():
    with socket.socket() as s:   # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ProbexError, match=f"no Ray cluster answers at 127.0.0.1:{port}") as err:
        check_reachable("127.0.0.1", port)
    assert "\n" not in str(err.value)
