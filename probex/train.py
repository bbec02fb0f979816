"""Fit tree experts on one cached layer, and sweep over layers to find the one that reads best.

Tasks
- multiclass: one class per model (generative zoos), cross-entropy over the in-distribution classes.
- multilabel: a label set per model (discriminative zoos), binary cross-entropy per label.
- align: contrastive against class text embeddings, as the paper's text alignment: cosine logits between the model's
  encoding and every class text of the split, cross-entropy. `text_embeddings` (C, text_dim) is computed by the
  caller with a probex.text encoder, one row per class of the cache (`class_text_embeddings`). In-distribution
  splits are scored against the in-distribution classes, val_holdout / test_holdout against the held-out classes
  (zero-shot: those class names were never seen in training).

Recipe (probex.config; the paper's defaults): Adam, lr 1e-3, weight decay 1e-5, 500 epochs, batch 128; the best epoch on `val` is kept
(its state held in memory). The public release trains the generative split with lr 2e-3, 200 epochs and r_T = 512
(`probex.config.RELEASE_GENERATIVE`). Deterministic under a seed on CPU.

Inputs and initialisation (ours; the paper reads raw weights from a random start: ``centre=False, init="random"``).
By default an expert reads its layer centred on the training models' mean and scaled to unit RMS norm, and ProbeX's
probes and projection start at the principal directions of the training models' deviations from that mean
(probex.experts: CentredInput, ProbeX.initialise). Both use the train split only. In a tree the root's weights dominate
every model's layer and carry no label; centring removes them, and the probes start where the models differ.

Training inputs (probex.data.LayerData / LayerStack) live in memory as tensors and batches are slices of them.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from probex.cluster import map_jobs
from probex.config import TrainConfig
from probex.errors import InputError
from probex.data import LayerData, LayerStack, Targets, task_targets
from probex.gallery import class_means
from probex.text import DEFAULT_PROMPT, prompt
from probex.experts import AnchoredProbeX, DenseExpert, Expert, ProbeX, StackedProbeX
from probex.zoo import LayerCache, select_layers


def class_text_embeddings(cache: LayerCache, encoder, template: str | None = None) -> torch.Tensor:
    """One embedding per class of the cache, of its prompt (the given template, else the tree's, else the release's)."""
    template = template or cache.index.get("tree", {}).get("prompt_template") or DEFAULT_PROMPT
    return encoder.embed([prompt(template, c["name"]) for c in cache.classes])


# ---- training -------------------------------------------------------------------------------------------------------
def loss_and_score(task: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss, and the paper's metric: per-label accuracy (multilabel) or top-1 accuracy."""
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y), ((logits > 0) == (y > 0.5)).float().mean()
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


@torch.no_grad()
def evaluate_split(expert: Expert, data: LayerData, targets: Targets, split: str, batch_size: int = 512) -> dict:
    expert.eval()
    idx = targets.split[split]
    logits = torch.cat([expert.logits(data.encode(expert, b), targets.text_for(split)) for b in idx.split(batch_size)])
    loss, score = loss_and_score(targets.task, logits, targets.y[idx])
    return {"loss": loss.item(), "score": score.item()}


def train_epoch(expert: Expert, data: LayerData, targets: Targets, opt: torch.optim.Optimizer,
                batch_size: int, generator: torch.Generator) -> float:
    expert.train()
    idx = targets.split["train"]
    order = idx[torch.randperm(len(idx), generator=generator)]
    total = 0.0
    for batch in order.split(batch_size):
        logits = expert.logits(data.encode(expert, batch), targets.text)
        loss, _ = loss_and_score(targets.task, logits, targets.y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
    return total / len(idx)


def nearest_mean_top1(encodings: torch.Tensor, targets: Targets, split: str) -> float:
    """In-distribution top-1 of the nearest class mean: each class is the mean encoding of its train-split models."""
    train = targets.split["train"]
    means, _ = class_means(encodings[train], targets.y[train], len(targets.classes))
    idx = targets.split[split]
    return float(((F.normalize(encodings[idx].float(), dim=-1) @ means.T).argmax(1) == targets.y[idx]).float().mean())


@dataclass
class FitResult:
    expert: Expert
    metrics: dict[str, float]      # score per split at the best epoch
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def train_expert(expert: Expert, data: LayerData, targets: Targets, config: TrainConfig = TrainConfig(),
                 progress: bool = False) -> FitResult:
    """Adam on the train split; the state of the best val epoch (higher score, then lower loss) is restored."""
    for needed in ("train", "val"):
        if len(targets.split.get(needed, ())) == 0:
            raise InputError(f"the {needed} split is empty: training needs train and val models")
    generator = torch.Generator().manual_seed(config.optimiser.seed)
    opt = torch.optim.Adam(expert.parameters(), lr=config.optimiser.lr, weight_decay=config.optimiser.weight_decay)
    best, best_state, best_epoch, history = None, None, -1, []
    start = time.perf_counter()
    epochs = tqdm(range(config.optimiser.epochs), desc="epochs", disable=not progress, leave=False)
    for epoch in epochs:
        train_loss = train_epoch(expert, data, targets, opt, config.optimiser.batch_size, generator)
        val = evaluate_split(expert, data, targets, "val")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val": val["score"]})
        if best is None or (val["score"], -val["loss"]) > best:
            best, best_epoch = (val["score"], -val["loss"]), epoch
            best_state = {k: v.detach().clone() for k, v in expert.state_dict().items()}
        elif config.optimiser.patience is not None and epoch - best_epoch >= config.optimiser.patience:
            break
    expert.load_state_dict(best_state)
    metrics = {s: evaluate_split(expert, data, targets, s)["score"] for s in targets.evaluated_splits()}
    return FitResult(expert.eval(), metrics, best_epoch, len(history), time.perf_counter() - start, history)


def _head(targets: Targets, config: TrainConfig) -> dict:
    """The head an expert for `targets` needs: its kind, outputs or text width, temperature."""
    align = targets.task == "align"
    return dict(head=targets.task, n_out=None if align else len(targets.classes),
                text_dim=targets.text.shape[1] if align else None, temperature=config.model.temperature)


def new_dense(data: LayerData, targets: Targets, config: TrainConfig, ram_budget_gb: float = 4.0) -> DenseExpert:
    """The dense expert (Eq. 1) for this layer and task, on the same inputs as `new_probex` would read (centred when
    `config.model.centre`). Raises ProbexError when its training state would pass `ram_budget_gb`."""
    d_w, d_h = data.shape
    torch.manual_seed(config.optimiser.seed)
    expert = DenseExpert(d_w, d_h, config.model.r_t, **_head(targets, config), ram_budget_gb=ram_budget_gb,
                         centred=config.model.centre)
    if config.model.centre:
        expert.centre_on(data, targets.split["train"])
    return expert


def new_probex(data: LayerData, targets: Targets, config: TrainConfig) -> ProbeX:
    """A ProbeX for this layer and task, its inputs and initialisation as `config` says (ProbeX.initialise)."""
    d_w, d_h = data.shape
    torch.manual_seed(config.optimiser.seed)  # initialisation is part of what a seed fixes
    m = config.model
    expert = ProbeX(d_w, d_h, m.r_u, m.r_v, m.r_t, m.relu, **_head(targets, config), centred=m.centre)
    return expert.initialise(data, targets.split["train"], m.init)


def new_stacked(stack: LayerStack, targets: Targets, config: TrainConfig) -> StackedProbeX:
    """A ProbeX per layer of ``stack``, encodings summed (probex.experts.stacked), set up as `new_probex` sets one."""
    torch.manual_seed(config.optimiser.seed)
    m = config.model
    expert = StackedProbeX([list(d.shape) for d in stack.layers], m.r_u, m.r_v, m.r_t, m.relu,
                           **_head(targets, config), centred=m.centre)
    return expert.initialise(stack, targets.split["train"], m.init)


def fit_expert(cache: LayerCache, layer: str, task: str | None = None, text_embeddings: torch.Tensor | None = None,
               config: TrainConfig = TrainConfig(), progress: bool = False) -> FitResult:
    """A ProbeX for `task` on one cached layer, best epoch on val."""
    data = LayerData.from_cache(cache, layer)
    targets = task_targets(cache, task, text_embeddings)
    return train_expert(new_probex(data, targets, config), data, targets, config, progress)


# ---- layer sweep ----------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    rows: list[dict]               # per layer: index, layer, split scores, best_epoch, epochs, seconds, n_params
    best_layer: str
    best: FitResult

    @property
    def best_row(self) -> dict:
        return next(r for r in self.rows if r["layer"] == self.best_layer)


def sweep_layers(cache: LayerCache, layers=None, task: str | None = None, text_embeddings: torch.Tensor | None = None,
                 config: TrainConfig = TrainConfig(), out_dir: str | Path | None = None, save_experts: bool = False,
                 progress: bool = True, ray: bool | str = False) -> SweepResult:
    """One expert per layer (a `select_layers` spec: all, a list, "40-47"…); the best layer is the best on val
    (ties: the lower index). With `out_dir`, sweep.csv / sweep.json are rewritten after every layer, so a long sweep
    leaves its results as it goes; `save_experts` also keeps each layer's expert under out_dir/experts/<layer>/.
    Each layer is one job of `probex.cluster.map_jobs`: here, or on Ray when `ray` says so (same results)."""
    names = select_layers(cache.all_layers, layers)
    missing = [n for n in names if n not in cache.layers]
    if missing:
        raise InputError(f"{len(missing)} requested layer(s) are not cached (e.g. {missing[0]}); build the cache first")
    targets = task_targets(cache, task, text_embeddings)
    fit_layer = partial(fit_expert, cache, task=task, text_embeddings=text_embeddings, config=config)
    out_dir = Path(out_dir) if out_dir else None
    rows, best = [], None
    for name, fit in zip(names, map_jobs(fit_layer, names, ray, desc="layers", progress=progress)):
        rows.append({"index": cache.all_layers.index(name), "layer": name, **fit.metrics, "best_epoch": fit.best_epoch,
                     "epochs": fit.epochs_run, "seconds": round(fit.seconds, 3),
                     "n_params": sum(p.numel() for p in fit.expert.parameters())})
        if best is None or fit.metrics["val"] > best[1].metrics["val"]:
            best = (name, fit)
        if out_dir:
            if save_experts:
                fit.expert.save_pretrained(out_dir / "experts" / name)
            write_sweep(out_dir, rows, best[0], targets.task, config)
    return SweepResult(rows, best[0], best[1])


def write_sweep(out_dir: Path, rows: list[dict], best_layer: str, task: str, config: TrainConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    best = next(r for r in rows if r["layer"] == best_layer)
    (out_dir / "sweep.json").write_text(json.dumps(
        {"task": task, "config": config.as_dict(), "best_layer": best_layer, "best_index": best["index"],
         "selected_on": "val", "layers": rows}, indent=1))


def encode_all(expert: Expert, data: LayerData, idx: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """Encodings (N, r_T) of the models at `idx` (default all), in batches."""
    idx = torch.arange(len(data)) if idx is None else idx
    expert.eval()
    with torch.no_grad():
        return torch.cat([data.encode(expert, b) for b in idx.split(batch_size)])


def fit_anchored(cache, names: list[str], root_weights: dict[str, Tensor], instance_states: Tensor,
                 class_states: Tensor, config=None, relu: bool = True):
    """Train a root-anchored expert on the cached ``names`` layers with ``train.train_expert`` (best epoch on val).

    root_weights: the root's matrix per layer name; instance_states (n_tokens, d_h); class_states (C, n_tokens, d_h),
    one row per class of the cache. Returns (FitResult, LayerStack)."""
    torch.manual_seed((config or TrainConfig()).optimiser.seed)
    model = AnchoredProbeX.from_root([root_weights[n] for n in names], instance_states, relu=relu)
    data = LayerStack.from_cache(cache, names)
    return train_expert(model, data, task_targets(cache, "align", class_states), config or TrainConfig()), data
