"""A diffusers pipeline for emoji roots. LoRAs load through diffusers' standard LoRA API (peft underneath):
``pipe.load_lora_weights(path, adapter_name=...)``, ``pipe.set_adapters``, ``pipe.unload_lora_weights``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from PIL import Image

from ..text import load_text_encoder
from .root import RootRecipe, from_latent, load_root


SAMPLERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}   # a root recipe's "scheduler" → class


class EmojiPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text → 32×32 emoji. Components: UNet, scheduler, MiniLM text encoder + tokenizer."""

    def __init__(self, unet, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.recipe: RootRecipe | None = None

    @classmethod
    def from_root(cls, root_dir: str | Path, device: str = "cpu") -> "EmojiPipeline":
        unet, train_scheduler, recipe = load_root(root_dir, device)
        text = load_text_encoder("minilm", device)
        sampler = SAMPLERS[recipe.sampling.get("scheduler", "ddim")]
        pipe = cls(unet=unet, scheduler=sampler.from_config(train_scheduler.config),
                   text_encoder=text.model, tokenizer=text.tokenizer)
        pipe.recipe = recipe
        return pipe

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.recipe.token_length, truncation=True,
                               return_tensors="pt").to(self.unet.device)
        return self.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1, num_inference_steps: int = 30,
                 guidance_scale: float = 3.0, generator: torch.Generator | None = None, output_type: str = "pil"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([""]).expand_as(cond)
        r = self.recipe
        latents = torch.randn((len(prompts), r.channels, r.latent_size, r.latent_size), generator=generator)
        latents = latents.to(self.unet.device)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            guess_uncond, guess_cond = both.chunk(2)
            guess = guess_uncond + guidance_scale * (guess_cond - guess_uncond)
            latents = self.scheduler.step(guess, t, latents).prev_sample
        images = ((from_latent(latents, r).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return ImagePipelineOutput(images=images)
        return ImagePipelineOutput(images=[Image.fromarray((im * 255).round().astype(np.uint8)) for im in images])


def image_grid(images: list[Image.Image], cols: int, scale: int = 2) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid.resize((cols * w * scale, rows * h * scale), Image.Resampling.NEAREST)
