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

"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from probex.errors import ProbexError
from probex.experts import Expert, load_expert
from probex.gallery import Gallery
from probex.router import Router
from probex.text import DEFAULT_PROMPT
from probex.zoo import WEIGHT_FILES, sha256_file

FORMAT, VERSION = "probex-bundle", 3  # 2: text_emb in its own file, encodings in int8; 3: encodings over files
FILE_BYTES = 9_500_000  # gallery encodings are split over files of at most this many bytes (Spaces: ≤ 10 MB a file)


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

    @property
    def layers(self) -> list[str]:
        """The names of the layer(s) the expert reads, as a list either way."""
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    def class_text_input(self) -> torch.Tensor:
        """The gallery's class text bank as the expert takes it (token-state experts store it flattened)."""
        n_tokens = getattr(self.expert, "n_tokens", None)
        g = self.gallery
        return g.text_emb.reshape(len(g.vocabulary), n_tokens, -1) if n_tokens else g.text_emb

    def class_text_features(self) -> torch.Tensor | None:
        """(C, r_T) the vocabulary's captions in the expert's space; None without a text head."""
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
            folder = folder_name(tree.name, folders)
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


def folder_name(name: str, taken: set) -> str:
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "tree"
    while folder in taken:
        folder += "_"
    taken.add(folder)
    return folder


def _example_name(source: Path) -> str:
    """Zoo files all share one name (pytorch_lora_weights.safetensors): name the copy after the model's folders,
    tree included (two trees both have a test/model_idx_0014)."""
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
    save_file({"encodings": parts[0].contiguous(), "encoding_scale": scale, "umap": g.coords.half().contiguous()},
              str(folder / gallery_files[0]))
    for part, file in zip(parts[1:], gallery_files[1:]):
        save_file({"encodings": part.contiguous()}, str(folder / file))
    save_file({"text_emb": g.text_emb.half().contiguous()}, str(folder / "text.safetensors"))
    samples = {mid: _ship_half(Path(p), folder / "samples" / (re.sub(r"[^A-Za-z0-9._-]+", "__", mid) + ".safetensors"))
               for mid, p in g.sample_paths.items()}
    (folder / "gallery.json").write_text(json.dumps(
        {"ids": g.ids, "classes": g.model_classes, "splits": g.splits, "classes_vocabulary": g.vocabulary,
         "class_ids": g.vocabulary_ids, **({"class_keywords": g.vocabulary_keywords} if g.vocabulary_keywords else {}),
         "sample_paths": {m: p.relative_to(root).as_posix() for m, p in samples.items()},
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


def _keywords(lists, n_classes: int) -> list[list[str]]:
    if not lists:
        return []
    if len(lists) != n_classes or not all(isinstance(w, list) and all(isinstance(x, str) for x in w) for w in lists):
        raise ValueError("class_keywords is not one list of words per vocabulary class")
    return lists


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
                       vocabulary_keywords=_keywords(j.get("class_keywords", []), len(j["classes_vocabulary"])),
                       sample_paths={m: str(directory / p) for m, p in j.get("sample_paths", {}).items()},
                       layout=j.get("layout", {}))
    except (OSError, ValueError, KeyError) as exc:
        raise ProbexError(f"bundle {directory.name}: {folder}/gallery is incomplete ({exc})") from None
