"""Measurements behind the jungle's gates: does a root use its text, does a LoRA fit its class, and the
functional zero-shot reference (run the root) that weight-space methods are compared against.

All use held-out augmented views (seeds disjoint from training) and fixed noise, so two models are compared on
exactly the same inputs.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..text import load_text_encoder
from .atlas import load_atlas
from .lora import INSTANCE_PROMPT, target_modules, wrap_unet
from .pipeline import EmojiPipeline, image_grid
from .root import augment, caption, load_root, to_latent

EVAL_SEED = 10_000_019  # never used for training views


def x0_error(unet, scheduler, latents, states, t: int, noise) -> torch.Tensor:
    """Per-sample MSE between the clean latent and the model's estimate of it at timestep t."""
    tt = torch.full((len(latents),), t, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, tt)
    with torch.no_grad():
        pred = unet(noisy, tt, encoder_hidden_states=states).sample
    a = scheduler.alphas_cumprod[t].sqrt()
    s = (1 - scheduler.alphas_cumprod[t]).sqrt()
    x0 = a * noisy - s * pred if scheduler.config.prediction_type == "v_prediction" else (noisy - s * pred) / a
    return (x0 - latents).pow(2).flatten(1).mean(1)


@torch.no_grad()
def text_usage(root_dir: Path, timesteps=(100, 300, 500, 600, 700, 800, 900, 950), n: int = 512,
               seed: int = EVAL_SEED):
    """Gate 1: loss with shuffled captions / loss with matching captions, per timestep, on held-out views."""
    unet, scheduler, recipe = load_root(root_dir)
    images, classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(classes)}
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(recipe.classes), (n,), generator=g)
    ids = [recipe.classes[i] for i in pick.tolist()]
    rgba = torch.from_numpy(images[[row[i] for i in ids]])
    latents = to_latent(augment(rgba, g), recipe)
    names = [classes[row[i]]["name"] for i in ids]
    states = load_text_encoder("minilm").token_states([caption(recipe, nm) for nm in names], recipe.token_length)
    shuffled = states[torch.randperm(n, generator=g)]
    out = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g)
        tt = torch.full((n,), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, tt)
        target = scheduler.get_velocity(latents, noise, tt)
        match = (unet(noisy, tt, encoder_hidden_states=states).sample - target).pow(2).mean().item()
        shuf = (unet(noisy, tt, encoder_hidden_states=shuffled).sample - target).pow(2).mean().item()
        ab = float(scheduler.alphas_cumprod[t])
        out.append({"t": t, "snr": ab / (1 - ab), "matching": match, "shuffled": shuf, "ratio": shuf / match})
    return out


def sample_grid(root_dir: Path, names: list[str], out_png: Path, per_name: int = 4, seed: int = 0,
                lora_paths: list[Path] | None = None):
    """Prompts → images; with ``lora_paths`` each row is one LoRA drawn with the instance prompt."""
    pipe = EmojiPipeline.from_root(root_dir)
    pipe.set_progress_bar_config(disable=True)
    tiles = []
    if lora_paths is None:
        for name in names:
            g = torch.Generator().manual_seed(seed)
            tiles += pipe(caption(pipe.recipe, name), num_images_per_prompt=per_name, generator=g).images
    else:
        for i, path in enumerate(lora_paths):
            pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
            pipe.set_adapters([f"l{i}"])
            g = torch.Generator().manual_seed(seed)
            tiles += pipe(INSTANCE_PROMPT, num_images_per_prompt=per_name, generator=g).images
            pipe.delete_adapters(f"l{i}")
    image_grid(tiles, per_name).save(out_png)
    return out_png


def _lora_unet(unet, lora_files: list[Path]):
    """One UNet carrying several LoRAs side by side (batch block k → LoRA k), for evaluation."""
    states = [load_file(str(f)) for f in lora_files]
    names = target_modules(unet)
    model = copy.deepcopy(unet).requires_grad_(False)
    rank = max(s[f"unet.{names[0]}.lora_A.weight"].shape[0] for s in states)
    wrappers = wrap_unet(model, {n: torch.zeros(rank, unet.get_submodule(n).in_features) for n in names}, len(states))
    for k, s in enumerate(states):
        for n, w in wrappers.items():
            a, b = s[f"unet.{n}.lora_A.weight"], s[f"unet.{n}.lora_B.weight"]
            w.a[k].data.zero_()
            w.b[k].data.zero_()
            w.a[k].data[: a.shape[0]] = a
            w.b[k].data[:, : b.shape[1]] = b
    return model


@torch.no_grad()
def lora_fit(root_dir: Path, lora_files: list[Path], class_ids: list[str], t: int = 600, views: int = 8,
             chunk: int = 10):
    """Gate 2: fixed-noise x0 error on held-out views of each LoRA's class, for (LoRA, instance prompt),
    (root, instance prompt) and (root, true caption)."""
    unet, scheduler, recipe = load_root(root_dir)
    images, classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(classes)}
    text = load_text_encoder("minilm")
    sks = text.token_states([INSTANCE_PROMPT], recipe.token_length)
    rows = []
    for start in range(0, len(lora_files), chunk):
        files, ids = lora_files[start:start + chunk], class_ids[start:start + chunk]
        k = len(files)
        rgba = torch.from_numpy(images[[row[i] for i in ids]]).repeat_interleave(views, 0)
        latents = to_latent(augment(rgba, torch.Generator().manual_seed(EVAL_SEED)), recipe)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(EVAL_SEED + 1))
        true = text.token_states([caption(recipe, classes[row[i]]["name"]) for i in ids], recipe.token_length)
        true = true.repeat_interleave(views, 0)
        inst = sks.expand(k * views, -1, -1)
        lora_err = x0_error(_lora_unet(unet, files), scheduler, latents, inst, t, noise).view(k, views).mean(1)
        root_inst = x0_error(unet, scheduler, latents, inst, t, noise).view(k, views).mean(1)
        root_true = x0_error(unet, scheduler, latents, true, t, noise).view(k, views).mean(1)
        rows += [{"lora": float(a), "root_instance": float(b), "root_true_caption": float(c)}
                 for a, b, c in zip(lora_err, root_inst, root_true)]
    return rows


@torch.no_grad()
def functional_zero_shot(root_dir: Path, lora_files: list[Path], candidate_names: list[str], t: int = 600,
                         n_inputs: int = 8, chunk: int = 10, seed: int = EVAL_SEED) -> np.ndarray:
    """Reference, not from weights: score[i, c] = −‖LoRA_i(x_t, sks) − root(x_t, caption c)‖² on shared random
    inputs. It runs the model, which a weight-space method must not."""
    unet, scheduler, recipe = load_root(root_dir)
    text = load_text_encoder("minilm")
    g = torch.Generator().manual_seed(seed)
    images, classes = load_atlas()
    pool = torch.from_numpy(images[np.random.default_rng(seed).choice(len(images), n_inputs)])
    latents = to_latent(augment(pool, g), recipe)
    noise = torch.randn(latents.shape, generator=g)
    tt = torch.full((n_inputs,), t, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, tt)
    cands = text.token_states([caption(recipe, n) for n in candidate_names], recipe.token_length)
    root_out = torch.stack([unet(noisy, tt, encoder_hidden_states=c.expand(n_inputs, -1, -1)).sample
                            for c in cands])  # (C, n, ...)
    sks = text.token_states([INSTANCE_PROMPT], recipe.token_length)
    scores = []
    for start in range(0, len(lora_files), chunk):
        files = lora_files[start:start + chunk]
        model = _lora_unet(unet, files)
        out = model(noisy.repeat(len(files), 1, 1, 1), tt.repeat(len(files)),
                    encoder_hidden_states=sks.expand(len(files) * n_inputs, -1, -1)).sample
        out = out.view(len(files), 1, n_inputs, -1)
        scores.append(-(out - root_out.view(1, len(cands), n_inputs, -1)).pow(2).mean((2, 3)))
    return torch.cat(scores).numpy()
