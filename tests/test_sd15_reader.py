"""The training-free SD 1.5 tree (probex.sd15) on a randomly initialised SD 1.5 UNet and a CLIP text tower of SD 1.5's
width built from its config: no downloads. Random weights say nothing about concepts; these tests check that every
file form reads alike, that only the attn2 tensors are read, and what the verbs answer without known models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from probex import sd15
from probex.experts import AttentionReader
from probex.errors import NoExpertError, ProbexError
from probex.service import Studio
from sd15_fixtures import (CLIP_L_TEXT_DIMS, UNET_CONFIGS, build_unet, kohya_metadata, lora_shapes, random_factors,
                           save_random_sd15, save_tiny_clip_text, write_lora)

TEST_CLIP = {**CLIP_L_TEXT_DIMS, "layers": 2}  # SD 1.5's token width; two of CLIP-L's twelve layers keep it quick


@pytest.fixture(scope="module")
def sd15_parts(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd15-reader")
    return {"pipeline": save_random_sd15(base / "sd15"), "clip": save_tiny_clip_text(base / "clip", **TEST_CLIP),
            "cache": base / "cache"}


@pytest.fixture
def reader_studio(sd15_parts, monkeypatch):
    monkeypatch.setenv("PROBEX_PROFILE", "sd15-modelj")
    monkeypatch.setenv("PROBEX_SD15_MODEL", str(sd15_parts["pipeline"]))
    monkeypatch.setenv("PROBEX_CLIP_MODEL", str(sd15_parts["clip"]))
    monkeypatch.setenv("PROBEX_CACHE_DIR", str(sd15_parts["cache"]))
    monkeypatch.delenv("PROBEX_BUNDLE", raising=False)
    monkeypatch.chdir(sd15_parts["pipeline"].parent)  # checkpoints/sd15-modelj is missing here: no trained bundle
    return Studio.load()


def test_only_the_cross_attention_weights_are_read(sd15_parts, monkeypatch):
    config, files = sd15.unet_files(sd15_parts["pipeline"])
    assert [f.name for f in files] == ["diffusion_pytorch_model.fp16.safetensors"]
    read = []
    real_open = sd15.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(sd15, "safe_open", Recording)
    weights = sd15.cross_attention_weights(files)
    with safe_open(str(files[0]), framework="pt") as f:
        n_tensors = len(f.keys())
        assert torch.equal(weights["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"],
                           f.get_tensor("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight").float())
    assert len(weights) == len(read) == 64 and n_tensors > 600       # 16 blocks × 4 projections of ~686 tensors
    assert all(".attn2." in k for k in read)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    assert shapes == {n: s for n, s in lora_shapes("sd15").items() if ".attn2." in n}


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_head_counts_follow_diffusers(family):
    """SD 1.5 keeps its head count in attention_head_dim; SD 2.x gives one per level, the up blocks reversed."""
    unet = build_unet(family, "meta")
    blocks = {n[:-len("to_k")]: m.heads for n, m in ((n + ".to_k", m) for n, m in unet.named_modules()
                                                     if n.endswith("attn2"))}
    assert sd15.head_counts(UNET_CONFIGS[family], sorted(blocks)) == blocks


def test_reader_from_weights_is_the_reader_from_the_module():
    unet = build_unet("tiny")
    names = sorted(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn2.to_" in n)
    weights = {n: unet.get_submodule(n).weight.detach() for n in names}
    heads = sd15.head_counts(UNET_CONFIGS["tiny"], sorted({n[:-len("to_k")] for n in names if n.endswith("to_k")}))
    instance = torch.randn(6, 32)
    a = AttentionReader.from_root(unet, names, instance, n_queries=3)
    b = AttentionReader.from_weights(weights, heads, names, instance, n_queries=3)
    assert a.blocks == b.blocks and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                          b.state_dict().values()))
    other = b.with_probes(torch.randn(6, 32))
    assert other.wq0 is b.wq0 and not torch.equal(other.probes, b.probes) and torch.equal(b.probes, instance)
    states = torch.randn(5, 6, 32)
    assert torch.equal(b.text_features(states), b.features_of_outputs(b.text_outputs(states)))


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"instance_prompt": "a photo of  ohwx dog"}, ("a photo of ohwx dog", "instance_prompt")),
    ({"modelspec.trigger_phrase": "zxc style"}, ("zxc style", "modelspec.trigger_phrase")),
    ({"ss_datasets": json.dumps([{"subsets": [{"class_tokens": "sks woman", "num_repeats": 10}]}])},
     ("sks woman", "ss_datasets class tokens")),
    ({"ss_tag_frequency": json.dumps({"10_img": {"ghibli": 40, "1girl": 12, "outdoors": 30, "sky": 2}})},
     ("ghibli, outdoors, 1girl", "ss_tag_frequency")),
    ({"ss_tag_frequency": "{not json", "ss_datasets": "[1, 2]"}, (sd15.DEFAULT_INSTANCE_PROMPT, "default")),
    ({}, (sd15.DEFAULT_INSTANCE_PROMPT, "default")),
])
def test_instance_prompt_from_metadata(metadata, expected):
    assert sd15.instance_prompt(metadata) == expected


def test_every_sd15_file_form_reads_alike_without_any_training(reader_studio, tmp_path):
    studio = reader_studio
    assert studio.trees == ["sd15"] and "training-free reader, 1000 classes" in studio.describe_bundle()
    factors = random_factors(lora_shapes("sd15"), rank=16, seed=3)
    files = {fmt: write_lora(tmp_path / f"{fmt}.safetensors", factors, fmt, alpha=16.0)
             for fmt in ("diffusers", "modelj", "kohya")}
    files["kohya fp16"] = write_lora(tmp_path / "kohya16.safetensors", factors, "kohya", alpha=16.0,
                                     dtype=torch.float16, metadata=kohya_metadata("sd_v1", 16, 16.0))
    results = {fmt: studio.predict(path, top_k=5) for fmt, path in files.items()}
    first = results["diffusers"]
    assert first["tree"] == "sd15" and len(first["classes"]) == 5 and first["neighbors"] == []
    assert first["score_unit"] == "cosine" and first["prompt_source"] == "default"
    assert "training-free" in first["expert"] and "not on SD 1.5 LoRAs" in first["expert"]
    for fmt in ("modelj", "kohya"):
        assert [c["name"] for c in results[fmt]["classes"]] == [c["name"] for c in first["classes"]], fmt
    half = [c["name"] for c in results["kohya fp16"]["classes"]]
    assert len(set(half[:3]) & {c["name"] for c in first["classes"]}) >= 2   # fp16 factors: the same reading, rounded
    encodings = {fmt: studio.analyse(path).encoding for fmt, path in files.items()}
    assert torch.allclose(encodings["kohya"], encodings["diffusers"], atol=1e-5)
    assert torch.nn.functional.cosine_similarity(encodings["kohya fp16"], encodings["diffusers"], dim=0) > 0.999

    labels = studio.zero_shot(files["kohya"], ["tench", "a castle", "golden retriever"])
    assert sorted(s["name"] for s in labels) == ["a castle", "golden retriever", "tench"]
    card = studio.model_card(files["kohya fp16"])
    assert "training-free" in card and "default" in card and "no known models" in card
    with pytest.raises(ProbexError, match="has known models to search"):
        studio.search("a dog")
    with pytest.raises(ProbexError, match="no known models to map"):
        studio.map_figure(files["kohya"])


def test_the_file_trigger_is_the_probe(reader_studio, tmp_path):
    studio = reader_studio
    factors = random_factors(lora_shapes("sd15"), rank=8, seed=4)
    plain = write_lora(tmp_path / "plain.safetensors", factors, "kohya", alpha=8.0)
    tagged = write_lora(tmp_path / "tagged.safetensors", factors, "kohya", alpha=8.0, metadata={
        "ss_tag_frequency": json.dumps({"5_zzk": {"zzk": 20, "portrait": 11}})})
    a, b = studio.analyse(plain), studio.analyse(tagged)
    assert (a.instance_prompt, a.prompt_source) == (sd15.DEFAULT_INSTANCE_PROMPT, "default")
    assert (b.instance_prompt, b.prompt_source) == ("zzk, portrait", "ss_tag_frequency")
    assert not torch.allclose(a.encoding, b.encoding)
    assert studio.predict(tagged)["instance_prompt"] == "zzk, portrait"


def test_other_bases_are_refused_with_the_base_found(reader_studio, tmp_path):
    for family, fmt, name in (("sdxl", "kohya-sgm", "SDXL"), ("sd2", "diffusers", "SD 2.x")):
        path = write_lora(tmp_path / f"{family}.safetensors", random_factors(lora_shapes(family), 2, 1), fmt)
        with pytest.raises(NoExpertError, match=f"no tree expert for {name} UNet LoRAs: this bundle reads SD 1.5"):
            reader_studio.predict(path)


def test_caption_outputs_come_back_from_the_disk_cache(reader_studio, sd15_parts):
    cached = list((sd15_parts["cache"] / "sd15-reader").glob("*.safetensors"))
    assert len(cached) == 1
    again = Studio.load()
    first, second = reader_studio.prompted["sd15"], again.prompted["sd15"]
    assert all(torch.equal(x, y) for x, y in zip(first.caption_outputs, second.caption_outputs))
    assert torch.equal(first.class_features(sd15.DEFAULT_INSTANCE_PROMPT),
                       second.class_features(sd15.DEFAULT_INSTANCE_PROMPT))


def test_samples_need_the_whole_pipeline_and_say_so(reader_studio, tmp_path):
    """Reading needs only the UNet's attn2 tensors; drawing needs the pipeline, absent from a UNet-only folder."""
    path = write_lora(tmp_path / "lora.safetensors", random_factors(lora_shapes("sd15"), 4, 5), "diffusers")
    with pytest.raises(ProbexError, match="cannot load the SD 1.5 pipeline .*model_index.json"):
        reader_studio.samples(path, n=1)
