"""What training ProbeX at Model-J scale costs on this machine: one SD 1.5 layer, then a full 128-layer sweep.

    python bench/sd15_scale.py [--models 5000] [--rank 8] [--threads 1] [--device cpu|cuda]

Setting: the release's generative recipe (`probex.config.RELEASE_GENERATIVE`: r_U = r_V = 128, r_T = 512, batch 128,
200 epochs; the paper's own default is 500 epochs), text alignment over 200 classes with 768-d text embeddings (CLIP
ViT-L/14's width), N random rank-r LoRAs of the layer the release found best,
down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q (1280×1280).

- factor path: what `probex.train` does — the expert reads (B, A, scale) and never forms B·A; one full epoch timed.
- materialised path: the release's way — B·A formed per batch (1280×1280 per model), the expert reads the matrix.
  N dense matrices would need N × 6.5 MB (33 GB at N = 5000), so it can only run batch by batch; its epoch time is
  measured on a few batches and extrapolated to the epoch (printed as such).
Each path runs in its own process, so its peak memory is its own (data, expert, optimiser): resident memory
(ru_maxrss) on the CPU, torch's peak allocation on a GPU.
The sweep projection times a few factor-path batches for each distinct SD 1.5 layer shape (the 128 LoRA'd modules have
6) and adds up epochs × time per epoch over all 128 layers: training passes only (train_expert's per-epoch val pass
adds about val/train × 1/3 more).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from probex.config import RELEASE_GENERATIVE  # noqa: E402
from probex.data import LayerData, Targets  # noqa: E402
from probex.experts import ProbeX, dense_from_factors  # noqa: E402
from probex.train import loss_and_score, train_epoch  # noqa: E402

LAYER = "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q"
N_CLASSES, TEXT_DIM = 200, 768


def population(n: int, shape: tuple[int, int], rank: int, device: str, seed: int = 0) -> tuple[LayerData, Targets]:
    """n random LoRAs of one layer, 25 per class as in SD_200, every model in the train split."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    up = (torch.randn(n, d_out, rank, generator=gen) / rank ** 0.5).to(device)
    down = (torch.randn(n, rank, d_in, generator=gen) / d_in ** 0.5).to(device)
    data = LayerData((up, down, torch.ones(n, device=device)), torch.full((n,), rank))
    text = torch.nn.functional.normalize(torch.randn(N_CLASSES, TEXT_DIM, generator=gen), dim=-1).to(device)
    y = (torch.arange(n) % N_CLASSES).to(device)
    targets = Targets("align", y, {"train": torch.arange(n)}, [str(c) for c in range(N_CLASSES)], text=text)
    return data, targets


def expert_for(shape: tuple[int, int], device: str) -> ProbeX:
    c = RELEASE_GENERATIVE
    torch.manual_seed(0)
    return ProbeX(*shape, r_u=c.model.r_u, r_v=c.model.r_v, r_t=c.model.r_t, relu=c.model.relu, head="align", text_dim=TEXT_DIM).to(device)


def optimiser(expert: ProbeX) -> torch.optim.Optimizer:
    return torch.optim.Adam(expert.parameters(), lr=RELEASE_GENERATIVE.optimiser.lr, weight_decay=RELEASE_GENERATIVE.optimiser.weight_decay)


def epoch_seconds(materialise: bool, n: int, shape, rank: int, threads: int, device: str,
                  max_batches: int | None) -> dict:
    """Seconds per training epoch: on the factor path a whole epoch as `probex.train` runs it (max_batches None),
    else `max_batches` steps extrapolated to the epoch; materialised, each batch's B·A is formed first."""
    torch.set_num_threads(threads)
    data, targets = population(n, shape, rank, device)
    expert = expert_for(shape, device)
    opt = optimiser(expert)
    batch = RELEASE_GENERATIVE.optimiser.batch_size
    n_batches = math.ceil(n / batch)
    if max_batches is None and not materialise:
        start = time.perf_counter()
        train_epoch(expert, data, targets, opt, batch, torch.Generator().manual_seed(0))
        synchronize(device)
        seconds, measured = time.perf_counter() - start, n_batches
    else:
        measured = min(max_batches or n_batches, n_batches)
        inputs = (lambda idx: dense_from_factors(data.take(idx))) if materialise else data.take
        seconds = timed_batches(expert, opt, targets, inputs, measured, batch, device) * n_batches / measured
    return {"seconds": seconds, "batches": n_batches, "measured_batches": measured, "peak_mb": peak_mb(device)}


def timed_batches(expert, opt, targets, inputs, n_batches: int, batch: int, device: str) -> float:
    """Seconds for n_batches training steps (after one untimed warm-up step)."""
    idx = torch.arange(batch)

    def step():
        loss, _ = loss_and_score("align", expert(inputs(idx), targets.text), targets.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    expert.train()
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        step()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # kernels run asynchronously: time them to their end


def peak_mb(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def in_child(fn, *args) -> dict:
    """Run fn in a fresh process (spawned, so its memory peak is its own) and return its result."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def sd15_shapes() -> Counter:
    from sd15_fixtures import lora_shapes  # diffusers' SD 1.5 UNet on the meta device: the 128 Model-J modules

    return Counter(lora_shapes("sd15").values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2 cores here are shared)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dense-batches", type=int, default=3, help="materialised batches to time")
    parser.add_argument("--shape-batches", type=int, default=8, help="factor batches to time per layer shape")
    args = parser.parse_args(argv)
    n, r, c, dev = args.models, args.rank, RELEASE_GENERATIVE, args.device
    shape = (1280, 1280)
    print(f"SD 1.5 {LAYER} {shape[0]}×{shape[1]}, {n} LoRAs of rank {r}, align over {N_CLASSES} classes "
          f"(text {TEXT_DIM}-d); ProbeX r_U={c.model.r_u} r_V={c.model.r_v} r_T={c.model.r_t}, batch {c.optimiser.batch_size}, Adam; "
          f"on {dev}, {args.threads} torch thread(s) ({torch.get_num_threads()} by default)")
    print(f"idle process with torch imported: {peak_mb():.0f} MB resident; peaks below are "
          f"{'GPU allocations' if dev.startswith('cuda') else 'resident memory'}")

    factor = in_child(epoch_seconds, False, n, shape, r, args.threads, dev, None)
    print(f"factor path:       {factor['seconds']:8.1f} s/epoch  (whole epoch, {factor['batches']} batches)  "
          f"peak {factor['peak_mb']:.0f} MB")
    dense = in_child(epoch_seconds, True, n, shape, r, args.threads, dev, args.dense_batches)
    print(f"materialised path: {dense['seconds']:8.1f} s/epoch  (EXTRAPOLATED from {dense['measured_batches']} of "
          f"{dense['batches']} batches)  peak {dense['peak_mb']:.0f} MB")
    print(f"factor path is {dense['seconds'] / factor['seconds']:.1f}× faster per epoch")

    shapes = sd15_shapes()
    per_epoch = {}
    for s in sorted(shapes):
        per_epoch[s] = (factor["seconds"] if s == shape else
                        in_child(epoch_seconds, False, n, s, r, args.threads, dev, args.shape_batches)["seconds"])
        print(f"  {shapes[s]:3d} layers of {s[0]:4d}×{s[1]:<4d}: {per_epoch[s]:6.1f} s/epoch (factor path"
              f"{'' if s == shape else f', from {args.shape_batches} batches'})")
    sweep_epoch = sum(per_epoch[s] * k for s, k in shapes.items())
    for epochs, who in ((c.optimiser.epochs, "release"), (500, "paper")):
        hours = sweep_epoch * epochs / 3600
        print(f"projected 128-layer sweep, {epochs} epochs ({who}): {hours:6.1f} h factor path on {dev} "
              f"({args.threads} thread(s)); one layer {per_epoch[shape] * epochs / 60:.0f} min; materialised path "
              f"{dense['seconds'] * epochs / 3600:.1f} h for that one layer")


if __name__ == "__main__":
    main()
