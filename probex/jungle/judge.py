"""The judge: a small image classifier over every atlas class, our stand-in for a CLIP score on the emoji jungle.

It is trained only on atlas renders — clean and under the roots' own augmentation (``root.augment``), plus mild pixel
noise — never on anything a root drew, so it can grade a root's samples without having seen them.

    judge = load_judge()
    probs = judge(images)            # (N, 3, 32, 32) in [-1, 1] → (N, n_classes) class probabilities
    judge.class_ids[probs.argmax(1)] # atlas ids such as "U+1F34E"
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atlas import load_atlas
from .root import augment

JUDGE_FILE = Path(__file__).resolve().parents[1] / "data" / "judge.safetensors"
WIDTHS = (32, 64, 128, 192)


class Judge(nn.Module):
    """Conv stages at 32, 16, 8 and 4 pixels (two 3×3 convs each but the first), global average pool, linear head."""

    def __init__(self, class_ids: list[str], widths: tuple = WIDTHS):
        super().__init__()
        self.class_ids = list(class_ids)
        layers, c_in = [], 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(1 if i == 0 else 2):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, len(class_ids))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.training
        self.eval()
        probs = torch.cat([self.logits(b.float()).softmax(1) for b in images.split(256)])
        self.train(was_training)
        return probs


def training_batch(rgba: torch.Tensor, batch_size: int, generator: torch.Generator):
    """A quarter clean renders, the rest under the roots' augmentation; all with mild Gaussian pixel noise."""
    idx = torch.randint(0, len(rgba), (batch_size,), generator=generator)
    n_clean = batch_size // 4
    images = torch.cat([augment(rgba[idx[:n_clean]], generator, strength=0.0),
                        augment(rgba[idx[n_clean:]], generator, strength=1.0)])
    sigma = 0.08 * torch.rand(batch_size, 1, 1, 1, generator=generator)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1), idx


def accuracy(judge: Judge, rgba: torch.Tensor, strength: float, seed: int, repeats: int = 1) -> tuple[float, float]:
    """(top-1, top-5) over every class, each drawn ``repeats`` times under ``augment(strength)`` with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(rgba)).repeat(repeats)
    images = torch.cat([augment(rgba, generator, strength=strength) for _ in range(repeats)])
    top5 = judge(images).topk(5, 1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(1).float().mean().item()


def train_judge(steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                out: Path = JUDGE_FILE) -> dict:
    """Train on the atlas, save fp16 weights with the class ids, return held-out accuracy (fresh augmentation seeds)."""
    torch.manual_seed(seed)
    images, classes = load_atlas()
    rgba = torch.from_numpy(images)
    judge = Judge([c["id"] for c in classes])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    judge.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = training_batch(rgba, batch_size, generator)
        loss = F.cross_entropy(judge.logits(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 250 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4),
                              "elapsed_s": round(time.time() - started, 1)}), flush=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    save_file(state, str(out), metadata={"class_ids": json.dumps(judge.class_ids), "widths": json.dumps(WIDTHS),
                                         "steps": str(steps), "seed": str(seed)})
    report = {"classes": len(classes), "steps": steps, "train_s": round(time.time() - started, 1),
              "file_mb": round(out.stat().st_size / 1e6, 2)}
    return {**report, **evaluate_judge(load_judge(out), seed=seed)}


def evaluate_judge(judge: Judge, seed: int = 0) -> dict:
    """Top-1 / top-5 over every atlas class on fresh renders: clean, and 4 draws under the roots' augmentation
    (seeds the training batches never used)."""
    images, _ = load_atlas()
    rgba = torch.from_numpy(images)
    report = {}
    for label, strength, repeats in (("clean", 0.0, 1), ("augmented", 1.0, 4)):
        top1, top5 = accuracy(judge, rgba, strength, seed=10_000 + seed, repeats=repeats)
        report[f"{label}_top1"], report[f"{label}_top5"] = round(top1, 3), round(top5, 3)
    return report


def load_judge(path: Path = JUDGE_FILE) -> Judge:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    judge = Judge(json.loads(meta["class_ids"]), tuple(json.loads(meta["widths"])))
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return judge.eval()
