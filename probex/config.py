"""Training configurations: what a trained expert is (``ProbeXConfig``) and how it is trained (``OptimiserConfig``).

Each setting has one default, here; the CLI's defaults are read from these objects. No torch import: the CLI parses
its arguments before loading anything heavy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class ProbeXConfig:
    """ProbeX's ranks and how it reads its layer (probex.experts.ProbeX)."""
    r_u: int = 128
    r_v: int = 128
    r_t: int = 128
    relu: bool = True
    temperature: float | None = None  # align head: cosine logits divided by it (None: raw cosines)
    centre: bool = True          # read (X − X̄) / s, X̄ and s from the train split (probex.train's docstring)
    init: str = "principal"      # "principal": U, V start at the train split's principal directions; "random": paper


@dataclass(frozen=True)
class OptimiserConfig:
    """Adam over shuffled batches for a number of epochs; the best epoch on val is kept."""
    epochs: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    patience: int | None = None  # stop after this many epochs without a better val score (None: run all epochs)


PAPER_OPTIMISER = OptimiserConfig()                         # the paper's recipe
RELEASE_OPTIMISER = OptimiserConfig(epochs=200, lr=2e-3)    # the public release's for generative trees (and `probex train`'s)
RELEASE_GENERATIVE_MODEL = ProbeXConfig(r_t=512)            # the release's ProbeX for generative trees


@dataclass(frozen=True)
class TrainConfig:
    model: ProbeXConfig = ProbeXConfig()
    optimiser: OptimiserConfig = PAPER_OPTIMISER

    @classmethod
    def of(cls, **settings) -> "TrainConfig":
        """The defaults with some settings of either part changed: ``TrainConfig.of(epochs=5, r_t=16)``."""
        return cls().replace(**settings)

    def replace(self, **settings) -> "TrainConfig":
        """A copy with some settings of either part changed; an unknown name is a TypeError."""
        model_keys = {f.name for f in fields(ProbeXConfig)}
        optimiser_keys = {f.name for f in fields(OptimiserConfig)}
        unknown = set(settings) - model_keys - optimiser_keys
        if unknown:
            raise TypeError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return TrainConfig(replace(self.model, **{k: v for k, v in settings.items() if k in model_keys}),
                           replace(self.optimiser, **{k: v for k, v in settings.items() if k in optimiser_keys}))

    def as_dict(self) -> dict:
        return {"model": asdict(self.model), "optimiser": asdict(self.optimiser)}


RELEASE_GENERATIVE = TrainConfig(RELEASE_GENERATIVE_MODEL, RELEASE_OPTIMISER)
