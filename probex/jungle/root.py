"""Emoji roots: tiny text-to-image diffusion models built from diffusers parts, pretrained on the emoji atlas.

A root is a ``UNet2DConditionModel`` on 32×32 RGB images pixel-unshuffled to 8×8×48 (attention stays cheap at 8×8),
cross-attending to 16 all-MiniLM-L6-v2 token states of the caption "an emoji of {name}", trained with
v-prediction: under ε-prediction at mid/high noise the clean-image error enters the loss with a tiny weight, and a
root of this setup trained that way learned to ignore its caption.

Saved as plain diffusers folders (``unet/`` in fp16, ``scheduler/``) plus ``recipe.json``, so diffusers loads a
root without this package. Pretraining is resumable: ``train_state.safetensors`` holds model, optimiser and RNG state.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..text import load_text_encoder
from .atlas import load_atlas

ROOTS_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "roots"  # the shipped roots
SHARD_SIZE = "8MB"  # committed files stay ≤ 10 MB: diffusers writes and reads sharded weights natively


@dataclass
class RootRecipe:
    """Everything needed to rebuild, train and use a root. Stored as ``recipe.json`` beside the weights."""

    name: str = "emoji-root-1"
    seed: int = 0
    text_encoder: str = "all-MiniLM-L6-v2"
    prompt_template: str = "an emoji of {name}"
    token_length: int = 16
    unshuffle: int = 4
    image_size: int = 32
    block_out_channels: tuple = (64, 128)
    layers_per_block: int = 1
    plain_blocks: int = 0  # leading blocks without attention: self-attention over 16×16 tokens would double a step's cost
    norm_num_groups: int = 32  # with one channel a group, GroupNorm strips each channel's image-wide mean (its colour)
    attention_head_dim: int = 8
    prediction_type: str = "v_prediction"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    caption_dropout: float = 0.1
    high_noise_share: float = 0.5  # half the timesteps drawn from [high_noise_from, T)
    high_noise_from: int = 300
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 3000
    ema_decay: float = 0.0  # > 0: the saved UNet is an exponential moving average of the weights (smoother samples)
    classes: list = field(default_factory=list)  # atlas ids the root is pretrained on
    # how the app draws with it, chosen with the judge (bench/root_quality.py): {"scheduler": "ddim" | "dpm++",
    # "num_inference_steps", "guidance_scale"}; empty: probex.generate's defaults
    sampling: dict = field(default_factory=dict)

    def save(self, path: Path):
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "RootRecipe":
        data = json.loads(Path(path).read_text())
        data["block_out_channels"] = tuple(data["block_out_channels"])
        return cls(**data)

    @property
    def channels(self) -> int:
        return 3 * self.unshuffle**2

    @property
    def latent_size(self) -> int:
        return self.image_size // self.unshuffle


def make_unet(recipe: RootRecipe):
    from diffusers import UNet2DConditionModel

    n, plain = len(recipe.block_out_channels), recipe.plain_blocks
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (n - plain)
    return UNet2DConditionModel(
        sample_size=recipe.latent_size,
        in_channels=recipe.channels,
        out_channels=recipe.channels,
        block_out_channels=recipe.block_out_channels,
        layers_per_block=recipe.layers_per_block,
        down_block_types=down,
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        cross_attention_dim=384,
        attention_head_dim=recipe.attention_head_dim,
        norm_num_groups=recipe.norm_num_groups,
    )


def make_scheduler(recipe: RootRecipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule=recipe.beta_schedule,
                         prediction_type=recipe.prediction_type, clip_sample=False)


def to_latent(images: torch.Tensor, recipe: RootRecipe) -> torch.Tensor:
    """(N,3,32,32) in [-1,1] → (N,48,8,8)."""
    return F.pixel_unshuffle(images, recipe.unshuffle)


def from_latent(latents: torch.Tensor, recipe: RootRecipe) -> torch.Tensor:
    return F.pixel_shuffle(latents, recipe.unshuffle)


def augment(rgba: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random scale / shift / rotation / colour / background for a batch of RGBA uint8 emoji → RGB in [-1, 1].

    ``strength`` 0 gives the clean emoji on white; 1 the full range used for roots and LoRAs.
    """
    x = rgba.permute(0, 3, 1, 2).float() / 255.0
    n = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    scale = 1.0 + strength * uniform(-0.3, 0.15)
    angle = strength * uniform(-0.35, 0.35)
    shift = strength * torch.stack([uniform(-0.15, 0.15), uniform(-0.15, 0.15)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, alpha = x[:, :3], x[:, 3:]
    gain = 1.0 + strength * uniform(-0.2, 0.2)[:, None, None, None]
    rgb = (rgb * gain).clamp(0, 1)
    light = torch.rand(n, 3, 1, 1, generator=generator) * 0.4 + 0.6  # pale random backgrounds
    background = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < strength * 0.7, light, torch.ones_like(light))
    return (rgb * alpha + background * (1 - alpha)) * 2 - 1


def caption(recipe: RootRecipe, name: str) -> str:
    return recipe.prompt_template.format(name=name)


def sample_timesteps(recipe: RootRecipe, n: int, generator: torch.Generator) -> torch.Tensor:
    t_all = torch.randint(0, recipe.num_train_timesteps, (n,), generator=generator)
    t_high = torch.randint(recipe.high_noise_from, recipe.num_train_timesteps, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < recipe.high_noise_share, t_high, t_all)


def diffusion_loss(unet, scheduler, latents, states, timesteps, noise, reduce=True):
    """MSE of the UNet's prediction against the scheduler's target (v or ε) — the one loss roots and LoRAs share."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" else noise
    pred = unet(noisy, timesteps, encoder_hidden_states=states).sample
    err = (pred - target).pow(2).flatten(1).mean(1)
    return err.mean() if reduce else err


def _state_tensors(unet, optimizer, step: int, generator: torch.Generator, ema=None) -> dict:
    tensors = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().clone() for k, v in ema.state_dict().items()})
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).clone()
    tensors["step"] = torch.tensor([step])
    tensors["rng"] = generator.get_state()
    return tensors


def _load_state(tensors: dict, unet, optimizer, generator: torch.Generator, ema=None) -> int:
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    params = optimizer.param_groups[0]["params"]
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            optimizer.state[params[int(i)]][name] = value if name != "step" else value.clone()
    generator.set_state(tensors["rng"])
    return int(tensors["step"][0])


def pretrain_root(out_dir: Path, recipe: RootRecipe, *, minutes: float | None = None, stop_after: int | None = None,
                  log_every: int = 100, checkpoint_every: int = 250, device: str = "cpu") -> Path:
    """Train (or resume) a root until ``recipe.steps``; a run may stop early after ``minutes`` or ``stop_after``
    steps (chunks across sessions) and the next call continues exactly where it stopped. Saves diffusers folders."""


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    images, classes = load_atlas()
    by_id = {c["id"]: i for i, c in enumerate(classes)}
    if not recipe.classes:
        recipe.classes = [c["id"] for c in classes]
    rows = torch.tensor([by_id[c] for c in recipe.classes])
    rgba = torch.from_numpy(images[rows.numpy()])
    names = [classes[i]["name"] for i in rows.tolist()]
    text = load_text_encoder("minilm")
    states = text.token_states([caption(recipe, n) for n in names], recipe.token_length).to(device)
    empty = text.token_states([""], recipe.token_length).to(device)

    unet = make_unet(recipe).to(device)
    scheduler = make_scheduler(recipe)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=1e-2)
    lr_at = lambda s: recipe.lr * 0.5 * (1 + math.cos(math.pi * min(s / recipe.steps, 1.0)))  # noqa: E731
    generator = torch.Generator().manual_seed(recipe.seed)
    ema = None
    if recipe.ema_decay > 0:
        ema = copy.deepcopy(unet).requires_grad_(False)
    step = 0
    ckpt = out_dir / "train_state.safetensors"
    if ckpt.exists():
        step = _load_state(load_file(ckpt), unet, optimizer, generator, ema)
        print(f"resumed {recipe.name} at step {step}")
    recipe.save(out_dir / "recipe.json")
    started, losses, first = time.time(), [], step
    log = open(out_dir / "train_log.jsonl", "a")
    while step < recipe.steps:
        if (minutes is not None and time.time() - started > minutes * 60) or \
                (stop_after is not None and step - first >= stop_after):
            break
        idx = torch.randint(0, len(rows), (recipe.batch_size,), generator=generator)
        latents = to_latent(augment(rgba[idx], generator), recipe).to(device)
        cond = states[idx].clone()
        drop = torch.rand(recipe.batch_size, generator=generator) < recipe.caption_dropout
        cond[drop] = empty
        t = sample_timesteps(recipe, recipe.batch_size, generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = diffusion_loss(unet, scheduler, latents, cond, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():  # warm-up: early averages would be dominated by the random initialisation
                decay = min(recipe.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        if step % log_every == 0:
            rec = {"step": step, "loss": float(np.mean(losses)), "elapsed_s": round(time.time() - started, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
            losses = []
        if step % checkpoint_every == 0:
            save_file(_state_tensors(unet, optimizer, step, generator, ema), str(ckpt))
    save_file(_state_tensors(unet, optimizer, step, generator, ema), str(ckpt))
    save_unet(ema if ema is not None else unet, out_dir / "unet")
    scheduler.save_pretrained(out_dir / "scheduler")
    return out_dir


def save_unet(unet, unet_dir: Path) -> Path:
    """The shipped form of a root's UNet: weights in fp16 (half the bytes: the shipped artifacts have a size budget),
    in ≤ 8 MB shards; ``load_root`` reads them back as fp32, and training state stays fp32 in train_state. Rounding
    to fp16 moves each weight by < 0.05 % of itself."""

    unet_dir = Path(unet_dir)
    if unet_dir.exists():
        shutil.rmtree(unet_dir)  # no stale shards of an earlier save
    copy.deepcopy(unet).to("cpu", torch.float16).save_pretrained(unet_dir, max_shard_size=SHARD_SIZE)
    return unet_dir


def load_root(root_dir: Path, device: str = "cpu"):
    """(unet, scheduler, recipe) from a saved root folder — plain diffusers loading."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    root_dir = Path(root_dir)
    recipe = RootRecipe.load(root_dir / "recipe.json")
    unet = UNet2DConditionModel.from_pretrained(root_dir / "unet", torch_dtype=torch.float32).to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(root_dir / "scheduler")
    return unet, scheduler, recipe
