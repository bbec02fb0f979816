"""The SD 1.5 tree without training: any SD 1.5 LoRA read through the base UNet's own cross-attention blocks.

The emoji bundle's expert (``AttentionReader``, probex/experts/attention_reader.py) needs no training, only its root's attn2 weights
and the token states of the text encoder that root draws from. For SD 1.5 those are the UNet's 16 attn2 blocks and
CLIP ViT-L/14's last hidden states, which a Space downloads; ``build_reader_tree`` puts the tree together in memory:
- the reader, from the attn2 tensors alone, read out of the UNet's safetensors (about 45 M of its 860 M parameters;
  the pipeline is never loaded for reading);
- an empty gallery whose vocabulary is ImageNet-1k's class names: concepts and zero-shot need no known models;
- the vocabulary captions' block outputs (``AttentionReader.text_outputs``), computed once and kept on disk: CLIP on
  a thousand captions takes about a minute on a CPU Space, and they do not depend on the instance prompt.

The instance prompt, the probe the reading pushes through the LoRA, is the file's own trigger where its metadata says
(``instance_prompt``, SAI model spec's trigger phrase, kohya's DreamBooth class tokens or most frequent caption tags),
else DEFAULT_INSTANCE_PROMPT. Each prompt gets its own reader (``PromptedReading``), sharing the root's weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from probex.bundle import TreeBundle
from probex.errors import InputError, first_line
from probex.experts import PROJECTIONS, AttentionReader
from probex.gallery import Gallery
from probex.router import Router
from probex.text import load_text_encoder, prompt
from probex.zoo import imagenet_names

TREE = "sd15"
ATTN2_WEIGHT = re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)\.weight$")
UNET_WEIGHTS = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")
DEFAULT_INSTANCE_PROMPT = "a photo of sks"  # DreamBooth's convention, what Model-J's LoRAs were trained with
READ_TOKENS = 16        # token states read of every prompt: CLIP is causal, so these equal the first 16 of SD's 77
READ_QUERIES = 4        # synthetic queries per block: 16 blocks × 4 queries × block width = 49,920 numbers a LoRA
READ_SEED, READ_SCALE = 0, 4.0   # the synthetic features' draw and standard deviation, as the emoji bundle reads
PROMPTS_KEPT = 2        # per-prompt readers kept with their class features (each C × r_T: 200 MB for SD 1.5)
CAPTION_DTYPE = torch.float16    # caption outputs as stored and used: the first run and a cached one read alike


def cache_dir() -> Path:
    return Path(os.environ.get("PROBEX_CACHE_DIR") or Path.home() / ".cache" / "probex")


# ------------------------------------------------------------------------------------------ the UNet's attn2
def unet_files(ref: str | Path) -> tuple[dict, list[Path]]:
    """(the UNet's config, its safetensors files) of a diffusers pipeline or UNet folder, or a Hub repo id (only
    ``unet/config.json`` and the UNet's weights are downloaded, the fp16 variant where there is one)."""
    local = Path(ref).expanduser()
    if local.is_dir():
        folder = local / "unet" if (local / "unet" / "config.json").is_file() else local
        if not (folder / "config.json").is_file():
            raise InputError(f"{ref}: no unet/config.json: not a diffusers pipeline or UNet folder")
        return json.loads((folder / "config.json").read_text()), _weight_files(folder, ref)
    return _download_unet(str(ref))


def _weight_files(folder: Path, ref) -> list[Path]:
    for name in UNET_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():  # sharded: the index maps each tensor to its shard
            return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise InputError(f"{ref}: the UNet has no safetensors weights ({' or '.join(UNET_WEIGHTS)})")


def _download_unet(repo_id: str) -> tuple[dict, list[Path]]:
    try:
        config = json.loads(Path(hf_hub_download(repo_id, "unet/config.json")).read_text())
        for name in UNET_WEIGHTS:
            try:
                return config, [Path(hf_hub_download(repo_id, f"unet/{name}"))]
            except EntryNotFoundError:
                continue
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise InputError(f"cannot download the SD 1.5 UNet {repo_id}: {first_line(exc, None)}") from None
    raise InputError(f"{repo_id} has no unet/{' or unet/'.join(UNET_WEIGHTS)}")


def cross_attention_weights(files: list[Path]) -> dict[str, Tensor]:
    """Every attn2 projection's weight (fp32) by module name, read alone out of the UNet's safetensors files."""
    weights = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if ATTN2_WEIGHT.search(key):
                    weights[key.removesuffix(".weight")] = f.get_tensor(key).float()
    if not weights:
        raise InputError(f"{files[0]}: holds no attn2 weights: not a Stable Diffusion UNet")
    return dict(sorted(weights.items()))


def head_counts(config: dict, blocks: list[str]) -> dict[str, int]:
    """Each attn2 block's head count (by its "….attn2." prefix) from the UNet config. diffusers keeps SD 1.5's head
    count in ``attention_head_dim`` (its historical name) unless ``num_attention_heads`` is set; either may be one
    number or one per down block, the up blocks taking them in reverse."""
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(config["block_out_channels"])
    levels = {"down_blocks": per_level, "up_blocks": per_level[::-1]}
    counts = {}
    for prefix in blocks:
        level, index = prefix.split(".")[:2]
        counts[prefix] = int(per_level[-1] if level == "mid_block" else levels[level][int(index)])
    return counts


# ---------------------------------------------------------------------------------------- instance prompts
def instance_prompt(metadata: dict[str, str]) -> tuple[str, str]:
    """(prompt, where it came from) of a LoRA file: what it was trained to answer, as far as its metadata says."""
    for key in ("instance_prompt", "prompt", "modelspec.trigger_phrase"):
        if metadata.get(key, "").strip():
            return " ".join(metadata[key].split()), key
    tokens = _kohya_class_tokens(metadata.get("ss_datasets"))
    if tokens:
        return tokens, "ss_datasets class tokens"
    tags = _top_tags(metadata.get("ss_tag_frequency"))
    if tags:
        return tags, "ss_tag_frequency"
    return DEFAULT_INSTANCE_PROMPT, "default"


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _kohya_class_tokens(datasets: str | None) -> str | None:
    """DreamBooth-style kohya training names its trigger in each subset's ``class_tokens``."""
    found = [s.get("class_tokens") for d in _json(datasets) or [] if isinstance(d, dict)
             for s in d.get("subsets") or [] if isinstance(s, dict)]
    found = [" ".join(t.split()) for t in found if isinstance(t, str) and t.strip()]
    return found[0] if found else None


def _top_tags(frequency: str | None, n: int = 3) -> str | None:
    """The n most frequent caption tags over kohya's dataset folders: a caption-trained LoRA's trigger words lead."""
    counts: dict[str, float] = {}
    for tags in (_json(frequency) or {}).values():
        for tag, count in (tags.items() if isinstance(tags, dict) else ()):
            if isinstance(count, (int, float)) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + count
    best = sorted(counts, key=lambda t: -counts[t])[:n]
    return ", ".join(best) or None


# ------------------------------------------------------------------------------------------------ the tree
@dataclass
class PromptedReading:
    """A tree whose reader takes each file's instance prompt: readers and class features per prompt, LRU-kept."""
    reader: AttentionReader              # on DEFAULT_INSTANCE_PROMPT
    text_encoder: object
    caption_outputs: list[Tensor]        # per block (C, n_queries, out) in CAPTION_DTYPE: the vocabulary's captions
    _kept: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reader_for(self, prompt: str) -> AttentionReader:
        return self._entry(prompt)[0]

    def class_features(self, prompt: str) -> Tensor:
        """(C, r_T) the vocabulary's captions as changes from this instance prompt, in the reader's space."""
        return self._entry(prompt)[1]

    @torch.no_grad()
    def _entry(self, prompt: str) -> tuple[AttentionReader, Tensor]:
        with self._lock:
            if prompt in self._kept:
                self._kept.move_to_end(prompt)
                return self._kept[prompt]
        states = self.text_encoder.token_states([prompt], self.reader.n_tokens)[0]
        reader = self.reader.with_probes(states)
        entry = reader, reader.features_of_outputs(self.caption_outputs)
        with self._lock:
            self._kept[prompt] = entry
            while len(self._kept) > PROMPTS_KEPT:
                self._kept.popitem(last=False)
        return entry


def build_reader_tree(unet_ref: str | Path, text_encoder, template: str,
                      vocabulary: list[str] | None = None) -> tuple[TreeBundle, PromptedReading]:
    """The training-free SD 1.5 TreeBundle and its per-prompt reading: ``unet_ref`` a diffusers pipeline / UNet folder
    or Hub id, ``text_encoder`` a loaded probex.text encoder (CLIP ViT-L/14 for SD 1.5), ``template`` the caption of a
    class ("a photo of a {name}"), ``vocabulary`` the class names (default ImageNet-1k's)."""
    config, files = unet_files(unet_ref)
    weights = cross_attention_weights(files)
    names = [n for n in weights if n.endswith(tuple("." + p for p in PROJECTIONS))]
    heads = head_counts(config, sorted({n[:-len("to_k")] for n in names if n.endswith(".to_k")}))
    instance = text_encoder.token_states([DEFAULT_INSTANCE_PROMPT], READ_TOKENS)[0]
    width = weights[next(n for n in names if n.endswith(".to_k"))].shape[1]
    if instance.shape[1] != width:
        raise InputError(f"{text_encoder.name} gives {instance.shape[1]}-wide token states; the UNet's "
                         f"cross-attention takes {width}")
    reader = AttentionReader.from_weights(weights, heads, names, instance, READ_QUERIES, READ_SEED, READ_SCALE)
    del weights
    vocabulary = list(vocabulary or imagenet_names().values())
    captions = [prompt(template, c) for c in vocabulary]
    outputs = caption_outputs(reader, text_encoder, captions, _cache_key(files, text_encoder.name, captions))
    gallery = Gallery(ids=[], model_classes=[], splits=[], vocabulary=vocabulary,
                      encodings=torch.zeros(0, reader.r_t), coords=torch.zeros(0, 2), text_emb=torch.zeros(0),
                      layout={"method": "none"})
    tree = TreeBundle(TREE, names, reader, gallery, "align", family="sd15", prompt_template=template,
                      root_model=str(unet_ref), instance_prompt=DEFAULT_INSTANCE_PROMPT)
    return tree, PromptedReading(reader, text_encoder, outputs)


@torch.no_grad()
def caption_outputs(reader: AttentionReader, text_encoder, captions: list[str], key: str,
                    batch: int = 64) -> list[Tensor]:
    """The captions' block outputs, from the disk cache under ``key`` or computed (and cached) in batches."""
    path = cache_dir() / "sd15-reader" / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        if len(stored) == len(reader.blocks) and all(len(t) == len(captions) for t in stored.values()):
            return [stored[f"block{i}"] for i in range(len(reader.blocks))]

    parts = [[] for _ in reader.blocks]
    for start in tqdm(range(0, len(captions), batch), desc="SD 1.5 reader: captions", unit="batch",
                      disable=len(captions) <= batch):
        states = text_encoder.token_states(captions[start:start + batch], reader.n_tokens)
        for i, out in enumerate(reader.text_outputs(states)):
            parts[i].append(out.to(CAPTION_DTYPE))
    outputs = [torch.cat(p) for p in parts]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"block{i}": o.contiguous() for i, o in enumerate(outputs)}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
    except OSError:  # a read-only home: computed again next start
        pass
    return outputs


def _cache_key(files: list[Path], encoder_name: str, captions: list[str]) -> str:
    """What the caption outputs depend on: the UNet's weight files (path, size, mtime), the text encoder, the
    captions and the reading's constants."""
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    h.update(json.dumps([encoder_name, captions, READ_TOKENS, READ_QUERIES, READ_SEED, READ_SCALE,
                         str(CAPTION_DTYPE)]).encode())
    return h.hexdigest()[:24]


def add_reader_tree(bundle, profile) -> tuple[str, PromptedReading]:
    """Put the profile's training-free reader into ``bundle`` (beside its trained trees) and route to it every LoRA
    of its base that no trained tree takes. Returns the tree's name and its per-prompt reading, which the service
    keeps (it is built in memory, never saved with the bundle)."""
    if profile.reader != "sd15":
        raise InputError(f"profile {profile.name}: no training-free reader for {profile.reader!r} (known: sd15)")
    tree, reading = build_reader_tree(profile.root_model, load_text_encoder(profile.text_encoder),
                                      profile.prompt_template)
    bundle.trees[tree.name] = tree
    bundle.router = bundle.router or Router()
    bundle.router.base_trees["sd15"] = tree.name
    return tree.name, reading
