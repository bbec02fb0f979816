"""The dense expert (Eq. 1): a Linear over the whole flattened weight matrix — the baseline linear ProbeX factorises."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from probex.errors import ProbexError
from probex.experts.base import CentredInput, Expert, LayerInput, check_shape, dense_from_factors
from probex.experts.probex import ProbeX


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
        check_shape(x, self.d_w, self.d_h)
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
