"""Model populations on disk (Model-J layout) and the per-layer cache experts train on.

A zoo is a folder of splits, each holding one folder per model:
    <zoo>/{train,val,test,val_holdout,test_holdout}/<model>/pytorch_lora_weights.safetensors   (generative, LoRA)
    <zoo>/{train,val,test,val_holdout,test_holdout}/<model>/model.safetensors                  (discriminative)
Labels come from each file's safetensors metadata (see `labels_from_metadata`); an optional `<zoo>/tree.json` names the
tree, its root model, text profile, prompt template and (for multilabel zoos) the class pool.

The layer cache is the one pass over model files that training needs: for each requested layer, every model's
weights stacked into `<cache>/<layer>.safetensors` —
    LoRA:  up (N, d_out, r_max), down (N, r_max, d_in) zero-padded to the largest rank, scale (N), rank (N)
    full:  weight (N, d_out, d_in)
— plus `<cache>/index.json` (model ids, splits, labels, source sha256s, the cached layers). Files open memory-mapped
through safetensors, and re-running only extracts layers not yet cached for the same file list.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from probex.cluster import map_jobs
from probex.errors import InputError
from probex.weights import LoraFactors, layer_shape, read_weights

SPLITS = ("train", "val", "test", "val_holdout", "test_holdout")
IN_DISTRIBUTION = ("train", "val", "test")
HOLDOUT = ("val_holdout", "test_holdout")
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "model.safetensors")
IMAGENET_NAMES = Path(__file__).parent / "data" / "imagenet_classes.json"
INDEX_VERSION = 1


# ---- labels ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def imagenet_names() -> dict[str, str]:
    """wnid → human name from the shipped table (empty when it is not there: the wnid then stands for itself)."""
    if not IMAGENET_NAMES.exists():
        return {}
    table = json.loads(IMAGENET_NAMES.read_text())
    return {wnid: (name[0] if isinstance(name, list) else name) for wnid, name in table.items()}


def labels_from_metadata(meta: dict[str, str], source: str) -> dict:
    """{"class_id", "class_name"} for a generative model, {"labels": [...]} for a discriminative one, {} if unlabelled.

    Model-J stores `imagenet_class_id` (a wnid); our jungle stores `class_id` + `class_name`; discriminative Model-J
    stores `dataset_chosen_targets` as Python-list text — parsed as a literal, never evaluated."""
    if "imagenet_class_id" in meta:
        wnid = meta["imagenet_class_id"]
        return {"class_id": wnid, "class_name": imagenet_names().get(wnid, wnid).replace("_", " ")}
    if "class_id" in meta:
        return {"class_id": meta["class_id"], "class_name": meta.get("class_name", meta["class_id"])}
    if "dataset_chosen_targets" in meta:
        try:
            targets = ast.literal_eval(meta["dataset_chosen_targets"])
        except (ValueError, SyntaxError):
            targets = None
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise InputError(f"{source}: dataset_chosen_targets is not a list of class names")
        return {"labels": sorted(targets)}
    return {}


# ---- the population -------------------------------------------------------------------------------------------------
@dataclass
class ModelRecord:
    id: str                      # "<split>/<model folder>", unique in the zoo
    split: str
    source: str                  # weights file, relative to the zoo root
    class_id: str | None = None
    class_name: str | None = None
    labels: list[str] | None = None


@dataclass
class Zoo:
    root: Path
    models: list[ModelRecord]
    tree: dict = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str | Path) -> "Zoo":
        """Find every model file under the split folders and read its labels (headers only, no tensors)."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"zoo folder {root} does not exist")
        models = []
        for split in SPLITS:
            files = sorted(p for name in WEIGHT_FILES for p in (root / split).rglob(name)) if (root / split).is_dir() else []
            for path in files:
                source = path.relative_to(root).as_posix()
                models.append(ModelRecord(id=path.parent.relative_to(root).as_posix(), split=split, source=source,
                                          **labels_from_metadata(_metadata(path, source), source)))
        if not models:
            raise InputError(f"no model files ({' or '.join(WEIGHT_FILES)}) under {root}/{{{','.join(SPLITS)}}}")
        tree = json.loads((root / "tree.json").read_text()) if (root / "tree.json").exists() else {}
        return cls(root, models, tree)

    @property
    def name(self) -> str:
        """The tree's name: tree.json's "name", else the zoo folder's."""
        return self.tree.get("name") or self.root.resolve().name

    @property
    def task(self) -> str:
        """"multilabel" when the models carry label lists (discriminative), else "multiclass" (one class each)."""
        return "multilabel" if any(m.labels is not None for m in self.models) else "multiclass"

    def classes(self) -> list[dict]:
        """The class vocabulary, sorted by id: [{"id", "name", "holdout"}]. For multilabel zoos the pool is
        tree.json's "classes" when given, else every label seen."""
        if self.task == "multilabel":
            pool = self.tree.get("classes") or sorted({t for m in self.models for t in m.labels or []})
            return [{"id": c, "name": c, "holdout": False} for c in pool]
        names = {m.class_id: m.class_name for m in self.models if m.class_id is not None}
        seen_in_distribution = {m.class_id for m in self.models if m.split in IN_DISTRIBUTION}
        return [{"id": c, "name": names[c], "holdout": c not in seen_in_distribution} for c in sorted(names)]


def _metadata(path: Path, source: str) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{source}: not a readable safetensors file ({exc})") from None


# ---- layer selection ------------------------------------------------------------------------------------------------
def select_layers(names: list[str], spec=None) -> list[str]:
    """Layers by a spec over the sorted layer order: None/"all", a name, an index "46", a slice "40-47", a comma list
    of those ("3,40-47"), or a Python list of names / indices."""
    names = sorted(names)
    if spec is None or spec == "all":
        return names
    items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    chosen = []
    for item in items:
        if isinstance(item, int) or re.fullmatch(r"\d+", str(item)):
            chosen.append(_layer_at(names, int(item)))
        elif m := re.fullmatch(r"(\d+)-(\d+)", str(item)):
            chosen += [_layer_at(names, i) for i in range(int(m[1]), int(m[2]) + 1)]
        elif item in names:
            chosen.append(item)
        else:
            raise InputError(f"no layer {item!r} in this zoo (it has {len(names)} layers, e.g. {names[0]})")
    return list(dict.fromkeys(chosen))


def _layer_at(names: list[str], i: int) -> str:
    if not 0 <= i < len(names):
        raise InputError(f"layer index {i} is out of range: this zoo has {len(names)} layers (0–{len(names) - 1})")
    return names[i]


# ---- the layer cache ------------------------------------------------------------------------------------------------
class LayerCache:
    """A built cache: `index` (index.json) and `load(layer)` → the stacked weights of every model, in index order."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()   # absolute: a Ray task elsewhere reads the same files
        index_path = self.directory / "index.json"
        if not index_path.exists():
            raise InputError(f"no layer cache at {self.directory} (index.json missing)")
        self.index = json.loads(index_path.read_text())

    @property
    def models(self) -> list[dict]:
        return self.index["models"]

    @property
    def layers(self) -> list[str]:
        """Layers cached so far, in sorted order."""
        return sorted(self.index["layers"])

    @property
    def all_layers(self) -> list[str]:
        """Every layer the zoo's models have (cached or not), in sorted order — the paper's layer indices."""
        return self.index["all_layers"]

    @property
    def classes(self) -> list[dict]:
        return self.index["classes"]

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def task(self) -> str:
        return self.index["task"]

    def split_indices(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, m in enumerate(self.models) if m["split"] == split], dtype=torch.long)

    def router_items(self, layer: str) -> list:
        """One cached layer of every model, as the router takes it (LoRA factors or dense weights)."""
        t = self.load(layer)
        if "up" in t:
            return [LoraFactors(u[:, :r], d[:r], float(s)) for u, d, s, r in
                    zip(t["up"], t["down"], t["scale"], t["rank"].tolist())]
        return list(t["weight"])

    def load(self, layer: str) -> dict[str, torch.Tensor]:
        """The layer's stacked tensors (memory-mapped by safetensors until touched)."""
        if layer not in self.index["layers"]:
            raise InputError(f"layer {layer!r} is not in the cache at {self.directory}; build it first")
        path = self.directory / self.index["layers"][layer]["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise InputError(f"cache file {path.name} is unreadable ({exc}); rebuild the cache") from None

    def inputs(self, layer: str):
        """What an expert takes: (up, down, scale) for LoRA layers, the (N, d_out, d_in) weights for full ones."""
        t = self.load(layer)
        return (t["up"], t["down"], t["scale"]) if "up" in t else t["weight"]


def build_cache(zoo: Zoo | str | Path, cache_dir: str | Path, layers=None, memory_budget_gb: float = 4.0,
                ray: bool | str = False) -> LayerCache:
    """Extract `layers` (a `select_layers` spec; default all) of every model into `cache_dir`.

    Incremental: layers already cached for the same file list (paths, sizes, modification times) are skipped; a
    changed file list starts the cache afresh. Layers are gathered in memory and written stacked, so when the
    requested layers of all models exceed `memory_budget_gb` they are split over several passes over the files.
    Each pass is one job of `probex.cluster.map_jobs` (on Ray when `ray` says so, passes run side by side, each
    holding up to the budget in memory)."""
    zoo = zoo if isinstance(zoo, Zoo) else Zoo.scan(zoo)
    zoo = replace(zoo, root=zoo.root.resolve())   # absolute paths: a Ray task elsewhere reads the same files
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _file_list_fingerprint(zoo)
    index = _existing_index(cache_dir, fingerprint)

    first = _read(zoo, zoo.models[0])
    shapes = {name: layer_shape(w) for name, w in first.layers.items()}
    wanted = [name for name in select_layers(list(shapes), layers) if name not in index["layers"]]
    if index.get("all_layers") is None:
        index.update(_describe(zoo, first.kind, sorted(shapes)))
    elif index["kind"] != first.kind:
        raise InputError(f"{zoo.models[0].source}: a {first.kind} file in a {index['kind']} cache")

    per_model = {name: _bytes_per_model(first.layers[name]) for name in wanted}
    passes = _passes(wanted, per_model, len(zoo.models), memory_budget_gb * 2**30)
    # locally each pass shows its files; on Ray, the bar counts finished passes
    cache_pass = partial(_cache_pass, zoo, cache_dir, shapes, first.kind, fingerprint, not ray)
    for entries, hashes in map_jobs(cache_pass, passes, ray, desc="cache passes", progress=bool(ray)):
        index["layers"].update(entries)
        for record, digest in zip(index["models"], hashes):
            record["sha256"] = digest
        _write_index(cache_dir, index)
    _write_index(cache_dir, index)
    return LayerCache(cache_dir)


def _cache_pass(zoo: Zoo, cache_dir: Path, shapes: dict, kind: str, fingerprint: str, progress: bool,
                layers: list[str]) -> tuple[dict, list[str]]:
    """One pass over the files: the stacked files of `layers` written; their index entries and each file's sha256."""
    stacks, hashes = _extract(zoo, layers, shapes, kind, progress)
    entries = {}
    for name, tensors in stacks.items():
        file = f"{name}.safetensors"
        save_file(tensors, str(cache_dir / file), metadata={"layer": name, "fingerprint": fingerprint})
        entries[name] = {"file": file, "shape": list(shapes[name])}
    return entries, hashes


def _read(zoo: Zoo, record: ModelRecord):
    """read_weights, with the model's place in the zoo in the message (every file there has the same name)."""
    try:
        return read_weights(zoo.root / record.source)
    except InputError as exc:
        raise InputError(f"{record.id}: {exc}") from None


def _bytes_per_model(w) -> int:
    return 4 * (w.up.numel() + w.down.numel() if isinstance(w, LoraFactors) else w.numel())


def _passes(layers: list[str], per_model: dict[str, int], n_models: int, budget: float) -> list[list[str]]:
    """Greedy groups of layers whose stacked size fits the budget (a single layer always gets its own pass).
    The estimate uses the first model's ranks, so mixed-rank zoos can exceed it somewhat."""
    groups, size = [], budget + 1
    for name in layers:
        need = per_model[name] * n_models
        if size + need > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


def _extract(zoo: Zoo, layers: list[str], shapes: dict, kind: str, progress: bool = True):
    """One pass over the files: the chosen layers of every model, stacked; and each file's sha256."""
    collected = {name: [] for name in layers}
    hashes = []
    for record in tqdm(zoo.models, desc=f"caching {len(layers)} layer(s)", unit="model", disable=not progress):
        weights = _read(zoo, record)
        if weights.kind != kind:
            raise InputError(f"{record.source}: a {weights.kind} file among {kind} files")
        for name in layers:
            w = weights.layers.get(name)
            if w is None or layer_shape(w) != shapes[name]:
                found = "missing" if w is None else "×".join(map(str, layer_shape(w)))
                raise InputError(f"{record.source}: layer {name} is {found}, expected {'×'.join(map(str, shapes[name]))}")
            collected[name].append(w)
        hashes.append(sha256_file(zoo.root / record.source))
    return {name: _stack(ws) for name, ws in collected.items()}, hashes


def _stack(weights: list) -> dict[str, torch.Tensor]:
    if not isinstance(weights[0], LoraFactors):
        return {"weight": torch.stack([w.float() for w in weights]).contiguous()}
    ranks = [w.rank for w in weights]
    n, r_max = len(weights), max(ranks)
    d_out, d_in = weights[0].up.shape[0], weights[0].down.shape[1]
    up, down = torch.zeros(n, d_out, r_max), torch.zeros(n, r_max, d_in)
    for i, (w, r) in enumerate(zip(weights, ranks)):
        up[i, :, :r], down[i, :r] = w.up, w.down   # zero padding is exact: padded terms add 0·0
    return {"up": up, "down": down, "scale": torch.tensor([float(w.scale) for w in weights]),
            "rank": torch.tensor(ranks, dtype=torch.int32)}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_list_fingerprint(zoo: Zoo) -> str:
    """Changes when a model file is added, removed, renamed or rewritten (size / mtime) — cheap, no file reads."""
    rows = []
    for m in zoo.models:
        st = (zoo.root / m.source).stat()
        rows.append(f"{m.source}\t{st.st_size}\t{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _existing_index(cache_dir: Path, fingerprint: str) -> dict:
    """The cache's index when it was built from the same file list; otherwise a fresh one (stale layers removed)."""
    path = cache_dir / "index.json"
    if path.exists():
        index = json.loads(path.read_text())
        if index.get("version") == INDEX_VERSION and index.get("fingerprint") == fingerprint:
            return index
        for entry in index.get("layers", {}).values():
            (cache_dir / entry["file"]).unlink(missing_ok=True)
    return {"version": INDEX_VERSION, "fingerprint": fingerprint, "layers": {}}


def _describe(zoo: Zoo, kind: str, all_layers: list[str]) -> dict:
    models = [{k: v for k, v in asdict(m).items() if v is not None} for m in zoo.models]
    return {"zoo": str(zoo.root.resolve()), "kind": kind, "task": zoo.task, "tree": zoo.tree,
            "classes": zoo.classes(), "all_layers": all_layers, "models": models}


def _write_index(cache_dir: Path, index: dict) -> None:
    tmp = cache_dir / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(cache_dir / "index.json")  # atomic: an interrupted build never leaves a half-written index
