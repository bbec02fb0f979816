"""Bundles: exact round trip, a manifest that names a missing or altered file, map placement without refitting,
and the whole train flow (zoos → router + experts + galleries) read back and evaluated."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probex.build import train_bundle
from probex.bundle import Bundle, TreeBundle
from probex.gallery import Gallery, layout_2d
from probex.errors import NoExpertError, ProbexError
from probex.evaluate import evaluate_bundle
from probex.experts import ProbeX
from probex.train import TrainConfig
from probex.weights import read_weights
from synthetic import make_lora_zoo, write_tree_json


def small_bundle(n=6):
    torch.manual_seed(0)
    expert = ProbeX(8, 6, r_u=4, r_v=4, r_t=5, head="align", text_dim=3)
    enc = torch.randn(n, 5)
    coords, method = layout_2d(enc)
    gallery = Gallery([f"train/m{i}" for i in range(n)], ["cat", "dog"] * (n // 2), ["train"] * n, ["cat", "dog"],
                      enc, coords, torch.randn(2, 3), ["c0", "c1"], layout={"method": method, "seed": 0, "place_k": 2})
    tree = TreeBundle("tiny-tree", "down_blocks.0.attn2.to_q", expert, gallery, "align", "abc123", None,
                      "an emoji of {name}", None, "an emoji of sks")
    return Bundle("emoji-mini", "minilm", {"tiny-tree": tree}, None, [], {"note": "test"})


def test_round_trip_is_exact(tmp_path):
    """Exact up to the gallery's storage (fp16, encodings int8; the loaded tensors are fp32)."""
    bundle = small_bundle()
    bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    t, u = bundle.trees["tiny-tree"], loaded.trees["tiny-tree"]
    assert (u.layer, u.task, u.digest, u.prompt_template, u.instance_prompt) == \
           (t.layer, t.task, t.digest, t.prompt_template, t.instance_prompt)
    for field in ("coords", "text_emb"):
        loaded_field = getattr(u.gallery, field)
        assert loaded_field.dtype == torch.float32 and torch.equal(loaded_field, getattr(t.gallery, field).half().float())
    stored, kept = u.gallery.encodings, t.gallery.encodings  # int8 at one scale per model: each entry within half a step
    assert stored.dtype == torch.float32 and stored.shape == kept.shape
    assert ((stored - kept).abs() <= kept.abs().amax(1, keepdim=True) / 254 + 1e-7).all()
    assert u.gallery.ids == t.gallery.ids and u.gallery.vocabulary == ["cat", "dog"]
    x, text = torch.randn(3, 8, 6), torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(u.expert(x, text), t.expert(x, text))
    meta = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert set(meta["manifest"]) == {"tiny-tree/expert/config.json", "tiny-tree/expert/model.safetensors",
                                     "tiny-tree/gallery.safetensors", "tiny-tree/text.safetensors",
                                     "tiny-tree/gallery.json"}
    assert loaded.info == {"note": "test"} and loaded.router is None
    assert not list((tmp_path / "b").rglob("*.pt")) and not list((tmp_path / "b").rglob("*.pkl"))


def test_int8_encodings_keep_cosines():
    """The shipped galleries' encodings (thousands of dims, unit-norm blocks) stored in int8: cosines barely move."""
    from probex.bundle import quantize

    torch.manual_seed(0)
    x = torch.cat([F.normalize(torch.randn(40, 1000), dim=-1), 0.5 * F.normalize(torch.randn(40, 3000), dim=-1)], 1)
    x[:20] += 0.3 * x[20:]  # correlated rows too, not only near-orthogonal ones
    codes, scale = quantize(x)
    assert codes.dtype == torch.int8 and scale.shape == (40,)
    back = codes.float() * scale[:, None]
    cos = lambda e: F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T  # noqa: E731
    assert (cos(back) - cos(x)).abs().max() < 2e-3


@pytest.mark.parametrize("victim", ["tiny-tree/expert/model.safetensors", "tiny-tree/gallery.json"])
def test_altered_or_missing_files_are_named(tmp_path, victim):
    small_bundle().save(tmp_path)
    path = tmp_path / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ProbexError, match=f"{victim} is corrupted"):
        Bundle.load(tmp_path)
    path.unlink()
    with pytest.raises(ProbexError, match=f"{victim} is missing"):
        Bundle.load(tmp_path)


def test_class_keywords_round_trip_and_malformed_ones_are_named(tmp_path):
    bundle = small_bundle()
    assert Bundle.load(bundle.save(tmp_path / "plain")).trees["tiny-tree"].gallery.vocabulary_keywords == []
    bundle.trees["tiny-tree"].gallery.vocabulary_keywords = [["kitten", "pet"], []]
    bundle.save(tmp_path / "b")
    assert Bundle.load(tmp_path / "b").trees["tiny-tree"].gallery.vocabulary_keywords == [["kitten", "pet"], []]
    bundle.trees["tiny-tree"].gallery.vocabulary_keywords = [["kitten"]]   # one list for two classes
    bundle.save(tmp_path / "bad")
    with pytest.raises(ProbexError, match="gallery is incomplete.*one list of words per vocabulary class"):
        Bundle.load(tmp_path / "bad")


def test_cldr_keywords_are_matched_to_atlas_ids(tmp_path):
    from probex.jungle.atlas import build_keywords, load_keywords

    atlas = tmp_path / "atlas"
    atlas.mkdir()
    np.save(atlas / "atlas.npy", np.zeros((2, 32, 32, 4), np.uint8))
    (atlas / "classes.json").write_text(json.dumps({"classes": [{"id": "U+1F408", "name": "cat"},
                                                                {"id": "U+2744", "name": "snowflake"}]}))
    cldr = tmp_path / "annotations.json"   # CLDR writes some emoji with the variation selector, some without
    cldr.write_text(json.dumps({"annotations": {"annotations": {
        "🐈": {"default": ["cat", "kitten", "pet"], "tts": ["cat"]}, "❄️": {"default": ["cold", "snow"]}}}}))
    info = build_keywords(cldr, "48.2.0", atlas)
    assert load_keywords(atlas) == {"U+1F408": ["kitten", "pet"], "U+2744": ["cold", "snow"]}
    assert "48.2.0" in info["source"] and load_keywords(tmp_path) == {}


def test_broken_bundle_json_is_a_one_line_error(tmp_path):
    with pytest.raises(ProbexError, match="bundle.json is missing"):
        Bundle.load(tmp_path)
    small_bundle().save(tmp_path)
    meta = json.loads((tmp_path / "bundle.json").read_text())
    (tmp_path / "bundle.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ProbexError, match="version 99"):
        Bundle.load(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(ProbexError, match="not valid JSON") as err:
        Bundle.load(tmp_path)
    assert "\n" not in str(err.value)


def test_new_points_are_placed_among_their_neighbours_without_refitting():
    g = small_bundle(n=4).trees["tiny-tree"].gallery
    g.encodings = torch.tensor([[1.0, 0, 0, 0, 0], [0.9, 0.1, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0.9, 0.1, 0]])
    g.coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0]])
    on_top = g.place(g.encodings[2:3], k=2)[0]
    assert torch.allclose(on_top, g.coords[2], atol=1e-3)
    between = g.place(torch.tensor([[1.0, 0.05, 0, 0, 0]]), k=2)[0]
    assert 0 < between[0] < 1 and abs(between[1]) < 1e-6
    assert g.nearest(torch.tensor([0, 0, 1.0, 0.01, 0]), k=1)[0][0] == 2


def test_tiny_galleries_fall_back_to_pca():
    coords, method = layout_2d(torch.randn(4, 6))
    assert method == "pca" and coords.shape == (4, 2)


LAYERS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 12),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": (16, 16)}
INFORMATIVE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"


def test_train_bundle_end_to_end(tmp_path):
    """Two trees of one architecture (different shared components), trained, bundled, loaded, routed, evaluated."""
    from probex.text import load_text_encoder

    minilm = load_text_encoder("minilm")
    names = ["tiger", "lion", "house cat", "wolf", "fox", "owl", "eagle", "shark"]
    text = minilm.embed([f"an emoji of {n}" for n in names])
    zoos = []
    for i, tree_seed in enumerate((11, 22)):
        z = make_lora_zoo(tmp_path / f"zoo{i}", n_classes=6, per_class=5, layers=LAYERS, ranks=(2, 3),
                          holdout_classes=2, holdout_per_class=4, informative=[INFORMATIVE], class_names=names,
                          class_embeddings=text, tree_component=3.0, tree_seed=tree_seed, signal=1.0, seed=i)
        write_tree_json(z.root, name=f"tree-{i}", instance_prompt="an emoji of sks")
        zoos.append(z)
    config = TrainConfig.of(epochs=25, batch_size=32, lr=1e-2, r_u=8, r_v=8, r_t=16)
    summary = train_bundle([z.root for z in zoos], tmp_path / "bundle", config=config, profile="emoji-mini",
                           cache_dir=tmp_path / "cache", encoder=minilm)
    assert set(summary["trees"]) == {"tree-0", "tree-1"}, summary
    assert all(t["layer"] == INFORMATIVE and t["task"] == "align" for t in summary["trees"].values())

    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.text_encoder == "minilm" and set(bundle.trees) == {"tree-0", "tree-1"}
    for i, z in enumerate(zoos):
        tree = bundle.trees[f"tree-{i}"]
        assert tree.instance_prompt == "an emoji of sks" and tree.gallery.layout["method"] == "umap"
        known = len(z.models) - 3   # its 3 examples are kept out of the gallery
        assert tree.gallery.encodings.shape == (known, 16) and tree.gallery.coords.shape == (known, 2)
        shown = {"/".join(p.stem.split("__")[-2:]) for p in bundle.examples if p.stem.startswith(f"{z.root.name}__")}
        assert len(shown) == 3 and not shown & set(tree.gallery.ids)
        assert tree.gallery.vocabulary == names   # align: held-out classes are nameable too
        assert tree.gallery.text_emb.shape == (8, 384)
        assert len(tree.gallery.sample_paths) == 6 and all(
            p.startswith(str(tmp_path / "bundle")) for p in tree.gallery.sample_paths.values())
        for m in z.models[::7]:   # the router sends every model home
            assert bundle.router.route(read_weights(m["path"])).tree == f"tree-{i}"
    assert len(bundle.examples) == 6 and all(p.is_file() for p in bundle.examples)
    assert (tmp_path / "bundle" / "sweeps" / "tree-0" / "sweep.csv").is_file()

    foreign = make_lora_zoo(tmp_path / "foreign", n_classes=1, per_class=3, layers={"mid_block.attn1.to_v": (8, 8)})
    with pytest.raises(NoExpertError):
        bundle.router.route(read_weights(foreign.models[0]["path"]))

    report = evaluate_bundle(tmp_path / "bundle", zoos[0].root, k=3)
    assert report["tree"] == "tree-0" and report["router_accuracy"] == 1.0
    assert report["top1_test"] >= 0.8 and report["n_test_holdout"] == 4
    assert {"zero_shot_val_holdout", "zero_shot_test_holdout", "knn3_test", "occ_auc3_holdout"} <= set(report)


def test_train_bundle_for_a_discriminative_tree(tmp_path):
    """Full checkpoints with label sets: a multilabel expert, no LoRA files shipped, evaluated per label."""
    from synthetic import make_full_zoo

    zoo = make_full_zoo(tmp_path / "zoo", n_classes=6, n_models=60, labels_per_model=2,
                        layers={"blocks.0.fc": (12, 10), "blocks.1.fc": (12, 12)}, informative=["blocks.1.fc"],
                        signal=1.0, noise=0.3)
    write_tree_json(zoo.root, name="vit-mini")
    config = TrainConfig.of(epochs=30, batch_size=32, lr=1e-2, r_u=8, r_v=8, r_t=16)
    summary = train_bundle(zoo.root, tmp_path / "bundle", config=config, cache_dir=tmp_path / "cache")
    assert summary["trees"]["vit-mini"]["layer"] == "blocks.1.fc"
    assert summary["trees"]["vit-mini"]["task"] == "multilabel"
    bundle = Bundle.load(tmp_path / "bundle")
    tree = bundle.trees["vit-mini"]
    assert tree.expert.head_kind == "multilabel" and tree.gallery.vocabulary == zoo.class_ids
    assert tree.gallery.model_classes[0] == zoo.models[0]["labels"]
    assert tree.gallery.sample_paths == {} and bundle.examples == []
    assert bundle.router.groups[0].kind == "full"
    report = evaluate_bundle(tmp_path / "bundle", zoo.root)
    assert report["router_accuracy"] == 1.0 and report["per_label_accuracy_test"] > 0.85


def test_class_anchors_are_known_model_means_and_text_for_the_rest():
    """Classes with train-split models are anchored at their models' mean encoding; a class with none keeps its
    text feature, and models of other splits (val, test) never leak into an anchor."""
    enc = torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0, 1.0, 0], [0, 0, 5.0], [0, 0, 1.0]])
    gallery = Gallery(["train/a", "train/b", "train/c", "test/d", "val_holdout/e"], ["cat", "cat", "dog", "dog", "owl"],
                      ["train", "train", "train", "test", "val_holdout"], ["cat", "dog", "owl"], enc,
                      torch.zeros(5, 2), torch.zeros(3, 4))
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 1, 1], [1, -1, 0], [0, 1, -1]]), dim=-1)
    anchors = gallery.class_anchors(text)
    assert torch.allclose(anchors[0], torch.nn.functional.normalize(torch.tensor([1.8, 0.6, 0]), dim=0))
    assert torch.allclose(anchors[1], torch.tensor([0.0, 1, 0]))     # the test model (0, 0, 5) is not used
    assert torch.allclose(anchors[2], text[2])                          # no train models: the text stays


def test_concept_scores_are_z_normed_so_an_unseen_class_can_come_first():
    """A class mean scores high on every LoRA near it, a caption's text feature lower on all of them; measured
    against each anchor's usual score on the known train models, the LoRA of the unseen class has its class first,
    and known models keep theirs."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    known_dir, unseen_dir = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)
    enc = torch.nn.functional.normalize(3 * base + 0.5 * known_dir + 0.2 * torch.randn(6, 16, generator=g), dim=-1)
    gallery = Gallery([f"train/{i}" for i in range(6)], ["cat"] * 6, ["train"] * 6, ["cat", "owl"], enc,
                      torch.zeros(6, 2), torch.zeros(2, 4))
    text = torch.nn.functional.normalize(torch.stack([known_dir, unseen_dir]), dim=-1)
    anchors = gallery.class_anchors(text)
    owl_lora = torch.nn.functional.normalize(3 * base + 0.5 * unseen_dir, dim=0)[None]
    raw = gallery.concept_scores(owl_lora, anchors, (torch.zeros(2), torch.ones(2)))
    assert raw.argmax().item() == 0                                     # by raw cosine the known class wins
    mean, std = gallery.calibration(anchors)
    assert torch.allclose(mean, (enc @ anchors.T).mean(0), atol=1e-6) and (std > 0).all()
    assert gallery.concept_scores(owl_lora, anchors).argmax().item() == 1        # z-normed: the unseen class
    cat_lora = torch.nn.functional.normalize(3 * base + 0.5 * known_dir, dim=0)[None]
    assert gallery.concept_scores(cat_lora, anchors).argmax().item() == 0        # a new LoRA of the known class


def test_text_search_is_z_normed_per_model_so_a_hub_does_not_top_every_search():
    """A model close to every caption (a hub) wins each search by raw cosine; against its usual cosine with the
    vocabulary's captions, the model that matches one caption more than its usual is found for that caption."""
    eye = torch.eye(16)
    text = eye[:8]                                                       # 8 captions, orthonormal
    hub = torch.nn.functional.normalize(text.sum(0), dim=0)              # cosine 0.354 with every caption
    specific = torch.nn.functional.normalize(0.3 * eye[:4] + eye[8:12], dim=-1)   # 0.287 with its own, 0 others
    enc = torch.cat([hub[None], specific])
    gallery = Gallery(["hub", "m0", "m1", "m2", "m3"], ["x", "a", "b", "c", "d"], ["train"] * 5,
                      ["a", "b", "c", "d", "e", "f", "g", "h"], enc, torch.zeros(5, 2), torch.zeros(8, 4))
    raw = gallery.search_scores(text[:4], (torch.zeros(5), torch.ones(5)))
    assert (raw.argmax(1) == 0).all()                                   # by raw cosine the hub tops every search
    calibration = gallery.model_calibration(text)
    assert torch.allclose(calibration[0], (enc @ text.T).mean(1), atol=1e-6)
    assert gallery.search_scores(text[:4], calibration).argmax(1).tolist() == [1, 2, 3, 4]


def test_nearest_mean_reads_clustered_encodings_and_not_shuffled_ones():
    from probex.data import Targets
    from probex.train import nearest_mean_top1

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    y = torch.arange(10).repeat(4)
    enc = centres[y] + 0.3 * torch.randn(40, 32, generator=g)
    split = {"train": torch.arange(0, 30), "test": torch.arange(30, 40)}
    targets = Targets("multiclass", y, split, [str(i) for i in range(10)])
    assert nearest_mean_top1(enc, targets, "test") == 1.0
    shuffled = Targets("multiclass", torch.cat([y[torch.randperm(30, generator=g)], y[30:]]), split, targets.classes)
    assert nearest_mean_top1(enc, shuffled, "test") < 0.5


def test_examples_of_two_trees_with_the_same_model_id_both_ship(tmp_path):
    from probex.bundle import _example_name

    a = tmp_path / "tree-a" / "test" / "model_idx_0014" / "pytorch_lora_weights.safetensors"
    b = tmp_path / "tree-b" / "test" / "model_idx_0014" / "pytorch_lora_weights.safetensors"
    assert _example_name(a) != _example_name(b) and _example_name(a) == "tree-a__test__model_idx_0014.safetensors"


def test_unseen_offset_lifts_unseen_classes_until_val_reads_both_kinds():
    """Scores made by hand: val models of the known class score it 3 and the unseen class 1; val_holdout models of
    the unseen class score the known class 2 and their own 1.5. No offset names the unseen class for none of them;
    the chosen offset (nearest 0 among the best) puts each kind's own class first, and it is 0 with too few models."""
    splits = ["train"] * 2 + ["val"] * 10 + ["val_holdout"] * 10
    ids = [f"{s}/{i}" for i, s in enumerate(splits)]
    classes = ["cat"] * 12 + ["owl"] * 10
    gallery = Gallery(ids, classes, splits, ["cat", "owl"], torch.randn(22, 4), torch.zeros(22, 2), torch.zeros(2, 4))
    scores = torch.tensor([[3.0, 1.0]] * 12 + [[2.0, 1.5]] * 10)
    assert gallery.known_classes.tolist() == [True, False]
    offset = gallery.unseen_offset(scores)
    assert 0.5 < offset < 2.0 and offset == pytest.approx(0.55)   # the grid's first step past the tie at 0.5
    named = gallery.open_set_scores(scores, offset).argmax(1).tolist()
    assert named == [0] * 12 + [1] * 10 and scores.argmax(1).tolist() == [0] * 22
    few = Gallery(ids[:21], classes[:21], splits[:21], ["cat", "owl"], torch.randn(21, 4), torch.zeros(21, 2),
                  torch.zeros(2, 4))
    assert few.unseen_offset(scores[:21]) == 0.0   # 9 val_holdout models: too few to set an offset
