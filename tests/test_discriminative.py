"""The discriminative Model Trees builder (probex/jungle/discriminative/): a tiny build is a multilabel zoo that
probex.zoo reads, resumes without retraining, trains grouped models exactly as one at a time, and its weights carry
the classes each model was trained on."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from probex.jungle import discriminative as disc
from probex.train import TrainConfig, fit_expert
from probex.weights import read_weights
from probex.zoo import Zoo, build_cache

TINY = disc.PRESETS["tiny"]
TREE = TINY.populations[0].name


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("discriminative")
    record = disc.build(out, TINY, measure=False, progress=False)
    return out, record


def test_tiny_build_is_a_multilabel_zoo_with_the_pool_and_chosen_classes(tiny_zoo):
    out, record = tiny_zoo
    zoo = Zoo.scan(out / TREE)
    pool = [c["name"] for c in disc.class_split(TINY.pool_size)[0]]
    assert zoo.task == "multilabel"
    assert [c["id"] for c in zoo.classes()] == pool  # tree.json's pool, in order
    assert Counter(m.split for m in zoo.models) == {"train": 70, "val": 10, "test": 20}
    assert all(len(m.labels) == TINY.chosen and set(m.labels) <= set(pool) for m in zoo.models)
    assert len({tuple(m.labels) for m in zoo.models}) > 90  # each model draws its own half of the pool

    first = out / TREE / zoo.models[0].source
    weights = read_weights(first)
    assert weights.kind == "full"
    assert {name: tuple(w.shape) for name, w in weights.layers.items()} == {
        "conv1": (16, 27), "conv2": (32, 144), "conv3": (64, 288), "head": (TINY.chosen, 64)}
    meta = weights.metadata
    assert sorted(json.loads(meta["dataset_chosen_targets"])) == zoo.models[0].labels
    assert {"seed", "lr", "epochs", "batch_size", "eval_accuracy"} <= set(meta)
    # the models learned their 10-way task on held-out views (chance 0.1)
    assert record["populations"][TREE]["mean_eval_accuracy"] > 0.5
    assert (out / TREE / "root.safetensors").exists() and (out / "build.json").exists()


def test_rebuild_skips_existing_models_and_retrains_a_missing_one_identically(tiny_zoo):
    out, _ = tiny_zoo
    files = sorted((out / TREE).rglob(disc.WEIGHTS_FILE))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = disc.build(out, TINY, measure=False, progress=False)
    assert again["populations"][TREE]["trained"] == 0
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files)

    victim = files[7]
    original = load_file(str(victim))
    with safe_open(str(victim), framework="pt") as f:
        original_targets = json.loads(f.metadata()["dataset_chosen_targets"])
    victim.unlink()
    rebuilt = disc.build(out, TINY, measure=False, progress=False)
    assert rebuilt["populations"][TREE]["trained"] == 1  # alone now, in a group before: same seed, same model
    retrained = load_file(str(victim))
    assert all(torch.allclose(original[k], retrained[k], atol=1e-5) for k in original)
    with safe_open(str(victim), framework="pt") as f:
        targets = json.loads(f.metadata()["dataset_chosen_targets"])
    assert targets == original_targets and len(set(targets)) == TINY.chosen


@pytest.mark.parametrize("arch", sorted(disc.ARCHITECTURES))
def test_grouped_training_equals_one_at_a_time(arch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.stack([torch.randperm(64, generator=g)[:32] for _ in range(2)])
    labels = torch.randint(0, 4, (2, 32), generator=g)
    inits = [disc.initial_state(arch, 4, seed) for seed in (1, 2)]
    recipe = disc.Recipe(lr=1e-3, epochs=3, batch_size=8)
    together = disc.train_models(arch, inits, images, ids, labels, [11, 12], recipe)
    for i in range(2):
        (alone,) = disc.train_models(arch, inits[i:i + 1], images, ids[i:i + 1], labels[i:i + 1], [11 + i], recipe)
        # equal up to float rounding: a grouped convolution sums in another order
        assert all(torch.allclose(together[i][k], alone[k], atol=1e-6) for k in alone), f"{arch} model {i} differs"
        moved = max((together[i][k] - inits[i][k]).abs().max().item() for k in alone)
        assert moved > 5e-3  # it trained: equality is not two untouched copies


def test_probex_reads_which_classes_each_model_was_trained_on(tiny_zoo, tmp_path):
    out, _ = tiny_zoo
    cache = build_cache(out / TREE, tmp_path / "cache", layers="conv3")
    config = TrainConfig.of(epochs=200, lr=3e-3, r_u=16, r_v=16, r_t=64)
    fit = fit_expert(cache, "conv3", "multilabel", config=config)
    # per-label accuracy on 20 test models × 20 labels; chance is 0.5 (each label is on for half the models)
    assert fit.metrics["test"] >= 0.6, fit.metrics
