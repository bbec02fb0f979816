"""The service verbs on a real bundle built here: a tiny random emoji root, two synthetic LoRA trees of the same
architecture (planted class signal linear in MiniLM text embeddings, a different tree component each), trained with
probex.build.train_bundle — the same flow `python -m probex train` runs (the `built` fixture of
conftest.py builds it once per session)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from probex.errors import InputError, NoExpertError, ProbexError
from probex.fetch import local_file as fetch_local_file
from probex.weights import LoraFactors, read_weights, save_lora


@pytest.fixture(scope="session")
def studio(built):
    from probex.service import Studio

    return Studio.load(built["bundle"])


# ------------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("tree,split,cls", [("tree-a", "test", "banana"), ("tree-a", "test", "fish"),
                                            ("tree-b", "test", "apple"), ("tree-b", "test", "rocket"),
                                            ("tree-a", "test_holdout", "owl")])
def test_predict_routes_to_the_tree_and_names_the_class(zoo_file, studio, built, tree, split, cls):
    path = zoo_file(built["zoos"][tree], split, cls)
    result = studio.predict(path, top_k=5)
    assert set(result) >= {"tree", "layer", "router", "classes", "neighbors"}
    assert result["tree"] == tree
    assert result["score_unit"] == ("z" if studio.bundle.trees[tree].expert.head_kind == "align" else "probability")
    assert result["router"]["confidence"] > 0.5   # the trees are planted apart: nearer its own centre than halfway
    names = [c["name"] for c in result["classes"]]
    assert len(names) == min(5, len(studio.bundle.trees[tree].gallery.vocabulary)) and cls in names
    scores = [c["score"] for c in result["classes"]]
    assert scores == sorted(scores, reverse=True)
    own, top = path.parent.relative_to(built["zoos"][tree]).as_posix(), result["neighbors"][0]
    if own in studio.bundle.trees[tree].gallery.ids:  # a known model: its own gallery entry is the nearest (cosine 1)
        assert top["id"] == own and top["class"] == cls and top["score"] == pytest.approx(1.0, abs=1e-4)
    else:  # one of the bundle's examples, kept out of the gallery: read as a visitor's own file is
        assert own in example_ids(studio) and top["score"] < 0.999
    assert all(set(n) >= {"id", "class", "split", "score"} for n in result["neighbors"])


def example_ids(studio) -> set[str]:
    """Model ids of the bundle's examples (shipped as ``tree__split__model_idx_NNNN.safetensors``)."""
    return {"/".join(Path(e["path"]).stem.split("__")[-2:]) for e in studio.examples()}


def test_examples_are_not_gallery_members(studio):
    """An example is read as a visitor's own file would be: not found as its own nearest model."""
    examples = studio.examples()
    assert examples
    for e in examples:
        tree, split, model = Path(e["path"]).stem.split("__")
        assert f"{split}/{model}" not in studio.bundle.trees[tree].gallery.ids
        assert studio.predict(e["path"])["neighbors"][0]["score"] < 0.999


def test_in_distribution_top1_on_every_test_model(studio, built):
    """Not one lucky file: the expert names the class of most test models of both trees."""
    right = total = 0
    for tree, zoo in built["zoos"].items():
        for path in sorted((zoo / "test").glob("*/pytorch_lora_weights.safetensors")):
            truth = read_weights(path).metadata["class_name"]
            right += studio.predict(path, top_k=1)["classes"][0]["name"] == truth
            total += 1
    assert right / total >= 0.8, f"top-1 {right}/{total}"


def test_route_reports_the_routing_layer(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-b"], "test", "lion")
    r = studio.route(path)
    assert r["tree"] == "tree-b" and r["router"]["layer"] and r["router"]["exact_signature"] is True


# ----------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_scores_exactly_the_users_labels(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-b"], "test", "apple")
    scores = studio.zero_shot(path, ["rocket", " apple ", "tiger", "apple"])
    assert [s["name"] for s in scores][0] == "apple"
    assert sorted(s["name"] for s in scores) == ["apple", "rocket", "tiger"]  # cleaned, duplicates once
    assert scores == sorted(scores, key=lambda s: s["score"], reverse=True)


def test_zero_shot_accepts_a_comma_separated_string_and_an_analysis(zoo_file, studio, built):
    analysis = studio.analyse(zoo_file(built["zoos"]["tree-b"], "test", "lion"))
    assert studio.zero_shot(analysis, "tiger, lion,, ")[0]["name"] == "lion"


@pytest.mark.parametrize("labels,fragment", [([], "no labels"), ([" ", ","], "no labels"),
                                             ([f"l{i}" for i in range(100)], "more than"),
                                             (["x" * 500], "characters")])
def test_zero_shot_refuses_bad_labels(zoo_file, studio, built, labels, fragment):
    with pytest.raises(InputError, match=fragment):
        studio.zero_shot(zoo_file(built["zoos"]["tree-b"], "test", "lion"), labels)


# -------------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("cls", ["tiger", "banana", "tulip"])
def test_search_finds_models_of_the_class(studio, cls):
    models = studio.search(cls, top_k=3)["models"]
    assert len(models) == 3 and models[0]["class"] == cls
    assert all(set(m) >= {"id", "class", "split", "score", "tree"} for m in models)
    assert [m["score"] for m in models] == sorted((m["score"] for m in models), reverse=True)


@pytest.mark.parametrize("text, cls", [("a night bird that hoots", "owl"), ("a yellow fruit monkeys eat", "banana"),
                                       ("a slow garden creature with a shell", "snail")])
def test_a_description_is_read_as_its_class_and_finds_its_models(studio, text, cls):
    result = studio.search(text, top_k=3)
    assert result["read_as"][0]["class"] == cls
    assert [m["class"] for m in result["models"]] == [cls] * 3 and {m["found_by"] for m in result["models"]} == {"class"}


def test_a_text_unlike_every_class_is_searched_by_the_weights_alone(studio):
    result = studio.search("the tax code of a small country", top_k=4)
    assert result["read_as"] == [] and {m["found_by"] for m in result["models"]} == {"weights"}
    assert [m["score"] for m in result["models"]] == sorted((m["score"] for m in result["models"]), reverse=True)


@pytest.mark.parametrize("text", ["", "   ", "x" * 1000])
def test_search_refuses_empty_or_huge_text(studio, text):
    with pytest.raises(InputError):
        studio.search(text)


# ----------------------------------------------------------------------------------------------------- map
def test_map_figure_places_upload_and_query(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-a"], "test", "fish")
    fig = studio.map_figure(path, query="a red fruit")
    known = fig.data[0]
    gallery = studio.bundle.trees["tree-a"].gallery
    assert len(known.x) == len(gallery.ids) and known.customdata[0][0] == gallery.ids[0]
    names = [trace.name for trace in fig.data]
    assert "class names" in names
    upload = next(t for t in fig.data if (t.name or "").startswith("your LoRA"))
    query = next(t for t in fig.data if "a red fruit" in (t.name or ""))
    # the upload IS a known model: placed on its own gallery point (weights 1/(1-cos) favour the exact match)
    own = gallery.ids.index(path.parent.relative_to(built["zoos"]["tree-a"]).as_posix())
    assert upload.x[0] == pytest.approx(float(gallery.coords[own, 0]), abs=1e-2)
    assert upload.y[0] == pytest.approx(float(gallery.coords[own, 1]), abs=1e-2)
    # the query lands among the models of the class it reads as (the map's class clusters lie far apart)
    members = {c: [i for i, k in enumerate(gallery.model_classes) if k == c] for c in set(gallery.model_classes)}
    point = torch.tensor([query.x[0], query.y[0]])
    nearest = min(members, key=lambda c: float((gallery.coords[members[c]].mean(0) - point).norm()))
    assert nearest == studio.read_query("a red fruit")[0]["class"]


def test_map_without_a_request_shows_the_largest_tree(studio):
    fig = studio.map_figure()
    assert "tree-a" in fig.layout.title.text and len(fig.data[0].x) == len(studio.bundle.trees["tree-a"].gallery.ids)


# ---------------------------------------------------------------------------------------------------- card
def test_model_card_is_a_hub_readme(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-b"], "test", "rocket")
    text = studio.model_card(path)
    card = ModelCard(text)
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "root"  # the tree's root folder name
    assert "lora" in card.data.tags and "tree:tree-b" in card.data.tags
    assert "most likely draws *rocket*" in text
    assert "## Nearest known models" in text and "## Limits" in text and "## How this was inferred" in text
    unit = studio.score_unit("tree-b")
    assert {"z": "as a z-score", "probability": "probabilities of the expert's classifier head"}[unit] in text


def test_one_analysis_is_read_once_for_every_answer_about_it(zoo_file, studio, built, monkeypatch):
    """The app's flow: predict, then the card from that prediction, the map and the drawable neighbours, all from one
    Analysis: the gallery comparison and the concept scores run once, and each answer equals the one from a path."""
    path = zoo_file(built["zoos"]["tree-a"], "test", "fish")
    a = studio.analyse(path)
    calls = []

    def counted(owner, name):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs))
    counted(studio, "gallery_similarity")
    counted(studio.bundle.trees[a.tree].gallery, "concept_scores")
    result = studio.predict(a, top_k=3)
    card = studio.model_card(a, prediction=result)
    studio.map_figure(a)
    neighbours = studio.drawable_neighbors(a, 4)
    assert sorted(calls) == ["concept_scores", "gallery_similarity"]
    monkeypatch.undo()
    assert result == studio.predict(path, top_k=3) and card == studio.model_card(path, top_k=3)
    assert neighbours == studio.drawable_neighbors(path, 4)

# ------------------------------------------------------------------------------------------------- samples
def test_samples_of_a_known_model_are_drawn_once_then_cached(studio):
    g = studio.bundle.trees["tree-b"].gallery
    model = next(iter(g.sample_paths))
    images = studio.samples(model, n=2, tree="tree-b")
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    assert studio.samples(model, n=2, tree="tree-b") is images


def test_warm_up_draws_every_shipped_sample_once_and_stand_ins_share_it(studio, built, monkeypatch):
    """After the warm-up, a known model's neighbour image — its own file's or its class's stand-in's — is served
    from memory: nothing more is drawn."""
    shipped = sum(len(t.gallery.sample_paths) for t in studio.bundle.trees.values())
    assert studio.warm_samples() == shipped
    monkeypatch.setattr(studio, "draw", lambda *a: pytest.fail("drawn again after the warm-up"))
    g = studio.bundle.trees["tree-a"].gallery
    without_file = [m for m in g.ids if m not in g.sample_paths and studio.sample_source("tree-a", m)]
    assert without_file
    for model in [next(iter(g.sample_paths)), *without_file[:3]]:
        source = studio.sample_source("tree-a", model)
        assert studio.samples(model, n=1, tree="tree-a") is studio.shipped_samples("tree-a", source)


def test_samples_of_an_uploaded_file_and_of_a_model_without_its_own_file(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-a"], "test", "fish")
    assert len(studio.samples(str(path), n=1)) == 1
    # a test model ships no LoRA: a shipped model of its class is drawn instead
    model = path.parent.relative_to(built["zoos"]["tree-a"]).as_posix()
    assert model not in studio.bundle.trees["tree-a"].gallery.sample_paths
    g = studio.bundle.trees["tree-a"].gallery
    source = studio.sample_source("tree-a", model)
    assert source in g.sample_paths and g.model_classes[g.ids.index(source)] == "fish"
    neighbours = studio.drawable_neighbors(path, 4)
    assert 1 <= len(neighbours) <= 4 and all(studio.sample_source(n["tree"], n["id"]) for n in neighbours)
    # a held-out-class model (a search can return one) has nothing to draw: drawable passes it over, samples says so
    held = next(m for m, split in zip(g.ids, g.splits) if split.endswith("holdout"))
    assert studio.sample_source("tree-a", held) is None
    assert studio.drawable([{"id": held, "tree": "tree-a"}, {"id": model, "tree": "tree-a"}], 4) == \
        [{"id": model, "tree": "tree-a"}]
    with pytest.raises(ProbexError, match="ships no LoRA file"):
        studio.samples(held, n=1, tree="tree-a")


# -------------------------------------------------------------------------------------------- bad requests
def one_line(err: Exception) -> str:
    message = str(err)
    assert "\n" not in message and message
    return message


def test_not_a_safetensors_file(studio, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"this is plain text, certainly not safetensors" * 4)
    with pytest.raises(InputError) as err:
        studio.predict(path)
    assert "notes.safetensors" in one_line(err.value)


def test_full_checkpoint_is_not_a_lora(studio, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(32, 384),
               "conv_in.weight": torch.randn(32, 48, 3, 3)}, str(path))
    with pytest.raises(InputError) as err:
        studio.predict(path)
    assert "full checkpoint" in one_line(err.value) and "not a LoRA" in str(err.value)


def test_lora_of_another_base_names_the_base(studio, tmp_path):
    from sd15_fixtures import lora_shapes, random_factors, write_lora

    path = tmp_path / "sd15_lora.safetensors"
    write_lora(path, random_factors(lora_shapes("sd15"), rank=4), "kohya")
    with pytest.raises(NoExpertError) as err:
        studio.predict(path)
    assert "SD 1.5" in one_line(err.value)


def test_text_encoder_only_lora(studio, tmp_path):
    path = tmp_path / "te.safetensors"
    save_lora(path, {}, text_encoder={"text_model.encoder.layers.0.self_attn.q_proj":
                                      LoraFactors(torch.randn(32, 4), torch.randn(4, 32))})
    with pytest.raises(NoExpertError) as err:
        studio.predict(path)
    assert "text-encoder-only" in one_line(err.value)


def test_lora_missing_the_expert_layer(zoo_file, studio, built, tmp_path):
    weights = read_weights(zoo_file(built["zoos"]["tree-a"], "test", "fish"))
    expert_layer = studio.bundle.trees["tree-a"].layer
    routing_layer = studio.router().groups[0].layer
    assert expert_layer != routing_layer  # the file still routes, then lacks what the expert reads
    layers = {k: v for k, v in weights.layers.items() if k != expert_layer}
    path = tmp_path / "partial.safetensors"
    save_lora(path, layers)
    with pytest.raises(ProbexError) as err:
        studio.predict(path)
    assert expert_layer in one_line(err.value)


def test_over_the_size_cap(zoo_file, studio, built, monkeypatch):
    import probex.service as service

    monkeypatch.setattr(service, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(InputError) as err:
        studio.predict(zoo_file(built["zoos"]["tree-b"], "test", "lion"))
    assert "limit" in one_line(err.value)


def test_missing_file(studio, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        studio.predict(tmp_path / "nothing.safetensors")


# ------------------------------------------------------------------------------------ files and artifacts
def test_requests_never_write_into_the_bundle(zoo_file, studio, built):
    from probex.bundle import verify_manifest

    bundle = built["bundle"]
    before = {p: p.stat().st_mtime_ns for p in bundle.rglob("*")}
    path = zoo_file(built["zoos"]["tree-a"], "test", "fish")
    studio.predict(path)
    studio.model_card(path)
    studio.map_figure(path, query="fish")
    studio.samples(str(path), n=1)
    assert {p: p.stat().st_mtime_ns for p in bundle.rglob("*")} == before
    verify_manifest(bundle, json.loads((bundle / "bundle.json").read_text())["manifest"])


def local_file(ref: str):
    from probex.service import FETCH_TIMEOUT_S, MAX_UPLOAD_BYTES

    return fetch_local_file(ref, max_bytes=MAX_UPLOAD_BYTES, timeout=FETCH_TIMEOUT_S)


def test_downloads_are_deleted_after_use_even_on_failure(studio, tmp_path, monkeypatch):
    import probex.fetch as fetch

    made = []

    def fake_fetch(ref, *, max_bytes, timeout):
        directory = tmp_path / f"fetched{len(made)}"
        directory.mkdir()
        (directory / "lora.safetensors").write_bytes(b"junk")
        made.append(directory)
        return fetch.Fetched(directory / "lora.safetensors", directory)

    monkeypatch.setattr(fetch, "fetch_to_temp", fake_fetch)
    with local_file("https://example.org/lora.safetensors") as path:
        assert path.exists()
    with pytest.raises(InputError):
        with local_file("someone/some-lora") as path:
            studio.predict(path)
    assert len(made) == 2 and not any(d.exists() for d in made)


def test_local_paths_are_not_mistaken_for_hub_ids(zoo_file, studio, built):
    path = zoo_file(built["zoos"]["tree-b"], "test", "lion")
    with local_file(str(path)) as local:
        assert local == path
    with pytest.raises(InputError, match="no such file"):
        with local_file(str(path.parent / "missing.safetensors")) as local:
            studio.predict(local)


# -------------------------------------------------------------------------------------------- start-up
def test_load_with_fallback_without_a_bundle_says_why(tmp_path, monkeypatch):
    from probex.service import load_with_fallback

    monkeypatch.setenv("PROBEX_BUNDLE", str(tmp_path / "nothing-here"))
    studio, notice = load_with_fallback()
    assert studio is None and "nothing-here" in notice and "\n" not in notice
    monkeypatch.setenv("PROBEX_BUNDLE", "checkpoints/not-built-yet")  # a project folder, not a Hub repo id
    studio, notice = load_with_fallback()
    assert studio is None and notice.startswith("no bundle at checkpoints/not-built-yet: the folder does not exist")


def test_load_with_fallback_runs_the_embedded_profile_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    from probex.service import load_with_fallback

    monkeypatch.setenv("PROBEX_PROFILE", "sd15-modelj")
    monkeypatch.setenv("PROBEX_CLIP_MODEL", str(tmp_path / "no-clip-here"))  # the reader cannot load: offline
    monkeypatch.delenv("PROBEX_BUNDLE", raising=False)
    studio, notice = load_with_fallback()
    assert studio is not None and studio.profile.name == "emoji-mini"
    assert notice.startswith("profile sd15-modelj could not load") and "\n" not in notice
    assert os.environ["PROBEX_PROFILE"] == "sd15-modelj"


def test_a_corrupted_bundle_is_named_at_start_up(built, tmp_path):
    import shutil

    from probex.service import Studio

    copy = tmp_path / "bundle"
    shutil.copytree(built["bundle"], copy)
    gallery = copy / "tree-a" / "gallery.json"
    gallery.write_text(gallery.read_text().replace("tiger", "tigre"))
    with pytest.raises(ProbexError, match="tree-a/gallery.json is corrupted"):
        Studio.load(copy)


def test_examples_are_labelled_and_exist(studio):
    examples = studio.examples()
    assert examples and all(e["path"].is_file() and e["label"] for e in examples)
    assert any("held-out" in e["label"] for e in examples)


@pytest.mark.parametrize("kind", ["token rank", "attention blocks"])
def test_root_anchored_multi_layer_experts_work_through_every_verb(zoo_file, built, kind, tmp_path):
    """The shipped emoji bundle uses root-anchored experts: several layers in, token states on the text side."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from probex.experts import AnchoredProbeX, AttentionReader
    from probex.service import Studio
    from probex.text import prompt

    studio = Studio.load(built["bundle"])  # its own instance: the tree is rebuilt in memory below
    tree = studio.bundle.trees["tree-a"]
    unet = UNet2DConditionModel.from_pretrained(built["root"] / "unet")
    layers = json.loads((built["base"] / "done.json").read_text())["layers"]
    instance = studio.text.token_states(["an emoji of sks"], 16)[0]
    if kind == "token rank":
        names = [n for n in layers if n.endswith("attn2.to_v")]
        tree.expert = AnchoredProbeX.training_free([unet.get_submodule(n).weight.detach() for n in names], instance,
                                                   token_rank=2)
    else:
        names = sorted(n for n in layers if ".attn2." in n)
        tree.expert = AttentionReader.from_root(unet, names, instance, n_queries=4)
    tree.layer = names
    zoo = built["zoos"]["tree-a"]
    tree.gallery.encodings = torch.stack([studio.analyse(zoo / m / "pytorch_lora_weights.safetensors").encoding
                                          for m in tree.gallery.ids])
    prompts = [prompt(tree.prompt_template, n) for n in tree.gallery.vocabulary]
    tree.gallery.text_emb = tree.expert.text_input(studio.text, prompts).flatten(1)  # as bundles store it
    studio._class_text.clear()

    path = zoo_file(zoo, "test", "fish")
    result = studio.predict(path, top_k=3)
    assert result["tree"] == "tree-a" and result["layer"] == ", ".join(names) and len(result["classes"]) == 3
    assert result["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    scores = studio.zero_shot(path, ["fish", "a boat"])
    assert sorted(s["name"] for s in scores) == ["a boat", "fish"]
    assert scores == sorted(scores, key=lambda s: s["score"], reverse=True)
    models = studio.search("fish", top_k=10)["models"]   # tree A's 6 fish models by their class, then by weights
    assert [(m["class"], m["tree"], m["found_by"]) for m in models[:6]] == [("fish", "tree-a", "class")] * 6
    by_weights = [m["score"] for m in models[6:]]
    assert {m["found_by"] for m in models[6:]} == {"weights"} and by_weights == sorted(by_weights, reverse=True)
    fig = studio.map_figure(path, query="fish")
    own = tree.gallery.ids.index(path.parent.relative_to(zoo).as_posix())
    upload = next(t for t in fig.data if t.name == "your LoRA")
    assert len(fig.data[0].x) == len(tree.gallery.ids)
    assert (upload.x[0], upload.y[0]) == pytest.approx(tuple(tree.gallery.coords[own].tolist()), abs=1e-2)
    assert "attn2.to_v" in studio.model_card(path)

    # a LoRA that leaves some read projections alone: readable where the expert takes those as unchanged
    state = load_file(str(path))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not re.search(r"attn2\.to_(q|out)", k)}, str(partial))
    if kind == "attention blocks":
        assert studio.predict(partial, top_k=3)["tree"] == "tree-a"
    else:
        save_file({k: v for k, v in state.items() if "attn2.to_v" not in k}, str(partial))
        with pytest.raises(InputError, match="attn2.to_v"):
            studio.predict(partial)


def test_example_labels_name_the_class_the_split_and_the_tree(tmp_path):
    from safetensors.torch import save_file

    from probex.service import example_label

    for stem, expected in (("emoji-root-2__test__model_idx_0002", "yo-yo · test model · tree emoji-root-2"),
                           ("t__test_holdout__model_idx_0500", "yo-yo · held-out class (never seen in training) · tree t"),
                           ("my_lora", "yo-yo · test model")):
        path = tmp_path / f"{stem}.safetensors"
        save_file({"x": torch.zeros(1)}, str(path), metadata={"class_name": "yo-yo"})
        assert example_label(path) == expected
