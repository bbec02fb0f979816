"""Root-anchored ProbeX: zero-shot text alignment that borrows the tree root's own cross-attention weights.

A DreamBooth-style LoRA is trained with a prompt that lacks the class name ("an emoji of sks"). What it learns, in a
cross-attention key/value layer with root weight W, is to make the instance prompt act like the class caption:
    ΔW · h_sks  ≈  W · (h_class − h_sks)        (per token of the prompt)
Both sides of that relation live in the same space, the layer's output space, one column per prompt token. So:
- the weight side is ProbeX with its probes set to the instance prompt's token states: responses Z = Vᵀ·ΔW·H_sᵀ;
- the text side pushes a caption through the ROOT's weight: T(c) = Vᵀ·W·(H_c − H_s)ᵀ, i.e. "the change of this
  layer's output the caption asks for";
- one shared encoder (σ, then the per-probe encoders M) maps both to r_T, and logits are cosines.
With V = I, M = I, no σ this is a training-free score (``training_free``); training fits V and M.

Several layers (e.g. every attn2 to_k / to_v) are read at once: their responses are concatenated along d_W, each
scaled to unit norm first (``layer_norm``): the layers' scales differ by orders of magnitude, and concatenated raw the
largest would decide alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probex.experts.attention_reader import apply_update
from probex.experts.base import Expert


class AnchoredProbeX(Expert):
    def __init__(self, d_ws: list[int], d_h: int, n_tokens: int, r_v: int = 64, r_t: int = 128, relu: bool = True,
                 temperature: float | None = 0.1, text_dim: int | None = None, layer_norm: bool = False,
                 token_rank: int | None = None, text_layers: list[bool] | None = None):
        d_w = sum(d_ws)
        if token_rank is not None:  # training-free: the encoding is the responses themselves, nothing to choose
            r_t = d_w * token_rank
        super().__init__(r_t, "align", None, text_dim or d_h, temperature)
        del self.text_head  # the text side is the root's own weights, see text_features
        self.d_ws, self.d_h, self.n_tokens, self.r_v, self.r_t, self.relu = list(d_ws), d_h, n_tokens, r_v, r_t, relu
        self.layer_norm, self.token_rank = layer_norm, token_rank
        self.text_layers = [bool(t) for t in text_layers] if text_layers is not None else [True] * len(self.d_ws)
        if len(self.text_layers) != len(self.d_ws) or not any(self.text_layers):
            raise ValueError("text_layers needs one flag per read layer, at least one of them set")
        if token_rank is None and not all(self.text_layers):
            raise ValueError("text_layers can leave layers out only in the training-free expert (token_rank set)")
        self.register_buffer("probes", torch.zeros(n_tokens, d_h))   # H_s: instance-prompt token states
        self.register_buffer("root", torch.zeros(d_w, d_h))          # W: the root's weights, stacked layers
        if token_rank is None:  # trained: V and the per-probe encoders M are learned
            self.V = nn.Parameter(torch.empty(d_w, r_v).uniform_(-1, 1) / d_w**0.5)
            self.M = nn.Linear(r_v * n_tokens, r_t)
        else:  # training-free: the instance prompt's principal token directions (stored: an SVD's signs may differ)
            self.register_buffer("token_basis", torch.zeros(n_tokens, token_rank))

    @classmethod
    def from_root(cls, root_weights: list[Tensor], instance_states: Tensor, layer_norm: bool = True,
                  **kw) -> "AnchoredProbeX":
        """root_weights: the root's (d_w_l, d_h) matrices of the read layers; instance_states: (n_tokens, d_h)."""
        model = cls([w.shape[0] for w in root_weights], instance_states.shape[1], instance_states.shape[0],
                    layer_norm=layer_norm, **kw)
        model.root.copy_(torch.cat(root_weights))
        model.probes.copy_(instance_states)
        return model

    @classmethod
    def training_free(cls, root_weights: list[Tensor], instance_states: Tensor, token_rank: int = 3,
                      text_layers: list[bool] | None = None) -> "AnchoredProbeX":
        """No learning: V = I, no σ, and instead of all n_tokens columns of ΔW·H_sᵀ, its projection on the instance
        prompt's ``token_rank`` principal token directions P (top left singular vectors of H_s): ΔW·H_sᵀ·P, which
        is ΔW applied to H_s's top principal directions, each weighted by its singular value. Each layer is scaled to
        unit norm, and cosines between encodings are exact — no random projection. A caption's text side is
        W·(H_c − H_s)ᵀ·P on the ``text_layers`` (default all), zero on the others: those then only help tell LoRAs
        apart (nearest models, class means), not read text. Encoding size: Σ d_w · token_rank."""
        if not 1 <= token_rank <= min(instance_states.shape):
            raise ValueError(f"token_rank must be between 1 and {min(instance_states.shape)}, got {token_rank}")
        model = cls.from_root(root_weights, instance_states, r_v=sum(w.shape[0] for w in root_weights), relu=False,
                              temperature=None, token_rank=token_rank, text_layers=text_layers)
        model.token_basis.copy_(torch.linalg.svd(instance_states, full_matrices=False).U[:, :token_rank])
        return model.eval()

    def _encode_responses(self, z: Tensor) -> Tensor:  # (N, d_w, n_tokens) → (N, r_t)
        if self.token_rank is not None:
            z = z @ self.token_basis                                  # (N, d_w, token_rank)
        if self.layer_norm:  # every layer gets one vote: their scales differ by orders of magnitude
            z = torch.cat([F.normalize(p.flatten(1), dim=-1).view_as(p) for p in z.split(self.d_ws, dim=1)], 1)
        if self.token_rank is not None:
            return z.flatten(1)
        z = self.V.T @ z
        return self.M((torch.relu(z) if self.relu else z).flatten(1))

    def responses(self, layers: list) -> Tensor:
        """ΔW·H_sᵀ of every read layer, stacked: (N, d_w, n_tokens). Each item dense (N,d_w,d_h) or factors."""
        return torch.cat([apply_update(x, self.probes.T) for x in layers], 1)

    def encode(self, layers: list) -> Tensor:
        return self._encode_responses(self.responses(layers))

    def text_input(self, encoder, prompts: list[str]) -> Tensor:
        """Token states of each caption, as long as the instance prompt's: (C, n_tokens, d_h)."""
        return encoder.token_states(prompts, self.n_tokens)

    def text_responses(self, text_states: Tensor) -> Tensor:
        """W·(H_c − H_s)ᵀ for class captions' token states (C, n_tokens, d_h) → (C, d_w, n_tokens)."""
        return self.root @ (text_states - self.probes).transpose(1, 2)

    def text_features(self, text_states: Tensor) -> Tensor:
        return F.normalize(self._text_layers_only(self.text_responses(text_states)), dim=-1)

    def _text_layers_only(self, z: Tensor) -> Tensor:
        encoded = self._encode_responses(z)
        if not all(self.text_layers):  # training-free only: each layer is a block of d_w · token_rank columns
            keep = torch.tensor(self.text_layers, dtype=encoded.dtype)
            encoded = encoded * keep.repeat_interleave(torch.tensor(self.d_ws) * self.token_rank)
        return encoded


def training_free_scores(responses: Tensor, text_responses: Tensor) -> Tensor:
    """cos(ΔW·H_sᵀ, W·(H_c − H_s)ᵀ) flattened over layers and tokens: (N, C). No training at all."""
    return F.normalize(responses.flatten(1), dim=-1) @ F.normalize(text_responses.flatten(1), dim=-1).T


def anchored_layer_names(layer_names: list[str]) -> list[str]:
    """The cross-attention key and value layers: where the caption enters the root."""
    return [n for n in sorted(layer_names) if n.endswith(("attn2.to_k", "attn2.to_v"))]
