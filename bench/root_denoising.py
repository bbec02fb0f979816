"""Why root samples are speckled: how much of the noise a root removes in one call at low t, and what a step costs.

    python bench/root_denoising.py [ROOT_DIR ...] [--train-steps 300] [--threads 1]

For each saved root (default: the shipped ones): clean atlas renders of 64 of its classes are noised to t and the
root's x0 prediction compared with the clean image; "noise removed" is 1 − rmse(x0) / σ_t (a perfect denoiser of
flat-background emoji: ≈ 1). Whatever the last sampling steps leave stays in the image as per-pixel speckle.
Then, side by side, today's architecture (unshuffle 4, widths 64/128) and v3's (unshuffle 2, widths 32/64/128, no
attention in the first block): parameters and seconds per training step (batch 64); with ``--train-steps N`` both
are also trained N steps from scratch on the same batches and probed the same way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probex.jungle.atlas import load_atlas  # noqa: E402
from probex.jungle.root import (ROOTS_DIR, RootRecipe, augment, caption, diffusion_loss, load_root,  # noqa: E402
                                make_scheduler, make_unet, sample_timesteps, to_latent)
from probex.text import load_text_encoder  # noqa: E402

PROBE_T = (20, 100, 300)
ARCHITECTURES = {"today (unshuffle 4, 64/128)": dict(unshuffle=4, block_out_channels=(64, 128)),
                 "v3 (unshuffle 2, 32/64/128, plain first block)": dict(unshuffle=2, block_out_channels=(32, 64, 128),
                                                                        plain_blocks=1)}


@torch.no_grad()
def noise_removed(unet, scheduler, recipe, rgba, states) -> list[float]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(rgba), (64,), generator=g)
    x = to_latent(augment(rgba[idx], g, 0.0), recipe)
    out = []
    for t in PROBE_T:
        steps = torch.full((64,), t)
        noisy = scheduler.add_noise(x, torch.randn(x.shape, generator=g), steps)
        v = unet(noisy, steps, encoder_hidden_states=states[idx]).sample
        a, s = scheduler.alphas_cumprod[t].sqrt(), (1 - scheduler.alphas_cumprod[t]).sqrt()
        out.append(1 - float((a * noisy - s * v - x).pow(2).mean().sqrt()) / float(s))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", help="root folders (default: the shipped roots)")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, classes = load_atlas()
    rgba = torch.from_numpy(images)
    text = load_text_encoder("minilm")
    states = text.token_states([caption(RootRecipe(), c["name"]) for c in classes], RootRecipe().token_length)
    print(f"noise removed by one x0 prediction at t = {PROBE_T} (clean atlas renders, 64 classes)")
    for root in args.roots or sorted(p for p in ROOTS_DIR.iterdir() if (p / "recipe.json").exists()):
        unet, scheduler, recipe = load_root(root)
        print(f"  {Path(root).name:<28} " + "  ".join(f"{v:.3f}" for v in noise_removed(unet, scheduler, recipe, rgba, states)))
    print(f"architectures, one training step of batch 64 on {args.threads} thread(s)")
    for label, shape in ARCHITECTURES.items():
        recipe = RootRecipe(seed=3, **shape)
        torch.manual_seed(3)
        unet, scheduler = make_unet(recipe), make_scheduler(recipe)
        opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=1e-2)
        g = torch.Generator().manual_seed(1)
        seconds, loss = [], float("nan")
        for step in range(max(args.train_steps, 5)):
            idx = torch.randint(0, len(rgba), (64,), generator=g)
            x = to_latent(augment(rgba[idx], g), recipe)
            t = sample_timesteps(recipe, 64, g)
            noise = torch.randn(x.shape, generator=g)
            start = time.perf_counter()
            loss = diffusion_loss(unet, scheduler, x, states[idx], t, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seconds.append(time.perf_counter() - start)
        row = (f"  {label:<48} {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
               f"{sorted(seconds)[len(seconds) // 2]:.3f} s a step")
        if args.train_steps:
            unet.eval()
            row += (f"; after {args.train_steps} steps loss {float(loss):.3f}, noise removed "
                    + " / ".join(f"{v:.3f}" for v in noise_removed(unet, scheduler, recipe, rgba, states)))
        print(row, flush=True)


if __name__ == "__main__":
    main()
