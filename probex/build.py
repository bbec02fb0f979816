"""Building bundles: trained tree experts and their populations → galleries, router and the files the app loads.

``train_bundle`` is the `probex train` flow (cache, sweep layers, keep the best expert per tree, fit the router);
the emoji jungle's ship (probex.jungle.ship) trains its own experts and shares ``TreeSpec``, ``build_bundle``,
``sample_ids`` and ``example_models`` with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from probex.bundle import Bundle, TreeBundle, folder_name
from probex.data import LayerData
from probex.experts import Expert
from probex.gallery import PLACE_K, Gallery, layout_2d
from probex.profiles import get_profile
from probex.router import Population, fit_router
from probex.text import DEFAULT_PROMPT, load_text_encoder, prompt
from probex.train import TrainConfig, class_text_embeddings, encode_all, sweep_layers
from probex.weights import read_weights
from probex.zoo import Zoo, build_cache, select_layers


@dataclass
class TreeSpec:
    """A trained tree expert and where its known models live, ready to become a TreeBundle."""
    name: str
    expert: Expert
    cache: object                      # probex.zoo.LayerCache of the tree's population
    layer: str | list[str]
    prompt_template: str = DEFAULT_PROMPT
    root_model: str | None = None
    instance_prompt: str | None = None
    signature: object | None = None    # probex.weights.Signature; default: that of the cache's first model file
    samples: list[str] = field(default_factory=list)   # ids of models whose LoRA files ship (to draw samples)
    encodings: torch.Tensor | None = None   # precomputed, for experts reading several layers; default: encode `layer`
    keywords: dict[str, list[str]] = field(default_factory=dict)  # class id → words people search it by (CLDR's)
    examples: list[str] = field(default_factory=list)  # ids of models shipped as the app's example uploads: kept out
    # of the gallery, so that an example is read as a visitor's own file would be, not found as its own nearest model


def make_gallery(spec: TreeSpec, encoder, seed: int = 0) -> Gallery:
    """Encode every model of the tree's population, lay the encodings out in 2-D, embed the class prompts.

    The vocabulary is what the expert can name: every class for an align expert (held-out ones included: text is
    all it needs), the classes of its head otherwise."""
    cache = spec.cache
    left_out = set(spec.examples)
    keep = torch.tensor([m["id"] not in left_out for m in cache.models])
    if spec.encodings is not None:
        encodings = spec.encodings.float()[keep]
    else:
        encodings = encode_all(spec.expert, LayerData.from_cache(cache, spec.layer), torch.nonzero(keep).flatten())
    coords, method = layout_2d(encodings, seed)
    head = spec.expert.head_kind
    vocab = [c for c in cache.classes if head != "multiclass" or not c["holdout"]]
    names = [c["name"] for c in vocab]
    # stored 2-D: experts that read token states get them flattened (the service reshapes by the expert's n_tokens)
    text_emb = (spec.expert.text_input(encoder, [prompt(spec.prompt_template, n) for n in names]).flatten(1)
                if names else torch.zeros(0, 0))
    zoo_root = Path(cache.index["zoo"])
    models = [m for m in cache.models if m["id"] not in left_out]
    return Gallery(
        ids=[m["id"] for m in models],
        model_classes=[m.get("labels", m.get("class_name")) for m in models],
        splits=[m["split"] for m in models],
        vocabulary=names, vocabulary_ids=[c["id"] for c in vocab],
        vocabulary_keywords=[spec.keywords.get(c["id"], []) for c in vocab] if spec.keywords else [],
        encodings=encodings, coords=coords, text_emb=text_emb.float(),
        sample_paths={m["id"]: str(zoo_root / m["source"]) for m in models if m["id"] in set(spec.samples)},
        layout={"method": method, "seed": seed, "place_k": PLACE_K})


def build_bundle(out_dir: str | Path, trees: list[TreeSpec], text_encoder: str, router=None,
                 profile: str = "emoji-mini", seed: int = 0, encoder=None, info: dict | None = None) -> Bundle:
    """Galleries for trained experts, written with the router and the trees' example files as a bundle in `out_dir`.
    `text_encoder` is the load_text_encoder name stored in the bundle (`encoder` overrides the instance used, e.g. an
    already loaded one)."""
    encoder = encoder or load_text_encoder(text_encoder)
    built = {}
    for spec in trees:
        signature = spec.signature or first_signature(spec.cache)
        built[spec.name] = TreeBundle(
            spec.name, spec.layer, spec.expert.eval(), make_gallery(spec, encoder, seed), spec.expert.head_kind,
            getattr(signature, "digest", None), getattr(signature, "family", None), spec.prompt_template,
            spec.root_model, spec.instance_prompt)
    examples = [example_file(spec, model_id) for spec in trees for model_id in spec.examples]
    bundle = Bundle(profile, text_encoder, built, router, examples, info or {})
    bundle.save(out_dir)
    return Bundle.load(out_dir)   # what the app will see: paths inside the bundle, verified


def example_file(spec: TreeSpec, model_id: str) -> Path:
    source = next(m["source"] for m in spec.cache.models if m["id"] == model_id)
    return Path(spec.cache.index["zoo"]) / source


def first_signature(cache):
    path = Path(cache.index["zoo"]) / cache.models[0]["source"]
    return read_weights(path).signature if path.is_file() else None


def train_bundle(zoo, out_dir: str | Path, layers=None, config: TrainConfig = TrainConfig(), profile: str | None = None,
                 task: str | None = None, cache_dir: str | Path | None = None, routing_layer: str | None = None,
                 samples_per_class: int = 1, n_examples: int = 3, encoder=None, ray: bool | str = False) -> dict:
    """Population(s) → bundle: the `probex train` flow.

    Each zoo is one tree (named by its tree.json "name", else its folder). For each: cache the swept layers and the
    routing layer, sweep experts over the layers (best on val; align with the profile's text encoder for LoRA
    trees, multilabel for discriminative ones), keep the best; the router's trees are found per architecture with as
    many trees as zoos and must recover the zoos. Returns a summary (per tree: chosen layer and its scores).
    `ray` (see probex.cluster.map_jobs) runs the cache passes and the sweep's layers as Ray tasks."""
    prof = get_profile(profile)
    encoder = encoder or load_text_encoder(prof.text_encoder)
    out_dir = Path(out_dir)
    zoos = [Zoo.scan(z) for z in (zoo if isinstance(zoo, (list, tuple)) else [zoo])]
    cache_root = Path(cache_dir) if cache_dir else Path("cache")
    specs, caches, summary = [], [], {}
    for z in zoos:
        name = z.name
        all_layers = sorted(read_weights(z.root / z.models[0].source).layers)
        routing = routing_layer or all_layers[0]   # the router's default: the first layer in sorted order
        cache = build_cache(z, cache_root / folder_name(name, set()), layers=[*select_layers(all_layers, layers), routing],
                            ray=ray)
        template = z.tree.get("prompt_template") or prof.prompt_template
        tree_task = task or ("multilabel" if cache.task == "multilabel" else "align")
        text = class_text_embeddings(cache, encoder, template) if tree_task == "align" else None
        sweep = sweep_layers(cache, layers, tree_task, text, config, out_dir=out_dir / "sweeps" / folder_name(name, set()),
                             ray=ray)
        specs.append(TreeSpec(name, sweep.best.expert, cache, sweep.best_layer, template,
                              z.tree.get("root_model") or prof.root_model, z.tree.get("instance_prompt"),
                              # LoRA files are small enough to ship as samples and examples; full checkpoints are not
                              samples=sample_ids(cache, samples_per_class) if cache.kind == "lora" else [],
                              examples=[m["id"] for m in example_models(cache, n_examples)] if cache.kind == "lora"
                              else []))
        caches.append((cache, routing))
        summary[name] = {"layer": sweep.best_layer, **{k: v for k, v in sweep.best_row.items() if k != "layer"},
                         "task": tree_task, "n_models": len(cache.models)}
    for spec in specs:
        spec.signature = spec.signature or first_signature(spec.cache)
    router = fit_router([Population(s.name, s.signature, c, layer) for s, (c, layer) in zip(specs, caches)])
    build_bundle(out_dir, specs, prof.text_encoder, router, prof.name, config.optimiser.seed, encoder,
                 info={"config": config.as_dict(), "trees": summary})
    return {"bundle": str(out_dir), "profile": prof.name, "trees": summary}


def sample_ids(cache, per_class: int) -> list[str]:
    """The `per_class` smallest train LoRA files of each class (lowest rank; first by id among equals): they ship for
    drawing samples, and the smallest keep the bundle within its size budget."""
    zoo_root = Path(cache.index["zoo"])
    by_class = {}
    for m in cache.models:
        if m["split"] == "train":
            by_class.setdefault(m.get("class_id") or "|".join(m.get("labels", [])), []).append(m)
    chosen = {m["id"] for group in by_class.values()
              for m in sorted(group, key=lambda m: (zoo_root / m["source"]).stat().st_size)[:per_class]}
    return [m["id"] for m in cache.models if m["id"] in chosen]


def example_models(cache, n: int) -> list[dict]:
    """A few held-out-class and test models of distinct classes: the app's example uploads."""
    picked, seen = [], set()
    for split in ("test_holdout", "test"):
        for m in cache.models:
            key = m.get("class_id") or m["id"]
            if m["split"] == split and key not in seen and len(picked) < n:
                picked.append(m)
                seen.add(key)
    return picked
