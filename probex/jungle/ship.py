"""Build the embedded ``emoji-mini`` bundle (the app's default) from a built jungle population.

    python -m probex.jungle ship pilot [--zoo zoo] [--roots emoji-root-1] [--out checkpoints/emoji-mini]

Per tree (one folder per root under ``<zoo>/<preset>/``): cache the LoRA layers; on the root's cross-attention
value layers, and on its key + value layers, fit a linear root-anchored ProbeX (epoch chosen on val); build the
training-free ones at token ranks 2–4 (text read on the same layers or on the value layers only), and the training-free
readers of whole cross-attention blocks (AttentionReader: query, key, value and output changes) at 8, 12 and 16
synthetic queries, leaving out those whose gallery encodings (int8) would pass the tree's gallery budget; keep the
candidate whose encodings read the val splits best — known classes by the nearest mean of
their train models (what the app does, Gallery.class_anchors), held-out classes by text; encode every known model for
the gallery, ship one LoRA per class to draw samples from and a few test / held-out-class LoRAs as examples. The router
is fitted on all trees together, with each root's listeners (probex.router.Tree); its routing layer is the first
layer, in sorted order, on which every known LoRA routes back to its own tree — by clustering where that separates
the trees, else by the roots' listeners.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..build import TreeSpec, build_bundle, example_models, first_signature, sample_ids
from ..data import LayerStack, task_targets
from ..experts import PROJECTIONS, AnchoredProbeX, AttentionReader
from ..router import Population, separating_router
from ..text import load_text_encoder
from ..train import TrainConfig, encode_all, fit_anchored, loss_and_score, nearest_mean_top1
from ..weights import read_weights
from ..zoo import Zoo, build_cache
from .atlas import load_keywords
from .lora import INSTANCE_PROMPT
from .root import caption, load_root

PROJECT = Path(__file__).resolve().parents[2]
EXPERT_LAYERS = {"v": ("attn2.to_v",), "k+v": ("attn2.to_k", "attn2.to_v")}  # cross-attention: the caption enters here
BLOCK_LAYERS = tuple(f"attn2.{p}" for p in PROJECTIONS)  # what the AttentionReader candidates read
TOKEN_RANKS = (2, 3, 4)            # training-free candidates: principal token directions of the instance prompt
TEXT_READINGS = ("same", "v")      # ... reading text on all their layers, or on the value layers only
READER_QUERIES = (8, 12, 16)       # AttentionReader candidates: synthetic queries per block
READER = dict(seed=0, scale=4.0)   # their draw, and the features' standard deviation (set by hand, see README)
VAL_READINGS = ("selection", "val_nearest_mean", "val_holdout")  # what bundle.json keeps of every candidate
# bytes of one tree's int8 gallery encodings (stored in files of ≤ 10 MB): what the shipped total's budget (≤ 80 MB)
# leaves for galleries beside the roots, sample LoRAs, experts, examples and assets
GALLERY_LIMIT = 13 * 10**6


def build_emoji_bundle(population: Path, out: Path, epochs: int = 200, cache_root: Path = Path("cache"),
                       n_examples: int = 3, roots: list[str] | None = None) -> dict:
    """``roots``: ship only these trees of the population (default: all)."""
    encoder = load_text_encoder("minilm")
    keywords = load_keywords()
    specs, caches, summary, listeners = [], [], {}, {}
    for tree_dir in sorted(p for p in Path(population).iterdir() if (p / "tree.json").exists()
                           and (not roots or p.name in roots)):
        zoo = Zoo.scan(tree_dir)
        name = zoo.name
        root_dir = PROJECT / zoo.tree["root_model"]
        unet, _, recipe = load_root(root_dir)
        listeners[name] = root_listeners(unet)
        all_layers = sorted(read_weights(zoo.root / zoo.models[0].source).layers)
        cache = build_cache(zoo, Path(cache_root) / name, layers="all")
        class_states = encoder.token_states([caption(recipe, c["name"]) for c in cache.classes], recipe.token_length)
        instance = encoder.token_states([INSTANCE_PROMPT], recipe.token_length)[0]
        targets = task_targets(cache, "align", class_states)
        candidates = {}
        for layer_set, suffixes in EXPERT_LAYERS.items():
            names = [n for n in all_layers if n.endswith(suffixes)]
            root_weights = {n: unet.get_submodule(n).weight.detach() for n in names}
            fit, data = fit_anchored(cache, names, root_weights, instance, class_states, TrainConfig.of(epochs=epochs),
                                     relu=False)
            candidates[f"trained linear, {layer_set}"] = (
                fit.expert, fit.metrics, score_as_the_app_reads(encode_all(fit.expert, data), targets, fit.metrics),
                names)
            for rank in TOKEN_RANKS:
                for text in TEXT_READINGS if layer_set != "v" else ("same",):
                    free = AnchoredProbeX.training_free([root_weights[n] for n in names], instance, rank,
                                                        [text == "same" or n.endswith(".to_v") for n in names])
                    kind = f"training-free, {layer_set}, token rank {rank}" + ("" if text == "same" else ", text on v")
                    _add_free(candidates, kind, free, names, data, targets)
        names = [n for n in all_layers if n.endswith(BLOCK_LAYERS)]
        data = LayerStack.from_cache(cache, names)
        for n_queries in READER_QUERIES:
            reader = AttentionReader.from_root(unet, names, instance, n_queries, **READER)
            _add_free(candidates, f"training-free, attention blocks, {n_queries} queries", reader, names, data, targets)
        # ties (common: two accuracies on a few dozen models) go to the larger encoding, the fuller reading
        kind = max(candidates, key=lambda k: (candidates[k][1]["selection"], candidates[k][0].r_t))
        expert, metrics, encodings, names = candidates[kind]
        specs.append(TreeSpec(name, expert, cache, names, recipe.prompt_template, zoo.tree["root_model"],
                              INSTANCE_PROMPT, samples=sample_ids(cache, 1), encodings=encodings,
                              keywords=keywords, examples=[m["id"] for m in _examples(cache, n_examples)]))
        caches.append(cache)
        summary[name] = {"layers": names, "n_models": len(cache.models), "expert": kind,
                         **{f"top1_{k}": round(v, 4) for k, v in metrics.items()},
                         "candidates_on_val": {k: {m: round(c[1][m], 4) for m in VAL_READINGS if m in c[1]}
                                               for k, c in candidates.items()}}
        print(json.dumps({name: summary[name]}), flush=True)
    router, routing_layer = separating_router(
        [Population(s.name, first_signature(c), c, all_layers[0], listeners[s.name]) for s, c in zip(specs, caches)],
        all_layers)
    if Path(out).exists():
        shutil.rmtree(out)  # a rebuilt bundle must not keep files of the previous one
    build_bundle(out, specs, "minilm", router, "emoji-mini", encoder=encoder,
                 info={"trees": summary, "routing_layer": routing_layer,
                       "expert": "root-anchored ProbeX on cross-attention layers (probex/experts/anchored.py)",
                       "built_by": "python -m probex.jungle ship"})
    return {"bundle": str(out), "routing_layer": routing_layer, "trees": summary}


def _add_free(candidates: dict, kind: str, expert, names: list[str], data: LayerStack, targets) -> None:
    """Measure a training-free candidate on every split and add it — unless its int8 gallery is over budget.
    ``data``: the cached ``names`` layers of every model."""
    if len(data) * expert.r_t > GALLERY_LIMIT:  # int8 gallery encodings: a byte a number
        return
    encodings = encode_all(expert, data)   # once: the text top-1 per split and the app's reading both start here
    with torch.no_grad():
        metrics = {s: loss_and_score(targets.task, expert.logits(encodings[idx], targets.text_for(s)),
                                     targets.y[idx])[1].item()
                   for s in targets.evaluated_splits() for idx in [targets.split[s]]}
    candidates[kind] = (expert, metrics, score_as_the_app_reads(encodings, targets, metrics), names)


def score_as_the_app_reads(encodings, targets, metrics: dict):
    """The app scores known classes against the mean of their known models (Gallery.class_anchors) and held-out ones
    against their text. Adds the class-mean top-1 on val and test to ``metrics`` (which holds the text top-1 per
    split) and ``selection``: the mean of class-mean val and text val_holdout (where the tree has held-out classes),
    what a candidate expert is chosen by. ``encodings``: the candidate's, of every model; returned as they are."""
    metrics.update({f"{s}_nearest_mean": nearest_mean_top1(encodings, targets, s) for s in ("val", "test")})
    read = [metrics["val_nearest_mean"]] + ([metrics["val_holdout"]] if "val_holdout" in metrics else [])
    metrics["selection"] = sum(read) / len(read)
    return encodings


def _examples(cache, n: int) -> list[dict]:
    """n held-out-class and n in-distribution test LoRAs of distinct classes: what a visitor can try."""
    held = example_models(cache, n)
    seen = {m["class_id"] for m in held}
    test = [m for m in cache.models if m["split"] == "test" and m["class_id"] not in seen]
    return held + list({m["class_id"]: m for m in test}.values())[:n]


def root_listeners(unet) -> dict:
    """Every value projection's listener: the same attention's to_out.0 weight, at unit Frobenius norm."""
    return {name: (w / w.norm()) for name, module in unet.named_modules() if name.endswith(".to_v")
            for w in [unet.get_submodule(name[:-len("to_v")] + "to_out.0").weight.detach()]}

