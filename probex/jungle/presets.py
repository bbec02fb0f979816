"""Which classes go where. Deterministic: the same preset always names the same classes, splits and jobs.

Classes come from the atlas's 'thing' concepts (animals, food, plants, objects, vehicles…), shuffled once with
``CLASS_SEED``: the first ``TRAIN_CLASSES`` are tree A's training classes, the next ``HOLDOUT_CLASSES`` its held-out
(zero-shot) classes. Tree B (a second root of the same architecture) reuses tree A's training classes, so the router
has to tell the trees apart by their root, not by what they draw.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..profiles import PROJECT_ROOT
from .atlas import load_atlas
from .lora import INSTANCE_PROMPT, LoraJob, build_population, sample_jobs

CLASS_SEED = 7
TRAIN_CLASSES = 150
HOLDOUT_CLASSES = 30

PRESETS = {
    # the pilot that gates the recipe (issue: roots and LoRA recipe)
    "pilot": {
        "emoji-root-1": {"train_classes": 100, "holdout_classes": 30, "seed": 11,
                         "per_class": {"train": 3, "val": 1, "test": 1},
                         "per_holdout": {"val_holdout": 2, "test_holdout": 2}},
        "emoji-root-2": {"train_classes": 20, "holdout_classes": 0, "seed": 12,
                         "per_class": {"train": 1, "val": 1, "test": 1}, "per_holdout": {}},
    },
    # the full jungle the shipped bundle is built from (issue: the Mini Model Jungle at scale): tree A 150 training
    # classes × 6 LoRAs, classes taking five split patterns in turn so the models split exactly 70/10/20 (630/90/180;
    # every class has ≥ 4 train LoRAs and ≥ 1 test LoRA), and 30 held-out classes × 6; tree B 40 classes × 5.
    # 1,280 LoRAs: the minimum sizes (build time: docs/RESULTS.md)
    "emoji-mini": {
        "emoji-root-1": {"train_classes": 150, "holdout_classes": 30, "seed": 21,
                         "per_class": [{"train": 5, "test": 1}, {"train": 4, "val": 1, "test": 1},
                                       {"train": 4, "val": 1, "test": 1}, {"train": 4, "val": 1, "test": 1},
                                       {"train": 4, "test": 2}],
                         "per_holdout": {"val_holdout": 3, "test_holdout": 3}},
        "emoji-root-2": {"train_classes": 40, "holdout_classes": 0, "seed": 22,
                         "per_class": {"train": 3, "val": 1, "test": 1}, "per_holdout": {}},
    },
    # the Mini Model-J v2 pilot (issue: Mini Model-J v2): one tree on a roots-v2 root, 60 training classes × 25
    # train LoRAs (+ 2 val, 3 test) for learning curves at 5 / 10 / 25 LoRAs a class, 20 held-out classes × 10;
    # 2,000 LoRAs. The root is not shipped: --roots-dir names where it was pretrained
    "v2-pilot": {
        "emoji-root-3": {"train_classes": 60, "holdout_classes": 20, "seed": 41,
                         "per_class": {"train": 25, "val": 2, "test": 3},
                         "per_holdout": {"val_holdout": 4, "test_holdout": 6}},
    },
    # Mini Model-J v2, the paper's shapes (issue: Mini Model-J v2). SD_200 analogue on root 3: 170 training classes ×
    # 36 LoRAs (25 train, 4 val, 7 test: 69/11/19) and the 30 held-out classes × 10; tree B on root 4: 40 × 10.
    # 6,820 LoRAs
    "mini-modelj-v2": {
        "emoji-root-3": {"train_classes": 170, "holdout_classes": 30, "seed": 51,
                         "per_class": {"train": 25, "val": 4, "test": 7},
                         "per_holdout": {"val_holdout": 4, "test_holdout": 6}},
        "emoji-root-4": {"train_classes": 40, "holdout_classes": 0, "seed": 52,
                         "per_class": {"train": 7, "val": 1, "test": 2}, "per_holdout": {}},
    },
    # its SD_1k analogue on root 3: every class the root was pretrained on, 5 LoRAs each (70/10/20 over two
    # classes' patterns), 150 of them held out; 3,790 LoRAs
    "mini-modelj-v2-1k": {
        "emoji-root-3": {"train_classes": 608, "holdout_classes": 150, "seed": 53,
                         "per_class": [{"train": 4, "test": 1}, {"train": 3, "val": 1, "test": 1}],
                         "per_holdout": {"val_holdout": 2, "test_holdout": 3}},
    },
}


def class_split() -> tuple[list[dict], list[dict]]:
    """(training classes, held-out classes) in preset order: the shuffled 'thing' classes, the 30 held out by every
    preset first among the held-out ones. Training takes the first TRAIN_CLASSES, then every class after the held-out
    block; held-out lists beyond 30 (the SD_1k analogue) continue from the training pool's end, so a preset's
    training and held-out classes never meet (``preset_jobs`` checks it)."""
    _, classes = load_atlas()
    things = [c for c in classes if c["subject"] == "thing"]
    order = np.random.default_rng(CLASS_SEED).permutation(len(things))
    shuffled = [things[i] for i in order]
    held = shuffled[TRAIN_CLASSES:TRAIN_CLASSES + HOLDOUT_CLASSES]
    pool = shuffled[:TRAIN_CLASSES] + shuffled[TRAIN_CLASSES + HOLDOUT_CLASSES:]
    return pool, held + pool[::-1]


def jungle_split() -> tuple[list[dict], list[dict]]:
    """The emoji jungle's classes: its TRAIN_CLASSES training classes and HOLDOUT_CLASSES held-out ones (what the
    shipped bundle and the benches reading it call "known" and "held-out")."""
    train, holdout = class_split()
    return train[:TRAIN_CLASSES], holdout[:HOLDOUT_CLASSES]


def preset_jobs(preset: str) -> dict[str, list[LoraJob]]:
    """root name → jobs, model ids numbered per tree in Model-J style."""
    train, holdout = class_split()
    jobs = {}
    for root, spec in PRESETS[preset].items():
        seen, held = train[:spec["train_classes"]], holdout[:spec["holdout_classes"]]
        if {c["id"] for c in seen} & {c["id"] for c in held}:
            raise InputError(f"preset {preset}: {root} would hold out classes it trains on")
        tree = sample_jobs(root, seen, spec["per_class"], seed=spec["seed"])
        tree += sample_jobs(root, held, spec["per_holdout"], seed=spec["seed"] + 1000, start_index=len(tree))
        jobs[root] = tree
    return jobs


def write_tree_info(zoo_dir: Path, root: str, jobs: list[LoraJob], root_dir: Path):
    """``tree.json``: what a reader needs to know about this population besides the files."""
    root_dir = Path(root_dir).resolve()
    shipped = root_dir.is_relative_to(PROJECT_ROOT)   # shipped roots by their path in the repo, others as they are
    info = {"name": root, "root_model": (root_dir.relative_to(PROJECT_ROOT).as_posix() if shipped else str(root_dir)), "task": "generative",
            "text_encoder": "minilm", "prompt_template": "an emoji of {name}", "instance_prompt": INSTANCE_PROMPT,
            "models": len(jobs), "classes": sorted({j.class_name for j in jobs})}
    zoo_dir.mkdir(parents=True, exist_ok=True)
    (zoo_dir / "tree.json").write_text(json.dumps(info, indent=1))


def build_preset(preset: str, zoo: Path, roots_dir: Path, roots: list[str] | None = None, adapters_per_pass: int = 10,
                 device: str = "cpu", ray: bool | str = False) -> list[dict]:
    """Train a preset's LoRAs into ``<zoo>/<preset>/<root>/`` (Model-J layout); resumable — files that exist
    are skipped. ``ray`` (see probex.cluster.map_jobs) trains the passes as Ray tasks, side by side."""
    if preset not in PRESETS:
        raise InputError(f"no preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    records = []
    for root, jobs in preset_jobs(preset).items():
        if roots and root not in roots:
            continue
        tree_dir = Path(zoo) / preset / root
        write_tree_info(tree_dir, root, jobs, Path(roots_dir) / root)
        records.append(build_population(Path(roots_dir) / root, jobs, tree_dir, adapters_per_pass, device,
                                        seed=PRESETS[preset][root]["seed"], ray=ray))
    return records
