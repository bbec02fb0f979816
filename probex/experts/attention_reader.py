"""The shipped expert: a LoRA read through its root's whole cross-attention blocks, with no training.

A DreamBooth-style LoRA is trained so that its instance prompt ("an emoji of sks") draws as its class. In each
cross-attention block of the root, it does so by changing the block's query, key, value and output projections; a
class caption changes the block's keys and values (its token states) instead. ``AttentionReader`` reads both as the
change of the block's attention output on fixed synthetic image features, and compares them by cosine: a class never
seen in training lands in the right place, because its text goes through the root's own fixed weights. SD 1.5 is read
the same way (probex.sd15).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from probex.experts.base import Expert, per_model

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # a cross-attention block's four projections


class Block(NamedTuple):
    """One cross-attention block as the reader reads it: where its projections are among the read layers (−1: not
    read, it stays the root's), its heads and widths."""
    q: int
    k: int
    v: int
    out: int
    heads: int
    inner: int        # width of its queries, keys and values
    width: int        # its output width
    query_width: int  # width of the image features it attends from


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

    ``blocks``: one ``Block`` per attention block (config.json stores each as its eight numbers): the indices of its
    to_q, to_k, to_v, to_out.0 among the read layers (−1 for a projection not read: it stays the root's), then its
    heads, inner width, output width and query width.
    Block i's features and root weights are the buffers x{i}, wq{i}, wk{i}, wv{i}, wo{i}.
    A read layer handed as None is one the LoRA does not adapt: that projection stays the root's.
    """

    absent_layers_unchanged = True

    def __init__(self, blocks: list[list[int]], n_queries: int, n_tokens: int, d_h: int):
        self.blocks = [Block(*map(int, b)) for b in blocks]
        self.n_queries, self.n_tokens, self.d_h = n_queries, n_tokens, d_h
        super().__init__(n_queries * sum(b.width for b in self.blocks), "align", None, d_h, None)
        del self.text_head  # the text side is the root's own weights, see text_features
        self.r_t = n_queries * sum(b.width for b in self.blocks)
        self.register_buffer("probes", torch.zeros(n_tokens, d_h))   # H_s: instance-prompt token states
        for i, b in enumerate(self.blocks):
            self.register_buffer(f"x{i}", torch.zeros(n_queries, b.query_width))   # synthetic image features
            self.register_buffer(f"wq{i}", torch.zeros(b.inner, b.query_width))
            self.register_buffer(f"wk{i}", torch.zeros(b.inner, d_h))
            self.register_buffer(f"wv{i}", torch.zeros(b.inner, d_h))
            self.register_buffer(f"wo{i}", torch.zeros(b.width, b.inner))

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
        for i, (q_at, k_at, v_at, o_at, heads, *_) in enumerate(self.blocks):
            x, wo, q, keys, values, base = self._root_block(i)
            if adapted(q_at):
                q = q + apply_update(layers[q_at], x.T).transpose(1, 2)
            if adapted(k_at):
                keys = keys + apply_update(layers[k_at], self.probes.T)
            if adapted(v_at):
                values = values + apply_update(layers[v_at], self.probes.T)
            mixed = _attend(q.expand(n, -1, -1), keys.expand(n, -1, -1), values.expand(n, -1, -1), heads)
            changed = mixed @ wo.T
            if adapted(o_at):
                changed = changed + apply_update(layers[o_at], mixed.transpose(1, 2)).transpose(1, 2)
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
            out.append(_attend((x @ wq.T)[None].expand(len(h_c), -1, -1), wk @ h_c, wv @ h_c, block.heads) @ wo.T)
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
        return x, wo, q, keys, values, _attend(q, keys, values, self.blocks[i].heads) @ wo.T

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
        """``text_features`` from block outputs already computed (``text_outputs``, any float dtype): the same
        operations as ``_read(output_changes(outputs))``, so the same numbers, written block by block into one tensor
        (SD 1.5's caption outputs are large: no second copy of all of them)."""
        out = torch.empty(len(outputs[0]), self.r_t)
        start = 0
        for i, o in enumerate(outputs):
            part = out[:, start:start + o[0].numel()]
            part.copy_(o.flatten(1)).sub_(self._root_block(i)[-1].flatten(1))
            part.div_(part.norm(dim=1, keepdim=True).clamp_min(1e-12)).div_(len(outputs) ** 0.5)
            start += o[0].numel()
        return out


def apply_update(x, inputs: Tensor) -> Tensor:
    """ΔW·inputs for one read layer's item — dense (N, d_out, d_in) or LoRA factors — and inputs (d_in, T) or
    (N, d_in, T): (N, d_out, T), without forming B·A for factors."""
    if isinstance(x, Tensor):
        return x @ inputs
    up, down, scale = x
    return up @ (down @ inputs) * per_model(scale, up)


def _attend(q: Tensor, keys: Tensor, values: Tensor, heads: int) -> Tensor:
    """Multi-head scaled dot-product attention: q (B, n, inner), keys / values (B, inner, T) → (B, n, inner)."""
    b, n, inner = q.shape
    t, d = keys.shape[-1], inner // heads
    weights = torch.softmax(torch.einsum("bnhd,bhdt->bhnt", q.reshape(b, n, heads, d),
                                         keys.reshape(b, heads, d, t)) * d**-0.5, dim=-1)
    return torch.einsum("bhnt,bhdt->bnhd", weights, values.reshape(b, heads, d, t)).reshape(b, n, inner)
