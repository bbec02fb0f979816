"""Synthetic model populations on disk, in Model-J layout, with a planted class signal — for fast CPU tests.

`make_lora_zoo` writes generative-style LoRA populations:
    <root>/{train,val,test,val_holdout,test_holdout}/model_idx_NNNN/pytorch_lora_weights.safetensors
with metadata `class_id`, `class_name` and training hyperparameters (our jungle's labels).

What is planted, per informative layer (d_out × d_in):
    scale·B·A = (P t_c + jitter) aᵀ  +  tree_component · g hᵀ  +  noise (the remaining rank-1 terms)
t_c is class c's text embedding, P a fixed random map (d_out × text_dim) and a a fixed unit vector, both per layer.
The class part is LINEAR in the class text — like a real LoRA, whose change ΔW·h_token is the root's W applied to the
caption's change — so an expert trained on some classes can recognise held-out classes from their text (zero-shot).
Uninformative layers carry only noise; g hᵀ is shared by the whole zoo (a "tree": zoos with different tree_seed differ).

`make_full_zoo` writes discriminative-style full checkpoints `<split>/model_idx_NNNN/model.safetensors`: a shared
root plus a planted delta per chosen class, metadata `dataset_chosen_targets` (the Python-list text Model-J stores).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 24),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": (16, 16),
}
LORA_KEYS = {  # where each format keeps B (up) and A (down) of one module
    "diffusers": ("unet.{}.lora_B.weight", "unet.{}.lora_A.weight"),
    "modelj": ("unet.{}.lora.up.weight", "unet.{}.lora.down.weight"),
}


@dataclass
class SyntheticZoo:
    root: Path
    class_ids: list[str]
    class_names: list[str]
    text_embeddings: torch.Tensor        # (C, text_dim), rows follow class_ids: the planted text side
    train_classes: list[str]
    holdout_classes: list[str]
    layers: dict[str, tuple[int, int]]
    informative: list[str]
    models: list[dict] = field(default_factory=list)   # id, split, class_id / labels, path, rank

    def embeddings_for(self, class_ids: list[str]) -> torch.Tensor:
        return self.text_embeddings[[self.class_ids.index(c) for c in class_ids]]


def split_counts(n: int) -> dict[str, int]:
    """70/10/20, at least one val and one test model when there are 3 or more."""
    n_val = max(1, round(0.1 * n)) if n >= 3 else 0
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _layer_generator(seed: int, layer: str) -> torch.Generator:
    # Fixed per (seed, layer), independent of the other layers and of the call order. (torch's CPU generator keeps
    # only 32 bits of a seed, so seed and layer are hashed together rather than packed into one big integer.)
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}".encode()))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def make_lora_zoo(root, n_classes: int = 6, per_class: int = 10, layers: dict[str, tuple[int, int]] | None = None,
                  ranks: tuple[int, ...] = (4,), holdout_classes: int = 0, holdout_per_class: int | None = None,
                  seed: int = 0, tree_component: float = 0.0, tree_seed: int | None = None,
                  informative: list[str] | None = None, signal: float = 1.0, jitter: float = 0.2, noise: float = 1.0,
                  text_dim: int = 16, class_embeddings: torch.Tensor | None = None,
                  class_names: list[str] | None = None, fmt: str = "diffusers") -> SyntheticZoo:
    """Write a LoRA population; `n_classes` training classes plus `holdout_classes` more that only appear in
    val_holdout / test_holdout. Ranks cycle through `ranks` (so one zoo can mix ranks). Returns what was planted."""
    root = Path(root)
    layers = dict(layers or DEFAULT_LAYERS)
    informative = list(layers) if informative is None else list(informative)
    if tree_component and min(ranks) < 2:
        raise ValueError("a tree component needs rank ≥ 2 (it takes the second rank-1 term)")
    total = n_classes + holdout_classes
    gen = torch.Generator().manual_seed(seed)
    ids = [f"c{i:03d}" for i in range(total)]
    names = list(class_names) if class_names else [f"class {i}" for i in range(total)]
    text = _unit(class_embeddings.float()) if class_embeddings is not None else _unit(torch.randn(total, text_dim, generator=gen))
    text_dim = text.shape[1]

    planted = {}
    for name, (d_out, d_in) in layers.items():
        g = _layer_generator(seed, name)
        tg = _layer_generator(seed if tree_seed is None else tree_seed, name + "/tree")
        planted[name] = {
            # ‖P t‖ ≈ signal for a unit t, whatever the text width
            "P": torch.randn(d_out, text_dim, generator=g) * (signal / d_out ** 0.5 * (name in informative)),
            "a": _unit(torch.randn(d_in, generator=g)),
            "g": _unit(torch.randn(d_out, generator=tg)) * tree_component,
            "h": _unit(torch.randn(d_in, generator=tg)),
        }

    plan = []  # (split, class index)
    for c in range(n_classes):
        for split, k in split_counts(per_class).items():
            plan += [(split, c)] * k
    n_hold = holdout_per_class or per_class
    for c in range(n_classes, total):
        plan += [("val_holdout", c)] * (n_hold // 2) + [("test_holdout", c)] * (n_hold - n_hold // 2)

    up_key, down_key = LORA_KEYS[fmt]
    zoo = SyntheticZoo(root, ids, names, text, ids[:n_classes], ids[n_classes:], layers, informative)
    for idx, (split, c) in enumerate(plan):
        rank = ranks[idx % len(ranks)]
        tensors = {}
        for name, (d_out, d_in) in layers.items():
            p = planted[name]
            up = noise * _unit(torch.randn(rank, d_out, generator=gen)).T
            down = _unit(torch.randn(rank, d_in, generator=gen))
            up[:, 0] = p["P"] @ text[c] + jitter * signal * _unit(torch.randn(d_out, generator=gen))
            down[0] = p["a"]
            if tree_component:
                up[:, 1], down[1] = p["g"], p["h"]
            tensors[up_key.format(name)], tensors[down_key.format(name)] = up.contiguous(), down.contiguous()
        folder = root / split / f"model_idx_{idx:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "pytorch_lora_weights.safetensors"
        meta = {"class_id": ids[c], "class_name": names[c], "rank": str(rank), "lora_alpha": str(rank),
                "learning_rate": "0.0001", "seed": str(seed * 100_000 + idx)}
        save_file(tensors, str(path), metadata=meta)
        zoo.models.append({"id": f"{split}/model_idx_{idx:04d}", "split": split, "class_id": ids[c], "path": path,
                           "rank": rank})
    return zoo


def make_full_zoo(root, n_classes: int = 8, n_models: int = 60, labels_per_model: int = 3,
                  layers: dict[str, tuple[int, int]] | None = None, seed: int = 0, root_seed: int | None = None,
                  root_scale: float = 1.0, signal: float = 0.5, noise: float = 0.1,
                  informative: list[str] | None = None, with_bias: bool = True) -> SyntheticZoo:
    """Write full checkpoints of one tree: weights = root (drawn from root_seed) + Σ over the model's chosen classes
    of a planted rank-1 delta + noise. Splits 70/10/20 over models. Multi-label targets, Model-J style."""
    root = Path(root)
    layers = dict(layers or DEFAULT_LAYERS)
    informative = list(layers) if informative is None else list(informative)
    gen = torch.Generator().manual_seed(seed)
    names = [f"label_{i}" for i in range(n_classes)]
    base, deltas = {}, {}
    for name, (d_out, d_in) in layers.items():
        rg = _layer_generator(seed if root_seed is None else root_seed, name + "/root")
        base[name] = root_scale * torch.randn(d_out, d_in, generator=rg) / d_in ** 0.5
        g = _layer_generator(seed, name)
        deltas[name] = signal * (name in informative) * torch.stack(
            [torch.outer(_unit(torch.randn(d_out, generator=g)), _unit(torch.randn(d_in, generator=g)))
             for _ in range(n_classes)])
    zoo = SyntheticZoo(root, names, names, torch.eye(n_classes), names, [], layers, informative)
    counts = split_counts(n_models)
    splits = [s for s, k in counts.items() for _ in range(k)]
    for idx, split in enumerate(splits):
        chosen = sorted(torch.randperm(n_classes, generator=gen)[:labels_per_model].tolist())
        tensors = {}
        for name, (d_out, d_in) in layers.items():
            w = base[name] + deltas[name][chosen].sum(0) + noise * torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
            tensors[f"{name}.weight"] = w.contiguous()
            if with_bias:
                tensors[f"{name}.bias"] = noise * torch.randn(d_out, generator=gen)
        folder = root / split / f"model_idx_{idx:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.safetensors"
        targets = [names[c] for c in chosen]
        save_file(tensors, str(path), metadata={"dataset_chosen_targets": str(targets), "seed": str(idx)})
        zoo.models.append({"id": f"{split}/model_idx_{idx:04d}", "split": split, "labels": targets, "path": path})
    return zoo


def write_tree_json(root, **fields) -> None:
    (Path(root) / "tree.json").write_text(json.dumps(fields, indent=2))
