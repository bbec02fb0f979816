"""Root-anchored ProbeX: zero-shot text alignment that borrows the tree root's own cross-attention weights.

A DreamBooth-style LoRA is trained with a prompt that lacks the class name ("an emoji of sks"). What it learns, in a
cross-attention key/value layer with root weight W, is to make the instance prompt act like the class caption:
    ΔW · h_sks  ≈  W · (h_class − h_sks)        (per token of the prompt)
Both sides of that relation live in the same space, the layer's output space, one column per prompt token. So:
- the weight side is ProbeX with its probes set to the instance prompt's token states: responses Z = Vᵀ·ΔW·H_sᵀ;
- the text side pushes a caption through the ROOT's weight: T(c) = Vᵀ·W·(H_c − H_s)ᵀ, i.e. "the change of this
  layer's output the caption asks for";
- one shared encoder (σ, then the per-probe encoders M) maps both to r_T, and logits are cosines.
A class never seen in training still lands in the right place: its text goes through the root's fixed W and the
same encoder as every LoRA. With V = I, M = I, no σ this is a training-free score; training fits V and M.

Several layers (e.g. every attn2 to_k / to_v) are read at once: their responses are concatenated along d_W, each
scaled to unit norm first (``layer_norm``): the layers' scales differ by orders of magnitude, and concatenated raw the
largest would decide alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Expert, _per_model


class AttentionProbes(nn.Module):
    """A caption's or a LoRA's change read through the root's cross-attention rather than one linear layer at a time.

    Fixed synthetic queries — Gaussian image features through each block's to_q, drawn once at build time and stored —
    attend over the instance prompt's keys and values, once as the root has them (K_s = W_k·H_sᵀ, V_s = W_v·H_sᵀ) and
    once changed: by a LoRA (K_s + ΔW_k·H_sᵀ, V_s + ΔW_v·H_sᵀ) or by a caption (W_k·H_cᵀ = K_s + W_k·(H_c − H_s)ᵀ, the
    same for V). The reading is the change of the attention output through to_out, each block at unit norm. The
    softmax lets a key change and a value change act together, as they do when the root draws; no images, no training.
    ``blocks``: one [k layer index, v layer index, heads, inner width, output width] per attention block."""

    def __init__(self, blocks: list[list[int]], n_queries: int):
        super().__init__()
        self.blocks, self.n_queries = [[int(x) for x in b] for b in blocks], n_queries
        self.register_buffer("queries", torch.zeros(n_queries, sum(b[3] for b in self.blocks)))   # to_q applied
        self.register_buffer("out", torch.zeros(sum(b[4] for b in self.blocks), max(b[3] for b in self.blocks)))
        self.dim = n_queries * sum(b[4] for b in self.blocks)

    def fill(self, to_q: list[Tensor], to_out: list[Tensor], seed: int, scale: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.queries.copy_(torch.cat([scale * torch.randn(self.n_queries, w.shape[1], generator=g) @ w.T for w in to_q], 1))
        row = 0
        for (_, _, _, inner, out), w in zip(self.blocks, to_out):
            self.out[row:row + out, :inner] = w
            row += out

    def read(self, changes: list[Tensor], base: list[Tensor]) -> Tensor:
        """changes: per read layer (B, d_w, T) changes of its output on the instance prompt; base: per layer the
        root's (d_w, T). → (B, dim): per block the change of its attention output, each block at unit norm."""
        parts, q_at, out_at = [], 0, 0
        for k, v, heads, inner, out in self.blocks:
            q = self.queries[:, q_at:q_at + inner].reshape(self.n_queries, heads, inner // heads)
            w_out = self.out[out_at:out_at + out, :inner]
            q_at, out_at = q_at + inner, out_at + out
            changed = self._attend(q, base[k] + changes[k], base[v] + changes[v], heads) @ w_out.T
            parts.append(F.normalize((changed - self._attend(q, base[k][None], base[v][None], heads) @ w_out.T)
                                     .flatten(1), dim=-1))
        return torch.cat(parts, 1)

    @staticmethod
    def _attend(q: Tensor, keys: Tensor, values: Tensor, heads: int) -> Tensor:  # → (B, n_queries, inner)
        b, inner, t = keys.shape
        kh, vh = keys.reshape(b, heads, inner // heads, t), values.reshape(b, heads, inner // heads, t)
        weights = torch.softmax(torch.einsum("qhd,bhdt->bhqt", q, kh) * (inner // heads) ** -0.5, dim=-1)
        return torch.einsum("bhqt,bhdt->bqhd", weights, vh).reshape(b, q.shape[0], inner)


def attention_blocks(unet, names: list[str]) -> tuple[list[list[int]], list[Tensor], list[Tensor]]:
    """The cross-attention blocks whose to_k and to_v are both among ``names``: AttentionProbes' block list, and each
    block's to_q and to_out.0 weights."""
    blocks, to_q, to_out = [], [], []
    for i, name in enumerate(names):
        prefix = name[:-len("to_k")]
        if name.endswith(".to_k") and prefix + "to_v" in names:
            attn = unet.get_submodule(prefix[:-1])
            blocks.append([i, names.index(prefix + "to_v"), attn.heads, attn.to_k.weight.shape[0],
                           attn.to_out[0].weight.shape[0]])
            to_q.append(attn.to_q.weight.detach())
            to_out.append(attn.to_out[0].weight.detach())
    return blocks, to_q, to_out


class AnchoredProbeX(Expert):
    def __init__(self, d_ws: list[int], d_h: int, n_tokens: int, r_v: int = 64, r_t: int = 128, relu: bool = True,
                 temperature: float | None = 0.1, text_dim: int | None = None, layer_norm: bool = False,
                 token_rank: int | None = None, text_layers: list[bool] | None = None, attention: dict | None = None):
        d_w = sum(d_ws)
        if attention is not None and token_rank is None:
            raise ValueError("attention probes are part of the training-free expert (token_rank set)")
        probes = AttentionProbes(attention["blocks"], attention["n_queries"]) if attention else None
        if token_rank is not None:  # training-free: the encoding is the responses themselves, nothing to choose
            r_t = d_w * token_rank + (probes.dim if probes else 0)
        super().__init__(r_t, "align", None, text_dim or d_h, temperature)
        del self.text_head  # the text side is the root's own weights, see text_features
        self.d_ws, self.d_h, self.n_tokens, self.r_v, self.r_t, self.relu = list(d_ws), d_h, n_tokens, r_v, r_t, relu
        self.layer_norm, self.token_rank = layer_norm, token_rank
        self.text_layers = [bool(t) for t in text_layers] if text_layers is not None else [True] * len(self.d_ws)
        if len(self.text_layers) != len(self.d_ws) or not (any(self.text_layers) or attention):
            raise ValueError("text_layers needs one flag per read layer, at least one of them set")
        self.attention_config, self.attention = attention, probes
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
                      text_layers: list[bool] | None = None, attention: dict | None = None) -> "AnchoredProbeX":
        """No learning: V = I, no σ, and instead of all n_tokens columns of ΔW·H_sᵀ, its projection on the instance
        prompt's ``token_rank`` principal token directions P (top left singular vectors of H_s): ΔW·H_sᵀ·P, which
        is ΔW applied to H_s's top principal directions, each weighted by its singular value. Each layer is scaled to
        unit norm, and cosines between encodings are exact — no random projection. A caption's text side is
        W·(H_c − H_s)ᵀ·P on the ``text_layers`` (default all), zero on the others: those then only help tell LoRAs
        apart (nearest models, class means), not read text. Encoding size: Σ d_w · token_rank.

        ``attention`` (optional): dict(blocks, to_q, to_out — from ``attention_blocks`` —, n_queries, seed, scale,
        weight) adds AttentionProbes' reading of the same changes: the encoding is then [the reading above at unit
        norm, ``weight`` × the attention reading at unit norm]; the text side is the attention reading alone when no
        text layer is set."""
        if not 1 <= token_rank <= min(instance_states.shape):
            raise ValueError(f"token_rank must be between 1 and {min(instance_states.shape)}, got {token_rank}")
        spec = None if attention is None else {k: attention[k] for k in ("blocks", "n_queries", "weight")}
        model = cls.from_root(root_weights, instance_states, r_v=sum(w.shape[0] for w in root_weights), relu=False,
                              temperature=None, token_rank=token_rank, text_layers=text_layers, attention=spec)
        model.token_basis.copy_(torch.linalg.svd(instance_states, full_matrices=False).U[:, :token_rank])
        if attention is not None:
            model.attention.fill(attention["to_q"], attention["to_out"], attention["seed"], attention["scale"])
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
        parts = []
        for x in layers:
            if isinstance(x, Tensor):
                parts.append(x @ self.probes.T)
            else:
                up, down, scale = x
                parts.append(up @ (down @ self.probes.T) * _per_model(scale, up))
        return torch.cat(parts, 1)

    def encode(self, layers: list) -> Tensor:
        return self._with_attention(self.responses(layers), self._encode_responses)

    def _with_attention(self, z: Tensor, read) -> Tensor:
        """read(z), and where the expert has attention probes: [read(z) at unit norm, weight × their reading]."""
        if self.attention is None:
            return read(z)
        base = (self.root @ self.probes.T).split(self.d_ws)
        return torch.cat([F.normalize(read(z), dim=-1),
                          self.attention_config["weight"] * self.attention.read(list(z.split(self.d_ws, 1)), base)
                          / len(self.attention.blocks) ** 0.5], 1)

    def text_input(self, encoder, prompts: list[str]) -> Tensor:
        """Token states of each caption, as long as the instance prompt's: (C, n_tokens, d_h)."""
        return encoder.token_states(prompts, self.n_tokens)

    def text_responses(self, text_states: Tensor) -> Tensor:
        """W·(H_c − H_s)ᵀ for class captions' token states (C, n_tokens, d_h) → (C, d_w, n_tokens)."""
        return self.root @ (text_states - self.probes).transpose(1, 2)

    def text_features(self, text_states: Tensor) -> Tensor:
        return F.normalize(self._with_attention(self.text_responses(text_states), self._text_layers_only), dim=-1)

    def _text_layers_only(self, z: Tensor) -> Tensor:
        encoded = self._encode_responses(z)
        if not all(self.text_layers):  # training-free only: each layer is a block of d_w · token_rank columns
            keep = torch.tensor(self.text_layers, dtype=encoded.dtype)
            encoded = encoded * keep.repeat_interleave(torch.tensor(self.d_ws) * self.token_rank)
        return encoded

    def config(self) -> dict:
        return dict(d_ws=self.d_ws, d_h=self.d_h, n_tokens=self.n_tokens, r_v=self.r_v, r_t=self.r_t, relu=self.relu,
                    temperature=self.temperature, text_dim=self.d_h, layer_norm=self.layer_norm,
                    token_rank=self.token_rank, text_layers=self.text_layers, attention=self.attention_config)


def training_free_scores(responses: Tensor, text_responses: Tensor) -> Tensor:
    """cos(ΔW·H_sᵀ, W·(H_c − H_s)ᵀ) flattened over layers and tokens: (N, C). No training at all."""
    return F.normalize(responses.flatten(1), dim=-1) @ F.normalize(text_responses.flatten(1), dim=-1).T


class LayerStack:
    """Several cached layers of the same models, read together (what ``train.train_expert`` takes as data)."""

    def __init__(self, layers: list):
        self.layers = layers  # probex.train.LayerData, one per read layer

    @classmethod
    def from_cache(cls, cache, names: list[str]) -> "LayerStack":
        from .train import LayerData

        return cls([LayerData.from_cache(cache, n) for n in names])

    def __len__(self) -> int:
        return len(self.layers[0])

    def take(self, idx: Tensor) -> list:
        return [layer.take(idx) for layer in self.layers]

    def encode(self, expert, idx: Tensor) -> Tensor:
        return expert.encode(self.take(idx))


def anchored_layer_names(layer_names: list[str]) -> list[str]:
    """The cross-attention key and value layers: where the caption enters the root."""
    return [n for n in sorted(layer_names) if n.endswith(("attn2.to_k", "attn2.to_v"))]


def _register():
    from . import model

    model.EXPERTS.setdefault(AnchoredProbeX.__name__, AnchoredProbeX)


_register()



def fit_anchored(cache, names: list[str], root_weights: dict[str, Tensor], instance_states: Tensor,
                 class_states: Tensor, config=None, relu: bool = True):
    """Train a root-anchored expert on the cached ``names`` layers with ``train.train_expert`` (best epoch on val).

    root_weights: the root's matrix per layer name; instance_states (n_tokens, d_h); class_states (C, n_tokens, d_h),
    one row per class of the cache. Returns (FitResult, LayerStack)."""
    from .train import PAPER, task_targets, train_expert

    torch.manual_seed((config or PAPER).seed)
    model = AnchoredProbeX.from_root([root_weights[n] for n in names], instance_states, relu=relu)
    data = LayerStack.from_cache(cache, names)
    return train_expert(model, data, task_targets(cache, "align", class_states), config or PAPER), data
