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

from .atlas import load_atlas
from .lora import LoraJob, sample_jobs

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
}


def class_split() -> tuple[list[dict], list[dict]]:
    _, classes = load_atlas()
    things = [c for c in classes if c["subject"] == "thing"]
    order = np.random.default_rng(CLASS_SEED).permutation(len(things))
    shuffled = [things[i] for i in order]
    return shuffled[:TRAIN_CLASSES], shuffled[TRAIN_CLASSES:TRAIN_CLASSES + HOLDOUT_CLASSES]


def preset_jobs(preset: str) -> dict[str, list[LoraJob]]:
    """root name → jobs, model ids numbered per tree in Model-J style."""
    train, holdout = class_split()
    jobs = {}
    for root, spec in PRESETS[preset].items():
        tree = sample_jobs(root, train[:spec["train_classes"]], spec["per_class"], seed=spec["seed"])
        tree += sample_jobs(root, holdout[:spec["holdout_classes"]], spec["per_holdout"], seed=spec["seed"] + 1000,
                            start_index=len(tree))
        jobs[root] = tree
    return jobs


def write_tree_info(zoo_dir: Path, root: str, jobs: list[LoraJob]):
    """``tree.json``: what a reader needs to know about this population besides the files."""
    from .lora import INSTANCE_PROMPT

    info = {"name": root, "root_model": f"checkpoints/roots/{root}", "task": "generative",
            "text_encoder": "minilm", "prompt_template": "an emoji of {name}", "instance_prompt": INSTANCE_PROMPT,
            "models": len(jobs), "classes": sorted({j.class_name for j in jobs})}
    zoo_dir.mkdir(parents=True, exist_ok=True)
    (zoo_dir / "tree.json").write_text(json.dumps(info, indent=1))
