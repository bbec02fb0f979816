"""Stable Diffusion shaped LoRA files without any download — the key names and shapes real tools write.

Module names and shapes come from diffusers' own `UNet2DConditionModel` built from each base's published config on the
meta device (no memory, no init time), so SD 1.5 / SD 2.x / SDXL files carry the modules those UNets really have.
`test_sd15.py` proves once, on a real randomly initialised SD 1.5 UNet with peft, that these writers match what
peft / diffusers save and that diffusers' own loader puts every factor of all three formats where we say it belongs.

Formats written (B = up, A = down; LoRA on to_q, to_k, to_v, to_out.0 of every attention, Model-J's 128 for SD 1.5):
    diffusers   unet.<module>.lora_A.weight / .lora_B.weight                 (peft; save_lora_weights)
    modelj      unet.<module>.lora.down.weight / .lora.up.weight             (Model-J, diffusers ≤ 0.24)
    kohya       lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha   (sd-scripts, SD 1.x/2.x)
    kohya-sgm   lora_unet_<input_blocks_4_1_…>…                               (sd-scripts for SDXL: SGM block names)
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probex.modelj import CLASS_KEY
from probex.zoo import imagenet_names
from synthetic import make_lora_zoo

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SIGNAL_LAYER = "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"  # the release's best SD layer (46)

# The UNets' published configs (unet/config.json of each base), as diffusers constructor arguments.
UNET_CONFIGS = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "sd2": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    # a tiny SD-structured UNet for pipelines that must run on CPU in a test
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8),
}
CLIP_L_TEXT = dict(layers=12, width=768, mlp=3072)  # SD 1.5's text encoder, for kohya's lora_te_ entries


def build_unet(family: str, device: str | torch.device = "cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIGS[family])


@lru_cache(maxsize=None)
def lora_shapes(family: str) -> dict[str, tuple[int, int]]:
    """Every LoRA'd linear of the family's UNet: canonical name → (d_out, d_in), sorted by name."""
    unet = build_unet(family, "meta")
    shapes = {name: (m.out_features, m.in_features) for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith(tuple("." + t for t in LORA_TARGETS))}
    return dict(sorted(shapes.items()))


def random_factors(shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict:
    """name → (up (d_out, r), down (r, d_in)), both nonzero (a trained LoRA, not peft's zero-init B)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(d_out, rank, generator=gen) / rank ** 0.5,
                   torch.randn(rank, d_in, generator=gen) / d_in ** 0.5)
            for name, (d_out, d_in) in shapes.items()}


def text_encoder_factors(rank: int = 4, seed: int = 1) -> dict:
    """LoRA factors on SD 1.5's CLIP text encoder, named as transformers names its modules."""
    w, mlp = CLIP_L_TEXT["width"], CLIP_L_TEXT["mlp"]
    shapes = {}
    for i in range(CLIP_L_TEXT["layers"]):
        prefix = f"text_model.encoder.layers.{i}"
        shapes.update({f"{prefix}.self_attn.{p}_proj": (w, w) for p in ("q", "k", "v", "out")})
        shapes.update({f"{prefix}.mlp.fc1": (mlp, w), f"{prefix}.mlp.fc2": (w, mlp)})
    return random_factors(shapes, rank, seed)


def sgm_name(module: str, layers_per_block: int = 2) -> str:
    """diffusers → SGM/LDM block names, as sd-scripts names SDXL LoRA modules (input_blocks / middle_block /
    output_blocks; each down level has layers_per_block resnets plus a downsampler, each up level one more)."""
    part = module.split(".")
    if part[0] == "down_blocks":   # down_blocks.<level>.attentions.<i>.<rest>
        block, rest = f"input_blocks.{1 + int(part[1]) * (layers_per_block + 1) + int(part[3])}.1", part[4:]
    elif part[0] == "up_blocks":
        block, rest = f"output_blocks.{int(part[1]) * (layers_per_block + 1) + int(part[3])}.1", part[4:]
    elif part[0] == "mid_block":   # mid_block.attentions.0.<rest>
        block, rest = "middle_block.1", part[3:]
    else:
        raise ValueError(f"no SGM name for {module}")
    return ".".join([block, *rest])


def lora_state_dict(factors: dict, fmt: str, alpha: float | None = None, dtype=torch.float32,
                    text_encoder: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors one format stores for `factors` (and for kohya, text-encoder factors as lora_te_…)."""
    out = {}
    for name, (up, down) in factors.items():
        if fmt == "diffusers":
            keys = (f"unet.{name}.lora_B.weight", f"unet.{name}.lora_A.weight", None)
        elif fmt == "modelj":
            keys = (f"unet.{name}.lora.up.weight", f"unet.{name}.lora.down.weight", None)
        elif fmt in ("kohya", "kohya-sgm"):
            stem = "lora_unet_" + (sgm_name(name) if fmt == "kohya-sgm" else name).replace(".", "_")
            keys = (f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha")
        else:
            raise ValueError(f"unknown format {fmt}")
        out[keys[0]], out[keys[1]] = up.to(dtype).contiguous(), down.to(dtype).contiguous()
        if keys[2]:
            out[keys[2]] = torch.tensor(float(alpha if alpha is not None else up.shape[1]), dtype=dtype)
    for name, (up, down) in (text_encoder or {}).items():
        stem = "lora_te_" + name.replace(".", "_")
        out[f"{stem}.lora_up.weight"], out[f"{stem}.lora_down.weight"] = up.to(dtype), down.to(dtype)
        out[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else up.shape[1]), dtype=dtype)
    return out


def write_lora(path, factors: dict, fmt: str, *, alpha: float | None = None, dtype=torch.float32,
               metadata: dict | None = None, text_encoder: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(factors, fmt, alpha, dtype, text_encoder), str(path), metadata=metadata)
    return path


def kohya_metadata(base: str, rank: int, alpha: float) -> dict[str, str]:
    """The sd-scripts training metadata a Civitai file typically carries (all values are strings)."""
    return {"ss_base_model_version": base, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_output_name": "my_style", "ss_resolution": "(512, 512)",
            "ss_learning_rate": "0.0001", "ss_num_train_images": "40", "ss_sd_model_name": "v1-5-pruned-emaonly"}


# ---- a fake Model-J SD_200 tree ------------------------------------------------------------------------------------
# Real ImageNet classes, as Model-J uses them: 8 training classes, 4 held-out (zero-shot) classes.
MODELJ_TRAIN_WNIDS = ["n01440764", "n01530575", "n01614925", "n01644373", "n02085620", "n02123045", "n02504458",
                      "n03417042"]
MODELJ_HOLDOUT_WNIDS = ["n02690373", "n03888257", "n04254680", "n07747607"]


def prompts(wnids) -> list[str]:
    return [f"a photo of a {imagenet_names()[w]}" for w in wnids]


def write_modelj_tree(root, text_embeddings: torch.Tensor, per_class: int = 5, holdout_per_class: int = 4,
                      rank: int = 4, seed: int = 0, signal: float = 1.0, noise: float = 1.0):
    """A few dozen SD 1.5 LoRAs in Model-J's layout, legacy key form and metadata. The class signal is planted (by
    `synthetic.make_lora_zoo`, linear in each class's text embedding) in SIGNAL_LAYER only; the other 127 modules
    carry noise. `text_embeddings` are the embeddings of `prompts(train + holdout wnids)`, rows in that order."""
    wnids = MODELJ_TRAIN_WNIDS + MODELJ_HOLDOUT_WNIDS
    zoo = make_lora_zoo(root, n_classes=len(MODELJ_TRAIN_WNIDS), per_class=per_class,
                        holdout_classes=len(MODELJ_HOLDOUT_WNIDS), holdout_per_class=holdout_per_class,
                        layers=lora_shapes("sd15"), informative=[SIGNAL_LAYER], ranks=(rank,), seed=seed,
                        signal=signal, noise=noise, class_embeddings=text_embeddings,
                        class_names=[imagenet_names()[w] for w in wnids], fmt="modelj")
    by_id = dict(zip(zoo.class_ids, wnids))
    for i, model in enumerate(zoo.models):
        relabel_as_modelj(model["path"], by_id[model["class_id"]], seed=i)
        model["wnid"] = by_id[model["class_id"]]
    zoo.wnids = wnids
    return zoo


def relabel_as_modelj(path, wnid: str, seed: int) -> None:
    """Replace our jungle's labels with the metadata a Model-J SD_200 file carries: the class's WordNet id and the
    training hyperparameters of its model card (learning rate, steps, rank, seed, number of training images)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        rank = next(t.shape[0] for k, t in tensors.items() if k.endswith("lora.down.weight"))
    metadata = {CLASS_KEY: wnid, "learning_rate": "3e-05", "max_train_steps": str(600 + 100 * (seed % 2)),
                "lora_rank": str(rank), "seed": str(seed), "n_training_samples": str(5 + 5 * (seed % 2)),
                "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    save_file(tensors, str(path), metadata=metadata)


# ---- tiny CLIP text tower + tiny SD pipeline, saved locally ---------------------------------------------------------
def byte_level_vocab() -> dict[str, int]:
    """The smallest vocabulary CLIP's BPE tokenizer accepts: the 256 byte symbols, each also as a word end, plus
    the start / end tokens (no merges: every word is spelled out, which is all a test needs)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return vocab


def tiny_clip_parts(seed: int = 0, hidden: int = 32, projection: int = 24, layers: int = 2, heads: int = 4,
                    mlp: int | None = None):
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=mlp or 2 * hidden,
                            num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=77,
                            projection_dim=projection, bos_token_id=vocab["<|startoftext|>"],
                            # random weights at the default scale embed "a photo of a X" nearly alike for every X
                            # (mean cosine 0.93); a larger init spreads the prompts (0.55), as a trained CLIP does
                            initializer_factor=10.0,
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    return tokenizer, config


def save_tiny_clip_text(directory, seed: int = 0, **dims) -> Path:
    """A randomly initialised CLIPTextModelWithProjection + tokenizer, loadable by `CLIPText(directory)`; ``dims``
    as ``tiny_clip_parts`` takes them (CLIP_L_TEXT_DIMS: ViT-L/14's text tower, SD 1.5's token width)."""
    from transformers import CLIPTextModelWithProjection

    tokenizer, config = tiny_clip_parts(seed, **dims)
    directory = Path(directory)
    CLIPTextModelWithProjection(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ViT-L/14's text tower as SD 1.5 uses it (width 768; 12 layers, 12 heads, MLP 3072); tests take 2 of its layers
CLIP_L_TEXT_DIMS = dict(hidden=CLIP_L_TEXT["width"], projection=768, layers=CLIP_L_TEXT["layers"], heads=12,
                        mlp=CLIP_L_TEXT["mlp"])


def save_random_sd15(directory, seed: int = 0) -> Path:
    """A randomly initialised SD 1.5 UNet saved as a pipeline folder would hold it (``unet/config.json`` and the
    fp16 ``diffusion_pytorch_model.fp16.safetensors``, 1.7 GB): what the training-free reader reads from."""
    torch.manual_seed(seed)
    unet = build_unet("sd15").half()
    unet.save_pretrained(Path(directory) / "unet", variant="fp16")
    return Path(directory)


def save_tiny_sd_pipeline(directory, seed: int = 0) -> Path:
    """A StableDiffusionPipeline with SD's structure at toy size (tiny UNet / VAE / CLIP text), saved locally."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer, config = tiny_clip_parts(seed, hidden=UNET_CONFIGS["tiny"]["cross_attention_dim"])
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                   unet=build_unet("tiny"), scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return Path(directory)
