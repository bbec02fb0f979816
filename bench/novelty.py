"""How well "unlike every known class" (Studio.novelty) tells held-out classes from known ones on a bundle's gallery.

    python bench/novelty.py [--bundle DIR]

Per tree with held-out models: the share of test models (known classes) kept and of test_holdout models flagged at
the shipped threshold (95 % of validation models kept), and the AUC of the nearest-train-model cosine as a detector,
for the nearest model (shipped) and the mean of the 5 nearest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None)
    args = parser.parse_args()
    from probex.service import NOVELTY_KEPT, Studio

    studio = Studio.load(args.bundle, warm=False)
    for name, tree in studio.bundle.trees.items():
        g = tree.gallery
        x = F.normalize(g.encodings.float(), dim=-1)
        rows = {s: [i for i, p in enumerate(g.splits) if p == s] for s in ("train", "val", "test", "test_holdout")}
        if not rows["test_holdout"] or len(rows["val"]) < 5:
            continue
        for k in (1, 5):
            near = {s: (x[rows[s]] @ x[rows["train"]].T).topk(k, 1).values.mean(1) for s in ("val", "test", "test_holdout")}
            threshold = float(torch.quantile(near["val"], 1 - NOVELTY_KEPT))
            labels = [1] * len(near["test"]) + [0] * len(near["test_holdout"])
            auc = roc_auc_score(labels, torch.cat([near["test"], near["test_holdout"]]).numpy())
            print(f"{name}, {'nearest train model' if k == 1 else f'mean of {k} nearest'}: threshold {threshold:.3f}; "
                  f"test (known) kept {float((near['test'] >= threshold).float().mean()):.3f}, test_holdout flagged "
                  f"{float((near['test_holdout'] < threshold).float().mean()):.3f}; AUC {auc:.3f}")


if __name__ == "__main__":
    main()
