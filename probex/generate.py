"""Draw images from a tree's root with one LoRA on it, through the diffusers pipeline of the profile.

One interface for every profile:
    pipe = load_pipeline(profile)                      # once; the slow part
    images = sample(pipe, lora_path, prompt, n, seed)  # per LoRA: load it, draw, take it off again

Each profile's pipeline kind has one loader in ``PIPELINE_LOADERS``. ``sd15`` is Stable Diffusion 1.5 (any diffusers
model id or dir with that layout); ``emoji`` loads an emoji root (probex.jungle.root) into its
diffusers pipeline (probex.jungle.pipeline.EmojiPipeline). LoRA files are read here with safetensors and handed to diffusers as a state
dict, so diffusers never opens a user's file itself (no pickle path); its own converters then take the diffusers /
peft, Model-J legacy (``.lora.down``) and kohya (``lora_unet_…``, ``.alpha``) key forms.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from probex.errors import InputError, ProbexError, first_line
from probex.jungle.pipeline import EmojiPipeline
from probex.profiles import PROJECT_ROOT, Profile, get_profile

SD15_SAMPLING = {"num_inference_steps": 30, "guidance_scale": 7.5}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_sd15(model_id: str, device: str | None = None, dtype: torch.dtype | None = None):
    """StableDiffusionPipeline of the root; fp16 on a GPU (half the memory, same images for sampling)."""
    from diffusers import StableDiffusionPipeline

    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as exc:  # offline, a UNet-only folder, a repo that is not a pipeline
        raise ProbexError(f"cannot load the SD 1.5 pipeline {model_id}: {first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.sampling_defaults = dict(SD15_SAMPLING)
    return pipe.to(device)


EMOJI_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 3.0}  # few steps: samples are drawn live on a CPU


def load_emoji(root_dir: str, device: str | None = None, dtype: torch.dtype | None = None):
    """An emoji root (``probex.jungle``: unet/, scheduler/, recipe.json) as a diffusers pipeline; CPU-sized, fp32."""
    path = Path(root_dir)
    if not path.is_absolute() and not path.is_dir():
        path = PROJECT_ROOT / path  # bundles name shipped roots relative to the project
    if not (path / "unet").is_dir() or not (path / "recipe.json").is_file():
        raise ProbexError(f"emoji root {root_dir} is not there (no unet/ or recipe.json); samples cannot be drawn")
    pipe = EmojiPipeline.from_root(path, device or default_device())
    pipe.set_progress_bar_config(disable=True)
    own = {k: v for k, v in pipe.recipe.sampling.items() if k != "scheduler"}  # the root's, chosen with the judge
    pipe.sampling_defaults = {**EMOJI_SAMPLING, **own}
    return pipe


# pipeline kind → loader(root_model, device, dtype)
PIPELINE_LOADERS = {"sd15": load_sd15, "emoji": load_emoji}


def load_pipeline(profile: Profile | str | None = None, *, root_model: str | None = None, device: str | None = None,
                  dtype: torch.dtype | None = None):
    """The diffusers pipeline of a profile's root (``root_model`` overrides the profile's model id or dir)."""
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    loader = PIPELINE_LOADERS.get(profile.pipeline)
    if loader is None:
        raise ProbexError(f"profile {profile.name} has no image generator yet ({profile.pipeline!r} pipelines)")
    model = root_model or profile.root_model
    if not model:
        raise ProbexError(f"profile {profile.name} names no root model to draw samples with")
    return loader(model, device, dtype)


def read_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors, read with safetensors only (diffusers could otherwise unpickle a .bin)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path.name}: only .safetensors LoRA files can be drawn from")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{path.name}: not a readable safetensors file ({exc})") from None


def sample(pipe, lora_path: str | Path, prompt: str, n: int = 4, seed: int = 0, **overrides) -> list:
    """n images (PIL) for `prompt` with the LoRA in `lora_path` on the root; the pipeline is left as it was."""
    state = read_lora_state_dict(lora_path)
    adapter = "lora_" + hashlib.sha1(str(Path(lora_path).resolve()).encode()).hexdigest()[:12]
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except (ValueError, KeyError, RuntimeError) as exc:  # keys or shapes that do not fit this root
        pipe.unload_lora_weights()
        raise InputError(f"{Path(lora_path).name}: diffusers cannot put this LoRA on the root ({exc})") from None
    try:
        pipe.set_adapters([adapter])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        settings = {**getattr(pipe, "sampling_defaults", {}), **overrides}
        return pipe(prompt, num_images_per_prompt=n, generator=generator, output_type="pil", **settings).images
    finally:
        pipe.unload_lora_weights()
