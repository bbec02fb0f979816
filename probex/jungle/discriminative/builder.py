"""The populations (trees and the forest), their presets, and the resumable build that writes them as zoos."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .classes import POOL_SEED, class_split, image_bank
from .models import ARCHITECTURES, initial_state
from .train import Recipe, RecipeSpace, accuracy, grouping_speed, train_models

WEIGHTS_FILE = "model.safetensors"
SPLIT_SHARES = (("train", 0.7), ("val", 0.1), ("test", 0.2))


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
    head_std: float = 0.0              # fine-tuning head init: zero, as the ViT paper fine-tunes (see the package doc)
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
