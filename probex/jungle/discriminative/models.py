"""The three classifier architectures. No normalisation statistics: a model is its weights, and vmap needs no
buffers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three stride-2 3×3 convolutions (32→16→8→4), global average pool, linear head."""

    def __init__(self, n_out: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, stride=2, padding=1)
        self.head = nn.Linear(widths[2], n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((-2, -1)))


class SmallMLP(nn.Module):
    """2×2 average-pooled image (16×16×3 = 768) → 256 → 256 → head."""

    def __init__(self, n_out: int, width: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(768, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2).flatten(-3)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, 2 * tokens)
        self.token_fc2 = nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, 2 * dim)
        self.channel_fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.token_fc2(F.gelu(self.token_fc1(self.norm1(x).transpose(-1, -2)))).transpose(-1, -2)
        x = x + mixed
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class SmallMixer(nn.Module):
    """MLP-Mixer: 8×8 patches (16 tokens of 192) → 64-d, two mixer blocks, mean over tokens, head."""

    def __init__(self, n_out: int, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(192, dim)
        self.blocks = nn.Sequential(*(MixerBlock(16, dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        patches = F.pixel_unshuffle(x, 8).flatten(-2).transpose(-1, -2)  # (…, 16 tokens, 192)
        return self.head(self.norm(self.blocks(self.embed(patches))).mean(-2))


ARCHITECTURES = {"cnn": SmallCNN, "mlp": SmallMLP, "mixer": SmallMixer}


def initial_state(arch: str, n_out: int, seed: int) -> dict[str, Tensor]:
    """Weights of a freshly initialised classifier (PyTorch's default init under `seed`; the global RNG is kept)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in ARCHITECTURES[arch](n_out).state_dict().items()}
