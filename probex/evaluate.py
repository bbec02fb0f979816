"""The paper's metrics, on logits or on encodings.

- per-label accuracy (multilabel, logit > 0 means "trained on this class"), top-1 (in-distribution and zero-shot);
- on the representation: kNN classification, one-class classification ROC-AUC (normal = one class, anomaly score =
  mean distance to the k nearest reference models of that class, averaged over classes) and retrieval precision@k —
  all with cosine distance, the geometry the align head trains;
- router accuracy.
`evaluate_expert` runs every metric that fits an expert's task on a cached layer (what `probex eval` prints);
`evaluate_bundle` reads a bundle on one population, `evaluate_jungle` on every tree of a jungle.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from tqdm.auto import tqdm

from probex.bundle import Bundle
from probex.data import LayerData, LayerStack, task_targets
from probex.errors import NoExpertError, ProbexError
from probex.text import load_text_encoder, prompt
from probex.train import encode_all, nearest_mean_top1
from probex.weights import read_weights
from probex.zoo import Zoo, build_cache


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def top1_accuracy(logits, labels) -> float:
    return float((_np(logits).argmax(1) == _np(labels)).mean())


def per_label_accuracy(logits, targets) -> float:
    """Multilabel: the fraction of (model, label) pairs decided right, threshold logit 0 (probability ½)."""
    return float(((_np(logits) > 0) == (_np(targets) > 0.5)).mean())


@torch.no_grad()
def zero_shot_accuracy(expert, inputs, labels, text_emb: torch.Tensor) -> float:
    """Top-1 among `text_emb`'s classes (typically held-out class names the expert never trained on)."""
    expert.eval()
    return top1_accuracy(expert(inputs, text_emb), labels)


def knn_accuracy(train_enc, train_labels, query_enc, query_labels, k: int = 5) -> float:
    """Majority vote of the k nearest training models (cosine)."""
    k = min(k, len(train_enc))
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(_np(train_enc), _np(train_labels))
    return float((knn.predict(_np(query_enc)) == _np(query_labels)).mean())


def one_class_auc(reference_enc, reference_labels, test_enc, test_labels, k: int = 5) -> dict:
    """For each class c: train on c's reference models only (normal = c); a test model's anomaly score is its mean
    cosine distance to the k nearest of them; ROC-AUC of anomalies (other classes) vs normals (c). Returns
    {"auc": mean over classes, "per_class": {c: auc}}; classes without both normal and anomalous test models skip."""
    reference_enc, reference_labels = _np(reference_enc), _np(reference_labels)
    test_enc, test_labels = _np(test_enc), _np(test_labels)
    per_class = {}
    for c in np.unique(reference_labels):
        normal = reference_enc[reference_labels == c]
        is_anomaly = test_labels != c
        if is_anomaly.all() or not is_anomaly.any():
            continue
        nn = NearestNeighbors(n_neighbors=min(k, len(normal)), metric="cosine").fit(normal)
        score = nn.kneighbors(test_enc)[0].mean(1)
        per_class[c.item()] = float(roc_auc_score(is_anomaly, score))
    return {"auc": float(np.mean(list(per_class.values()))) if per_class else float("nan"), "per_class": per_class}


def precision_at_k(gallery_enc, gallery_labels, query_enc=None, query_labels=None, k: int = 5) -> float:
    """Retrieval: the fraction of each query's k nearest gallery models (cosine) that share its class.
    Without queries, every gallery model queries the others (itself excluded)."""
    gallery_labels = _np(gallery_labels)
    n_neighbors = min(k, len(gallery_labels) - (query_enc is None))
    nn = NearestNeighbors(n_neighbors=n_neighbors, metric="cosine").fit(_np(gallery_enc))
    if query_enc is None:
        idx, query_labels = nn.kneighbors(return_distance=False), gallery_labels
    else:
        idx, query_labels = nn.kneighbors(_np(query_enc), return_distance=False), _np(query_labels)
    return float((gallery_labels[idx] == query_labels[:, None]).mean())


def router_accuracy(router, models, true_trees) -> float:
    """Fraction routed to their true tree; a true tree of None means "no expert should claim it" — right when the
    router answers NoExpertError."""
    right = 0
    for weights, truth in zip(models, true_trees):
        try:
            right += router.route(weights).tree == truth
        except NoExpertError:
            right += truth is None
    return right / len(true_trees)


def layer_data(cache, layer: str | list[str]):
    """What an expert reads from a cache: one layer, or several together (root-anchored experts)."""
    if isinstance(layer, str):
        return LayerData.from_cache(cache, layer)

    return LayerStack.from_cache(cache, list(layer))


def evaluate_expert(expert, cache, layer: str | list[str], task: str | None = None,
                    text_embeddings: torch.Tensor | None = None, k: int = 5,
                    encodings: torch.Tensor | None = None) -> dict:
    """Every metric that fits the expert's task, on the cached layer's (or layers') splits.

    In-distribution: top-1 (or per-label accuracy) on val / test; for single-label trees also the top-1 of the
    nearest class mean of the train models' encodings (how the app reads known classes, Gallery.class_anchors), and kNN
    and retrieval of test models against the train models' encodings. Align experts also: zero-shot top-1 on
    val_holdout / test_holdout, and one-class AUC on the held-out classes (val_holdout models are each class's
    reference, test_holdout models are scored). ``encodings``: the expert's encodings of every cached model, when the
    caller has them already."""
    targets = task_targets(cache, task or expert.head_kind, text_embeddings)
    split = {s: idx for s, idx in targets.split.items() if len(idx)}
    every = encode_all(expert, layer_data(cache, layer)) if encodings is None else encodings
    enc = {s: every[idx] for s, idx in split.items()}
    y = {s: targets.y[idx] for s, idx in split.items()}
    report = {"layer": layer, "task": targets.task, "n_models": {s: len(idx) for s, idx in split.items()}}
    for s in ("val", "test", "val_holdout", "test_holdout"):
        if s not in split or (s.endswith("holdout") and targets.task != "align"):
            continue
        logits = expert.logits(enc[s], targets.text_for(s))
        name = "zero_shot" if s.endswith("holdout") else ("per_label_accuracy" if targets.task == "multilabel" else "top1")
        metric = per_label_accuracy if targets.task == "multilabel" else top1_accuracy
        report[f"{name}_{s}"] = metric(logits, y[s])
    if targets.task != "multilabel" and "train" in split:
        for s in ("val", "test"):
            if s in split:
                report[f"class_mean_top1_{s}"] = nearest_mean_top1(every, targets, s)
    if targets.task != "multilabel" and "train" in split and "test" in split:
        report[f"knn{k}_test"] = knn_accuracy(enc["train"], y["train"], enc["test"], y["test"], k)
        report[f"precision@{k}_test"] = precision_at_k(enc["train"], y["train"], enc["test"], y["test"], k)
    if targets.task == "align" and "val_holdout" in split and "test_holdout" in split:
        report[f"occ_auc{k}_holdout"] = one_class_auc(enc["val_holdout"], y["val_holdout"], enc["test_holdout"],
                                                      y["test_holdout"], k)["auc"]
    return report


def evaluate_bundle(bundle_dir, zoo_dir, cache_dir=None, k: int = 5) -> dict:
    """A bundle on a population (one tree, Model-J layout): how many of its models the router sends to the tree,
    then `evaluate_expert` of that tree's expert on them. The true tree is the zoo's tree.json "name" when the
    bundle has it, else the tree most models route to. Flat {metric: value}, as `probex eval` prints it."""
    bundle = Bundle.load(bundle_dir)
    zoo = Zoo.scan(zoo_dir)
    routed = []
    for m in tqdm(zoo.models, desc="routing", unit="model"):
        try:
            routed.append(bundle.router.route(read_weights(zoo.root / m.source)).tree)
        except NoExpertError:
            routed.append(None)
    named = zoo.tree.get("name")
    truth = named if named in bundle.trees else max(set(routed), key=lambda t: (t is not None, routed.count(t)))
    if truth not in bundle.trees:
        raise ProbexError(f"no model of {zoo.root.name} routes to a tree of this bundle")
    tree = bundle.trees[truth]
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(zoo, cache_dir or tmp, layers=tree.layers)
        text = None
        if tree.expert.head_kind == "align":
            text = tree.expert.text_input(load_text_encoder(bundle.text_encoder),
                                          [prompt(tree.prompt_template, c["name"]) for c in cache.classes])
        else:
            expected = tree.gallery.vocabulary_ids
            classes = [c["id"] for c in cache.classes if tree.expert.head_kind == "multilabel" or not c["holdout"]]
            if classes != expected:
                raise ProbexError(f"the {truth} expert was trained on {len(expected)} other classes than the "
                                  f"{len(classes)} of {zoo.root.name}; only an align expert reads new classes")
        report = evaluate_tree(tree, cache, tree.expert.head_kind, text, k)
    n_models = report.pop("n_models")
    return {"tree": truth, "router_accuracy": routed.count(truth) / len(routed),
            **{f"n_{split}": n for split, n in n_models.items()}, **report}


def evaluate_jungle(bundle_dir, jungle_dir, cache_root=None, k: int = 5) -> dict[str, dict]:
    """A bundle on every tree of a jungle (the folders of ``jungle_dir`` with a tree.json): `evaluate_bundle` of
    each, so the router is checked on every LoRA of every tree. Caches under ``cache_root``/<folder> (temporary
    without one). {folder name: report}."""
    trees = sorted(p for p in Path(jungle_dir).iterdir() if (p / "tree.json").is_file())
    return {t.name: evaluate_bundle(bundle_dir, t, Path(cache_root) / t.name if cache_root else None, k)
            for t in trees}


def evaluate_tree(tree, cache, task: str | None, text: torch.Tensor | None, k: int = 5) -> dict:
    """A bundle tree on a cached population: `evaluate_expert` of its expert, the app's concept list
    (`concept_top1`) and its text search (`search_precision`); the models are encoded once for all of them."""
    encodings = encode_all(tree.expert, layer_data(cache, tree.layer))
    return {**evaluate_expert(tree.expert, cache, tree.layer, task, text, k, encodings),
            **concept_top1(tree, cache, encodings), **search_precision(tree, k)}


@torch.no_grad()
def concept_top1(tree, cache, encodings: torch.Tensor) -> dict:
    """Top-1 of the app's concept list (Studio.concepts) per split: every class of the tree's vocabulary scored
    together — known ones by their train models' mean, the others by text, z-normed (Gallery.concept_scores) — the
    right class first? {concept_top1_<split>: value}, and concept_top1_raw_<split> by raw cosine (no z-norm); empty
    for trees without a text head or with label lists; concept_top1_open_<split> with the open-set offset
    (Gallery.unseen_offset, set on the gallery's val models) and unseen_auc_test, how well the margin between the
    best unseen and the best known class tells test_holdout from test models. ``encodings``: the tree's expert's,
    of every cached model."""
    anchors = tree.concept_anchors()
    g = tree.gallery
    if anchors is None or not all(isinstance(c, str) for c in g.model_classes):
        return {}
    row = {name: i for i, name in enumerate(g.vocabulary)}
    name_of = {c["id"]: c["name"] for c in cache.classes}
    y = torch.tensor([row.get(name_of[m["class_id"]], -1) for m in cache.models])
    report = {}
    z = g.concept_scores(encodings, anchors)
    offset = g.unseen_offset(g.concept_scores(g.encodings, anchors))
    kinds = {"": z, "raw_": g.concept_scores(encodings, anchors, (torch.zeros(len(anchors)), torch.ones(len(anchors)))),
             "open_": g.open_set_scores(z, offset)}
    for kind, scores in kinds.items():
        for split in ("val", "test", "val_holdout", "test_holdout"):
            idx = cache.split_indices(split)
            if len(idx):
                report[f"concept_top1_{kind}{split}"] = float((scores[idx].argmax(1) == y[idx]).float().mean())
    known = g.known_classes
    test, held = cache.split_indices("test"), cache.split_indices("test_holdout")
    if len(test) and len(held) and 0 < known.sum() < len(known):
        # the open-set list's test for "none of the known classes": best unseen minus best known score
        margin = z[:, ~known].max(1).values - z[:, known].max(1).values
        report["unseen_offset"] = offset
        report["unseen_auc_test"] = float(roc_auc_score([0] * len(test) + [1] * len(held),
                                                        torch.cat([margin[test], margin[held]]).numpy()))
    return report


def search_precision(tree, k: int = 5) -> dict:
    """Text search over the tree's gallery (Studio.search) with each vocabulary class's caption as the query: the
    share of the top k models that are of that class, averaged over classes with train models ("known") and
    without ("unseen"), z-normed (the app) and by raw cosine. {search_p@k_<known|unseen>[_raw]: value}."""
    text = tree.class_text_features()
    g = tree.gallery
    if text is None or not all(isinstance(c, str) for c in g.model_classes):
        return {}
    row = {name: i for i, name in enumerate(g.vocabulary)}
    y = torch.tensor([row[c] for c in g.model_classes])
    has_train = torch.zeros(len(text), dtype=torch.bool)
    has_train[[row[c] for c, s in zip(g.model_classes, g.splits) if s == "train"]] = True
    present = torch.bincount(y, minlength=len(text)) > 0  # a class with no model in the gallery cannot be found
    calibrations = {"": g.model_calibration(text), "_raw": (torch.zeros(len(y)), torch.ones(len(y)))}
    report = {}
    for kind, calibration in calibrations.items():
        top = g.search_scores(text, calibration).topk(min(k, len(y)), dim=1).indices   # (C, k)
        hits = (y[top] == torch.arange(len(text))[:, None]).float().mean(1)
        for group, mask in (("known", has_train & present), ("unseen", ~has_train & present)):
            if mask.any():
                report[f"search_p@{k}_{group}{kind}"] = float(hits[mask].mean())
    return report
