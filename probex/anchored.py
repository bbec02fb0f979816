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

``AttentionReader`` takes the same idea from one layer to a whole cross-attention block: the LoRA's updates of its
query, key, value and output projections against a caption's tokens, both read as the change of the block's output
on fixed synthetic image features (what the emoji bundle ships; README, "How it works").
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Expert, _per_model


PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # a cross-attention block's four projections


class AttentionReader(Expert):
    """Training-free: a LoRA's and a caption's change read through the root's whole cross-attention blocks.

    Per block, fixed synthetic image features X (Gaussian, drawn once at build time and stored) are the queries; the
    keys and values come from the instance prompt's token states H_s ("an emoji of sks"). The reading of a block is
    how its attention output changes:
    - a LoRA changes its projections: (W_o + ΔW_o)·attn((W_q + ΔW_q)·X, (W_k + ΔW_k)·H_s, (W_v + ΔW_v)·H_s) minus the
      root's W_o·attn(W_q·X, W_k·H_s, W_v·H_s);
    - a caption changes the tokens: W_o·attn(W_q·X, W_k·H_c, W_v·H_c) minus the same root output.
    A DreamBooth LoRA learns to make "sks" draw as its class, so it moves the blocks' outputs the way the class's
    caption does. Each block's change (n_queries × output width) is scaled to unit norm and the blocks are
    concatenated; encodings and captions meet by cosine. The softmax lets key, value, query and output changes act
    together, as they do when the root draws. No images, no training.

    ``blocks``: per attention block [q, k, v, out] — the indices of its to_q, to_k, to_v, to_out.0 among the read
    layers (−1 for a projection not read: it stays the root's) — then heads, inner width, output width, query width.
    Block i's features and root weights are the buffers x{i}, wq{i}, wk{i}, wv{i}, wo{i}.
    A read layer handed as None is one the LoRA does not adapt: that projection stays the root's.
    """

    absent_layers_unchanged = True

    def __init__(self, blocks: list[list[int]], n_queries: int, n_tokens: int, d_h: int):
        self.blocks = [[int(x) for x in b] for b in blocks]
        self.n_queries, self.n_tokens, self.d_h = n_queries, n_tokens, d_h
        super().__init__(n_queries * sum(b[6] for b in self.blocks), "align", None, d_h, None)
        del self.text_head  # the text side is the root's own weights, see text_features
        self.r_t = n_queries * sum(b[6] for b in self.blocks)
        self.register_buffer("probes", torch.zeros(n_tokens, d_h))   # H_s: instance-prompt token states
        for i, (*_, inner, out, query) in enumerate(self.blocks):
            self.register_buffer(f"x{i}", torch.zeros(n_queries, query))   # the block's synthetic image features
            self.register_buffer(f"wq{i}", torch.zeros(inner, query))
            self.register_buffer(f"wk{i}", torch.zeros(inner, d_h))
            self.register_buffer(f"wv{i}", torch.zeros(inner, d_h))
            self.register_buffer(f"wo{i}", torch.zeros(out, inner))

    @classmethod
    def from_root(cls, unet, names: list[str], instance_states: Tensor, n_queries: int, seed: int = 0,
                  scale: float = 4.0) -> "AttentionReader":
        """The cross-attention blocks of ``unet`` (a loaded diffusers UNet) whose to_k and to_v are both among
        ``names``; see ``from_weights``."""
        weights, heads = {}, {}
        for name in names:
            if name.endswith(".to_k"):
                attn = unet.get_submodule(name[:-len(".to_k")])
                heads[name[:-len("to_k")]] = attn.heads
                for p in PROJECTIONS:
                    weights[name[:-len("to_k")] + p] = attn.get_submodule(p).weight.detach()
        return cls.from_weights(weights, heads, names, instance_states, n_queries, seed, scale)

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], heads: dict[str, int], names: list[str],
                     instance_states: Tensor, n_queries: int, seed: int = 0, scale: float = 4.0) -> "AttentionReader":
        """The cross-attention blocks whose to_k and to_v are both among ``names`` (the layers the expert reads, in
        the order it is handed them); their to_q / to_out.0 are read where ``names`` has them.

        ``weights``: the root's projection matrices by module name (all four of every such block); ``heads``: each
        block's head count by its prefix ("….attn2."). ``scale``: the standard deviation of the synthetic image
        features (rounded to fp16 precision, so the saved expert stores them losslessly in fp16, as it does the
        root's fp16 weights)."""
        blocks, block_weights = [], []
        for name in names:
            prefix = name[:-len("to_k")]
            if not (name.endswith(".to_k") and prefix + "to_v" in names):
                continue
            wq, wk, wv, wo = (weights[prefix + p] for p in PROJECTIONS)
            at = [names.index(prefix + p) if prefix + p in names else -1 for p in PROJECTIONS]
            blocks.append(at + [heads[prefix], wq.shape[0], wo.shape[0], wq.shape[1]])
            block_weights.append([wq, wk, wv, wo])
        if not blocks:
            raise ValueError("no cross-attention block has both its to_k and to_v among the read layers")
        reader = cls(blocks, n_queries, *instance_states.shape)
        reader.probes.copy_(instance_states)
        g = torch.Generator().manual_seed(seed)
        for i, (wq, wk, wv, wo) in enumerate(block_weights):
            x = scale * torch.randn(n_queries, wq.shape[1], generator=g)
            getattr(reader, f"x{i}").copy_(x.half().float())  # at fp16 precision: stored in half the bytes
            for kind, w in zip("qkvo", (wq, wk, wv, wo)):
                getattr(reader, f"w{kind}{i}").copy_(w.detach())
        return reader.eval()

    def changes(self, layers: list) -> list[Tensor]:
        """Per block the change of its attention output, (N, n_queries, output width): each read layer's item is
        dense (N, d_out, d_in), factors, or None (not adapted)."""
        given = [x for x in layers if x is not None]
        if not given:
            raise ValueError("no read layer given: nothing changes")
        n = len(given[0][0] if isinstance(given[0], tuple) else given[0])
        adapted = lambda at: at >= 0 and layers[at] is not None  # noqa: E731
        out = []
        for i, (q_at, k_at, v_at, o_at, heads, *_rest) in enumerate(self.blocks):
            x, wo, q, keys, values, base = self._root_block(i)
            if adapted(q_at):
                q = q + _apply(layers[q_at], x.T).transpose(1, 2)
            if adapted(k_at):
                keys = keys + _apply(layers[k_at], self.probes.T)
            if adapted(v_at):
                values = values + _apply(layers[v_at], self.probes.T)
            mixed = _attend(q.expand(n, -1, -1), keys.expand(n, -1, -1), values.expand(n, -1, -1), heads)
            changed = mixed @ wo.T
            if adapted(o_at):
                changed = changed + _apply(layers[o_at], mixed.transpose(1, 2)).transpose(1, 2)
            out.append(changed - base)
        return out

    def text_changes(self, text_states: Tensor) -> list[Tensor]:
        """Per block the change a caption's token states (C, n_tokens, d_h) ask of its output: (C, n_queries, out)."""
        return self.output_changes(self.text_outputs(text_states))

    def text_outputs(self, text_states: Tensor) -> list[Tensor]:
        """Per block the root's attention output on a caption's token states: (C, n_queries, out). It does not depend
        on the instance prompt, so readers that differ only in their probes (``with_probes``) can share it."""
        out, h_c = [], text_states.transpose(1, 2)
        for i, block in enumerate(self.blocks):
            x, wq, wk, wv, wo = (getattr(self, f"{k}{i}") for k in ("x", "wq", "wk", "wv", "wo"))
            out.append(_attend((x @ wq.T)[None].expand(len(h_c), -1, -1), wk @ h_c, wv @ h_c, block[4]) @ wo.T)
        return out

    def output_changes(self, outputs: list[Tensor]) -> list[Tensor]:
        """Block outputs (``text_outputs``) as changes of the root's output on the instance prompt."""
        return [o - self._root_block(i)[-1] for i, o in enumerate(outputs)]

    def with_probes(self, instance_states: Tensor) -> "AttentionReader":
        """The same reader with another instance prompt's token states (n_tokens, d_h); the root's weights and the
        synthetic features are shared, not copied."""
        if tuple(instance_states.shape) != tuple(self.probes.shape):
            raise ValueError(f"instance states of shape {tuple(instance_states.shape)}; this reader takes "
                             f"{tuple(self.probes.shape)}")
        reader = copy.copy(self)
        reader._buffers = {**self._buffers, "probes": instance_states.to(self.probes)}
        return reader

    def _root_block(self, i: int) -> tuple[Tensor, ...]:
        """Block i as the root has it on the instance prompt: its features x, output weight, queries (1, n, inner),
        keys and values (1, inner, T), and attention output (1, n, out) — what both readings change."""
        x, wq, wk, wv, wo = (getattr(self, f"{k}{i}") for k in ("x", "wq", "wk", "wv", "wo"))
        h_s = self.probes.T
        q, keys, values = (x @ wq.T)[None], (wk @ h_s)[None], (wv @ h_s)[None]
        return x, wo, q, keys, values, _attend(q, keys, values, self.blocks[i][4]) @ wo.T

    def _read(self, changes: list[Tensor]) -> Tensor:  # each block at unit norm, concatenated: a unit vector
        return torch.cat([F.normalize(c.flatten(1), dim=-1) for c in changes], 1) / len(changes) ** 0.5

    def encode(self, layers: list) -> Tensor:
        return self._read(self.changes(layers))

    def text_input(self, encoder, prompts: list[str]) -> Tensor:
        """Token states of each caption, as long as the instance prompt's: (C, n_tokens, d_h)."""
        return encoder.token_states(prompts, self.n_tokens)

    def text_features(self, text_states: Tensor) -> Tensor:
        return self._read(self.text_changes(text_states))

    def features_of_outputs(self, outputs: list[Tensor]) -> Tensor:
        """``text_features`` from block outputs already computed (``text_outputs``)."""
        return self._read(self.output_changes(outputs))

    def config(self) -> dict:
        return dict(blocks=self.blocks, n_queries=self.n_queries, n_tokens=self.n_tokens, d_h=self.d_h)


def _apply(x, inputs: Tensor) -> Tensor:
    """ΔW·inputs for one read layer's item — dense (N, d_out, d_in) or LoRA factors — and inputs (d_in, T) or
    (N, d_in, T): (N, d_out, T), without forming B·A for factors."""
    if isinstance(x, Tensor):
        return x @ inputs
    up, down, scale = x
    return up @ (down @ inputs) * _per_model(scale, up)


def _attend(q: Tensor, keys: Tensor, values: Tensor, heads: int) -> Tensor:
    """Multi-head scaled dot-product attention: q (B, n, inner), keys / values (B, inner, T) → (B, n, inner)."""
    b, n, inner = q.shape
    t, d = keys.shape[-1], inner // heads
    weights = torch.softmax(torch.einsum("bnhd,bhdt->bhnt", q.reshape(b, n, heads, d),
                                         keys.reshape(b, heads, d, t)) * d**-0.5, dim=-1)
    return torch.einsum("bhnt,bhdt->bnhd", weights, values.reshape(b, heads, d, t)).reshape(b, n, inner)


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
        return torch.cat([_apply(x, self.probes.T) for x in layers], 1)

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

    def config(self) -> dict:
        return dict(d_ws=self.d_ws, d_h=self.d_h, n_tokens=self.n_tokens, r_v=self.r_v, r_t=self.r_t, relu=self.relu,
                    temperature=self.temperature, text_dim=self.d_h, layer_norm=self.layer_norm,
                    token_rank=self.token_rank, text_layers=self.text_layers)


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

    for cls in (AnchoredProbeX, AttentionReader):
        model.EXPERTS.setdefault(cls.__name__, cls)


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
