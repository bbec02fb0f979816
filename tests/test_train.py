"""Training on planted synthetic populations: ProbeX learns them, recognises held-out classes from text, the layer
sweep finds the informative layer, and a seed fixes everything."""
import csv
import json

import pytest
import torch

from probex.errors import InputError, ProbexError
from probex.experts import ProbeX
from probex.data import LayerData, Targets, task_targets
from probex.experts import input_stats, principal_directions
from probex.train import (TrainConfig, class_text_embeddings, encode_all, fit_expert, new_dense, new_probex,
                          sweep_layers, train_expert)
from probex.zoo import build_cache
from synthetic import make_full_zoo, make_lora_zoo

INFORMATIVE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
LAYERS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 24),
          INFORMATIVE: (32, 32),
          "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (24, 32)}
SMALL = TrainConfig.of(epochs=40, batch_size=32, lr=1e-2, r_u=16, r_v=16, r_t=16)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """20 training classes × 6 LoRAs (ranks 2–4) + 5 held-out classes × 4; only INFORMATIVE carries the class."""
    root = tmp_path_factory.mktemp("train")
    zoo = make_lora_zoo(root / "zoo", n_classes=20, per_class=6, layers=LAYERS, ranks=(2, 3, 4), holdout_classes=5,
                        holdout_per_class=4, informative=[INFORMATIVE], text_dim=8, signal=0.6, jitter=0.4, seed=0)
    return zoo, build_cache(zoo.root, root / "cache")


def test_probex_learns_the_planted_classes(planted):
    zoo, cache = planted
    fit = fit_expert(cache, INFORMATIVE, "multiclass", config=SMALL)
    assert fit.metrics["test"] >= 0.7          # 20 classes: chance is 0.05
    assert set(fit.metrics) == {"train", "val", "test"}
    assert fit.metrics["val"] == max(h["val"] for h in fit.history)   # the best val epoch is what we keep
    assert fit.history[fit.best_epoch]["val"] == fit.metrics["val"]


def test_alignment_recognises_held_out_classes_zero_shot(planted):
    zoo, cache = planted
    text = zoo.text_embeddings
    fit = fit_expert(cache, INFORMATIVE, "align", text_embeddings=text, config=SMALL)
    assert fit.metrics["test"] >= 0.7
    held = fit.metrics["val_holdout"] * 10 + fit.metrics["test_holdout"] * 10   # 20 held-out models, 5 classes
    assert held / 20 >= 0.6                    # chance is 0.2

    # control: the same expert scored against the held-out class texts in the wrong order falls to chance
    targets = task_targets(cache, "align", text)
    data = LayerData.from_cache(cache, INFORMATIVE)
    idx = torch.cat([targets.split["val_holdout"], targets.split["test_holdout"]])
    with torch.no_grad():
        right = fit.expert(data.take(idx), targets.holdout_text).argmax(1)
        wrong = fit.expert(data.take(idx), targets.holdout_text.roll(1, 0)).argmax(1)
    truth = targets.y[idx]
    assert (right == truth).float().mean() >= 0.6 and (wrong == truth).float().mean() <= 0.3


def test_sweep_picks_the_informative_layer_and_writes_its_tables(planted, tmp_path):
    zoo, cache = planted
    result = sweep_layers(cache, "all", "multiclass", config=SMALL, out_dir=tmp_path, save_experts=True, progress=False)
    assert result.best_layer == INFORMATIVE
    assert result.best_row["index"] == sorted(LAYERS).index(INFORMATIVE)
    others = [r["val"] for r in result.rows if r["layer"] != INFORMATIVE]
    assert max(others) < 0.3 < result.best_row["val"]
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["layer"] for r in rows] == sorted(LAYERS)
    assert {"index", "val", "test", "best_epoch", "seconds", "n_params"} <= set(rows[0])
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["best_layer"] == INFORMATIVE and summary["selected_on"] == "val"
    assert (tmp_path / "experts" / INFORMATIVE / "model.safetensors").exists()


def test_sweep_over_a_slice_reports_held_out_splits_for_alignment(planted):
    zoo, cache = planted
    result = sweep_layers(cache, "1-2", "align", zoo.text_embeddings, config=SMALL.replace(epochs=5),
                          progress=False)
    assert [r["index"] for r in result.rows] == [1, 2]
    assert {"val", "test", "val_holdout", "test_holdout"} <= set(result.rows[0])


def test_training_is_deterministic_under_a_seed(planted):
    zoo, cache = planted
    config = SMALL.replace(epochs=5)
    a, b = (fit_expert(cache, INFORMATIVE, "multiclass", config=config) for _ in range(2))
    other = fit_expert(cache, INFORMATIVE, "multiclass", config=config.replace(seed=1))
    assert a.metrics == b.metrics and a.best_epoch == b.best_epoch
    assert all(torch.equal(v, b.expert.state_dict()[k]) for k, v in a.expert.state_dict().items())
    assert not torch.equal(a.expert.U, other.expert.U)


def test_patience_stops_early(planted):
    zoo, cache = planted
    fit = fit_expert(cache, INFORMATIVE, "multiclass", config=SMALL.replace(epochs=500, patience=3))
    assert fit.epochs_run < 500 and fit.epochs_run - 1 - fit.best_epoch <= 3


def test_multilabel_on_full_checkpoints(tmp_path):
    zoo = make_full_zoo(tmp_path / "zoo", n_classes=8, n_models=80, labels_per_model=3, layers={"blocks.0.fc": (16, 12)},
                        signal=1.0, noise=0.3)
    cache = build_cache(zoo.root, tmp_path / "cache")
    fit = fit_expert(cache, "blocks.0.fc", config=SMALL)   # the cache's own task: multilabel
    assert fit.expert.head_kind == "multilabel"
    targets = task_targets(cache)
    majority = max(targets.y.mean().item(), 1 - targets.y.mean().item())   # always answering the common label
    assert fit.metrics["test"] > max(0.85, majority + 0.1)


def test_encodings_and_text_bank(planted):
    zoo, cache = planted
    fit = fit_expert(cache, INFORMATIVE, "multiclass", config=SMALL.replace(epochs=1))
    enc = encode_all(fit.expert, LayerData.from_cache(cache, INFORMATIVE))
    assert enc.shape == (len(cache.models), SMALL.model.r_t)

    class Recorder:
        def embed(self, texts):
            self.texts = texts
            return torch.zeros(len(texts), 3)

    rec = Recorder()
    assert class_text_embeddings(cache, rec).shape == (25, 3)
    assert rec.texts[0] == "a photo of a class 0"


def test_user_mistakes_are_one_line_errors(planted, tmp_path):
    zoo, cache = planted
    with pytest.raises(InputError, match="one text embedding per class"):
        fit_expert(cache, INFORMATIVE, "align", config=SMALL)
    with pytest.raises(InputError, match="label lists"):
        fit_expert(cache, INFORMATIVE, "multilabel", config=SMALL)
    with pytest.raises(InputError, match="unknown task"):
        fit_expert(cache, INFORMATIVE, "regression", config=SMALL)
    partial = build_cache(zoo.root, tmp_path / "partial", layers="0")
    with pytest.raises(InputError, match="not cached"):
        sweep_layers(partial, "0-1", config=SMALL, progress=False)


def test_rank_grouped_encoding_equals_the_padded_batch(planted):
    zoo, cache = planted
    data = LayerData.from_cache(cache, INFORMATIVE)
    assert set(data.rank.tolist()) == {2, 3, 4}
    torch.manual_seed(0)
    expert = fit_expert(cache, INFORMATIVE, "multiclass", config=SMALL.replace(epochs=1)).expert
    idx = torch.randperm(len(data))[:17]
    with torch.no_grad():
        assert torch.allclose(data.encode(expert, idx), expert.encode(data.take(idx)), atol=1e-5)


def test_input_stats_and_principal_directions_read_factors_as_their_products(planted):
    """X̄, s and the principal directions of a LoRA layer equal those of its dense products, and are what they say."""
    zoo, cache = planted
    factors = LayerData.from_cache(cache, INFORMATIVE)
    dense = LayerData(torch.stack([s * u @ d for u, d, s in zip(*factors.x)]))
    train = task_targets(cache, "multiclass").split["train"]
    mean, scale = input_stats(factors, train)
    mean_d, scale_d = input_stats(dense, train)
    assert torch.allclose(mean, mean_d, atol=1e-6) and scale == pytest.approx(scale_d, rel=1e-5)
    x = dense.x[train]
    assert torch.allclose(mean, x.mean(0), atol=1e-6)
    assert ((x - mean) / scale).flatten(1).norm(dim=1).square().mean() == pytest.approx(1.0, rel=1e-4)
    p_w, p_h = principal_directions(factors, train, mean, 5, 4)
    q_w, q_h = principal_directions(dense, train, mean, 5, 4)
    assert p_w.shape == (32, 5) and p_h.shape == (32, 4)
    assert torch.allclose(p_h.T @ p_h, torch.eye(4), atol=1e-5)
    assert torch.allclose((p_w * q_w).sum(0).abs(), torch.ones(5), atol=1e-4)   # same directions up to sign
    assert torch.allclose((p_h * q_h).sum(0).abs(), torch.ones(4), atol=1e-4)
    # the first direction on the input side is the one along which the centred models vary most
    c = (x - mean).double()
    energy = lambda u: float(((c @ u.double()) ** 2).sum())
    assert energy(p_h[:, 0]) >= max(energy(u) for u in torch.randn(50, 32).div(5.66)) * 0.999


def test_new_probex_centres_and_starts_at_principal_directions_unless_told_otherwise(planted):
    zoo, cache = planted
    data = LayerData.from_cache(cache, INFORMATIVE)
    targets = task_targets(cache, "multiclass")
    expert = new_probex(data, targets, SMALL)
    mean, scale = input_stats(data, targets.split["train"])
    assert expert.centred and torch.allclose(expert.input_mean, mean) and expert.input_scale.item() == pytest.approx(scale)
    p_w, p_h = principal_directions(data, targets.split["train"], mean, SMALL.model.r_v, SMALL.model.r_u)
    assert torch.allclose(expert.U, p_h) and torch.allclose(expert.V, p_w)
    paper = new_probex(data, targets, SMALL.replace(centre=False, init="random"))
    assert not paper.centred and not any(k.startswith("input_") for k in paper.state_dict())
    torch.manual_seed(SMALL.optimiser.seed)
    assert torch.equal(paper.U, ProbeX(32, 32, SMALL.model.r_u, SMALL.model.r_v, SMALL.model.r_t, n_out=20).U)
    with pytest.raises(InputError, match="init must be one of"):
        new_probex(data, targets, TrainConfig.of(init="pca"))


def test_a_tree_whose_root_dwarfs_the_models_differences_is_read():
    """Every model = a shared root 1,000× the size of its label-carrying deviation: centred inputs read it."""
    g = torch.Generator().manual_seed(3)
    n, d_w, d_h = 300, 24, 16
    root = 1000 * torch.randn(d_w, d_h, generator=g)
    templates = torch.randn(4, d_w, d_h, generator=g)
    y = (torch.rand(n, 4, generator=g) < 0.5).float()
    x = root + torch.einsum("nc,cwh->nwh", y, templates) + 0.5 * torch.randn(n, d_w, d_h, generator=g)
    idx = torch.randperm(n, generator=g)
    targets = Targets("multilabel", y, {"train": idx[:200], "val": idx[200:240], "test": idx[240:]},
                      [f"label {i}" for i in range(4)])
    fit = train_expert(new_probex(LayerData(x), targets, SMALL), LayerData(x), targets, SMALL)
    assert fit.metrics["test"] > 0.95


def test_new_dense_reads_the_same_centred_inputs_and_keeps_its_ram_budget(planted):
    zoo, cache = planted
    data = LayerData.from_cache(cache, INFORMATIVE)
    targets = task_targets(cache, "multiclass")
    dense = new_dense(data, targets, SMALL)
    mean, scale = input_stats(data, targets.split["train"])
    assert dense.centred and torch.allclose(dense.input_mean, mean) and dense.input_scale.item() == pytest.approx(scale)
    assert dense.head.out_features == len(targets.classes)
    raw = new_dense(data, targets, SMALL.replace(centre=False, init="random"))
    assert not raw.centred
    with pytest.raises(ProbexError, match="budget"):
        new_dense(data, targets, SMALL, ram_budget_gb=1e-6)
