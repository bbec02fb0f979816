"""Populations in Model-J layout and the layer cache."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from probex import zoo as zoo_mod
from probex.errors import InputError
from probex.weights import read_weights
from probex.zoo import LayerCache, Zoo, build_cache, labels_from_metadata, select_layers
from synthetic import make_full_zoo, make_lora_zoo, write_tree_json

LAYERS = {"down_blocks.0.attn2.to_k": (6, 5), "down_blocks.0.attn2.to_q": (6, 6), "up_blocks.1.attn1.to_v": (4, 6)}


@pytest.fixture
def lora_zoo(tmp_path):
    return make_lora_zoo(tmp_path / "zoo", n_classes=3, per_class=5, layers=LAYERS, ranks=(1, 2, 3),
                         holdout_classes=2, holdout_per_class=2, seed=1)


@pytest.fixture
def count_reads(monkeypatch):
    calls = []
    real = zoo_mod.read_weights

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(zoo_mod, "read_weights", counting)
    return calls


def test_scan_reads_splits_and_labels(lora_zoo):
    zoo = Zoo.scan(lora_zoo.root)
    assert len(zoo.models) == 3 * 5 + 2 * 2
    assert {m.split for m in zoo.models} == {"train", "val", "test", "val_holdout", "test_holdout"}
    by_id = {m.id: m for m in zoo.models}
    for planted in lora_zoo.models:
        assert by_id[planted["id"]].class_id == planted["class_id"]
    classes = zoo.classes()
    assert [c["id"] for c in classes] == lora_zoo.class_ids
    assert [c["id"] for c in classes if c["holdout"]] == lora_zoo.holdout_classes
    assert zoo.task == "multiclass"


def test_cache_stacks_every_layer_with_exact_zero_padding(lora_zoo, tmp_path):
    cache = build_cache(lora_zoo.root, tmp_path / "cache")
    assert cache.layers == sorted(LAYERS) == cache.all_layers
    assert len(cache.models) == 19 and cache.kind == "lora"
    layer = "down_blocks.0.attn2.to_q"
    t = cache.load(layer)
    assert t["up"].shape == (19, 6, 3) and t["down"].shape == (19, 3, 6) and t["scale"].shape == (19,)
    for i, m in enumerate(cache.models):   # each row is that model's own factors, padded with zeros
        own = read_weights(lora_zoo.root / m["source"]).layers[layer]
        r = own.up.shape[1]
        assert t["rank"][i] == r
        assert torch.equal(t["up"][i, :, :r], own.up) and not t["up"][i, :, r:].any()
        assert torch.equal(t["down"][i, :r], own.down) and not t["down"][i, r:].any()
        assert len(m["sha256"]) == 64
    up, down, scale = cache.inputs(layer)
    assert up is not None and scale.dtype == torch.float32


def test_rebuilding_is_incremental(lora_zoo, tmp_path, count_reads):
    build_cache(lora_zoo.root, tmp_path / "cache", layers="0")
    n_files = 19
    assert len(count_reads) == 1 + n_files  # the first file's layout, then one pass
    count_reads.clear()
    cache = build_cache(lora_zoo.root, tmp_path / "cache", layers="0")
    assert len(count_reads) == 1           # nothing to extract
    count_reads.clear()
    before = (tmp_path / "cache" / f"{cache.layers[0]}.safetensors").stat().st_mtime_ns
    cache = build_cache(lora_zoo.root, tmp_path / "cache", layers="0-2")
    assert len(count_reads) == 1 + n_files and cache.layers == sorted(LAYERS)
    assert (tmp_path / "cache" / f"{cache.layers[0]}.safetensors").stat().st_mtime_ns == before


def test_a_changed_file_list_restarts_the_cache(lora_zoo, tmp_path):
    build_cache(lora_zoo.root, tmp_path / "cache")
    victim = lora_zoo.models[0]["path"]
    victim.unlink()
    cache = build_cache(lora_zoo.root, tmp_path / "cache", layers="1")
    assert len(cache.models) == 18 and len(cache.layers) == 1
    assert not (tmp_path / "cache" / f"{sorted(LAYERS)[0]}.safetensors").exists()


def test_memory_budget_splits_passes_without_changing_the_result(lora_zoo, tmp_path, count_reads):
    one = build_cache(lora_zoo.root, tmp_path / "one")
    reads_one_pass = len(count_reads)
    count_reads.clear()
    many = build_cache(lora_zoo.root, tmp_path / "many", memory_budget_gb=1e-9)
    assert len(count_reads) == 1 + 3 * 19 > reads_one_pass
    for layer in one.layers:
        a, b = one.load(layer), many.load(layer)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_models_cache_as_stacked_matrices(tmp_path):
    planted = make_full_zoo(tmp_path / "zoo", n_classes=5, n_models=12, layers={"enc.0.fc": (4, 3)})
    write_tree_json(planted.root, name="tiny", classes=planted.class_ids + ["never_used"])
    zoo = Zoo.scan(planted.root)
    assert zoo.task == "multilabel" and zoo.tree["name"] == "tiny"
    assert [c["id"] for c in zoo.classes()][-1] == "never_used"
    cache = build_cache(zoo, tmp_path / "cache")
    w = cache.inputs("enc.0.fc")
    assert w.shape == (12, 4, 3)
    file0 = load_file(str(planted.root / cache.models[0]["source"]))
    assert torch.equal(w[0], file0["enc.0.fc.weight"])
    assert cache.models[0]["labels"] == planted.models[0]["labels"]


def test_mismatched_layer_is_named(lora_zoo, tmp_path):
    odd = lora_zoo.root / "train" / "model_idx_9999"
    odd.mkdir()
    save_file({"unet.down_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, 7),
               "unet.down_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(6, 2)},
              str(odd / "pytorch_lora_weights.safetensors"), metadata={"class_id": "c000"})
    with pytest.raises(InputError, match="model_idx_9999.*to_k is 6×7, expected 6×5"):
        build_cache(lora_zoo.root, tmp_path / "cache")


def test_label_metadata_forms(monkeypatch):
    monkeypatch.setattr(zoo_mod, "imagenet_names", lambda: {"n01440764": "tench"})
    assert labels_from_metadata({"imagenet_class_id": "n01440764"}, "f") == {"class_id": "n01440764", "class_name": "tench"}
    assert labels_from_metadata({"imagenet_class_id": "n0000_x"}, "f")["class_name"] == "n0000 x"
    assert labels_from_metadata({"class_id": "c1", "class_name": "cat"}, "f") == {"class_id": "c1", "class_name": "cat"}
    assert labels_from_metadata({"dataset_chosen_targets": "['b', 'a']"}, "f") == {"labels": ["a", "b"]}
    assert labels_from_metadata({"dataset_chosen_targets": '["x"]'}, "f") == {"labels": ["x"]}
    assert labels_from_metadata({}, "f") == {}
    with pytest.raises(InputError, match="f: dataset_chosen_targets"):
        labels_from_metadata({"dataset_chosen_targets": "__import__('os').getcwd()"}, "f")


def test_layer_specs():
    names = [f"l{i:02d}" for i in range(12)]
    assert select_layers(names) == names == select_layers(names, "all")
    assert select_layers(names, "3") == ["l03"]
    assert select_layers(names, "9-11") == ["l09", "l10", "l11"]
    assert select_layers(names, "1,9-10,l05") == ["l01", "l09", "l10", "l05"]
    assert select_layers(names, ["l07", 2]) == ["l07", "l02"]
    with pytest.raises(InputError, match="out of range"):
        select_layers(names, "12")
    with pytest.raises(InputError, match="no layer 'nope'"):
        select_layers(names, "nope")


def test_missing_things_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Zoo.scan(tmp_path / "absent")
    (tmp_path / "train").mkdir()
    with pytest.raises(InputError, match="no model files"):
        Zoo.scan(tmp_path)
    with pytest.raises(InputError, match="no layer cache"):
        LayerCache(tmp_path)
    bad = tmp_path / "train" / "m" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(InputError, match="train/m/model.safetensors: not a readable"):
        Zoo.scan(tmp_path)
