"""ProbeX — a tree expert that reads ONE weight matrix (Horwitz et al., CVPR 2025, Eq. 4).

    X ∈ R^{d_W×d_H}                  a layer's weights (for a LoRA: X = scale · B·A, B = up, A = down)
    z_l = Vᵀ X u_l ∈ R^{r_V}          probe responses: r_U learned probes u_l (columns of U), shared projection V
    e   = Σ_l M_l σ(z_l) ∈ R^{r_T}    per-probe encoders M_l, σ = ReLU (identity for linear ProbeX)
    y   = head(e)                     class logits, label logits, or cosine to text embeddings

All r_U per-probe encoders are one Linear(r_V·r_U → r_T) over the flattened responses (the same map, one matmul).

Factor space. For a LoRA we never build B·A (d_W×d_H per model): Vᵀ(B A)U = (VᵀB)(AU), two thin products of width r.
That is exact, so a batch of different ranks can be zero-padded to the largest rank (padded columns of B and rows of A
are zero and add nothing).

Tree-centred inputs (``centred=True``, what probex.train sets up by default). Inside a tree every model carries the
root's weights; what tells models apart is their small deviation from it. A centred expert reads (X − X̄) / s: X̄ is the
mean layer of its training models and s the RMS Frobenius norm of X − X̄, both stored as buffers and set once by
`set_input_stats`. For ProbeX that is Vᵀ(X − X̄)U / s = (VᵀXU − VᵀX̄U) / s, so factor inputs stay in factor space.
The paper and its release read the raw weights (``centred=False``).

Paper defaults r_U = r_V = r_T = 128; the public release uses r_T = 512 for the representation.
Also here: the dense expert (Eq. 1, the baseline linear ProbeX factorises, Prop. 2) and StatNN (weight statistics).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from probex.errors import InputError, ProbexError

HEADS = ("multiclass", "multilabel", "align")

# A layer's weights as the experts take them: dense (N, d_W, d_H), or LoRA factors (up (N,d_W,r), down (N,r,d_H),
# scale (N,)) — ranks zero-padded to a common r.
Factors = tuple[Tensor, Tensor, Tensor]
LayerInput = Tensor | Factors


def dense_from_factors(x: LayerInput) -> Tensor:
    """(N, d_W, d_H) weights; forms scale·B·A only when handed factors (the baselines need the matrix itself)."""
    if isinstance(x, Tensor):
        return x
    up, down, scale = x
    # scale applied to B (d_W×r), not to the product (d_W×d_H): the same matrix for far fewer multiplies
    return torch.bmm(up * _per_model(scale, up), down)


def _per_model(scale: Tensor | float, like: Tensor) -> Tensor:
    """scale broadcast over a (N, a, b) batch."""
    return torch.as_tensor(scale, dtype=like.dtype).reshape(-1, 1, 1)


def _matrix_shape(x: LayerInput) -> tuple[int, int]:
    if isinstance(x, Tensor):
        return tuple(x.shape[1:])
    up, down, _ = x
    return up.shape[1], down.shape[2]


class Expert(nn.Module):
    """What every expert shares: a head on top of `encode`, and config.json + model.safetensors persistence."""

    # whether a read layer that a LoRA does not adapt can be handed to `encode` as None (that layer unchanged)
    absent_layers_unchanged = False

    def __init__(self, r_t: int, head: str, n_out: int | None, text_dim: int | None, temperature: float | None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "align":
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
        raise NotImplementedError

    def head_config(self) -> dict:
        align = self.head_kind == "align"
        return dict(head=self.head_kind, n_out=None if align else self.head.out_features,
                    text_dim=self.text_head.in_features if align else None, temperature=self.temperature)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"class": type(self).__name__, **self.config()}, indent=2))
        save_file({k: _compact(v.detach()) for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Expert":
        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text())
            state = load_file(str(directory / "model.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:  # missing file, bad JSON, bad safetensors header
            raise ProbexError(f"cannot load expert from {directory}: {exc}") from None
        kind = config.pop("class", cls.__name__)
        import probex.anchored  # noqa: F401  (registers the root-anchored experts)

        expert_cls = EXPERTS.get(kind)
        if expert_cls is None or not issubclass(expert_cls, cls):
            raise ProbexError(f"{directory}/config.json describes a {kind}, not a {cls.__name__}")
        expert = expert_cls(**config)
        expert.load_state_dict(state)
        return expert.eval()


class CentredInput:
    """The tree-centred input of ProbeX and the dense expert (module docstring): buffers input_mean (d_W, d_H) and
    input_scale (), present only when the expert was built with centred=True."""

    def _init_centring(self, centred: bool) -> None:
        self.centred = centred
        if centred:
            self.register_buffer("input_mean", torch.zeros(self.d_w, self.d_h))
            self.register_buffer("input_scale", torch.ones(()))

    def set_input_stats(self, mean: Tensor, scale: Tensor | float) -> None:
        """X̄ and s from the training models (probex.train.input_stats)."""
        if not self.centred:
            raise ValueError("this expert reads raw inputs (centred=False)")
        scale = torch.as_tensor(scale, dtype=torch.float32)
        if tuple(mean.shape) != (self.d_w, self.d_h) or not scale.item() > 0:
            raise ValueError(f"input stats must be a {self.d_w}×{self.d_h} mean and a positive scale")
        self.input_mean.copy_(mean)
        self.input_scale.copy_(scale)


def _compact(t: Tensor) -> Tensor:
    """fp32 tensors that fp16 holds exactly (a root's fp16 weights, features drawn at fp16 precision) are stored in
    fp16, half the bytes and nothing lost; load_state_dict casts them back into the fp32 buffers."""
    if t.dtype == torch.float32 and torch.equal(t.half().float(), t):
        t = t.half()
    return t.contiguous()


class ProbeX(CentredInput, Expert):
    def __init__(self, d_w: int, d_h: int, r_u: int = 128, r_v: int = 128, r_t: int = 128, relu: bool = True,
                 head: str = "multiclass", n_out: int | None = None, text_dim: int | None = None,
                 temperature: float | None = None, centred: bool = False):
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.d_w, self.d_h, self.r_u, self.r_v, self.r_t, self.relu = d_w, d_h, r_u, r_v, r_t, relu
        self._init_centring(centred)
        # Same scale as nn.Linear's default init, which the public release uses for probes and projection.
        self.U = nn.Parameter(torch.empty(d_h, r_u).uniform_(-1, 1) / math.sqrt(r_u))
        self.V = nn.Parameter(torch.empty(d_w, r_v).uniform_(-1, 1) / math.sqrt(d_w))
        self.M = nn.Linear(r_v * r_u, r_t)  # all per-probe encoders M_l at once

    def responses(self, x: LayerInput) -> Tensor:
        """Vᵀ X U for every model: (N, r_V, r_U)."""
        if _matrix_shape(x) != (self.d_w, self.d_h):
            raise InputError(f"this expert reads {self.d_w}×{self.d_h} layers, got {'×'.join(map(str, _matrix_shape(x)))}")
        if isinstance(x, Tensor):
            z = self.V.T @ (x @ self.U)
        else:
            up, down, scale = x
            # (VᵀB)(AU): r_V×r times r×r_U per model; B·A (d_W×d_H) is never formed. Each einsum is one GEMM over the
            # whole batch (batch folded into rows), faster than a batched product of many thin matrices. The scale
            # goes on the r×r_U factor, not on the r_V×r_U responses: r/r_V as many multiplies, forward and backward.
            left = torch.einsum("wv,nwr->nvr", self.V, up)
            right = torch.einsum("nrh,hu->nru", down, self.U) * _per_model(scale, up)
            z = left @ right
        if self.centred:
            z = (z - self.V.T @ self.input_mean @ self.U) / self.input_scale
        return z

    def encode(self, x: LayerInput) -> Tensor:
        z = self.responses(x)
        if self.relu:
            z = z.relu_()  # in place: no backward step reads the responses, so a second r_V×r_U copy is pure cost
        return self.M(z.flatten(1))

    def config(self) -> dict:
        return dict(d_w=self.d_w, d_h=self.d_h, r_u=self.r_u, r_v=self.r_v, r_t=self.r_t, relu=self.relu,
                    centred=self.centred, **self.head_config())


class DenseExpert(CentredInput, Expert):
    """Eq. 1: e_k = Σ_ij W_ijk X_ij + b_k, a Linear over the flattened matrix, then the same heads as ProbeX.

    With r_T ≥ the number of outputs the head adds nothing Eq. 1 cannot express; keeping the representation makes
    linear ProbeX and this expert comparable term by term (Prop. 2: ProbeX without ReLU is this W in Tucker form)."""

    def __init__(self, d_w: int, d_h: int, r_t: int = 128, head: str = "multiclass", n_out: int | None = None,
                 text_dim: int | None = None, temperature: float | None = None, ram_budget_gb: float = 4.0,
                 centred: bool = False):
        n_params = d_w * d_h * r_t
        # Training holds the weights, their gradients and Adam's two moments: four float32 copies.
        need_gb = 4 * 4 * n_params / 2**30
        if need_gb > ram_budget_gb:
            raise ProbexError(f"a dense expert on {d_w}×{d_h} layers with r_T={r_t} needs ~{need_gb:.1f} GB to train, "
                              f"over the {ram_budget_gb:g} GB budget")
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.d_w, self.d_h, self.r_t, self.ram_budget_gb = d_w, d_h, r_t, ram_budget_gb
        self.W = nn.Linear(d_w * d_h, r_t)
        self._init_centring(centred)

    def encode(self, x: LayerInput) -> Tensor:
        if _matrix_shape(x) != (self.d_w, self.d_h):
            raise InputError(f"this expert reads {self.d_w}×{self.d_h} layers, got {'×'.join(map(str, _matrix_shape(x)))}")
        x = dense_from_factors(x)
        if self.centred:
            x = (x - self.input_mean) / self.input_scale
        return self.W(x.flatten(1))

    @classmethod
    def from_linear_probex(cls, probex: ProbeX) -> "DenseExpert":
        """Prop. 2: W_ijk = Σ_lm V_im U_jl M[k, (m, l)], the dense tensor a linear ProbeX factorises."""
        if probex.relu:
            raise ValueError("only linear ProbeX (relu=False) is a factorised dense expert")
        dense = cls(probex.d_w, probex.d_h, probex.r_t, centred=probex.centred, **probex.head_config())
        M = probex.M.weight.detach().reshape(probex.r_t, probex.r_v, probex.r_u)
        W = torch.einsum("im,jl,kml->kij", probex.V.detach(), probex.U.detach(), M)
        head = {k: v for k, v in probex.state_dict().items() if k.split(".")[0] in ("head", "text_head")}
        inputs = {k: v for k, v in probex.state_dict().items() if k.startswith("input_")}
        dense.load_state_dict({"W.weight": W.reshape(probex.r_t, -1), "W.bias": probex.M.bias.detach(), **head,
                               **inputs})
        return dense

    def config(self) -> dict:
        return dict(d_w=self.d_w, d_h=self.d_h, r_t=self.r_t, ram_budget_gb=self.ram_budget_gb, centred=self.centred,
                    **self.head_config())


# ---- StatNN (Unterthiner et al. 2020): 7 statistics per layer -------------------------------------------------------
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
N_STATS = 2 + len(QUANTILES)


def weight_statistics(x: LayerInput, bias: Tensor | None = None, chunk: int = 64) -> Tensor:
    """(N, 7) mean, variance and 5 quantiles of each model's weights; (N, 14) with the biases' statistics too.

    For LoRAs the statistics are those of the product scale·B·A — the weight change the LoRA makes — which is
    formed here `chunk` models at a time (fine for the small layers StatNN is run on)."""
    n = x.shape[0] if isinstance(x, Tensor) else x[0].shape[0]
    rows = []
    for start in range(0, n, chunk):
        part = x[start:start + chunk] if isinstance(x, Tensor) else tuple(t[start:start + chunk] for t in x)
        rows.append(_seven_stats(dense_from_factors(part).flatten(1)))
    stats = torch.cat(rows)
    return torch.cat([stats, _seven_stats(bias.flatten(1))], 1) if bias is not None else stats


def _seven_stats(flat: Tensor) -> Tensor:
    q = torch.quantile(flat.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T.float()
    return torch.cat([flat.mean(1, keepdim=True), flat.var(1, keepdim=True), q], 1)


class StatNNClassifier:
    """StatNN for classification: weight statistics → gradient-boosted trees (sklearn); one model per label for
    multilabel targets. Plain fit / predict_scores, like scikit-learn."""

    def __init__(self, task: str = "multiclass", seed: int = 0, max_iter: int = 200):
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.multioutput import MultiOutputClassifier

        trees = HistGradientBoostingClassifier(max_iter=max_iter, random_state=seed)
        self.task = task
        self.model = MultiOutputClassifier(trees) if task == "multilabel" else trees

    def fit(self, features: Tensor | np.ndarray, y: Tensor | np.ndarray) -> "StatNNClassifier":
        self.model.fit(np.asarray(features), np.asarray(y))
        return self

    def predict_scores(self, features: Tensor | np.ndarray) -> np.ndarray:
        """(N, C) class probabilities (multiclass) or per-label probabilities of the positive label (multilabel)."""
        features = np.asarray(features)
        if self.task == "multilabel":
            return np.stack([p[:, 1] for p in self.model.predict_proba(features)], 1)
        return self.model.predict_proba(features)

    def predict(self, features: Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(np.asarray(features)))


class StatMLP(Expert):
    """StatNN's MLP variant for text alignment: standardised statistics (N, n_features) → MLP → r_T, align head.
    Its input is the precomputed `weight_statistics` table, so training never recomputes them."""

    def __init__(self, n_features: int, hidden: int = 256, r_t: int = 128, head: str = "align",
                 n_out: int | None = None, text_dim: int | None = None, temperature: float | None = None):
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.n_features, self.hidden, self.r_t = n_features, hidden, r_t
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, r_t))

    def fit_normaliser(self, features: Tensor) -> "StatMLP":
        """Statistics differ by orders of magnitude (variance vs mean): standardise with the training split's."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-12))
        return self

    def encode(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise InputError(f"this expert reads {self.n_features} weight statistics per model, got {tuple(features.shape)}")
        return self.mlp((features - self.mean) / self.std)

    def config(self) -> dict:
        return dict(n_features=self.n_features, hidden=self.hidden, r_t=self.r_t, **self.head_config())


EXPERTS = {cls.__name__: cls for cls in (ProbeX, DenseExpert, StatMLP)}


def load_expert(directory: str | Path) -> Expert:
    """Any saved expert, its class read from config.json."""
    return Expert.from_pretrained(directory)
