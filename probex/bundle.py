"""Bundles: everything the app and the CLI load — router, per-tree experts and galleries — as safetensors + JSON.

    <bundle>/bundle.json                 format, profile, text encoder, trees (name, folder, layer, signature digest,
                                         family, task, prompt template, root model, instance prompt), the router's
                                         JSON state, example files, and a manifest: sha256 of every other file
    <bundle>/router.safetensors          the router's tensors (tree centres of the routing layer)
    <bundle>/<tree>/expert/              the expert's save_pretrained (config.json + model.safetensors)
    <bundle>/<tree>/gallery.safetensors  encodings (N, r_T) in int8 and their scales (N,), umap (N, 2); rows
                                         past what one file holds (FILE_BYTES) go on in gallery-1.safetensors, …
    <bundle>/<tree>/text.safetensors     text_emb (C, text_dim): the class vocabulary's text inputs, one row a class
    <bundle>/<tree>/gallery.json         model ids, classes, splits, class vocabulary, sample LoRA paths, layout
    <bundle>/<tree>/samples/*.safetensors, <bundle>/examples/*.safetensors   LoRA files shipped with the bundle
Nothing is pickled. Loading checks every file against the manifest; a missing or altered file is named.

The map. Gallery encodings get 2-D coordinates once, at build time: UMAP (umap-learn, cosine, fixed seed) — or PCA
for galleries too small for UMAP. New points (an upload, a text query) are placed WITHOUT refitting — UMAP's
`transform` would need the fitted object, which only pickles — as the average of their k nearest gallery models'
coordinates (cosine), weighted by 1 / cosine distance: a point on top of a known model lands on it, a point between
two clusters lands between them.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from probex.errors import ProbexError
from probex.experts import Expert, load_expert
from probex.zoo import sha256_file
from probex.data import LayerData
from probex.train import (DEFAULT_PROMPT, PAPER, TrainConfig, class_text_embeddings, encode_all, prompt,
                          sweep_layers)

FORMAT, VERSION = "probex-bundle", 3  # 2: text_emb in its own file, encodings in int8; 3: encodings over files
FILE_BYTES = 9_500_000  # gallery encodings are split over files of at most this many bytes (Spaces: ≤ 10 MB a file)
PLACE_K = 5
MIN_UMAP_MODELS = 10  # below this UMAP's neighbour graph is degenerate: PCA lays the gallery out instead


# ---- galleries --------------------------------------------------------------------------------------------------
@dataclass
class Gallery:
    """A tree's known models in its expert's representation, and the class text bank."""
    ids: list[str]
    classes: list                  # per model: its class name, or its label list (multilabel trees)
    splits: list[str]
    classes_vocabulary: list[str]  # class names: the rows of text_emb and the outputs of a classifier head
    encodings: torch.Tensor        # (N, r_T)
    umap: torch.Tensor             # (N, 2) map coordinates
    text_emb: torch.Tensor         # (C, text_dim) embeddings of the vocabulary's prompts
    class_ids: list[str] = field(default_factory=list)
    sample_paths: dict[str, str] = field(default_factory=dict)   # model id → LoRA file (absolute once loaded)
    layout: dict = field(default_factory=lambda: {"method": "umap", "seed": 0, "place_k": PLACE_K})

    def place(self, encodings: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """(M, 2) map positions of new encodings: 1/cosine-distance weighted mean of the k nearest models' points."""
        k = min(k or self.layout.get("place_k", PLACE_K), len(self.ids))
        cos = F.normalize(encodings.float(), dim=-1) @ F.normalize(self.encodings, dim=-1).T
        sim, idx = cos.topk(k, dim=1)
        weights = 1.0 / (1.0 - sim).clamp_min(1e-6)
        return (weights[..., None] * self.umap[idx]).sum(1) / weights.sum(1, keepdim=True)

    def class_anchors(self, text_features: torch.Tensor) -> torch.Tensor:
        """(C, r_T) unit vectors, one per vocabulary class, that concepts are scored against: the mean encoding of
        the class's known train-split models where it has any, else its text feature (held-out classes, free text).
        Both estimate where the class's LoRAs lie; on the emoji pilot the class mean reads in-distribution far
        better than text does (bench/jungle_signal.py). Multilabel trees keep their text features."""
        known = [i for i, s in enumerate(self.splits) if s == "train" and isinstance(self.classes[i], str)]
        if not known:
            return text_features
        row = {name: c for c, name in enumerate(self.classes_vocabulary)}
        y = torch.tensor([row[self.classes[i]] for i in known])
        from probex.train import class_means

        means, has = class_means(self.encodings[known], y, len(self.classes_vocabulary))
        return torch.where(has[:, None], means, text_features)

    def calibration(self, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-norm of concept scores: each anchor's mean and standard deviation of cosine over the tree's known train
        models, (C,) each. Raw cosines are not comparable across anchors: a class mean lies among LoRAs, a caption's
        text feature farther from all of them, so by raw cosine a LoRA of a class without known models almost never
        has its class first (``bench/paper_tables.py`` prints both: see the README). Without two train models:
        (0, 1), raw cosine."""
        known = [i for i, s in enumerate(self.splits) if s == "train"]
        if len(known) < 2:
            return torch.zeros(len(anchors)), torch.ones(len(anchors))
        cos = F.normalize(self.encodings[known], dim=-1) @ F.normalize(anchors, dim=-1).T
        return cos.mean(0), cos.std(0).clamp_min(1e-6)

    def concept_scores(self, encodings: torch.Tensor, anchors: torch.Tensor,
                       calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, C) concept scores of encodings against the class anchors: cosine, z-normed per anchor
        (``calibration``, computed here when not given) — how far above its usual score on known models."""
        mean, std = calibration if calibration is not None else self.calibration(anchors)
        return (F.normalize(encodings.float(), dim=-1) @ F.normalize(anchors, dim=-1).T - mean) / std

    def model_calibration(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-norm of text search, the other way round: each gallery model's mean and standard deviation of cosine
        over the class vocabulary's text features, (N,) each. Some models sit close to every caption (hubs) and by
        raw cosine would top most searches; a model is found for a text that it matches more than its usual."""
        if not len(self.encodings):
            return torch.zeros(0), torch.ones(0)
        cos = F.normalize(self.encodings, dim=-1) @ F.normalize(text_features, dim=-1).T
        return cos.mean(1), cos.std(1).clamp_min(1e-6)

    def search_scores(self, queries: torch.Tensor, calibration: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(Q, N) text search scores of query text features against every gallery model (``model_calibration``)."""
        mean, std = calibration
        return (F.normalize(queries.float(), dim=-1) @ F.normalize(self.encodings, dim=-1).T - mean) / std

    def nearest(self, encoding: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
        """(gallery index, cosine) of the k known models closest to one encoding."""
        cos = F.normalize(self.encodings, dim=-1) @ F.normalize(encoding.float(), dim=-1)
        sim, idx = cos.topk(min(k, len(self.ids)))
        return list(zip(idx.tolist(), sim.tolist()))


def layout_2d(encodings: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, str]:
    """2-D coordinates of the gallery: UMAP on cosine distance with a fixed seed, or PCA for tiny galleries."""
    x = F.normalize(encodings.float(), dim=-1).numpy()
    if len(x) >= MIN_UMAP_MODELS:
        import umap  # slow to import (numba): only when a bundle is built

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed,
                            n_jobs=1)
        return torch.from_numpy(reducer.fit_transform(x).astype(np.float32)), "umap"
    from sklearn.decomposition import PCA

    coords = PCA(n_components=min(2, len(x)), random_state=seed).fit_transform(x) if len(x) > 1 else np.zeros((1, 1))
    return torch.from_numpy(np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))).astype(np.float32)), "pca"


# ---- trees and bundles ------------------------------------------------------------------------------------------
@dataclass
class TreeBundle:
    name: str
    layer: str | list[str]          # the layer(s) the expert reads
    expert: Expert
    gallery: Gallery
    task: str
    digest: str | None = None       # architecture signature the tree's models share
    family: str | None = None
    prompt_template: str = DEFAULT_PROMPT
    root_model: str | None = None   # diffusers model id or dir of the tree's root (for drawing samples)
    instance_prompt: str | None = None
    # probex.sd15.PromptedReading: a training-free reader that takes each file's own instance prompt (built in
    # memory, never saved)
    prompted: object | None = None

    @property
    def layers(self) -> list[str]:
        """The names of the layer(s) the expert reads, as a list either way."""
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    def class_text_input(self) -> torch.Tensor:
        """The gallery's class text bank as the expert takes it (token-state experts store it flattened)."""
        n_tokens = getattr(self.expert, "n_tokens", None)
        g = self.gallery
        return g.text_emb.reshape(len(g.classes_vocabulary), n_tokens, -1) if n_tokens else g.text_emb

    def class_text_features(self) -> torch.Tensor | None:
        """(C, r_T) the vocabulary's captions in the expert's space; None without a text head."""
        if self.prompted is not None:
            return self.prompted.class_features(self.instance_prompt)
        return self.expert.text_features(self.class_text_input()) if self.expert.head_kind == "align" else None

    def concept_anchors(self) -> torch.Tensor | None:
        """(C, r_T) what each vocabulary class is scored against (Gallery.class_anchors); None without a text head."""
        text = self.class_text_features()
        return None if text is None else self.gallery.class_anchors(text)


@dataclass
class Bundle:
    profile: str
    text_encoder: str | None        # a probex.text.load_text_encoder name
    trees: dict[str, TreeBundle]
    router: object | None = None    # probex.router.Router (to_state / from_state)
    examples: list[Path] = field(default_factory=list)   # LoRA files for the app's examples
    info: dict = field(default_factory=dict)             # free-form provenance (training config, sweep summary)

    def place(self, tree: str, encodings: torch.Tensor) -> torch.Tensor:
        return self.trees[tree].gallery.place(encodings)

    # -- writing ----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        router_state = None
        if self.router is not None:
            tensors, router_state = self.router.to_state()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "router.safetensors"))
            written.append(directory / "router.safetensors")
        trees = []
        folders = set()
        for tree in self.trees.values():
            folder = _folder_name(tree.name, folders)
            written += _save_tree(tree, directory / folder, directory)
            trees.append({"name": tree.name, "folder": folder, "layer": tree.layer, "task": tree.task,
                          "digest": tree.digest, "family": tree.family, "prompt_template": tree.prompt_template,
                          "root_model": tree.root_model, "instance_prompt": tree.instance_prompt})
        examples = [_ship(Path(p), directory / "examples" / _example_name(Path(p))) for p in self.examples]
        written += examples
        manifest = {p.relative_to(directory).as_posix(): sha256_file(p) for p in written}
        (directory / "bundle.json").write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "profile": self.profile, "text_encoder": self.text_encoder,
             "trees": trees, "router": router_state,
             "examples": [p.relative_to(directory).as_posix() for p in examples], "info": self.info,
             "manifest": manifest}, indent=1))
        return directory

    # -- reading ----------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> "Bundle":
        directory = Path(directory)
        meta = _read_bundle_json(directory)
        if verify:
            verify_manifest(directory, meta["manifest"])
        router = None
        if meta.get("router") is not None:
            from probex.router import Router

            router = Router.from_state(_load_tensors(directory, "router.safetensors"), meta["router"])
        trees = {}
        for t in meta["trees"]:
            trees[t["name"]] = TreeBundle(
                name=t["name"], layer=t["layer"], expert=load_expert(directory / t["folder"] / "expert"),
                gallery=_load_gallery(directory, t["folder"]), task=t["task"], digest=t.get("digest"),
                family=t.get("family"), prompt_template=t.get("prompt_template") or DEFAULT_PROMPT,
                root_model=t.get("root_model"), instance_prompt=t.get("instance_prompt"))
        return cls(meta.get("profile", ""), meta.get("text_encoder"), trees, router,
                   [directory / p for p in meta.get("examples", [])], meta.get("info", {}))


def save_bundle(bundle: Bundle, directory: str | Path) -> Path:
    return bundle.save(directory)


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    return Bundle.load(directory, verify)


def _folder_name(name: str, taken: set) -> str:
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tree"
    while folder in taken:
        folder += "_"
    taken.add(folder)
    return folder


def _example_name(source: Path) -> str:
    """Zoo files all share one name (pytorch_lora_weights.safetensors): name the copy after the model's folders,
    tree included (two trees both have a test/model_idx_0014)."""
    from probex.zoo import WEIGHT_FILES

    folders = source.parent.parent.parent.name, source.parent.parent.name, source.parent.name
    stem = "__".join(folders) if source.name in WEIGHT_FILES else source.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".safetensors"


def _ship(source: Path, target: Path) -> Path:
    """Copy a LoRA file into the bundle (no-op when re-saving a bundle in place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target


def _ship_half(source: Path, target: Path) -> Path:
    """Copy a LoRA file into the bundle with its floating-point tensors in fp16 (half the bytes; the sampler loads
    them into the fp32 root as it would any LoRA), metadata kept. No-op when re-saving a bundle in place."""
    if source.resolve() == target.resolve():
        return target
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (t.half() if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}, str(target),
              metadata=metadata)
    return target


def _save_tree(tree: TreeBundle, folder: Path, root: Path) -> list[Path]:
    """Gallery encodings are stored in int8 with one scale per model (``quantize``), the other gallery tensors and the
    sample LoRAs in fp16; all are read back as fp32: the shipped artifacts stay within their size budget."""
    tree.expert.save_pretrained(folder / "expert")
    g = tree.gallery
    codes, scale = quantize(g.encodings)
    parts = codes.split(max(1, FILE_BYTES // max(1, codes.shape[1])))
    gallery_files = ["gallery.safetensors"] + [f"gallery-{i}.safetensors" for i in range(1, len(parts))]
    save_file({"encodings": parts[0].contiguous(), "encoding_scale": scale, "umap": g.umap.half().contiguous()},
              str(folder / gallery_files[0]))
    for part, file in zip(parts[1:], gallery_files[1:]):
        save_file({"encodings": part.contiguous()}, str(folder / file))
    save_file({"text_emb": g.text_emb.half().contiguous()}, str(folder / "text.safetensors"))
    samples = {mid: _ship_half(Path(p), folder / "samples" / (re.sub(r"[^A-Za-z0-9._-]+", "__", mid) + ".safetensors"))
               for mid, p in g.sample_paths.items()}
    (folder / "gallery.json").write_text(json.dumps(
        {"ids": g.ids, "classes": g.classes, "splits": g.splits, "classes_vocabulary": g.classes_vocabulary,
         "class_ids": g.class_ids, "sample_paths": {m: p.relative_to(root).as_posix() for m, p in samples.items()},
         "layout": g.layout, "gallery_files": gallery_files}, indent=1))
    return [folder / "expert" / "config.json", folder / "expert" / "model.safetensors",
            *(folder / f for f in gallery_files), folder / "text.safetensors", folder / "gallery.json", *samples.values()]


def _read_bundle_json(directory: Path) -> dict:
    path = directory / "bundle.json"
    if not path.is_file():
        raise ProbexError(f"no bundle at {directory} (bundle.json is missing)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProbexError(f"bundle {directory.name}: bundle.json is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("manifest"), dict):
        raise ProbexError(f"bundle {directory.name}: bundle.json is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ProbexError(f"bundle {directory.name}: version {meta.get('version')} is not supported (this is {VERSION})")
    return meta


def verify_manifest(directory: Path, manifest: dict[str, str]) -> None:
    """Every listed file exists and has its recorded sha256 — before anything is parsed."""
    for rel, expected in manifest.items():
        path = directory / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise ProbexError(f"bundle {directory.name}: {rel} is missing")
        if sha256_file(path) != expected:
            raise ProbexError(f"bundle {directory.name}: {rel} is corrupted (its sha256 does not match the manifest)")


def _load_tensors(directory: Path, rel: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / rel))
    except (SafetensorError, OSError) as exc:
        raise ProbexError(f"bundle {directory.name}: {rel} is unreadable ({exc})") from None


def quantize(encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to int8 at its own scale (its largest magnitude ↦ 127): a quarter of fp32's bytes; a cosine between
    two stored rows moves by about 1e-3 (tests/test_bundle.py)."""
    scale = encodings.float().abs().amax(1).clamp_min(1e-12) / 127
    return (encodings.float() / scale[:, None]).round().to(torch.int8).contiguous(), scale.contiguous()


def _load_gallery(directory: Path, folder: str) -> Gallery:
    try:
        j = json.loads((directory / folder / "gallery.json").read_text())
        if not all(re.fullmatch(r"gallery(-\d+)?\.safetensors", f) for f in j["gallery_files"]):
            raise ValueError(f"unexpected gallery file names {j['gallery_files']}")
        parts = [_load_tensors(directory, f"{folder}/{f}") for f in j["gallery_files"]]
        t = {**parts[0], **_load_tensors(directory, f"{folder}/text.safetensors")}
        codes = torch.cat([p["encodings"] for p in parts])
        return Gallery(j["ids"], j["classes"], j["splits"], j["classes_vocabulary"],
                       codes.float() * t["encoding_scale"][:, None],
                       t["umap"].float(), t["text_emb"].float(), j.get("class_ids", []),
                       {m: str(directory / p) for m, p in j.get("sample_paths", {}).items()}, j.get("layout", {}))
    except (OSError, ValueError, KeyError) as exc:
        raise ProbexError(f"bundle {directory.name}: {folder}/gallery is incomplete ({exc})") from None


# ---- building bundles -------------------------------------------------------------------------------------------
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


def make_gallery(spec: TreeSpec, encoder, seed: int = 0) -> Gallery:
    """Encode every model of the tree's population, lay the encodings out in 2-D, embed the class prompts.

    The vocabulary is what the expert can name: every class for an align expert (held-out ones included: text is
    all it needs), the classes of its head otherwise."""
    cache = spec.cache
    if spec.encodings is not None:
        encodings = spec.encodings.float()
    else:
        encodings = encode_all(spec.expert, LayerData.from_cache(cache, spec.layer))
    coords, method = layout_2d(encodings, seed)
    head = spec.expert.head_kind
    vocab = [c for c in cache.classes if head != "multiclass" or not c["holdout"]]
    names = [c["name"] for c in vocab]
    # stored 2-D: experts that read token states get them flattened (the service reshapes by the expert's n_tokens)
    text_emb = (spec.expert.text_input(encoder, [prompt(spec.prompt_template, n) for n in names]).flatten(1)
                if names else torch.zeros(0, 0))
    zoo_root = Path(cache.index["zoo"])
    models = cache.models
    return Gallery(
        ids=[m["id"] for m in models],
        classes=[m.get("labels", m.get("class_name")) for m in models],
        splits=[m["split"] for m in models],
        classes_vocabulary=names, class_ids=[c["id"] for c in vocab],
        encodings=encodings, umap=coords, text_emb=text_emb.float(),
        sample_paths={m["id"]: str(zoo_root / m["source"]) for m in models if m["id"] in set(spec.samples)},
        layout={"method": method, "seed": seed, "place_k": PLACE_K})


def build_bundle(out_dir: str | Path, trees: list[TreeSpec], text_encoder: str, router=None,
                 profile: str = "emoji-mini", examples=(), seed: int = 0, encoder=None, info: dict | None = None) -> Bundle:
    """Galleries for trained experts, written with the router as a bundle in `out_dir`. `text_encoder` is the
    load_text_encoder name stored in the bundle (`encoder` overrides the instance used, e.g. an already loaded one)."""
    from probex.text import load_text_encoder

    encoder = encoder or load_text_encoder(text_encoder)
    built = {}
    for spec in trees:
        signature = spec.signature or _first_signature(spec.cache)
        built[spec.name] = TreeBundle(
            spec.name, spec.layer, spec.expert.eval(), make_gallery(spec, encoder, seed), spec.expert.head_kind,
            getattr(signature, "digest", None), getattr(signature, "family", None), spec.prompt_template,
            spec.root_model, spec.instance_prompt)
    bundle = Bundle(profile, text_encoder, built, router, [Path(p) for p in examples], info or {})
    bundle.save(out_dir)
    return Bundle.load(out_dir)   # what the app will see: paths inside the bundle, verified


def _first_signature(cache):
    from probex.weights import read_weights

    path = Path(cache.index["zoo"]) / cache.models[0]["source"]
    return read_weights(path).signature if path.is_file() else None


def train_bundle(zoo, out_dir: str | Path, layers=None, config: TrainConfig = PAPER, profile: str | None = None,
                 task: str | None = None, cache_dir: str | Path | None = None, routing_layer: str | None = None,
                 samples_per_class: int = 1, n_examples: int = 3, encoder=None, ray: bool | str = False) -> dict:
    """Population(s) → bundle: the `probex train` flow.

    Each zoo is one tree (named by its tree.json "name", else its folder). For each: cache the swept layers and the
    routing layer, sweep experts over the layers (best on val; align with the profile's text encoder for LoRA
    trees, multilabel for discriminative ones), keep the best; the router's trees are found per architecture with as
    many trees as zoos and must recover the zoos. Returns a summary (per tree: chosen layer and its scores).
    `ray` (see probex.cluster.map_jobs) runs the cache passes and the sweep's layers as Ray tasks."""
    from probex.profiles import get_profile
    from probex.text import load_text_encoder
    from probex.weights import read_weights
    from probex.zoo import Zoo, build_cache, select_layers

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
        cache = build_cache(z, cache_root / _folder_name(name, set()), layers=[*select_layers(all_layers, layers), routing],
                            ray=ray)
        template = z.tree.get("prompt_template") or prof.prompt_template
        tree_task = task or ("multilabel" if cache.task == "multilabel" else "align")
        text = class_text_embeddings(cache, encoder, template) if tree_task == "align" else None
        sweep = sweep_layers(cache, layers, tree_task, text, config, out_dir=out_dir / "sweeps" / _folder_name(name, set()),
                             ray=ray)
        specs.append(TreeSpec(name, sweep.best.expert, cache, sweep.best_layer, template,
                              z.tree.get("root_model") or prof.root_model, z.tree.get("instance_prompt"),
                              samples=_sample_ids(cache, samples_per_class) if cache.kind == "lora" else []))
        caches.append((cache, routing))
        summary[name] = {"layer": sweep.best_layer, **{k: v for k, v in sweep.best_row.items() if k != "layer"},
                         "task": tree_task, "n_models": len(cache.models)}
    router = _fit_router(specs, caches)
    # LoRA files are small enough to ship as samples and examples; full checkpoints are not
    examples = [Path(c.index["zoo"]) / m["source"] for c, _ in caches if c.kind == "lora"
                for m in _example_models(c, n_examples)]
    build_bundle(out_dir, specs, prof.text_encoder, router, prof.name, examples, config.seed, encoder,
                 info={"config": asdict(config), "trees": summary})
    return {"bundle": str(out_dir), "profile": prof.name, "trees": summary}


def _fit_router(specs: list[TreeSpec], caches: list, listeners: dict[str, dict] | None = None):
    """Trees per architecture from the routing layer of every known model; each tree must be one zoo.

    Trees are first found by clustering, as the paper does. Where clustering cannot tell same-architecture zoos apart
    (LoRAs of two roots that differ only in their pretraining seed, for example), each zoo is taken as a tree, with its
    root's ``listeners`` when given (tree name → {LoRA layer: matrix}, see probex.router.Tree), and the router is kept
    only if every known model routes back to its own zoo."""
    from probex.router import Router

    router = Router()
    by_digest: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        spec.signature = spec.signature or _first_signature(spec.cache)
        by_digest.setdefault(spec.signature.digest, []).append(i)
    for members in by_digest.values():
        first, layer = specs[members[0]], caches[members[0]][1]
        items = [item for i in members for item in _cached_items(caches[i][0], layer)]
        owner = [i for i in members for _ in caches[i][0].models]
        found = router.add_group(first.signature, first.cache.kind, layer, items, n_trees=len(members))
        names = {}
        for i in members:
            votes = [f for f, o in zip(found, owner) if o == i]
            majority = max(set(votes), key=votes.count)
            if majority in names or votes.count(majority) != len(votes):
                names = None
                break
            names[majority] = specs[i].name
        if names is None:  # clustering mixes the zoos: take them as given, keep them only if routing separates them
            router.groups.pop()
            index = {i: k for k, i in enumerate(members)}
            found = router.add_group(first.signature, first.cache.kind, layer, items,
                                     members=[index[o] for o in owner])
            group = router.groups[-1]
            heard = sorted({n for i in members for n in (listeners or {}).get(specs[i].name, {})})
            for i in members:
                group.trees[index[i]].listeners = dict((listeners or {}).get(specs[i].name, {}))
            per_layer = {layer: items, **{n: [x for i in members for x in _cached_items(caches[i][0], n)]
                                          for n in heard if n != layer}}
            routed = [router.route_layers(group, {n: xs[j] for n, xs in per_layer.items()}).tree
                      for j in range(len(items))]
            if routed != found:
                wrong = next(specs[o].name for o, r, f in zip(owner, routed, found) if r != f)
                raise ProbexError(f"the router could not separate tree {wrong} from the other populations "
                                  f"of its architecture on layer {layer}")
            names = {found[owner.index(i)]: specs[i].name for i in members}
        router.rename(names)
    return router


def _cached_items(cache, layer: str) -> list:
    """One cached layer of every model of a cache, as the router takes it (LoRA factors or dense weights)."""
    from probex.weights import LoraFactors

    t = cache.load(layer)
    if "up" in t:
        return [LoraFactors(u[:, :r], d[:r], float(s)) for u, d, s, r in
                zip(t["up"], t["down"], t["scale"], t["rank"].tolist())]
    return list(t["weight"])


def _sample_ids(cache, per_class: int) -> list[str]:
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


def _example_models(cache, n: int) -> list[dict]:
    """A few held-out-class and test models of distinct classes: the app's example uploads."""
    picked, seen = [], set()
    for split in ("test_holdout", "test"):
        for m in cache.models:
            key = m.get("class_id") or m["id"]
            if m["split"] == split and key not in seen and len(picked) < n:
                picked.append(m)
                seen.add(key)
    return picked
