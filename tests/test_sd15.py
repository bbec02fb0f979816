"""The SD 1.5 path without the Hub: real key names and shapes, three LoRA formats, CLIP text, the SD 1.5 pipeline,
and real-world files (kohya fp16 with text-encoder parts, SD 2.x, SDXL)."""
from __future__ import annotations

import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch

from probex.build import train_bundle
from probex.errors import InputError, NoExpertError, ProbexError
from probex.generate import load_pipeline, sample
from probex.modelj import write_tree_json
from probex.profiles import get_profile
from probex.router import Router
from probex.service import Studio
from probex.text import CLIPText, OpenCLIPText, load_text_encoder
from probex.train import TrainConfig
from probex.weights import read_weights
from probex.zoo import imagenet_names
from sd15_fixtures import (MODELJ_HOLDOUT_WNIDS, MODELJ_TRAIN_WNIDS, SIGNAL_LAYER, build_unet, kohya_metadata,
                           lora_shapes, lora_state_dict, prompts, random_factors, save_tiny_clip_text,
                           save_tiny_sd_pipeline, text_encoder_factors, write_lora, write_modelj_tree)

FORMATS = ("diffusers", "modelj", "kohya")


# ---- key names and shapes: proven on a real SD 1.5 UNet with peft and diffusers' own loader ---------------------------
def test_sd15_files_match_what_peft_and_diffusers_use(tmp_path):
    """One randomly initialised SD 1.5 UNet (860 M parameters, ~12 s to build): peft's LoRA on it has exactly our
    128 modules and key names, and diffusers' loader puts every factor of our three formats where we say."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_unet("sd15")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964        # SD 1.5's UNet size
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft_sd = get_peft_model_state_dict(unet)
    factors = random_factors(lora_shapes("sd15"), rank=4, seed=3)
    ours = lora_state_dict(factors, "diffusers")
    assert {f"unet.{k}": tuple(v.shape) for k, v in peft_sd.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert len(factors) == 128

    # diffusers' own writer, then our reader: the same 128 SD 1.5 modules
    StableDiffusionPipeline.save_lora_weights(tmp_path / "saved", unet_lora_layers=peft_sd, safe_serialization=True)
    saved = read_weights(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    assert saved.signature.family == "sd15" and sorted(saved.layers) == sorted(factors)
    unet.delete_adapters("default")

    modules = dict(unet.named_modules())
    for fmt in FORMATS:
        path = write_lora(tmp_path / f"{fmt}.safetensors", factors, fmt, alpha=2.0)
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        unet.load_lora_adapter(state, network_alphas=alphas, adapter_name=fmt, prefix="unet")
        scale = 0.5 if fmt == "kohya" else 1.0                              # alpha / rank
        for name, (up, down) in factors.items():
            m = modules[name]
            assert torch.equal(m.lora_A[fmt].weight, down) and torch.equal(m.lora_B[fmt].weight, up), (fmt, name)
            assert m.scaling[fmt] == scale


# ---- our reader: three formats, one model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_formats(tmp_path_factory):
    """One SD 1.5 LoRA (rank 4) in all three formats, plus a kohya fp16 file with text-encoder parts."""
    root = tmp_path_factory.mktemp("formats")
    factors = random_factors(lora_shapes("sd15"), rank=4, seed=0)
    paths = {fmt: write_lora(root / f"{fmt}.safetensors", factors, fmt, alpha=4.0) for fmt in FORMATS}
    paths["kohya-fp16"] = write_lora(root / "civitai.safetensors", factors, "kohya", alpha=2.0, dtype=torch.float16,
                                     metadata=kohya_metadata("sd_v1", 4, 2.0), text_encoder=text_encoder_factors())
    return factors, paths


def test_three_formats_read_identically(sd15_formats):
    factors, paths = sd15_formats
    read = {fmt: read_weights(paths[fmt]) for fmt in FORMATS}
    digests = {w.signature.digest for w in read.values()}
    assert len(digests) == 1
    for fmt, w in read.items():
        assert w.kind == "lora" and w.signature.family == "sd15" and len(w.layers) == 128 and not w.text_encoder
        for name, (up, down) in factors.items():
            got = w.layers[name]
            assert got.up.dtype == torch.float32 and got.rank == 4
            assert torch.allclose(got.dense(), up @ down, atol=1e-6), (fmt, name)   # kohya alpha 4 / rank 4 = 1
    assert sorted(read["modelj"].layers).index(SIGNAL_LAYER) == 46                  # the paper's layer 46


def test_civitai_style_kohya_fp16_with_text_encoder(sd15_formats):
    factors, paths = sd15_formats
    w = read_weights(paths["kohya-fp16"])
    assert w.signature.family == "sd15" and len(w.layers) == 128
    assert w.signature.digest == read_weights(paths["modelj"]).signature.digest
    assert len(w.text_encoder) == 12 * 6                                            # q, k, v, out, fc1, fc2 × 12
    assert w.metadata["ss_base_model_version"] == "sd_v1" and w.metadata["ss_network_alpha"] == "2.0"
    up, down = factors[SIGNAL_LAYER]
    layer = w.layers[SIGNAL_LAYER]
    assert layer.scale == pytest.approx(0.5)                                        # alpha 2 / rank 4
    expected = 0.5 * up.half().float() @ down.half().float()
    assert torch.allclose(layer.dense(), expected, atol=1e-5)


# ---- routing: SD 1.5 files go to the SD 1.5 tree; SD 2.x / SDXL files are named and refused -------------------------
@pytest.fixture(scope="module")
def sd15_router(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    shapes = lora_shapes("sd15")
    population = [read_weights(write_lora(root / f"m{i}.safetensors", random_factors(shapes, 4, 100 + i), "modelj"))
                  for i in range(6)]
    return Router().fit(population, layer=SIGNAL_LAYER)


def test_every_sd15_format_routes_to_the_sd15_tree(sd15_router, sd15_formats):
    _, paths = sd15_formats
    assert sd15_router.trees == ["sd15-0"]
    for fmt, path in paths.items():
        route = sd15_router.route(read_weights(path))
        assert route.tree == "sd15-0" and route.exact_signature and route.layer == SIGNAL_LAYER, fmt


@pytest.mark.parametrize("family, fmt, expected", [
    ("sdxl", "kohya-sgm", "SDXL"), ("sdxl", "diffusers", "SDXL"), ("sd2", "kohya", "SD 2.x")])
def test_other_bases_are_recognised_and_refused(sd15_router, tmp_path, family, fmt, expected):
    shapes = lora_shapes(family)
    path = write_lora(tmp_path / f"{family}.safetensors", random_factors(shapes, rank=2, seed=7), fmt,
                      dtype=torch.float16, metadata=kohya_metadata("sdxl_base_v1-0" if family == "sdxl" else "sd_v2", 2, 1.0))
    w = read_weights(path)
    assert w.signature.family == family and len(w.layers) == len(shapes)
    with pytest.raises(NoExpertError, match=f"no tree expert for {expected} UNet LoRAs") as err:
        sd15_router.route(w)
    assert "\n" not in str(err.value)


def test_base_shapes():
    """The three bases differ where the reader tells them apart: cross-attention width and transformer depth."""
    cross = {f: {s[1] for n, s in lora_shapes(f).items() if n.endswith("attn2.to_k")} for f in ("sd15", "sd2", "sdxl")}
    assert cross == {"sd15": {768}, "sd2": {1024}, "sdxl": {2048}}
    assert len(lora_shapes("sd2")) == 128 and len(lora_shapes("sdxl")) == 560     # SDXL: depths 2 and 10 → 70 blocks


# ---- CLIP text ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(save_tiny_clip_text(tmp_path_factory.mktemp("clip")))


def test_clip_text_embeddings(tiny_clip):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = load_text_encoder(f"clip:{tiny_clip}")
    assert isinstance(encoder, CLIPText) and encoder is load_text_encoder(f"clip:{tiny_clip}")   # one shared instance
    texts = ["a photo of a tench", "a photo of a goldfinch", "a photo of a tench"]
    emb = encoder.embed(texts)
    assert emb.shape == (3, 24) and encoder.dim == 24
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1], atol=1e-3)

    # the projected end-of-text state, as CLIP's own encode_text — padding to 77 changes nothing
    tok, model = CLIPTokenizer.from_pretrained(tiny_clip), CLIPTextModelWithProjection.from_pretrained(tiny_clip)
    with torch.no_grad():
        direct = model(**tok(texts[:2], padding=True, return_tensors="pt")).text_embeds
    assert torch.allclose(emb[:2], torch.nn.functional.normalize(direct, dim=-1), atol=1e-5)

    states = encoder.token_states(texts[:2])
    assert states.shape == (2, 77, 32)


def test_a_clip_text_encoder_that_cannot_load_is_one_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot load the CLIP text encoder .*no-clip-here"):
        load_text_encoder(f"clip:{tmp_path / 'no-clip-here'}")


def test_open_clip_backend_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)            # not installed (it needs torchvision)
    with pytest.raises(ProbexError, match="needs the open_clip_torch package"):
        load_text_encoder("open_clip:ViT-L-14/laion2b_s32b_b82k")

    class FakeTextTower(torch.nn.Module):                           # open_clip's API surface, nothing more
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(256, 8)
            self.text_projection = torch.nn.Parameter(torch.randn(8, 5))

        def encode_text(self, tokens):
            return self.token_embedding(tokens).mean(1) @ self.text_projection

    made = []
    fake = types.SimpleNamespace(
        create_model_and_transforms=lambda arch, pretrained=None: (made.append((arch, pretrained)) or FakeTextTower(),
                                                                   None, None),
        get_tokenizer=lambda arch: lambda texts: torch.tensor([[ord(c) % 256 for c in t[:6].ljust(6)] for t in texts]))
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    encoder = OpenCLIPText("ViT-L-14/laion2b_s32b_b82k")
    assert made == [("ViT-L-14", "laion2b_s32b_b82k")] and encoder.dim == 5
    emb = encoder.embed(["a photo of a tench", "a photo of a goldfinch"])
    expected = encoder.model.encode_text(encoder.tokenizer(["a photo of a tench", "a photo of a goldfinch"]))
    assert torch.allclose(emb, torch.nn.functional.normalize(expected, dim=-1).detach(), atol=1e-6)
    with pytest.raises(ProbexError, match="only embeds texts"):
        encoder.token_states(["x"])


def test_sd15_profile():
    profile = get_profile("sd15-modelj")
    assert profile.text_encoder == "clip:openai/clip-vit-large-patch14"
    assert profile.prompt("tench") == "a photo of a tench" and profile.pipeline == "sd15"
    assert profile.root_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert get_profile("emoji-mini").prompt("cat face") == "an emoji of cat face"


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("PROBEX_PROFILE", "sd15-modelj")
    monkeypatch.setenv("PROBEX_SD15_MODEL", "/models/my-sd15")
    monkeypatch.setenv("PROBEX_CLIP_MODEL", "/models/clip-l")
    monkeypatch.setenv("PROBEX_BUNDLE", "someone/probex-sd15")
    profile = get_profile()
    assert (profile.name, profile.root_model, profile.text_encoder, profile.bundle) == \
        ("sd15-modelj", "/models/my-sd15", "clip:/models/clip-l", "someone/probex-sd15")
    monkeypatch.setenv("PROBEX_PROFILE", "sd3")
    with pytest.raises(InputError, match="unknown profile 'sd3'"):
        get_profile()


# ---- the SD 1.5 pipeline with a LoRA, each format through diffusers' loader -------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    root = save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    return load_pipeline("sd15-modelj", root_model=str(root), device="cpu")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_samples_with_each_lora_format(tiny_pipe, tmp_path):
    factors = {name: (up * 3, down * 3) for name, (up, down) in random_factors(lora_shapes("tiny"), 4, 5).items()}
    steps = {"num_inference_steps": 3}
    plain = {**tiny_pipe.sampling_defaults, **steps}   # the root alone, with the settings `sample` uses
    paths = {fmt: write_lora(tmp_path / f"{fmt}.safetensors", factors, fmt, alpha=4.0) for fmt in FORMATS}

    before = pixels(tiny_pipe("a photo of a tench", num_images_per_prompt=2, output_type="pil",
                              generator=torch.Generator().manual_seed(0), **plain).images)
    drawn = {fmt: pixels(sample(tiny_pipe, path, "a photo of a tench", n=2, seed=0, **steps))
             for fmt, path in paths.items()}
    assert drawn["diffusers"].shape == (2, 8, 8, 3)
    assert np.abs(drawn["diffusers"] - before).mean() > 1.0                        # the LoRA changes the images
    for fmt in ("modelj", "kohya"):                                                 # same factors, same images
        assert np.abs(drawn[fmt] - drawn["diffusers"]).max() <= 1.0, fmt
    again = pixels(sample(tiny_pipe, paths["modelj"], "a photo of a tench", n=2, seed=0, **steps))
    assert np.array_equal(again, drawn["modelj"])                                   # seeded
    after = pixels(tiny_pipe("a photo of a tench", num_images_per_prompt=2, output_type="pil",
                             generator=torch.Generator().manual_seed(0), **plain).images)
    assert np.array_equal(after, before)                                            # the root is left as it was


def test_sample_refuses_what_it_cannot_draw(tiny_pipe, tmp_path):
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(InputError, match="only .safetensors"):
        sample(tiny_pipe, tmp_path / "lora.bin", "x")
    sd15_file = write_lora(tmp_path / "sd15.safetensors", random_factors(lora_shapes("sd15"), 2, 0), "diffusers")
    with pytest.raises(InputError, match="cannot put this LoRA on the root"):   # SD 1.5 shapes on the tiny root
        sample(tiny_pipe, sd15_file, "x", num_inference_steps=1)
    sd15 = get_profile("sd15-modelj")
    with pytest.raises(ProbexError, match="no image generator yet"):
        load_pipeline(replace(sd15, name="sd3-test", pipeline="sd3"))
    with pytest.raises(ProbexError, match="names no root model"):
        load_pipeline(replace(sd15, root_model=None))


# ---- a fake Model-J tree, download-free: zoo → cache → train → bundle → predict ---------------------------------------
@pytest.fixture(scope="module")
def modelj_tree(tmp_path_factory, tiny_clip):
    """56 SD 1.5 LoRAs in Model-J layout / keys / metadata: 8 training classes × 5, 4 held-out classes × 4; the class
    signal (linear in the class prompt's CLIP embedding) sits in SIGNAL_LAYER only."""
    root = tmp_path_factory.mktemp("modelj") / "SD_200"
    text = load_text_encoder(f"clip:{tiny_clip}").embed(prompts(MODELJ_TRAIN_WNIDS + MODELJ_HOLDOUT_WNIDS))
    zoo = write_modelj_tree(root, text)
    write_tree_json(root, "SD_200", "ProbeX/Model-J__SD_200")
    return zoo


def civitai_copy(source, target):
    """A Model-J LoRA as a Civitai user would upload it: kohya keys, fp16, text-encoder parts, ss_ metadata."""
    w = read_weights(source)
    factors = {name: (f.up * f.scale, f.down) for name, f in w.layers.items()}
    return write_lora(target, factors, "kohya", alpha=4.0, dtype=torch.float16, text_encoder=text_encoder_factors(),
                      metadata=kohya_metadata("sd_v1", 4, 4.0))


def test_fake_modelj_tree_end_to_end(modelj_tree, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEX_PROFILE", "sd15-modelj")
    monkeypatch.setenv("PROBEX_CLIP_MODEL", tiny_clip)        # the profile's CLIP, offline: the tiny one
    noise_layer = sorted(lora_shapes("sd15"))[0]               # a layer without signal, to be swept and rejected
    config = TrainConfig.of(epochs=60, batch_size=16, lr=2e-3, r_u=16, r_v=16, r_t=32)
    summary = train_bundle(modelj_tree.root, tmp_path / "bundle", layers=[noise_layer, SIGNAL_LAYER], config=config,
                           cache_dir=tmp_path / "cache", routing_layer=SIGNAL_LAYER)
    tree = summary["trees"]["modelj-sd_200"]
    assert summary["profile"] == "sd15-modelj" and tree["layer"] == SIGNAL_LAYER and tree["task"] == "align"
    assert tree["n_models"] == len(modelj_tree.models) == 56
    assert tree["test"] >= 0.75                                 # 8 in-distribution classes: chance 0.125
    assert tree["test_holdout"] >= 0.5                          # 4 never-seen classes, from text alone: chance 0.25
    assert len(list((tmp_path / "cache").glob("*/index.json"))) == 1   # the layer cache, built on the way

    # Uploads as Civitai users make them (kohya keys, fp16, text-encoder parts), read and routed by the service.
    studio = Studio.load(tmp_path / "bundle")
    # no SD 1.5 UNet here for the training-free reader: the trained tree answers alone, and the studio says why
    assert studio.trees == ["modelj-sd_200"] and "reader could not load" in studio.notice
    known, zero_shot, in_top3 = 0, 0, 0
    held_out_names = [imagenet_names()[w] for w in MODELJ_HOLDOUT_WNIDS]
    for model in modelj_tree.models:
        if model["split"] not in ("test", "test_holdout"):
            continue
        upload = civitai_copy(model["path"], tmp_path / "uploads" / f"{model['id'].replace('/', '_')}.safetensors")
        out = studio.predict(upload, top_k=3)
        assert out["tree"] == "modelj-sd_200" and out["layer"] == SIGNAL_LAYER
        if model["id"] in studio.bundle.trees["modelj-sd_200"].gallery.ids:
            assert out["neighbors"][0]["id"] == model["id"]      # the same LoRA, whatever its file format
        else:                                                    # a bundle example, kept out of the gallery
            assert out["neighbors"][0]["id"] != model["id"]
        names = [c["name"] for c in out["classes"]]
        if model["split"] == "test":
            known += names[0] == imagenet_names()[model["wnid"]]
        else:
            in_top3 += imagenet_names()[model["wnid"]] in names
            zero_shot += studio.zero_shot(upload, held_out_names)[0]["name"] == imagenet_names()[model["wnid"]]
    assert known >= 7                     # 8 test LoRAs, 12 class names to choose from (chance 1/12)
    assert zero_shot >= 5                 # 8 held-out LoRAs among 4 never-trained class names (chance 2 of 8)
    assert in_top3 >= 6                   # … and among all 12 names, the true one in the top 3 (chance 2 of 8)

    sdxl = write_lora(tmp_path / "sdxl.safetensors", random_factors(lora_shapes("sdxl"), 2, 1), "kohya-sgm",
                      dtype=torch.float16, metadata=kohya_metadata("sdxl_base_v1-0", 2, 1.0))
    with pytest.raises(NoExpertError, match="no tree expert for SDXL UNet LoRAs"):
        studio.predict(sdxl)

