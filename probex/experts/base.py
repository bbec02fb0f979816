"""What every tree expert shares: the layer inputs it takes, a head, its config and its files.

An expert reads a layer's weights — dense (N, d_W, d_H) or LoRA factors (up (N, d_W, r), down (N, r, d_H), scale (N,),
ranks zero-padded to a common r) — into encodings (N, r_T), and a head turns encodings into class logits, label
logits or cosines to text. Every subclass is registered by name when it is defined, and its ``__init__`` arguments
are recorded by name as it is built (``config``), so ``save_pretrained`` writes config.json + model.safetensors and
``load_expert`` builds the same class back from them. Nothing is ever unpickled.
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from probex.errors import InputError, ProbexError

HEADS = ("multiclass", "multilabel", "align")

Factors = tuple[Tensor, Tensor, Tensor]
LayerInput = Tensor | Factors

EXPERTS: dict[str, type["Expert"]] = {}   # class name → class, filled as each expert class is defined


def dense_from_factors(x: LayerInput) -> Tensor:
    """(N, d_W, d_H) weights; forms scale·B·A only when handed factors (the baselines need the matrix itself)."""
    if isinstance(x, Tensor):
        return x
    up, down, scale = x
    # scale applied to B (d_W×r), not to the product (d_W×d_H): the same matrix for far fewer multiplies
    return torch.bmm(up * per_model(scale, up), down)


def per_model(scale: Tensor | float, like: Tensor) -> Tensor:
    """scale broadcast over a (N, a, b) batch."""
    return torch.as_tensor(scale, dtype=like.dtype).reshape(-1, 1, 1)


def matrix_shape(x: LayerInput) -> tuple[int, int]:
    if isinstance(x, Tensor):
        return tuple(x.shape[1:])
    up, down, _ = x
    return up.shape[1], down.shape[2]


def check_shape(x: LayerInput, d_w: int, d_h: int) -> None:
    if matrix_shape(x) != (d_w, d_h):
        raise InputError(f"this expert reads {d_w}×{d_h} layers, got {'×'.join(map(str, matrix_shape(x)))}")


class Expert(nn.Module):
    """A head on top of ``encode``, and config.json + model.safetensors persistence.

    Parameters (of every expert's head):
        r_t: width of the encodings.
        head: "multiclass" | "multilabel" (a Linear to ``n_out`` outputs) or "align" (a Linear from ``text_dim``-wide
            text embeddings to r_t on the text side; logits are cosines, × 1/temperature if set), or None: an
            encoder read inside another expert, which holds the head (probex.experts.stacked).
    """

    # whether a read layer that a LoRA does not adapt can be handed to `encode` as None (that layer unchanged)
    absent_layers_unchanged = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        EXPERTS[cls.__name__] = cls
        cls.__init__ = _recording_config(cls.__init__)

    def __init__(self, r_t: int, head: str, n_out: int | None, text_dim: int | None, temperature: float | None):
        super().__init__()
        if head is not None and head not in HEADS:
            raise ValueError(f"head must be one of {HEADS} or None, got {head!r}")
        if head is None:
            pass
        elif head == "align":
            if not text_dim:
                raise ValueError("the align head needs text_dim")
            self.text_head = nn.Linear(text_dim, r_t)
        else:
            if not n_out:
                raise ValueError(f"the {head} head needs n_out")
            self.head = nn.Linear(r_t, n_out)
        self.head_kind, self.temperature = head, temperature

    def encode(self, x) -> Tensor:
        raise NotImplementedError

    def text_input(self, encoder, prompts: list[str]) -> Tensor:
        """What this expert's text side reads for these prompts (here one sentence embedding each)."""
        return encoder.embed(prompts)

    def text_features(self, text_emb: Tensor) -> Tensor:
        """Class text embeddings (C, text_dim) → unit vectors in the representation space (C, r_T)."""
        return F.normalize(self.text_head(text_emb), dim=-1)

    def logits(self, e: Tensor, text_emb: Tensor | None = None) -> Tensor:
        """Head on encodings: class / label logits, or cosine to each class text (× 1/temperature if set)."""
        if self.head_kind != "align":
            return self.head(e)
        if text_emb is None:
            raise ValueError("the align head needs class text embeddings")
        cos = F.normalize(e, dim=-1) @ self.text_features(text_emb).T
        return cos / self.temperature if self.temperature else cos

    def forward(self, x, text_emb: Tensor | None = None) -> Tensor:
        return self.logits(self.encode(x), text_emb)

    # -- persistence: configuration is data, weights are safetensors; nothing is unpickled -------------------------
    def config(self) -> dict:
        """The ``__init__`` arguments this expert was built with, by name (defaults included)."""
        return dict(self._config)

    def head_config(self) -> dict:
        return {k: self._config[k] for k in ("head", "n_out", "text_dim", "temperature") if k in self._config}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"class": type(self).__name__, **self.config()}, indent=2))
        save_file({k: compact(v.detach()) for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Expert":
        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text())
            state = load_file(str(directory / "model.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:  # missing file, bad JSON, bad safetensors header
            raise ProbexError(f"cannot load expert from {directory}: {exc}") from None
        kind = config.pop("class", cls.__name__)
        expert_cls = EXPERTS.get(kind)
        if expert_cls is None or not issubclass(expert_cls, cls):
            raise ProbexError(f"{directory}/config.json describes a {kind}, not a {cls.__name__}")
        expert = expert_cls(**config)
        expert.load_state_dict(state)
        return expert.eval()


def _recording_config(init):
    """``init`` that also keeps the arguments it was called with, by name, when it builds the object's own class
    (not when a subclass's ``__init__`` calls it through ``super``)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        if not hasattr(self, "_config_owner"):
            object.__setattr__(self, "_config_owner", init)
        init(self, *args, **kwargs)
        if self._config_owner is init:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            object.__setattr__(self, "_config", {k: v for k, v in list(bound.arguments.items())[1:]})
    return wrapped


def load_expert(directory: str | Path) -> Expert:
    """Any saved expert, its class read from config.json."""
    return Expert.from_pretrained(directory)


class CentredInput:
    """Tree-centred inputs (ProbeX and the dense expert): X read as (X − X̄) / s, with X̄ the mean layer of the
    training models and s the RMS Frobenius norm of X − X̄. Inside a tree every model carries the root's weights;
    what tells models apart is their small deviation from it. Buffers input_mean (d_W, d_H) and input_scale (),
    present only when the expert was built with centred=True."""

    def _init_centring(self, centred: bool) -> None:
        self.centred = centred
        if centred:
            self.register_buffer("input_mean", torch.zeros(self.d_w, self.d_h))
            self.register_buffer("input_scale", torch.ones(()))

    def set_input_stats(self, mean: Tensor, scale: Tensor | float) -> None:
        """X̄ and s (``input_stats``)."""
        if not self.centred:
            raise ValueError("this expert reads raw inputs (centred=False)")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if tuple(mean.shape) != (self.d_w, self.d_h) or not scale.item() > 0:
            raise ValueError(f"input stats must be a {self.d_w}×{self.d_h} mean and a positive scale")
        self.input_mean.copy_(mean)
        self.input_scale.copy_(scale)

    def centre_on(self, data, idx: Tensor) -> Tensor:
        """Set the input statistics from the models at ``idx`` of ``data`` (probex.data.LayerData); returns X̄."""
        mean, scale = input_stats(data, idx)
        self.set_input_stats(mean, scale)
        return mean


def dense_batches(data, idx: Tensor, batch_size: int = 16):
    """The models at `idx` as dense float64 matrices, a few at a time (a LoRA's scale·B·A is formed per batch)."""
    for b in idx.split(batch_size):
        yield dense_from_factors(data.take(b)).double()


def input_stats(data, idx: Tensor) -> tuple[Tensor, float]:
    """X̄, the mean layer of the models at `idx` (d_W, d_H), and s, the RMS Frobenius norm of X − X̄ over them: the
    centred inputs (X − X̄) / s are about unit norm whatever the layer's size and the tree's weight scale."""
    if len(idx) == 0:
        raise InputError("input statistics need at least one training model")
    total, squares = torch.zeros(data.shape, dtype=torch.float64), 0.0
    for x in dense_batches(data, idx):
        total += x.sum(0)
        squares += float(x.square().sum())
    mean = total / len(idx)
    var = squares / len(idx) - float(mean.square().sum())
    return mean.float(), max(var, 0.0) ** 0.5 or 1.0   # all models equal: nothing to scale


def compact(t: Tensor) -> Tensor:
    """fp32 tensors that fp16 holds exactly (a root's fp16 weights, features drawn at fp16 precision) are stored in
    fp16, half the bytes and nothing lost; load_state_dict casts them back into the fp32 buffers."""
    if t.dtype == torch.float32 and torch.equal(t.half().float(), t):
        t = t.half()
    return t.contiguous()
