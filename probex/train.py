"""Fit tree experts on one cached layer, and sweep over layers to find the one that reads best.

Tasks
- multiclass: one class per model (generative zoos), cross-entropy over the in-distribution classes.
- multilabel: a label set per model (discriminative zoos), binary cross-entropy per label.
- align: contrastive against class text embeddings, as the paper's text alignment: cosine logits between the model's
  encoding and every class text of the split, cross-entropy. `text_embeddings` (C, text_dim) is computed by the
  caller with a probex.text encoder, one row per class of the cache (`class_text_embeddings`). In-distribution
  splits are scored against the in-distribution classes, val_holdout / test_holdout against the held-out classes
  (zero-shot: those class names were never seen in training).

Recipe (paper defaults): Adam, lr 1e-3, weight decay 1e-5, 500 epochs, batch 128; the best epoch on `val` is kept
(its state held in memory). The public release trains the generative split with lr 2e-3, 200 epochs and r_T = 512
(`RELEASE_GENERATIVE`). Deterministic under a seed on CPU.

Inputs and initialisation (ours; the paper reads raw weights from a random start: ``centre=False, init="random"``).
By default an expert reads its layer centred on the training models' mean and scaled to unit RMS norm
(`input_stats`, stored in the expert), and ProbeX's probes U and projection V start at the principal directions of
the training models' deviations from that mean (`principal_directions`: the top eigenvectors of Σ (X−X̄)ᵀ(X−X̄) and
Σ (X−X̄)(X−X̄)ᵀ) instead of at random. Both use the train split only. In a tree the root's weights dominate every
model's layer and carry no label; centring removes them, and the probes start where the models differ.

The whole cached layer lives in memory as tensors and batches are slices of it — no DataLoader, no workers: the
factor-space forward is the cost, and it is a few thin matmuls per model.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probex.cluster import map_jobs
from probex.errors import InputError
from probex.model import DenseExpert, Expert, ProbeX, dense_from_factors
from probex.zoo import HOLDOUT, IN_DISTRIBUTION, LayerCache, select_layers


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    r_u: int = 128
    r_v: int = 128
    r_t: int = 128
    relu: bool = True
    temperature: float | None = None
    patience: int | None = None  # stop after this many epochs without a better val score (None: run all epochs)
    centre: bool = True          # read (X − X̄) / s, X̄ and s from the train split (module docstring)
    init: str = "principal"      # "principal": U, V start at the train split's principal directions; "random": paper


PAPER = TrainConfig()
RELEASE_GENERATIVE = TrainConfig(epochs=200, lr=2e-3, r_t=512)


# ---- data: one layer of every model, and what to predict ------------------------------------------------------------
@dataclass
class LayerData:
    """A cached layer in memory: dense (N, d_W, d_H) or LoRA factors, with each model's true rank."""
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    rank: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, cache: LayerCache, layer: str) -> "LayerData":
        t = cache.load(layer)
        if "up" in t:
            return cls((t["up"], t["down"], t["scale"]), t.get("rank"))
        return cls(t["weight"])

    def __len__(self) -> int:
        return len(self.x if isinstance(self.x, torch.Tensor) else self.x[0])

    @property
    def shape(self) -> tuple[int, int]:
        if isinstance(self.x, torch.Tensor):
            return tuple(self.x.shape[1:])
        up, down, _ = self.x
        return up.shape[1], down.shape[2]

    def take(self, idx: torch.Tensor):
        """The models at `idx`; LoRA padding trimmed to the largest rank among them (less work, same result)."""
        if isinstance(self.x, torch.Tensor):
            return self.x[idx]
        up, down, scale = self.x
        r = int(self.rank[idx].max()) if self.rank is not None and len(idx) else up.shape[2]
        return up[idx, :, :r], down[idx, :r], scale[idx]

    def encode(self, expert: Expert, idx: torch.Tensor) -> torch.Tensor:
        """Encodings of the models at `idx`, in that order. LoRAs are encoded one rank at a time, so a batch mixing
        rank 4 and rank 64 costs its true ranks, not 64 each (padding is exact, but it is not free)."""
        if self.rank is None or isinstance(self.x, torch.Tensor):
            return expert.encode(self.take(idx))
        ranks = self.rank[idx]
        groups = [torch.nonzero(ranks == r).flatten() for r in ranks.unique()]
        if len(groups) == 1:
            return expert.encode(self.take(idx))
        enc = torch.cat([expert.encode(self.take(idx[g])) for g in groups])
        return enc[torch.cat(groups).argsort()]   # back to the order of idx


@dataclass
class Targets:
    """Labels for one task. y: class index (N,) — into `classes` for in-distribution models and into
    `holdout_classes` for held-out ones — or multi-hot (N, C) for multilabel. split: index tensors per split."""
    task: str
    y: torch.Tensor
    split: dict[str, torch.Tensor]
    classes: list[str]
    holdout_classes: list[str] = field(default_factory=list)
    text: torch.Tensor | None = None          # (len(classes), text_dim), align only
    holdout_text: torch.Tensor | None = None  # (len(holdout_classes), text_dim)

    def text_for(self, split: str) -> torch.Tensor | None:
        return self.holdout_text if split in HOLDOUT else self.text

    def evaluated_splits(self) -> list[str]:
        """Held-out classes can only be scored by the align head (the others have no output for them)."""
        splits = ("train", *IN_DISTRIBUTION[1:], *(HOLDOUT if self.task == "align" else ()))
        return [s for s in splits if len(self.split.get(s, ())) > 0]


def task_targets(cache: LayerCache, task: str | None = None, text_embeddings: torch.Tensor | None = None) -> Targets:
    """Targets for `task` (default: the cache's own, multiclass or multilabel) from the cache's labels."""
    task = task or cache.task
    models, vocab = cache.models, cache.classes
    split = {s: cache.split_indices(s) for s in (*IN_DISTRIBUTION, *HOLDOUT)}
    if task == "multilabel":
        if cache.task != "multilabel":
            raise InputError("multilabel training needs a zoo whose models carry label lists (dataset_chosen_targets)")
        pos = {c["id"]: i for i, c in enumerate(vocab)}
        y = torch.zeros(len(models), len(vocab))
        for i, m in enumerate(models):
            y[i, [pos[t] for t in m["labels"]]] = 1
        return Targets(task, y, split, [c["id"] for c in vocab])
    if task not in ("multiclass", "align"):
        raise InputError(f"unknown task {task!r}: use multiclass, multilabel or align")
    if any("class_id" not in m for m in models):
        raise InputError(f"{task} training needs one class per model (class_id or imagenet_class_id metadata)")
    seen = [c for c in vocab if not c["holdout"]]
    held = [c for c in vocab if c["holdout"]]
    pos = {c["id"]: i for i, c in enumerate(seen)} | {c["id"]: i for i, c in enumerate(held)}
    y = torch.tensor([pos[m["class_id"]] for m in models])
    targets = Targets(task, y, split, [c["id"] for c in seen], [c["id"] for c in held])
    if task == "align":
        if text_embeddings is None or len(text_embeddings) != len(vocab):
            raise InputError(f"align training needs one text embedding per class ({len(vocab)} classes)")
        is_held = torch.tensor([c["holdout"] for c in vocab])
        targets.text, targets.holdout_text = text_embeddings[~is_held].float(), text_embeddings[is_held].float()
    return targets


DEFAULT_PROMPT = "a photo of a {name}"  # the release's prompt for CLIP


def prompt(template: str, name: str) -> str:
    """A class name in its prompt; templates may write the slot as {name} or {}."""
    return template.format(name, name=name)


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


def class_means(encodings: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit mean of each class's unit encodings (C, r_T), and which classes have any models (C,) bool."""
    e = F.normalize(encodings.float(), dim=-1)
    sums = torch.zeros(n_classes, e.shape[1]).index_add_(0, y, e)
    return F.normalize(sums, dim=-1), torch.bincount(y, minlength=n_classes) > 0


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


def train_expert(expert: Expert, data: LayerData, targets: Targets, config: TrainConfig = PAPER,
                 progress: bool = False) -> FitResult:
    """Adam on the train split; the state of the best val epoch (higher score, then lower loss) is restored."""
    for needed in ("train", "val"):
        if len(targets.split.get(needed, ())) == 0:
            raise InputError(f"the {needed} split is empty: training needs train and val models")
    generator = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(expert.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, best_epoch, history = None, None, -1, []
    start = time.perf_counter()
    epochs = tqdm(range(config.epochs), desc="epochs", disable=not progress, leave=False)
    for epoch in epochs:
        train_loss = train_epoch(expert, data, targets, opt, config.batch_size, generator)
        val = evaluate_split(expert, data, targets, "val")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val": val["score"]})
        if best is None or (val["score"], -val["loss"]) > best:
            best, best_epoch = (val["score"], -val["loss"]), epoch
            best_state = {k: v.detach().clone() for k, v in expert.state_dict().items()}
        elif config.patience is not None and epoch - best_epoch >= config.patience:
            break
    expert.load_state_dict(best_state)
    metrics = {s: evaluate_split(expert, data, targets, s)["score"] for s in targets.evaluated_splits()}
    return FitResult(expert.eval(), metrics, best_epoch, len(history), time.perf_counter() - start, history)


INITS = ("principal", "random")


def _dense_batches(data: LayerData, idx: torch.Tensor, batch_size: int = 16):
    """The models at `idx` as dense float64 matrices, a few at a time (a LoRA's scale·B·A is formed per batch)."""
    for b in idx.split(batch_size):
        yield dense_from_factors(data.take(b)).double()


def input_stats(data: LayerData, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """X̄, the mean layer of the models at `idx` (d_W, d_H), and s, the RMS Frobenius norm of X − X̄ over them: the
    centred inputs (X − X̄) / s are about unit norm whatever the layer's size and the tree's weight scale."""
    if len(idx) == 0:
        raise InputError("input statistics need at least one training model")
    total, squares = torch.zeros(data.shape, dtype=torch.float64), 0.0
    for x in _dense_batches(data, idx):
        total += x.sum(0)
        squares += float(x.square().sum())
    mean = total / len(idx)
    var = squares / len(idx) - float(mean.square().sum())
    return mean.float(), max(var, 0.0) ** 0.5 or 1.0   # all models equal: nothing to scale


def principal_directions(data: LayerData, idx: torch.Tensor, mean: torch.Tensor, k_w: int,
                         k_h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit columns, strongest first: the top k_w eigenvectors of Σ (X−X̄)(X−X̄)ᵀ (d_W, k_w) and the top k_h of
    Σ (X−X̄)ᵀ(X−X̄) (d_H, k_h), over the models at `idx` — the directions in which those models' layers differ most."""
    d_w, d_h = data.shape
    gram_w, gram_h = torch.zeros(d_w, d_w, dtype=torch.float64), torch.zeros(d_h, d_h, dtype=torch.float64)
    for x in _dense_batches(data, idx):
        x = x - mean.double()
        gram_w += torch.einsum("nwh,nvh->wv", x, x)
        gram_h += torch.einsum("nwh,nwg->hg", x, x)
    top = [torch.linalg.eigh(g).eigenvectors[:, -k:].flip(1).float() for g, k in ((gram_w, k_w), (gram_h, k_h))]
    return top[0], top[1]


def centre_on_train(expert: Expert, data: LayerData, targets: Targets) -> torch.Tensor:
    """Set a centred expert's input statistics from the train split; returns X̄."""
    mean, scale = input_stats(data, targets.split["train"])
    expert.set_input_stats(mean, scale)
    return mean


def _head(targets: Targets, config: TrainConfig) -> dict:
    """The head an expert for `targets` needs: its kind, outputs or text width, temperature."""
    align = targets.task == "align"
    return dict(head=targets.task, n_out=None if align else len(targets.classes),
                text_dim=targets.text.shape[1] if align else None, temperature=config.temperature)


def new_dense(data: LayerData, targets: Targets, config: TrainConfig, ram_budget_gb: float = 4.0) -> DenseExpert:
    """The dense expert (Eq. 1) for this layer and task, on the same inputs as `new_probex` would read (centred when
    `config.centre`). Raises ProbexError when its training state would pass `ram_budget_gb`."""
    d_w, d_h = data.shape
    torch.manual_seed(config.seed)
    expert = DenseExpert(d_w, d_h, config.r_t, **_head(targets, config), ram_budget_gb=ram_budget_gb,
                         centred=config.centre)
    if config.centre:
        centre_on_train(expert, data, targets)
    return expert


def new_probex(data: LayerData, targets: Targets, config: TrainConfig) -> ProbeX:
    """A ProbeX for this layer and task, its inputs and initialisation as `config` says (module docstring)."""
    if config.init not in INITS:
        raise InputError(f"init must be one of {INITS}, got {config.init!r}")
    d_w, d_h = data.shape
    torch.manual_seed(config.seed)  # initialisation is part of what a seed fixes
    expert = ProbeX(d_w, d_h, config.r_u, config.r_v, config.r_t, config.relu, **_head(targets, config),
                    centred=config.centre)
    if config.centre:
        mean = centre_on_train(expert, data, targets)
    elif config.init == "principal":
        mean, _ = input_stats(data, targets.split["train"])
    if config.init == "principal":
        # Probes beyond the layer's width (r > d) keep their random start.
        k_w, k_h = min(config.r_v, d_w), min(config.r_u, d_h)
        p_w, p_h = principal_directions(data, targets.split["train"], mean, k_w, k_h)
        with torch.no_grad():
            expert.V[:, :k_w] = p_w
            expert.U[:, :k_h] = p_h
    return expert


def fit_expert(cache: LayerCache, layer: str, task: str | None = None, text_embeddings: torch.Tensor | None = None,
               config: TrainConfig = PAPER, progress: bool = False) -> FitResult:
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
                 config: TrainConfig = PAPER, out_dir: str | Path | None = None, save_experts: bool = False,
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
        {"task": task, "config": asdict(config), "best_layer": best_layer, "best_index": best["index"],
         "selected_on": "val", "layers": rows}, indent=1))


def encode_all(expert: Expert, data: LayerData, idx: torch.Tensor | None = None, batch_size: int = 512) -> torch.Tensor:
    """Encodings (N, r_T) of the models at `idx` (default all), in batches."""
    idx = torch.arange(len(data)) if idx is None else idx
    expert.eval()
    with torch.no_grad():
        return torch.cat([data.encode(expert, b) for b in idx.split(batch_size)])

