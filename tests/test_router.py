"""probex.router: factor-space distances, trees read off the dendrogram, routing, state round trip."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.cluster.hierarchy import linkage

from probex.errors import InputError, NoExpertError
from probex.router import (Router, count_trees, distance, find_trees, gram, inner, mean_layer,
                           pairwise_distances)
from probex.weights import LoraFactors, ModelWeights, Signature

from hostile.corpus import random_lora, sd_attention_shapes

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN)


def mixed_loras(n=6, d_out=40, d_in=30):
    return [LoraFactors(randn(d_out, r), randn(r, d_in), s)
            for r, s in zip([1, 2, 4, 8, 3, 5][:n], [1.0, 0.5, 2.0, 0.25, 1.0, 3.0][:n])]


def dense64(x):
    return x.scale * x.up.double() @ x.down.double() if isinstance(x, LoraFactors) else x.double()


def test_factor_distances_equal_dense_distances():
    items = mixed_loras()
    dense = torch.stack([dense64(x).reshape(-1) for x in items])
    expected = torch.cdist(dense, dense).numpy()
    assert np.allclose(pairwise_distances(items), expected, rtol=1e-9, atol=1e-9)
    assert np.allclose(gram(items), (dense @ dense.T).numpy(), rtol=1e-9)


def test_inner_products_of_every_pairing_equal_dense():
    a, b = mixed_loras(2)
    m = randn(40, 30)
    for x, y in [(a, b), (a, m), (m, a), (m, m)]:
        assert inner(x, y) == pytest.approx(float((dense64(x) * dense64(y)).sum()), rel=1e-9)
    assert distance(a, m) == pytest.approx(float((a.dense() - m).norm()), rel=1e-5)


def test_gram_chunks_give_the_same_answer(monkeypatch):
    items = mixed_loras()
    whole = gram(items)
    monkeypatch.setattr("probex.router.GRAM_CHUNK_ELEMENTS", 1)  # one row per chunk
    assert np.allclose(gram(items), whole, rtol=1e-12)


def test_centres_are_exact_means_in_the_smaller_form():
    small_tree = mixed_loras(3, d_out=200, d_in=200)  # Σr = 7: factors (7·400) < dense (40,000)
    centre = mean_layer(small_tree)
    assert isinstance(centre, LoraFactors)
    expected = torch.stack([x.dense() for x in small_tree]).mean(0)
    assert torch.allclose(centre.dense(), expected, atol=1e-5)
    big_tree = mixed_loras(6, d_out=8, d_in=8)  # Σr = 23: factors (23·16) > dense (64)
    centre = mean_layer(big_tree)
    assert isinstance(centre, torch.Tensor)
    assert torch.allclose(centre, torch.stack([x.dense() for x in big_tree]).mean(0), atol=1e-5)


def test_no_lora_product_is_ever_materialised(monkeypatch):
    """20,000 × 20,000 layers (a dense product: 400 M numbers). Every matrix product made while clustering, building
    centres and routing is checked to stay far below that."""
    matmul = torch.Tensor.__matmul__

    def small_matmul(a, b):
        out = matmul(a, b)
        assert out.numel() < 10**7, f"a {tuple(out.shape)} product was formed"
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", small_matmul)
    monkeypatch.setattr(LoraFactors, "dense", lambda self: pytest.fail("dense() called"))
    d = 20_000
    roots = [randn(d, 2) / 100, randn(d, 2) / 100]
    models = []
    for t in range(2):
        for _ in range(4):
            up = torch.cat([roots[t], randn(d, 1) / 1000], 1)
            down = torch.cat([torch.eye(2, d).roll(5 * t, 1), randn(1, d) / 1000])
            models.append(lora_model({"x": LoraFactors(up, down)}))
    router = Router().fit(models)
    assert len(router.trees) == 2
    assert all(isinstance(t.centre, LoraFactors) for t in router.groups[0].trees)
    assert [router.route(m).tree for m in models] == router.labels_


# ------------------------------------------------------------------------------------------- tree counting
@pytest.mark.parametrize("positions, expected", [
    ([0, 1, 2, 3, 4, 5], 1),  # evenly spread: one tree
    ([0, 1.1, 1.9, 3.2, 4.0], 1),  # no gap stands out
    ([0, 1, 2, 3, 40, 41, 42], 2),  # one merge far above the rest
    ([0, 1, 2, 50, 51, 52, 100, 101, 150, 151.5], 4),
    ([0, 1, 2, 3, 4, 30], 1),  # a lone outlier is not a tree
    ([0, 1, 2, 3, 4, 30, 60, 61, 62], 2),  # …nor here: the next largest gap is the cut
    ([0, 5], 1),  # two models: nothing to compare
])
def test_count_trees_rule(positions, expected):
    merges = linkage(np.array(positions, dtype=float)[:, None], method="single")
    assert count_trees(merges) == expected


def test_count_trees_of_one_model():
    assert count_trees(np.zeros((0, 4))) == 1


def planted_trees(n_trees, per_tree, shape=(64, 48), rank=2, spread=0.05, seed=0):
    """LoRA populations whose product B@A = tree component + small member component; trees differ only there."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    models, truth = [], []
    for t in range(n_trees):
        tree_up, tree_down = torch.randn(d_out, 4, generator=gen), torch.randn(4, d_in, generator=gen) / d_in ** 0.5
        for _ in range(per_tree):
            up = torch.cat([tree_up, spread * torch.randn(d_out, rank, generator=gen)], 1)
            down = torch.cat([tree_down, torch.randn(rank, d_in, generator=gen) / d_in ** 0.5])
            models.append(LoraFactors(up, down, 1.0))
            truth.append(t)
    return models, np.array(truth)


def same_partition(a, b) -> bool:
    pairs = {(x, y) for x, y in zip(a, b)}
    return len(pairs) == len(set(a)) == len(set(b))


@pytest.mark.parametrize("n_trees", [1, 2, 4])
def test_number_of_trees_is_read_off_the_dendrogram(n_trees):
    items, truth = planted_trees(n_trees, per_tree=8, seed=n_trees)
    labels, heights, _ = find_trees(items)
    assert labels.max() + 1 == n_trees
    assert same_partition(labels, truth)


def lora_model(layers, source="m.safetensors"):
    return ModelWeights("lora", layers, {}, {}, Signature.of(layers), source)


def full_model(layers, source="f.safetensors"):
    return ModelWeights("full", layers, {}, {}, Signature.of(layers), source)


def sd15_population(n_trees, per_tree, seed=0, spread=0.05):
    """SD 1.5-shaped LoRAs (all 128 modules); the trees are planted in the routing layer."""
    layer = "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"
    shapes = sd_attention_shapes("sd15")
    items, truth = planted_trees(n_trees, per_tree, shapes[layer], seed=seed, spread=spread)
    models = []
    for i, item in enumerate(items):
        layers = random_lora(shapes, rank=2, seed=1000 * seed + i)
        layers[layer] = item
        models.append(lora_model(layers, f"model_{i}.safetensors"))
    return models, truth, layer


def test_planted_trees_are_recovered_and_new_members_routed_100_percent():
    models, truth, layer = sd15_population(3, per_tree=12, seed=1)
    train = [i for i in range(len(models)) if i % 4 != 0]
    held_out = [i for i in range(len(models)) if i % 4 == 0]
    router = Router().fit([models[i] for i in train], layer=layer)
    assert len(router.trees) == 3
    assert same_partition(router.labels_, truth[train])
    tree_of_truth = {t: name for t, name in zip(truth[train], router.labels_)}
    for i in held_out:
        route = router.route(models[i])
        assert route.tree == tree_of_truth[truth[i]] and route.exact_signature and route.layer == layer
        assert route.confidence > 0.5


def test_full_model_trees_that_differ_only_in_their_root():
    gen = torch.Generator().manual_seed(7)
    models, truth = [], []
    for t in range(3):
        root = {"blocks.0.qkv": torch.randn(48, 16, generator=gen), "head": torch.randn(10, 16, generator=gen)}
        for _ in range(6):
            models.append(full_model({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in root.items()}))
            truth.append(t)
    router = Router().fit(models, layer="blocks.0.qkv")
    assert len(router.trees) == 3 and same_partition(router.labels_, truth)
    assert all(router.route(m).tree == label for m, label in zip(models, router.labels_))


def test_each_architecture_gets_its_own_trees():
    sd15, _, layer = sd15_population(2, per_tree=5, seed=2)
    other = [lora_model(random_lora({"layer.a": (8, 8)}, rank=1, seed=s)) for s in range(4)]
    router = Router().fit(sd15 + other, layer=None)
    assert len(router.groups) == 2
    assert router.route(other[0]).tree in router.labels_[len(sd15):]
    assert router.route(sd15[0]).tree in router.labels_[: len(sd15)]


def test_one_tree_confidence_uses_its_radius():
    models, _, layer = sd15_population(1, per_tree=6, seed=3)
    router = Router().fit(models, layer=layer)
    assert router.route(models[0]).confidence == 1.0
    far = dict(models[0].layers)
    far[layer] = LoraFactors(100 * far[layer].up, far[layer].down)
    assert router.route(lora_model(far)).confidence < 0.1


# -------------------------------------------------------------------------------------------- refusals
def refusal(router, weights):
    with pytest.raises(NoExpertError) as caught:
        router.route(weights)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_models_of_no_known_tree_are_refused_with_what_they_look_like():
    models, _, layer = sd15_population(2, per_tree=4)
    router = Router().fit(models, layer=layer)
    sdxl = lora_model(random_lora(sd_attention_shapes("sdxl", ["down_blocks.1"]), rank=1), "xl.safetensors")
    assert refusal(router, sdxl).startswith("no tree expert for SDXL UNet LoRAs: xl.safetensors")
    full = full_model({n: f.dense() for n, f in models[0].layers.items()})
    assert "full checkpoints" in refusal(router, full)
    te_only = ModelWeights("lora", {}, {"q": models[0].layers[layer]}, {}, Signature.of({}), "te.safetensors")
    assert "text-encoder-only" in refusal(router, te_only)
    odd = lora_model(random_lora({"encoder.0": (5, 5)}, rank=1))
    assert refusal(router, odd) == ("no tree expert for this architecture (LoRAs, 1 layer): m.safetensors matches "
                                    "no known tree (known: sd15-0, sd15-1 for SD 1.5 LoRAs)")


def test_a_model_missing_modules_routes_on_the_routing_layer_if_it_has_it():
    models, truth, layer = sd15_population(2, per_tree=5)
    router = Router().fit(models, layer=layer)
    fewer = dict(models[0].layers)
    fewer.pop(next(n for n in fewer if n != layer))
    route = router.route(lora_model(fewer))
    assert not route.exact_signature and route.tree == router.labels_[0]
    fewer.pop(layer)
    assert layer not in fewer
    assert refusal(router, lora_model(fewer)) == (f"no tree expert for SD 1.5 UNet LoRAs: m.safetensors lacks {layer}, "
                                                  "the layer its trees are told apart by")


# ----------------------------------------------------------------------------------------------- state
def test_state_round_trips_through_safetensors_and_json(tmp_path):
    models, _, layer = sd15_population(3, per_tree=4, seed=4)
    big = [full_model({"w": randn(6, 5) + 10 * k}) for k in (0, 0, 0, 1, 1, 1)]
    router = Router().fit(models + big, layer=None)
    router.rename({router.trees[0]: "sd15-modelj"})
    tensors, state = router.to_state()
    assert {type(t.centre).__name__ for g in router.groups for t in g.trees} == {"LoraFactors", "Tensor"}
    save_file(tensors, str(tmp_path / "router.safetensors"))
    (tmp_path / "router.json").write_text(json.dumps(state))
    loaded = Router.from_state(load_file(str(tmp_path / "router.safetensors")),
                               json.loads((tmp_path / "router.json").read_text()))
    assert loaded.trees == router.trees and loaded.trees[0] == "sd15-modelj"
    for m in models + big:
        a, b = router.route(m), loaded.route(m)
        assert a.tree == b.tree and a.distance == pytest.approx(b.distance, rel=1e-5)


def test_malformed_state_is_a_clear_error():
    tensors, state = Router().fit(sd15_population(2, per_tree=3)[0]).to_state()
    tensors.pop(next(iter(tensors)))
    with pytest.raises(InputError, match="router state"):
        Router.from_state(tensors, state)
    with pytest.raises(InputError, match="router state"):
        Router.from_state({}, {"format": "something else"})


def test_known_trees_need_no_clustering_and_route_to_their_own_centres():
    """LoRA populations that share their A matrices (one peft seed) and differ in B around their root's own offset:
    single linkage chains across the two when the within-tree spread is wide, but given the membership the centres
    are the members' means and every member routes home."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 30, generator=g)
    offsets = [torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)]
    items, members = [], []
    for k in (0, 1):
        for _ in range(15):
            items.append(LoraFactors(offsets[k] * 0.5 + torch.randn(40, 4, generator=g), a, 1.0))
            members.append(k)
    found, _, _ = find_trees(items, n_trees=2)
    assert sorted(np.bincount(found).tolist()) != [15, 15]   # clustering alone does not recover them
    sig = Signature.of({"down_blocks.0.attn2.to_v": items[0]})
    router = Router()
    names = router.add_group(sig, "lora", "down_blocks.0.attn2.to_v", items, members=members)
    group = router.groups[0]
    assert names == [group.trees[k].name for k in members] and [t.size for t in group.trees] == [15, 15]
    for k, tree in enumerate(group.trees):
        mean = torch.stack([dense64(x) for x, m in zip(items, members) if m == k]).mean(0)
        assert torch.allclose(dense64(tree.centre), mean, atol=1e-6)
    assert [router.route_item(group, x).tree for x in items] == names


def test_roots_listeners_route_loras_their_centres_cannot_and_survive_a_round_trip():
    """Two trees with the same centre: only their roots' listeners tell them apart. A LoRA shaped by its root's
    listener (ΔW = Lᵀ·X, as a gradient through L makes it) is amplified most by that listener."""
    g = torch.Generator().manual_seed(5)
    def orthogonal():
        return torch.linalg.qr(torch.randn(24, 24, generator=g))[0]

    listeners = [orthogonal() @ torch.diag(torch.linspace(3, 0.1, 24)) @ orthogonal().T for _ in (0, 1)]
    listeners = [m / m.norm() for m in listeners]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    a = torch.randn(4, 24, generator=g)
    models, members = [], []
    for k in (0, 1):
        for _ in range(6):
            up = listeners[k].T @ torch.randn(24, 4, generator=g)
            models.append({name: LoraFactors(up, a, 1.0)})
            members.append(k)
    router = Router()
    names = router.add_group(Signature.of(models[0]), "lora", name, [m[name] for m in models], members=members)
    group = router.groups[0]
    for k, tree in enumerate(group.trees):
        tree.listeners = {name: listeners[k]}
    routes = [router.route_layers(group, m) for m in models]
    assert [r.tree for r in routes] == names and {r.method for r in routes} == {"root"}
    assert all(0 < r.confidence <= 1 for r in routes)
    back = Router.from_state(*router.to_state())
    assert [back.route_layers(back.groups[0], m).tree for m in models] == names
    for tree in back.groups[0].trees:   # without listeners the same router falls back to the centres
        tree.listeners = {}
    assert back.route_layers(back.groups[0], models[0]).method == "centre"
