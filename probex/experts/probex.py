"""ProbeX — a tree expert that reads ONE weight matrix (Horwitz et al., CVPR 2025, Eq. 4).

    X ∈ R^{d_W×d_H}                  a layer's weights (for a LoRA: X = scale · B·A, B = up, A = down)
    z_l = Vᵀ X u_l ∈ R^{r_V}          probe responses: r_U learned probes u_l (columns of U), shared projection V
    e   = Σ_l M_l σ(z_l) ∈ R^{r_T}    per-probe encoders M_l, σ = ReLU (identity for linear ProbeX)
    y   = head(e)                     class logits, label logits, or cosine to text embeddings

All r_U per-probe encoders are one Linear(r_V·r_U → r_T) over the flattened responses (the same map, one matmul).

Factor space. For a LoRA we never build B·A (d_W×d_H per model): Vᵀ(B A)U = (VᵀB)(AU), two thin products of width r.
That is exact, so a batch of different ranks can be zero-padded to the largest rank (padded columns of B and rows of A
are zero and add nothing).

Tree-centred inputs (``centred=True``, what probex.train sets up by default): ProbeX reads (X − X̄) / s
(``CentredInput``), i.e. Vᵀ(X − X̄)U / s = (VᵀXU − VᵀX̄U) / s, so factor inputs stay in factor space. The paper and
its release read the raw weights (``centred=False``).

Initialisation (``initialise``; ours, the paper starts at random): the probes U and the projection V start at the
principal directions of the training models' deviations from their mean — the top eigenvectors of Σ (X−X̄)ᵀ(X−X̄)
and Σ (X−X̄)(X−X̄)ᵀ — where the models of a tree differ, instead of at random. Without it they keep nn.Linear's
default scale, as the release's probes and projection do.

Paper defaults r_U = r_V = r_T = 128; the public release uses r_T = 512 for the representation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from probex.errors import InputError
from probex.experts.base import CentredInput, Expert, LayerInput, check_shape, dense_batches, input_stats, per_model

INITS = ("principal", "random")


class ProbeX(CentredInput, Expert):
    """Parameters:
        d_w, d_h: the layer's shape (d_out, d_in of the linear it is).
        r_u, r_v, r_t: probes, projection width, encoding width.
        relu: σ = ReLU (True) or identity (linear ProbeX, a factorised dense expert: probex.experts.dense).
        head, n_out, text_dim, temperature: the head (probex.experts.base.Expert).
        centred: read tree-centred inputs (module docstring); ``initialise`` sets their statistics.
    """

    def __init__(self, d_w: int, d_h: int, r_u: int = 128, r_v: int = 128, r_t: int = 128, relu: bool = True,
                 head: str = "multiclass", n_out: int | None = None, text_dim: int | None = None,
                 temperature: float | None = None, centred: bool = False):
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.d_w, self.d_h, self.r_u, self.r_v, self.r_t, self.relu = d_w, d_h, r_u, r_v, r_t, relu
        self._init_centring(centred)
        self.U = nn.Parameter(torch.empty(d_h, r_u).uniform_(-1, 1) / math.sqrt(r_u))   # (d_H, r_U) probes
        self.V = nn.Parameter(torch.empty(d_w, r_v).uniform_(-1, 1) / math.sqrt(d_w))   # (d_W, r_V) projection
        self.M = nn.Linear(r_v * r_u, r_t)  # all per-probe encoders M_l at once

    @torch.no_grad()
    def initialise(self, data, train: Tensor, init: str = "principal") -> "ProbeX":
        """Input statistics (when centred) and U, V's start (``init``) from the models at ``train`` of ``data``
        (probex.data.LayerData). Probes beyond the layer's width (r > d) keep their random start."""
        if init not in INITS:
            raise InputError(f"init must be one of {INITS}, got {init!r}")
        if self.centred:
            mean = self.centre_on(data, train)
        elif init == "principal":
            mean, _ = input_stats(data, train)
        if init == "principal":
            k_w, k_h = min(self.r_v, self.d_w), min(self.r_u, self.d_h)
            self.V[:, :k_w], self.U[:, :k_h] = principal_directions(data, train, mean, k_w, k_h)
        return self

    def responses(self, x: LayerInput) -> Tensor:
        """Vᵀ X U for every model: (N, r_V, r_U)."""
        check_shape(x, self.d_w, self.d_h)
        if isinstance(x, Tensor):
            z = self.V.T @ (x @ self.U)
        else:
            up, down, scale = x
            # (VᵀB)(AU): r_V×r times r×r_U per model; B·A (d_W×d_H) is never formed. Each einsum is one GEMM over the
            # whole batch (batch folded into rows), faster than a batched product of many thin matrices. The scale
            # goes on the r×r_U factor, not on the r_V×r_U responses: r/r_V as many multiplies, forward and backward.
            left = torch.einsum("wv,nwr->nvr", self.V, up)
            right = torch.einsum("nrh,hu->nru", down, self.U) * per_model(scale, up)
            z = left @ right
        if self.centred:
            z = (z - self.V.T @ self.input_mean @ self.U) / self.input_scale
        return z

    def encode(self, x: LayerInput) -> Tensor:
        z = self.responses(x)                       # (N, r_V, r_U)
        if self.relu:
            z = z.relu_()  # in place: no backward step reads the responses, so a second r_V×r_U copy is pure cost
        return self.M(z.flatten(1))                 # (N, r_T)


def principal_directions(data, idx: Tensor, mean: Tensor, k_w: int, k_h: int) -> tuple[Tensor, Tensor]:
    """Unit columns, strongest first: the top k_w eigenvectors of Σ (X−X̄)(X−X̄)ᵀ (d_W, k_w) and the top k_h of
    Σ (X−X̄)ᵀ(X−X̄) (d_H, k_h), over the models at `idx` — the directions in which those models' layers differ most."""
    d_w, d_h = data.shape
    gram_w, gram_h = torch.zeros(d_w, d_w, dtype=torch.float64), torch.zeros(d_h, d_h, dtype=torch.float64)
    for x in dense_batches(data, idx):
        x = x - mean.double()
        gram_w += torch.einsum("nwh,nvh->wv", x, x)
        gram_h += torch.einsum("nwh,nwg->hg", x, x)
    top = [torch.linalg.eigh(g).eigenvectors[:, -k:].flip(1).float() for g, k in ((gram_w, k_w), (gram_h, k_h))]
    return top[0], top[1]
