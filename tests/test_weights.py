"""probex.weights: LoRA dialects → one canonical form, full checkpoints, signatures and SD families."""
import pytest
import torch
from safetensors.torch import save_file

from probex.weights import (LoraFactors, Signature, describe, ldm_to_diffusers, read_weights, save_lora,
                            unflatten_kohya_name, weights_from_tensors)

from hostile.corpus import SMALL_SHAPES, random_lora, sd_attention_shapes

SD15 = sd_attention_shapes("sd15")


def assert_same_layers(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].up, b[name].up), name
        assert torch.equal(a[name].down, b[name].down), name
        assert a[name].scale == b[name].scale, name


def test_three_formats_read_back_identical_layers(tmp_path):
    layers = random_lora(SD15, rank=[4, 8], seed=3)  # mixed ranks across modules
    te = random_lora({"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, rank=4, seed=4)
    read = {}
    for fmt in ("diffusers", "modelj", "kohya"):
        save_lora(tmp_path / f"{fmt}.safetensors", layers, fmt, metadata={"class_name": "goldfish"}, text_encoder=te)
        read[fmt] = read_weights(tmp_path / f"{fmt}.safetensors")
    for fmt, w in read.items():
        assert w.kind == "lora" and w.metadata == {"class_name": "goldfish"}
        assert_same_layers(w.layers, layers)
        assert_same_layers(w.text_encoder, te)
        assert w.signature == read["diffusers"].signature


def test_kohya_alpha_becomes_scale_and_matches_diffusers_alpha(tmp_path):
    layers = random_lora(SD15, rank=8, scale=0.25, seed=5)  # kohya: alpha 2 on rank 8
    save_lora(tmp_path / "k.safetensors", layers, "kohya")
    save_lora(tmp_path / "d.safetensors", layers, "diffusers")
    kohya, diffusers = read_weights(tmp_path / "k.safetensors"), read_weights(tmp_path / "d.safetensors")
    assert_same_layers(kohya.layers, layers)
    assert_same_layers(diffusers.layers, layers)


def test_modelj_has_no_alpha_so_the_scale_is_folded_into_up(tmp_path):
    layers = random_lora(SMALL_SHAPES, rank=2, scale=0.5)
    save_lora(tmp_path / "m.safetensors", layers, "modelj")
    read = read_weights(tmp_path / "m.safetensors").layers
    for name, f in layers.items():
        assert read[name].scale == 1.0
        assert torch.allclose(read[name].dense(), f.dense(), atol=1e-6)


def factors_file(tmp_path, keys_for, layers):
    tensors = {}
    for name, f in layers.items():
        up_key, down_key = keys_for(name)
        tensors[up_key], tensors[down_key] = f.up, f.down
    save_file(tensors, str(tmp_path / "f.safetensors"))
    return read_weights(tmp_path / "f.safetensors")


@pytest.mark.parametrize("keys_for", [
    lambda n: (f"{n}.lora_B.weight", f"{n}.lora_A.weight"),  # no unet. prefix
    lambda n: (f"unet.{n}.lora_B.default.weight", f"unet.{n}.lora_A.default.weight"),  # peft adapter name
    lambda n: (f"base_model.model.{n}.lora_B.weight", f"base_model.model.{n}.lora_A.weight"),  # peft save
    lambda n: (f"unet.{n}.lora_linear_layer.up.weight", f"unet.{n}.lora_linear_layer.down.weight"),
], ids=["no_prefix", "peft_default", "peft_base_model", "lora_linear_layer"])
def test_other_diffusers_and_peft_spellings(tmp_path, keys_for):
    layers = random_lora(SMALL_SHAPES, rank=2)
    assert_same_layers(factors_file(tmp_path, keys_for, layers).layers, layers)


def test_old_diffusers_attention_processor_names(tmp_path):
    # unet.<block>.attn1.processor.to_q_lora.down.weight → <block>.attn1.to_q ; to_out_lora → to_out.0
    stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    layers = random_lora({f"{stem}.to_q": (32, 32), f"{stem}.to_out.0": (32, 32)}, rank=2)

    def keys_for(name):
        proj = name.rsplit(".attn1.", 1)[1].replace("to_out.0", "to_out")
        return (f"unet.{stem}.processor.{proj}_lora.up.weight", f"unet.{stem}.processor.{proj}_lora.down.weight")

    assert_same_layers(factors_file(tmp_path, keys_for, layers).layers, layers)


@pytest.mark.parametrize("flat, dotted", [
    ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
     "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    ("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("down_blocks_1_attentions_1_proj_in", "down_blocks.1.attentions.1.proj_in"),
    ("up_blocks_1_attentions_0_proj_out", "up_blocks.1.attentions.0.proj_out"),
    ("down_blocks_0_resnets_1_time_emb_proj", "down_blocks.0.resnets.1.time_emb_proj"),
    ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
    ("text_model_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1"),
])
def test_kohya_names_map_back_to_dotted_diffusers_names(flat, dotted):
    assert unflatten_kohya_name(flat) == dotted


@pytest.mark.parametrize("ldm, diffusers", [
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("input_blocks.8.1.proj_in", "down_blocks.2.attentions.1.proj_in"),
    ("input_blocks.4.0.in_layers.2", "down_blocks.1.resnets.0.conv1"),
    ("input_blocks.5.0.skip_connection", "down_blocks.1.resnets.1.conv_shortcut"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.0.0", "conv_in"),
    ("middle_block.1.transformer_blocks.9.attn1.to_q", "mid_block.attentions.0.transformer_blocks.9.attn1.to_q"),
    ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
    ("output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
     "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.3.0.emb_layers.1", "up_blocks.1.resnets.0.time_emb_proj"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.2", "conv_out"),
])
def test_ldm_block_names_to_diffusers(ldm, diffusers):
    assert ldm_to_diffusers(ldm) == diffusers


def test_kohya_sdxl_keys_with_ldm_names_read_as_diffusers_names(tmp_path):
    shapes = sd_attention_shapes("sdxl", ["down_blocks.2"])
    layers = random_lora(shapes, rank=2, scale=0.5)
    tensors = {}
    for name, f in layers.items():
        level, slot = int(name.split(".")[1]), int(name.split(".")[3])
        stem = "lora_unet_" + f"input_blocks.{1 + 3 * level + slot}.1.{name.split('.', 4)[4]}".replace(".", "_")
        tensors.update({f"{stem}.lora_up.weight": f.up, f"{stem}.lora_down.weight": f.down,
                        f"{stem}.alpha": torch.tensor(1.0)})
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(1280, 2)
    tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(2, 1280)
    save_file(tensors, str(tmp_path / "sdxl.safetensors"))
    w = read_weights(tmp_path / "sdxl.safetensors")
    assert_same_layers(w.layers, layers)
    assert w.signature.family == "sdxl"
    assert list(w.text_encoder) == ["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"]


def test_conv_lora_factors_reshape_like_the_conv_kernel(tmp_path):
    up, down = torch.randn(64, 4, 1, 1), torch.randn(4, 32, 3, 3)
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up,
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
               "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(2.0)}, str(tmp_path / "c.safetensors"))
    f = read_weights(tmp_path / "c.safetensors").layers["down_blocks.0.resnets.0.conv1"]
    expected = 0.5 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down).reshape(64, -1)
    assert f.shape == (64, 288) and torch.allclose(f.dense(), expected, atol=1e-5)


def test_full_checkpoint_every_matrix_as_2d_out_channels_first(tmp_path):
    conv, linear = torch.randn(8, 3, 3, 3), torch.randn(5, 7)
    save_file({"conv.weight": conv, "conv.bias": torch.randn(8), "fc.weight": linear, "vae.x.weight": linear.clone()},
              str(tmp_path / "full.safetensors"))
    w = read_weights(tmp_path / "full.safetensors")
    assert w.kind == "full" and sorted(w.layers) == ["conv", "fc"]
    assert torch.equal(w.layers["conv"], conv.reshape(8, 27)) and torch.equal(w.layers["fc"], linear)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reads_as_float32_values(tmp_path, dtype):
    layers = random_lora(SMALL_SHAPES, rank=2)
    tensors = {f"unet.{n}.lora_A.weight": f.down.to(dtype) for n, f in layers.items()}
    tensors.update({f"unet.{n}.lora_B.weight": f.up.to(dtype) for n, f in layers.items()})
    save_file(tensors, str(tmp_path / "h.safetensors"))
    read = read_weights(tmp_path / "h.safetensors").layers
    for name, f in layers.items():
        assert read[name].up.dtype == torch.float32
        assert torch.equal(read[name].up, f.up.to(dtype).float())


def test_signature_is_sorted_and_the_papers_layer_46_is_where_the_release_says():
    sig = Signature.of(random_lora(SD15, rank=[2, 4]))
    names = [name for name, _ in sig.modules]
    assert len(names) == 128 and names == sorted(names)
    assert names[46] == "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"
    assert sig.family == "sd15"
    # rank is not architecture; shapes are
    assert Signature.of(random_lora(SD15, rank=8)).digest == sig.digest
    assert Signature.of(random_lora(sd_attention_shapes("sd2"), rank=2)).digest != sig.digest


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_family_from_lora_shapes_and_from_subsets(family):
    shapes = sd_attention_shapes(family)
    assert Signature.of(random_lora(shapes, rank=1)).family == family
    some_block = sorted({n.split(".attentions")[0] for n in shapes})[0]
    subset = {n: s for n, s in shapes.items() if n.startswith(some_block) and ".attn2." in n}
    assert Signature.of(random_lora(subset, rank=1)).family == family


def test_unknown_architectures_have_no_family():
    tiny = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (64, 384),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}
    assert Signature.of(random_lora(tiny, rank=1)).family is None
    wrong_width = dict(SD15)
    wrong_width["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = (321, 320)
    assert Signature.of(random_lora(wrong_width, rank=1)).family is None


UNET_CONFIGS = {  # the published unet/config.json of each base, as far as module shapes depend on it
    "sd15": dict(cross_attention_dim=768),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_family_on_real_diffusers_unet_structures(family):
    """The shape table above and family detection agree with diffusers' own UNets (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
    linears = {n: (m.out_features, m.in_features) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert linears == sd_attention_shapes(family)
    # the whole UNet as a full checkpoint (shapes only: meta tensors hold no data)
    full = weights_from_tensors(dict(unet.state_dict()), {}, source="unet.safetensors")
    assert full.kind == "full" and full.signature.family == family
    assert full.layers["conv_in"].shape == (unet.conv_in.out_channels, unet.conv_in.in_channels * 9)


def test_describe_says_what_was_read(tmp_path):
    save_lora(tmp_path / "l.safetensors", random_lora(SD15, rank=[4, 8]), "kohya",
              text_encoder=random_lora({"text_model.encoder.layers.0.mlp.fc1": (3072, 768)}, rank=4))
    assert describe(read_weights(tmp_path / "l.safetensors")) == \
        "LoRA, 128 modules, rank 4–8, SD 1.5 UNet (+ 1 text-encoder modules)"


def test_kohya_writer_refuses_names_it_cannot_round_trip(tmp_path):
    layers = {"blocks.0.my_odd_layer": LoraFactors(torch.ones(2, 1), torch.ones(1, 2))}
    with pytest.raises(ValueError, match="unambiguously"):
        save_lora(tmp_path / "x.safetensors", layers, "kohya")
