"""The open-set concept list on a bundle's gallery: known and unseen classes scored together, and how well it tells
"none of the known classes".

    python bench/novelty.py [--bundle DIR]

Per tree with held-out models, from the gallery's own encodings of its val / test / val_holdout / test_holdout
models (what predict computes for those files): top-1 over every vocabulary class of the z-normed list (before) and
of the open-set list (unseen classes' scores + Gallery.unseen_offset, set on val and val_holdout only), beside its
ceiling (known models read among the known classes only, held-out ones among the unseen only); and, as
detectors of "unlike every known class", the AUC on test vs test_holdout of the nearest train model's cosine (the
earlier test) and of the margin between the best unseen and the best known class (the app's), with the share of
test models kept and test_holdout models flagged at each one's operating point.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPLITS = ("val", "test", "val_holdout", "test_holdout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None)
    args = parser.parse_args()
    from probex.service import NOVELTY_KEPT, Studio

    studio = Studio.load(args.bundle, warm=False)
    for name, tree in studio.bundle.trees.items():
        g = tree.gallery
        rows = {s: [i for i, p in enumerate(g.splits) if p == s] for s in ("train", *SPLITS)}
        anchors = tree.concept_anchors()
        if anchors is None or not rows["test_holdout"] or len(rows["val"]) < 5:
            continue
        vocab_row = {c: i for i, c in enumerate(g.vocabulary)}
        y = torch.tensor([vocab_row[c] for c in g.model_classes])
        z = g.concept_scores(g.encodings, anchors)
        offset = g.unseen_offset(z)
        lists = {"z-normed (before)": z, f"open-set (unseen +{offset:.2f})": g.open_set_scores(z, offset)}
        print(f"{name}: concept list over all {len(g.vocabulary)} classes, top-1")
        for label, scores in lists.items():
            print(f"  {label:<27} " + "  ".join(
                f"{s} {float((scores[rows[s]].argmax(1) == y[rows[s]]).float().mean()):.3f}" for s in SPLITS))
        known = g.known_classes
        # a perfect "unlike every known class" test would send known models to the known classes only and held-out
        # ones to the unseen only: the most the open-set list can read with this expert
        ceiling = {s: float((z[rows[s]].masked_fill(known if "holdout" in s else ~known, -torch.inf).argmax(1)
                             == y[rows[s]]).float().mean()) for s in SPLITS}
        print("  " + f"{'ceiling (perfect detector)':<27} " + "  ".join(f"{s} {ceiling[s]:.3f}" for s in SPLITS))
        x = F.normalize(g.encodings.float(), dim=-1)
        nearest = {s: (x[rows[s]] @ x[rows["train"]].T).max(1).values for s in SPLITS}
        threshold = float(torch.quantile(nearest["val"], 1 - NOVELTY_KEPT))
        margin = z[:, ~known].max(1).values + offset - z[:, known].max(1).values   # > 0: an unseen class leads
        labels = [0] * len(rows["test"]) + [1] * len(rows["test_holdout"])
        detectors = {"nearest train model's cosine": (-torch.cat([nearest["test"], nearest["test_holdout"]]),
                                                       nearest["test"] < threshold, nearest["test_holdout"] < threshold),
                     "best unseen − best known": (torch.cat([margin[rows["test"]], margin[rows["test_holdout"]]]),
                                                  margin[rows["test"]] > 0, margin[rows["test_holdout"]] > 0)}
        print(f"{name}: 'unlike every known class', test vs test_holdout")
        for label, (score, known_flagged, held_flagged) in detectors.items():
            print(f"  {label:<30} AUC {roc_auc_score(labels, score.numpy()):.3f}; test kept "
                  f"{1 - float(known_flagged.float().mean()):.3f}, test_holdout flagged {float(held_flagged.float().mean()):.3f}")


if __name__ == "__main__":
    main()
