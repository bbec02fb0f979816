"""Does trained ProbeX read unseen classes once its tree has enough models? Learning curves on the v2 pilot tree.

    python -m probex.jungle build v2-pilot --roots-dir DIR           # the population, resumable
    python bench/learning_curves.py zoo/v2-pilot/TREE [--epochs 200] [--quick] [--out runs/learning_curves]

Every expert is trained on part of the tree's train split — the first n train LoRAs of each class (n = 5, 10, 25 over
all training classes), then 25 LoRAs of a quarter and of half the classes — with the same val, test and held-out
models throughout (Adam, the release's lr 2e-3, --epochs, stopped after a quarter of them without a better val score),
and reports, epoch chosen on val:
  in-distribution top-1 on test (cosine to the text of the classes it trained on: the paper's align reading) and
  zero-shot top-1 on test_holdout (cosine to the held-out classes' text, names never seen in training).
Experts:
  ProbeX, one layer     ReLU, the paper's r_U = r_V = r_T = 128, on the layer a sweep chose (every LoRA'd layer,
                        or --sweep attn2 the cross-attention ones; trained --sweep-epochs on all classes at the
                        largest n, chosen by the mean of val and val_holdout top-1)
  linear ProbeX         the same layer without the ReLU
  ProbeX, attn2 stacked a ProbeX (r_U = r_V = 16) per cross-attention projection, encodings summed
                        (probex.experts.StackedProbeX)
  root-anchored         AnchoredProbeX on the attn2 keys and values, ReLU, its text side read through the root's own
                        weights from the captions' token states (probex.experts.anchored)
  reader                the training-free AttentionReader on the attn2 blocks (what the app ships); not trained, so
                        its zero-shot figure is one number, and its in-distribution reading is by text too
Text: MiniLM's pooled embedding of "an emoji of {name}" for the ProbeX rows; the captions' token states through the
root for the root-anchored expert and the reader.
Ends with each row's trend against log2(n) and what it gives at 25 (in range) and 100 LoRAs a class (beyond it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from probex.config import RELEASE_OPTIMISER, TrainConfig  # noqa: E402
from probex.data import LayerData, LayerStack, Targets, task_targets  # noqa: E402
from probex.experts import AnchoredProbeX, AttentionReader  # noqa: E402
from probex.jungle.lora import INSTANCE_PROMPT  # noqa: E402
from probex.jungle.root import caption, load_root  # noqa: E402
from probex.jungle.ship import READER  # noqa: E402
from probex.text import load_text_encoder  # noqa: E402
from probex.train import class_text_embeddings, new_probex, new_stacked, train_expert  # noqa: E402
from probex.zoo import Zoo, build_cache  # noqa: E402

ROWS = ("ProbeX, one layer", "linear ProbeX", "ProbeX, attn2 stacked", "root-anchored", "reader")


def restricted(targets: Targets, per_class: int, n_classes: int) -> Targets:
    """The first ``per_class`` train models of each of the first ``n_classes`` training classes; val and test keep
    those classes' models, held-out splits stay whole. Class indices are renumbered, text rows cut to match."""
    keep_class = torch.arange(len(targets.classes)) < n_classes
    split, seen = {}, {}
    for name, idx in targets.split.items():
        if name in ("val_holdout", "test_holdout"):
            split[name] = idx
            continue
        idx = idx[keep_class[targets.y[idx]]]
        if name == "train":
            kept = []
            for i in idx.tolist():
                c = int(targets.y[i])
                seen[c] = seen.get(c, 0) + 1
                if seen[c] <= per_class:
                    kept.append(i)
            idx = torch.tensor(kept, dtype=torch.long)
        split[name] = idx
    return Targets(targets.task, targets.y, split, targets.classes[:n_classes], targets.holdout_classes,
                   None if targets.text is None else targets.text[:n_classes], targets.holdout_text)


def fit(make, data, targets: Targets, config: TrainConfig) -> dict:
    started = time.perf_counter()
    result = train_expert(make(data, targets, config), data, targets, config)
    return {**{k: round(v, 4) for k, v in result.metrics.items()}, "best_epoch": result.best_epoch,
            "seconds": round(time.perf_counter() - started, 1),
            "n_params": sum(p.numel() for p in result.expert.parameters())}


@torch.no_grad()
def read_free(reader, data: LayerStack, targets: Targets) -> dict:
    enc = torch.cat([data.encode(reader, b) for b in torch.arange(len(data)).split(256)])
    out = {}
    for split in ("val", "test", "val_holdout", "test_holdout"):
        idx = targets.split[split]
        out[split] = round(float((reader.logits(enc[idx], targets.text_for(split)).argmax(1) == targets.y[idx])
                                 .float().mean()), 4)
    return out


def trend(ns: list[int], values: list[float]) -> tuple[float, float, float]:
    """Least-squares line of top-1 against log2(n): slope per doubling, value at 25 and at 100 (kept in [0, 1])."""
    slope, intercept = np.polyfit(np.log2(ns), values, 1)
    at = lambda n: float(np.clip(intercept + slope * np.log2(n), 0.0, 1.0))  # noqa: E731
    return float(slope), at(25), at(100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", help="a built pilot tree: <zoo>/v2-pilot/<root name>")
    parser.add_argument("--epochs", type=int, default=RELEASE_OPTIMISER.epochs)
    parser.add_argument("--per-class", type=int, nargs="+", default=[5, 10, 25])
    parser.add_argument("--sweep-epochs", type=int, default=50, help="epochs of each layer's expert in the sweep")
    parser.add_argument("--quick", action="store_true", help="40 epochs, the sweep on attn2 layers only")
    parser.add_argument("--sweep", choices=("all", "attn2"), default="all",
                        help="layers the one-layer sweep tries: every LoRA'd layer, or the cross-attention ones")
    parser.add_argument("--temperature", type=float, default=None,
                        help="the ProbeX rows' contrastive temperature (default: none, plain cosine, as the release)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(REPO / "cache" / "learning_curves"))
    parser.add_argument("--out", default=str(REPO / "runs" / "learning_curves"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs = 40 if args.quick else args.epochs
    config = TrainConfig(optimiser=RELEASE_OPTIMISER).replace(epochs=epochs, patience=max(10, epochs // 4),
                                                              temperature=args.temperature)
    zoo = Zoo.scan(args.tree)
    cache = build_cache(zoo, Path(args.cache) / zoo.name, layers="all")
    layers = cache.all_layers
    attn2 = [n for n in layers if ".attn2." in n]
    kv = [n for n in attn2 if n.endswith(("to_k", "to_v"))]
    encoder = load_text_encoder("minilm")
    pooled = task_targets(cache, "align", class_text_embeddings(cache, encoder))
    unet, _, recipe = load_root(Path(zoo.tree["root_model"]) if Path(zoo.tree["root_model"]).is_absolute()
                                else REPO / zoo.tree["root_model"])
    class_states = encoder.token_states([caption(recipe, c["name"]) for c in cache.classes], recipe.token_length)
    instance = encoder.token_states([INSTANCE_PROMPT], recipe.token_length)[0]
    tokens = task_targets(cache, "align", class_states)
    n_classes = len(pooled.classes)
    # asking for more train LoRAs than every class has (a smaller preset, a build still under way) takes them all,
    # and the curve is labelled with what was trained on
    have = int(torch.bincount(pooled.y[pooled.split["train"]], minlength=n_classes).min())
    counts = sorted({min(n, have) for n in args.per_class})   # LoRAs a class on the curve
    if have < max(args.per_class):
        print(f"every training class has ≥ {have} train LoRAs: n = {max(args.per_class)} reads as {have} (all)")
    n_max = counts[-1]
    print(f"{zoo.name}: {len(cache.models)} LoRAs, {n_classes} training classes, {len(pooled.holdout_classes)} held-out; "
          f"{len(layers)} LoRA'd layers; {epochs} epochs (best on val), lr {config.optimiser.lr}, ProbeX temperature "
          f"{args.temperature or 'none'}")

    # the one layer: swept at the largest n on all classes, chosen on validation only
    sweep_layers = attn2 if args.quick or args.sweep == "attn2" else layers
    full = restricted(pooled, n_max, n_classes)
    sweep = []
    sweep_config = config.replace(epochs=args.sweep_epochs, patience=max(10, args.sweep_epochs // 4))
    for name in sweep_layers:
        row = fit(new_probex, LayerData.from_cache(cache, name), full, sweep_config)
        row["layer"], row["choice"] = name, (row["val"] + row["val_holdout"]) / 2
        sweep.append(row)
        print(f"   sweep {name:<58} val {row['val']:.3f}  val_holdout {row['val_holdout']:.3f}", flush=True)
    best = max(sweep, key=lambda r: r["choice"])["layer"]
    print(f"one layer: {best} (mean of val and val_holdout top-1)")

    one = LayerData.from_cache(cache, best)
    stacked = LayerStack.from_cache(cache, attn2)
    anchored_data = LayerStack.from_cache(cache, kv)
    reader_data = LayerStack.from_cache(cache, attn2)
    root_weights = {n: unet.get_submodule(n).weight.detach() for n in kv}
    linear = config.replace(relu=False)
    small = config.replace(r_u=16, r_v=16)

    def anchored(data, targets, cfg):
        torch.manual_seed(cfg.optimiser.seed)
        return AnchoredProbeX.from_root([root_weights[n] for n in kv], instance, relu=True)

    reader = AttentionReader.from_root(unet, attn2, instance, 16, **READER)
    settings = [(n, n_classes) for n in counts]
    settings += [(n_max, k) for k in (n_classes // 4, n_classes // 2) if k > 1]
    results = []
    for per_class, k in settings:
        p, t = restricted(pooled, per_class, k), restricted(tokens, per_class, k)
        rows = {"ProbeX, one layer": fit(new_probex, one, p, config),
                "linear ProbeX": fit(new_probex, one, p, linear),
                "ProbeX, attn2 stacked": fit(new_stacked, stacked, p, small),
                "root-anchored": fit(anchored, anchored_data, t, config),
                "reader": read_free(reader, reader_data, t)}
        results.append({"per_class": per_class, "classes": k, "train_models": len(p.split["train"]), "rows": rows})
        print(f"\n{per_class} LoRAs a class × {k} classes ({len(p.split['train'])} train LoRAs): "
              "test top-1 among its classes | test_holdout zero-shot top-1 (val | val_holdout)")
        for name in ROWS:
            r = rows[name]
            print(f"   {name:<22} {r['test']:.3f} | {r['test_holdout']:.3f}   ({r['val']:.3f} | {r['val_holdout']:.3f})"
                  + (f"   {r['seconds']:.0f} s, {r['n_params']:,} parameters" if "seconds" in r else ""), flush=True)

    curve = [r for r in results if r["classes"] == n_classes]
    ns = [r["per_class"] for r in curve]
    print(f"\ntrend over n = {ns} LoRAs a class ({n_classes} classes): slope per doubling of n, value at 25 / 100")
    for name in ROWS[:4]:
        for column, label in (("test", "in-distribution"), ("test_holdout", "zero-shot")):
            values = [r["rows"][name][column] for r in curve]
            slope, at25, at100 = trend(ns, values)
            print(f"   {name:<22} {label:<16} {' '.join(f'{v:.3f}' for v in values)}   slope {slope:+.3f}  "
                  f"→ {at25:.3f} at 25, {at100:.3f} at 100")
    classes_axis = sorted((r for r in results if r["per_class"] == n_max), key=lambda r: r["classes"])
    print(f"\nzero-shot against the number of training classes ({n_max} LoRAs each): "
          + ", ".join(str(r["classes"]) for r in classes_axis))
    for name in ROWS[:4]:
        print(f"   {name:<22} " + " ".join(f"{r['rows'][name]['test_holdout']:.3f}" for r in classes_axis))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{zoo.name}.json").write_text(json.dumps({"tree": zoo.name, "layer": best, "epochs": epochs,
                                                      "sweep": sweep, "results": results}, indent=1))
    print(f"\nwritten {out / (zoo.name + '.json')}")


if __name__ == "__main__":
    main()
