"""Stacked ProbeX — several layers of one model read at once: one ProbeX encoder per layer, encodings summed.

    e = Σ_k ProbeX_k(X_k) ∈ R^{r_T}     X_k: the k-th read layer (e.g. every cross-attention projection)
    y = head(e)

The paper reads one layer; its issue asks how much reading several at once adds. Summing per-layer encodings is one
Linear over their concatenation, so no layer is favoured by its position. Each per-layer ProbeX keeps its own
centring and principal start (probex.experts.probex); the head is shared.
"""
from __future__ import annotations

from torch import Tensor, nn

from probex.experts.base import Expert
from probex.experts.probex import ProbeX


class StackedProbeX(Expert):
    """Parameters:
        shapes: (d_w, d_h) of each read layer, in the order ``encode`` takes them.
        r_u, r_v, r_t, relu, centred: each per-layer ProbeX's (probex.experts.ProbeX).
        head, n_out, text_dim, temperature: the shared head (probex.experts.base.Expert).
    """

    def __init__(self, shapes: list[list[int]], r_u: int = 16, r_v: int = 16, r_t: int = 128, relu: bool = True,
                 head: str = "align", n_out: int | None = None, text_dim: int | None = None,
                 temperature: float | None = None, centred: bool = True):
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.r_t = r_t
        self.layers = nn.ModuleList(ProbeX(d_w, d_h, r_u, r_v, r_t, relu, head=None, centred=centred)
                                    for d_w, d_h in shapes)

    def initialise(self, stack, train: Tensor, init: str = "principal") -> "StackedProbeX":
        """Each layer's centring and start from the models at ``train`` of ``stack`` (probex.data.LayerStack)."""
        for probe, data in zip(self.layers, stack.layers):
            probe.initialise(data, train, init)
        return self

    def encode(self, layers: list) -> Tensor:
        return sum(probe.encode(x) for probe, x in zip(self.layers, layers))
