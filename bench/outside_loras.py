"""LoRAs trained outside the jungle build, read by the shipped app like the jungle's own.

    python bench/outside_loras.py train [--out runs/outside_loras]      # plain diffusers + peft, README recipe
    python bench/outside_loras.py score [--out runs/outside_loras] [--zoo zoo/emoji-mini]

``train`` follows the README's "train your own LoRA" recipe with code of its own, as someone outside this project
would: the shipped root loaded by EmojiPipeline, ``unet.add_adapter(LoraConfig(...))`` from peft, a plain loop over
the v-prediction loss, saved by ``save_lora_weights``. It shares nothing with the build's trainer
(probex/jungle/lora.py: batched adapters, its augmentation, its timestep mix): its own augmentation (random scale,
shift, flip, pale background), uniformly drawn timesteps, a fixed lr 5e-3 and 120 steps, rank 4 or 8. Half the LoRAs
seed peft's A with ``torch.manual_seed(0)`` as the README says; the other half forget to (seed 1234).

Classes: 8 of tree A's training classes and 8 of its held-out classes (seeded draw), one LoRA each on
``emoji-root-1``, plus 4 training classes on ``emoji-root-2``.

``score`` runs the shipped Studio (what the app calls) on them and on the jungle's own test LoRAs of the same classes:
router (right tree), top-1 of the app's concepts for training classes, and zero-shot top-1 among the 30 held-out class
names for held-out classes. The two should read alike: the experts must not depend on how the build trained.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROOTS = ROOT / "checkpoints" / "roots"
PROMPT = "an emoji of sks"
STEPS, LR, BATCH = 120, 5e-3, 4


def chosen_classes() -> list[dict]:
    """(root, class record, kind) for every outside LoRA, deterministic."""
    from probex.jungle.presets import PRESETS, jungle_split

    train, held = jungle_split()
    rng = np.random.default_rng(99)
    n_b = PRESETS["emoji-mini"]["emoji-root-2"]["train_classes"]
    picks = [("emoji-root-1", train[i], "training") for i in rng.choice(len(train), 8, replace=False)]
    picks += [("emoji-root-1", held[i], "held-out") for i in rng.choice(len(held), 8, replace=False)]
    picks += [("emoji-root-2", train[i], "training") for i in rng.choice(n_b, 4, replace=False)]
    return [{"root": r, "class_id": c["id"], "class_name": c["name"], "kind": k} for r, c, k in picks]


def my_views(rgba: np.ndarray, n: int, g: torch.Generator) -> torch.Tensor:
    """n augmented RGB views in [-1, 1] of one RGBA emoji: scale 0.8–1.0, shift ±3 px, flip, pale background."""
    x = torch.from_numpy(rgba).permute(2, 0, 1).float()[None] / 255
    views = []
    for _ in range(n):
        size = int(32 * (0.8 + 0.2 * torch.rand(1, generator=g)))
        small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        canvas = torch.zeros(1, 4, 32, 32)
        top, left = ((32 - size) // 2 + torch.randint(-3, 4, (2,), generator=g)).clamp(0, 32 - size).tolist()
        canvas[..., top:top + size, left:left + size] = small
        if torch.rand(1, generator=g) < 0.5:
            canvas = canvas.flip(-1)
        background = 0.75 + 0.25 * torch.rand(1, 3, 1, 1, generator=g)
        rgb, alpha = canvas[:, :3], canvas[:, 3:]
        views.append((rgb * alpha + background * (1 - alpha)) * 2 - 1)
    return torch.cat(views)


def train_one(pipe, scheduler, views: torch.Tensor, rank: int, seed_a: int, seed: int) -> dict:
    """One LoRA on pipe.unet with peft, the root's training scheduler giving the v target; returns its state dict
    (the adapter is removed afterwards)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    torch.manual_seed(seed_a)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    latents = F.pixel_unshuffle(views, pipe.recipe.unshuffle)
    states = pipe.encode_prompt([PROMPT]).expand(BATCH, -1, -1)
    g = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in range(STEPS):
        x0 = latents[torch.randint(0, len(latents), (BATCH,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, scheduler.get_velocity(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    unet.delete_adapters(["default"])
    return state


def train(out: Path) -> None:
    from diffusers import DDPMScheduler

    from probex.jungle.atlas import load_atlas
    from probex.jungle.pipeline import EmojiPipeline

    images, classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(classes)}
    pipes = {}
    for i, job in enumerate(chosen_classes()):
        target = out / f"{i:02d}_{job['root']}_{job['class_id']}"
        if (target / "pytorch_lora_weights.safetensors").exists():
            continue
        if job["root"] not in pipes:
            pipe = EmojiPipeline.from_root(ROOTS / job["root"])
            pipe.unet.requires_grad_(False)
            pipes[job["root"]] = pipe, DDPMScheduler.from_pretrained(ROOTS / job["root"] / "scheduler")
        start = time.perf_counter()
        g = torch.Generator().manual_seed(1000 + i)
        rank, seed_a = (4, 8)[i % 2], (0, 1234)[(i // 2) % 2]
        state = train_one(*pipes[job["root"]], my_views(images[row[job["class_id"]]], 8, g), rank, seed_a, 2000 + i)
        EmojiPipeline.save_lora_weights(target, unet_lora_layers=state)
        (target / "job.json").write_text(json.dumps({**job, "rank": rank, "seed_a": seed_a, "steps": STEPS, "lr": LR}))
        print(f"{target.name}: {job['class_name']} ({job['kind']}), rank {rank}, A seed {seed_a}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def read_app(studio, path: Path, root: str, name: str, kind: str, held_names: list[str]) -> dict:
    """What the app says about one LoRA: its tree, and whether it names the class."""
    p = studio.predict(path, top_k=1)
    right_tree = p["tree"] == root
    if kind == "training":
        named = right_tree and p["classes"][0]["name"] == name
    else:
        named = right_tree and studio.zero_shot(path, held_names)[0]["name"] == name
    return {"tree": right_tree, "named": named}


def score(out: Path, zoo: Path) -> dict:
    from probex.jungle.presets import jungle_split
    from probex.service import Studio
    from probex.zoo import Zoo

    studio = Studio.load()
    held_names = [c["name"] for c in jungle_split()[1]]
    result = {}
    for job_file in sorted(out.glob("*/job.json")):
        job = json.loads(job_file.read_text())
        own = read_app(studio, job_file.parent / "pytorch_lora_weights.safetensors", job["root"], job["class_name"],
                       job["kind"], held_names)
        tree = Zoo.scan(zoo / job["root"])
        split = "test" if job["kind"] == "training" else "test_holdout"
        theirs = [read_app(studio, tree.root / m.source, job["root"], job["class_name"], job["kind"], held_names)
                  for m in tree.models if m.class_id == job["class_id"] and m.split == split]
        key = f"{job['root']} {job['kind']}"
        agg = result.setdefault(key, {"outside": [], "jungle": [], "outside_tree": [], "jungle_tree": [],
                                      "seed0": [], "other_seed": []})
        agg["outside"].append(own["named"])
        agg["outside_tree"].append(own["tree"])
        agg["seed0" if job["seed_a"] == 0 else "other_seed"].append(own["named"])
        agg["jungle"] += [t["named"] for t in theirs]
        agg["jungle_tree"] += [t["tree"] for t in theirs]
    print(f"\n{'LoRAs':<28} {'outside: named':>15} {'jungle test: named':>19} {'outside routed':>15} "
          f"{'jungle routed':>14}   outside by A seed (0 / other)")
    summary = {}
    for key, a in result.items():
        summary[key] = {k: (float(np.mean(v)) if v else None, len(v)) for k, v in a.items()}
        s = summary[key]
        print(f"{key:<28} {s['outside'][0]:>8.2f} ({s['outside'][1]:>3}) {s['jungle'][0]:>11.2f} ({s['jungle'][1]:>3}) "
              f"{s['outside_tree'][0]:>15.2f} {s['jungle_tree'][0]:>14.2f}   "
              + " / ".join("—" if s[k][0] is None else f"{s[k][0]:.2f} ({s[k][1]})" for k in ("seed0", "other_seed")))
    print("named = training classes: the app's top concept; held-out classes: zero-shot top-1 among the 30 "
          "held-out names")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("train", "score"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "outside_loras"))
    parser.add_argument("--zoo", default=str(ROOT / "zoo" / "emoji-mini"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step == "train":
        train(out)
    else:
        (out / "score.json").write_text(json.dumps(score(out, Path(args.zoo)), indent=1))


if __name__ == "__main__":
    main()
