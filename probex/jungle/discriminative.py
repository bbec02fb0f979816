"""The jungle's discriminative Model Trees: small emoji classifiers fine-tuned from a few roots (the paper's Table 1 /
Fig. 3a analogue), plus a "forest" whose models each start from their own random init.

Class pool. The atlas's 'thing' classes (probex.jungle.atlas.subject) shuffled once with ``POOL_SEED``: the first
``pool_size`` (20) are the pool every fine-tuned model draws its classes from; roots are pretrained on slices of the
remaining thing classes, so no root has seen a pool class.

Trees (``POPULATIONS``). A root = an image classifier pretrained on a broad set of other classes; its models are
fine-tuned from it, each on a random 10 of the 20 pool classes as a 10-way task with a fresh head (the paper: a random
50 of 100 CIFAR classes). The label of a model is which classes it was trained on. Four trees differ in architecture
(CNN, MLP, MLP-Mixer) and/or pretraining (two CNN roots: other seed, other classes). The forest: CNNs trained on a
random 10 of the pool from their own random init (no shared root), the paper's population where a linear
metanetwork is at chance.

Data. A fixed bank of augmented images per class (probex.jungle.root.augment), drawn once from ``bank_seed``: every
model fine-tunes on all bank images of its 10 classes, in its own shuffled order; a second bank (another seed) gives
each model's held-out accuracy (metadata ``eval_accuracy``), evidence that the models learned their task.

Recipe. Adam, per-model learning rate and epochs drawn from a small grid (``RecipeSpace``: models on the Hub are not
trained alike), batch 16. The fine-tuning head starts at zero, as the ViT paper fine-tunes: with Adam even a small
random head (N(0, 0.02²), Hugging Face's init) sends the body along a random direction for the first steps, and in
fine-tunes this short that noise swamps the class signal (measured on cnn-a's conv3, test per-label accuracy:
ProbeX 0.52 with that head vs 0.79 with a zero head, the dense expert 0.50 vs 0.88; chance 0.50). Forest models
train longer (from scratch).

Layout (each population is a zoo probex.zoo reads as a multilabel zoo):
    <zoo>/<population>/{train,val,test}/model_idx_NNNN/model.safetensors   split 70/10/20 by model index
    <zoo>/<population>/tree.json        the class pool, architecture, recipe
    <zoo>/<population>/root.safetensors the root (trees only)
    <zoo>/build.json                    timings, seeds, versions, the grouping speed measurement
Each model file holds the full weights and metadata ``dataset_chosen_targets`` = JSON list of its class names in
the order of its head's outputs (random: the head's rows say nothing by position), plus seed and hyperparameters.

Speed. ``train_models`` trains G classifiers at once: their weights are stacked and one forward runs them all
(torch.func.vmap over functional_call; convolutions become one grouped convolution). Each model's loss is its own
batch mean and the losses are summed, so each model gets exactly its own gradient, and Adam is elementwise: G
independent trainings, equal to one at a time up to float rounding (tests/test_discriminative.py). The gain is
measured at build time for each architecture (``grouping_speed``, best of 3) and written to build.json; on this
shared 2-core CPU, one thread, 10 at once at batch 16 ran 1.4–1.6× (CNN), 1.0–1.7× (MLP), 2.0–2.2× (mixer) faster
per model-step than one at a time over several runs. The work is small products either way: the gain is per-call
overhead, and it shrinks with larger per-model batches (at batch 32 grouping was no faster in a first measurement).
Full build (``full``: 4 trees + forest, 1,250 models): 519 s on one thread of the shared machine.

    python -m probex.jungle.discriminative build --zoo zoo/discriminative [--preset full|tiny] [--only cnn-a …]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .atlas import load_atlas
from .root import augment

POOL_SEED = 2025
WEIGHTS_FILE = "model.safetensors"
SPLIT_SHARES = (("train", 0.7), ("val", 0.1), ("test", 0.2))


# ---- the classes --------------------------------------------------------------------------------------------------
def class_split(pool_size: int = 20) -> tuple[list[dict], list[dict]]:
    """(pool, others): atlas class records of the fixed pool and of the remaining 'thing' classes, deterministic."""
    _, classes = load_atlas()
    things = [c for c in classes if c["subject"] == "thing"]
    order = np.random.default_rng(POOL_SEED).permutation(len(things))
    shuffled = [things[i] for i in order]
    return shuffled[:pool_size], shuffled[pool_size:]


def image_bank(classes: list[dict], per_class: int, seed: int) -> Tensor:
    """(C, per_class, 3, 32, 32) augmented views in [-1, 1] of each class's emoji, fixed by `seed`."""
    images, all_classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(all_classes)}
    rgba = torch.from_numpy(images[[row[c["id"]] for c in classes]])
    views = augment(rgba.repeat_interleave(per_class, 0), torch.Generator().manual_seed(seed))
    return views.view(len(classes), per_class, 3, 32, 32)


# ---- the architectures (no normalisation statistics: a model is its weights, and vmap needs no buffers) ----------
class SmallCNN(nn.Module):
    """Three stride-2 3×3 convolutions (32→16→8→4), global average pool, linear head."""

    def __init__(self, n_out: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(widths[1], widths[2], 3, stride=2, padding=1)
        self.head = nn.Linear(widths[2], n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((-2, -1)))


class SmallMLP(nn.Module):
    """2×2 average-pooled image (16×16×3 = 768) → 256 → 256 → head."""

    def __init__(self, n_out: int, width: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(768, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2).flatten(-3)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, 2 * tokens)
        self.token_fc2 = nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, 2 * dim)
        self.channel_fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.token_fc2(F.gelu(self.token_fc1(self.norm1(x).transpose(-1, -2)))).transpose(-1, -2)
        x = x + mixed
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class SmallMixer(nn.Module):
    """MLP-Mixer: 8×8 patches (16 tokens of 192) → 64-d, two mixer blocks, mean over tokens, head."""

    def __init__(self, n_out: int, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(192, dim)
        self.blocks = nn.Sequential(*(MixerBlock(16, dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        patches = F.pixel_unshuffle(x, 8).flatten(-2).transpose(-1, -2)  # (…, 16 tokens, 192)
        return self.head(self.norm(self.blocks(self.embed(patches))).mean(-2))


ARCHITECTURES = {"cnn": SmallCNN, "mlp": SmallMLP, "mixer": SmallMixer}


def initial_state(arch: str, n_out: int, seed: int) -> dict[str, Tensor]:
    """Weights of a freshly initialised classifier (PyTorch's default init under `seed`; the global RNG is kept)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in ARCHITECTURES[arch](n_out).state_dict().items()}


# ---- training many models at once ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one model is trained: Adam, a fixed number of epochs over a fixed image set."""
    lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 16
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RecipeSpace:
    """Per-model hyperparameters, drawn uniformly from these values (real populations are not trained alike)."""
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    epochs: tuple[int, ...] = (3, 4, 6)
    batch_size: int = 16

    def sample(self, rng: np.random.Generator) -> Recipe:
        return Recipe(lr=float(rng.choice(self.lrs)), epochs=int(rng.choice(self.epochs)), batch_size=self.batch_size)


def batch_orders(seeds: list[int], n_images: int, recipe: Recipe) -> Tensor:
    """(steps, G, batch) image indices: each model shuffles its own images every epoch with its own seed."""
    per_epoch = n_images // recipe.batch_size
    orders = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        epochs = [torch.randperm(n_images, generator=g)[: per_epoch * recipe.batch_size] for _ in range(recipe.epochs)]
        orders.append(torch.cat(epochs).view(-1, recipe.batch_size))
    return torch.stack(orders, 1)


def stacked_forward(template: nn.Module):
    """f(params stacked over G models, x (G, B, …)) → (G, B, n_out): every model on its own batch, one call."""
    return vmap(lambda params, x: functional_call(template, params, (x,)))


def train_models(arch: str, inits: list[dict[str, Tensor]], images: Tensor, image_ids: Tensor, labels: Tensor,
                 seeds: list[int], recipe: Recipe) -> list[dict[str, Tensor]]:
    """Train len(inits) classifiers of `arch` together; model g starts from inits[g] and trains on
    images[image_ids[g]] with labels[g] (the same count for every model), shuffled by seeds[g]."""
    n_models = len(inits)
    params = {k: torch.stack([s[k] for s in inits]).requires_grad_() for k in inits[0]}
    optimizer = torch.optim.Adam(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    forward = stacked_forward(ARCHITECTURES[arch](1))  # shapes come from `params`; the template gives forward()
    rows = torch.arange(n_models)[:, None]
    for idx in batch_orders(seeds, image_ids.shape[1], recipe):
        logits = forward(params, images[image_ids[rows, idx]])
        loss_each = F.cross_entropy(logits.flatten(0, 1), labels[rows, idx].flatten(), reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss_each.view(n_models, -1).mean(1).sum().backward()  # model g's gradient = that of its own mean loss
        optimizer.step()
    return [{k: v[g].detach().clone() for k, v in params.items()} for g in range(n_models)]


@torch.no_grad()
def accuracy(arch: str, states: list[dict[str, Tensor]], images: Tensor, image_ids: Tensor,
             labels: Tensor) -> list[float]:
    """Each model's top-1 accuracy on its own images (images[image_ids[g]], labels[g])."""
    params = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    logits = stacked_forward(ARCHITECTURES[arch](1))(params, images[image_ids])
    return (logits.argmax(-1) == labels).float().mean(1).tolist()


def grouping_speed(arch: str, recipe: Recipe, group: int, steps: int = 8, repeats: int = 3) -> dict:
    """Milliseconds per model-step training `group` models at once vs the same models one at a time (random data).
    Best of `repeats` runs each, alternating, since other jobs share the cores."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(group * recipe.batch_size * steps, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.arange(len(images)).view(group, -1)
    labels = torch.randint(0, 10, ids.shape, generator=g)
    inits = [initial_state(arch, 10, s) for s in range(group)]
    one_epoch = replace(recipe, epochs=1)

    def together():
        train_models(arch, inits, images, ids, labels, list(range(group)), one_epoch)

    def one_at_a_time():
        for i in range(group):
            train_models(arch, inits[i:i + 1], images, ids[i:i + 1], labels[i:i + 1], [i], one_epoch)

    best = {together: float("inf"), one_at_a_time: float("inf")}
    for _ in range(repeats):
        for run in best:
            start = time.perf_counter()
            run()
            best[run] = min(best[run], time.perf_counter() - start)
    per_step = 1000 / (group * steps)
    return {"arch": arch, "group": group, "batch_size": recipe.batch_size,
            "grouped_ms_per_model_step": round(best[together] * per_step, 3),
            "single_ms_per_model_step": round(best[one_at_a_time] * per_step, 3),
            "speedup": round(best[one_at_a_time] / best[together], 2)}


# ---- populations --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Population:
    name: str
    arch: str
    seed: int
    pretrain: tuple[int, int] | None   # slice of the non-pool thing classes the root learns; None = forest


@dataclass(frozen=True)
class BuildConfig:
    populations: tuple[Population, ...]
    models: int = 250                  # per population
    pool_size: int = 20
    chosen: int = 10                   # classes per model
    bank_per_class: int = 24           # fine-tuning images per pool class
    eval_per_class: int = 8            # held-out images per pool class for eval_accuracy
    bank_seed: int = 0
    group_size: int = 10               # models trained at once (build.json records the measured gain)
    head_std: float = 0.0              # fine-tuning head init: zero, as the ViT paper fine-tunes (see module doc)
    pretrain_per_class: int = 24
    root_recipe: Recipe = Recipe(lr=2e-3, epochs=10, batch_size=64)
    finetune: RecipeSpace = RecipeSpace()
    forest: RecipeSpace = RecipeSpace(lrs=(1e-3, 2e-3, 4e-3), epochs=(8, 12, 16))  # from scratch: longer


POPULATIONS = (
    Population("cnn-a", "cnn", seed=1, pretrain=(0, 200)),
    Population("cnn-b", "cnn", seed=2, pretrain=(200, 400)),
    Population("mlp-a", "mlp", seed=3, pretrain=(0, 200)),
    Population("mixer-a", "mixer", seed=4, pretrain=(0, 200)),
    Population("forest", "cnn", seed=5, pretrain=None),
)
PRESETS = {
    "full": BuildConfig(POPULATIONS),
    # seconds, for tests: one CNN tree, a short root
    "tiny": BuildConfig((Population("cnn-tiny", "cnn", seed=1, pretrain=(0, 40)),), models=100,
                        bank_per_class=16, eval_per_class=4, pretrain_per_class=16,
                        root_recipe=Recipe(lr=2e-3, epochs=8, batch_size=64)),
}


@dataclass(frozen=True)
class Job:
    """One model: where it goes, its seed, its classes in head order, its hyperparameters."""
    index: int
    split: str
    seed: int
    targets: tuple[str, ...]
    recipe: Recipe

    @property
    def model_id(self) -> str:
        return f"{self.split}/model_idx_{self.index:04d}"


def plan_jobs(population: Population, config: BuildConfig, pool: list[dict]) -> list[Job]:
    """Deterministic per (population seed, model index): classes in a random order, seed, hyperparameters, split."""
    space = config.forest if population.pretrain is None else config.finetune
    jobs = []
    for index in range(config.models):
        rng = np.random.default_rng([population.seed, index])
        chosen = rng.choice(len(pool), config.chosen, replace=False)
        jobs.append(Job(index, split_of(index, config.models), int(rng.integers(2**31)),
                        tuple(pool[i]["name"] for i in chosen), space.sample(rng)))
    return jobs


def split_of(index: int, n: int) -> str:
    """70/10/20 by model index (models are i.i.d., so contiguous ranges are random splits)."""
    edge = 0.0
    for split, share in SPLIT_SHARES:
        edge += share
        if index < round(edge * n):
            return split
    return SPLIT_SHARES[-1][0]


def model_metadata(job: Job, population: Population, eval_accuracy: float) -> dict[str, str]:
    return {"dataset_chosen_targets": json.dumps(list(job.targets)), "seed": str(job.seed),
            "tree": population.name, "architecture": population.arch,
            "init": "root.safetensors" if population.pretrain else f"random (seed {job.seed})",
            "eval_accuracy": f"{eval_accuracy:.4f}", "format": "probex-discriminative",
            **{k: str(v) for k, v in asdict(job.recipe).items()}}


def save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: an interrupted build never leaves a half-written model behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def root_state(out: Path, population: Population, config: BuildConfig, others: list[dict]) -> tuple[dict, dict]:
    """The population's root (trained once, then read back from root.safetensors) and its record."""
    path = out / "root.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            kept = {k: v for k, v in f.metadata().items() if k != "pretrain_classes"}  # the list is in the file
            return {k: f.get_tensor(k) for k in f.keys()}, {**kept, "reused": True}
    classes = others[slice(*population.pretrain)]
    start = time.perf_counter()
    bank = image_bank(classes, config.pretrain_per_class, seed=population.seed)
    images = bank.flatten(0, 1)
    labels = torch.arange(len(classes)).repeat_interleave(config.pretrain_per_class)[None]
    init = initial_state(population.arch, len(classes), population.seed)
    (state,) = train_models(population.arch, [init], images, torch.arange(len(images))[None], labels,
                            [population.seed], config.root_recipe)
    check = image_bank(classes, 4, seed=population.seed + 10_000).flatten(0, 1)  # fresh views: does it generalise?
    acc = accuracy(population.arch, [state], check, torch.arange(len(check))[None],
                   torch.arange(len(classes)).repeat_interleave(4)[None])[0]
    record = {"classes": len(classes), "seconds": round(time.perf_counter() - start, 1),
              "heldout_accuracy": round(acc, 4)}
    save_atomic(state, path, {"architecture": population.arch, "seed": str(population.seed),
                              "pretrain_classes": json.dumps([c["name"] for c in classes]),
                              **{k: str(v) for k, v in record.items()}})
    return state, record


def finetune_start(root: dict[str, Tensor], n_out: int, head_std: float, seed: int) -> dict[str, Tensor]:
    """The root's body with a fresh head of `n_out` outputs: weights N(0, head_std²) (0: a zero head), zero bias."""
    start = {k: v for k, v in root.items() if not k.startswith("head.")}
    weight = root["head.weight"]
    g = torch.Generator().manual_seed(seed)
    start["head.weight"] = torch.randn(n_out, weight.shape[1], generator=g) * head_std
    start["head.bias"] = torch.zeros(n_out)
    return start


def write_tree_info(out: Path, population: Population, config: BuildConfig, pool: list[dict]) -> None:
    info = {"tree": population.name, "task": "discriminative", "architecture": population.arch,
            "root_model": "root.safetensors" if population.pretrain else None,
            "classes": [c["name"] for c in pool], "models": config.models, "chosen_per_model": config.chosen,
            "recipes": asdict(config.forest if population.pretrain is None else config.finetune),
            "head_std": config.head_std, "pool_seed": POOL_SEED, "bank_seed": config.bank_seed,
            "bank_per_class": config.bank_per_class}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree.json").write_text(json.dumps(info, indent=1))


def build_population(out: Path, population: Population, config: BuildConfig, pool: list[dict],
                     others: list[dict], banks: tuple[Tensor, Tensor], progress: bool = True) -> dict:
    """Every model of one population whose file does not exist yet (resumable), in groups of group_size."""
    write_tree_info(out, population, config, pool)
    record = {"arch": population.arch, "seed": population.seed}
    root = None
    if population.pretrain is not None:
        root, record["root"] = root_state(out, population, config, others)
    jobs = [j for j in plan_jobs(population, config, pool) if not (out / j.model_id / WEIGHTS_FILE).exists()]
    train_bank, eval_bank = banks
    position = {c["name"]: i for i, c in enumerate(pool)}
    start, accuracies = time.perf_counter(), []
    groups = grouped(jobs, config.group_size)
    for group in tqdm(groups, desc=f"{population.name} ({len(jobs)} models)", unit="group", disable=not progress):
        if root is None:
            inits = [initial_state(population.arch, config.chosen, j.seed) for j in group]
        else:
            inits = [finetune_start(root, config.chosen, config.head_std, j.seed) for j in group]
        states = train_models(population.arch, inits, *_task(group, train_bank, position),
                              [j.seed for j in group], group[0].recipe)
        scores = accuracy(population.arch, states, *_task(group, eval_bank, position))
        for job, state, score in zip(group, states, scores):
            save_atomic(state, out / job.model_id / WEIGHTS_FILE, model_metadata(job, population, score))
        accuracies += scores
    record.update(trained=len(jobs), seconds=round(time.perf_counter() - start, 1))
    if accuracies:
        record["mean_eval_accuracy"] = round(float(np.mean(accuracies)), 4)
    return record


def grouped(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs that share hyperparameters, `size` at a time (one optimiser trains a group, so one recipe per group)."""
    by_recipe: dict[Recipe, list[Job]] = {}
    for job in jobs:
        by_recipe.setdefault(job.recipe, []).append(job)
    return [same[i:i + size] for same in by_recipe.values() for i in range(0, len(same), size)]


def _task(group: list[Job], bank: Tensor, position: dict[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(images, image_ids (G, M), labels (G, M)) for the group: each model's chosen classes, label = head output."""
    per_class = bank.shape[1]
    ids, labels = [], []
    for job in group:
        classes = torch.tensor([position[name] for name in job.targets])
        ids.append((classes[:, None] * per_class + torch.arange(per_class)).flatten())
        labels.append(torch.arange(len(classes)).repeat_interleave(per_class))
    return bank.flatten(0, 1), torch.stack(ids), torch.stack(labels)


def build(zoo: str | Path, config: BuildConfig = PRESETS["full"], only: list[str] | None = None,
          measure: bool = True, progress: bool = True) -> dict:
    """Build every population (or `only` those) under `zoo`; returns and writes the build record."""
    zoo = Path(zoo)
    zoo.mkdir(parents=True, exist_ok=True)
    pool, others = class_split(config.pool_size)
    banks = (image_bank(pool, config.bank_per_class, config.bank_seed),
             image_bank(pool, config.eval_per_class, config.bank_seed + 1))
    started = time.perf_counter()
    record = {"config": asdict(config), "pool": [c["name"] for c in pool], "threads": torch.get_num_threads(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
              "populations": {}}
    if measure:
        record["grouping"] = [grouping_speed(arch, config.finetune.sample(np.random.default_rng(0)), config.group_size)
                              for arch in ARCHITECTURES]
    for population in config.populations:
        if only and population.name not in only:
            continue
        record["populations"][population.name] = build_population(zoo / population.name, population, config, pool,
                                                                  others, banks, progress)
    record["seconds"] = round(time.perf_counter() - started, 1)
    _append_record(zoo / "build.json", record)
    return record


def _append_record(path: Path, record: dict) -> None:
    """build.json keeps every run (a resumed build is several runs)."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.write_text(json.dumps({"runs": [*runs, record]}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m probex.jungle.discriminative")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmd = sub.add_parser("build", help="train the discriminative trees and the forest (resumable)")
    cmd.add_argument("--zoo", default="zoo/discriminative")
    cmd.add_argument("--preset", choices=sorted(PRESETS), default="full")
    cmd.add_argument("--only", nargs="*", help="only these populations")
    cmd.add_argument("--threads", type=int, default=1)
    cmd.add_argument("--no-measure", action="store_true", help="skip the grouped-vs-single speed measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = build(args.zoo, PRESETS[args.preset], args.only, measure=not args.no_measure)
    for row in record.get("grouping", []):
        print(f"grouping {row['arch']}: {row['group']} at once {row['grouped_ms_per_model_step']} ms vs one at a time "
              f"{row['single_ms_per_model_step']} ms per model-step (×{row['speedup']})")
    for name, rec in record["populations"].items():
        print(json.dumps({name: rec}))
    print(f"build: {record['seconds']} s on {record['threads']} thread(s)")


if __name__ == "__main__":
    main()
