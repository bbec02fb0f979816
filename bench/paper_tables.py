"""Our analogues of the paper's tables, printed.

    python -m probex.jungle.discriminative build --zoo zoo/discriminative     # once each (resumable)
    python -m probex zoo build --preset emoji-mini
    python bench/paper_tables.py [--part all|generative|discriminative] [--json runs/tables.json]

Generative (paper Tables 2–3) on the emoji jungle (zoo/emoji-mini, the population the shipped bundle was built from),
on the tree with held-out classes (emoji-root-1: 150 training classes, 30 held-out): in-distribution top-1 on test
(chance 1/150) and zero-shot top-1 on test_holdout (chance 1/30), each method's layer chosen on val:
  ProbeX         ReLU; a classifier head for in-distribution and an align head (MiniLM text of "an emoji of {name}")
                 for zero-shot, each swept over the cross-attention value layers (--layers), chosen on val
  linear ProbeX  the same without the ReLU
  dense          Eq. 1's dense expert with the same heads, on the layer ProbeX chose for each head
  StatNN         gradient-boosted trees on 7 statistics of every layer (in-distribution) / an MLP align head on them
  shipped        the bundle's expert as the app reads it (checkpoints/emoji-mini: root-anchored, cross-attention
                 layers): known classes by the nearest class mean of train models' encodings, held-out ones by text
plus kNN (k=5, train models as reference) and one-class ROC-AUC on the held-out classes (val_holdout models as each
class's reference, test_holdout scored) for the align experts, and the bundle's router on every LoRA of every tree.

Discriminative (paper Table 1 and Fig. 3a) on the jungle's discriminative populations: four Model Trees (small
classifiers fine-tuned from one root each, every model on a random 10 of a 20-class pool) and a forest (the same
task, every model from its own random init). For each population: the layer cache (probex.zoo), then per-label
accuracy on the test split (chance 0.5: each label is on for half the models) of
  ProbeX         ReLU, layer sweep with the layer chosen on val (probex.train.sweep_layers)
  linear ProbeX  the same sweep without the ReLU (Fig. 3a's linear metanetwork)
  dense          the dense expert of Eq. 1 (probex.experts.DenseExpert), layer chosen on val among the layers whose
                 training state fits --dense-ram-gb (default 0.25 GB, which leaves out only mlp-a's fc1: 25 M
                 parameters that alone would take minutes; --dense-ram-gb 4 includes it); same r_T, optimiser and
                 epochs and inputs as ProbeX
  StatNN         7 statistics of every layer's weights (probex.experts.weight_statistics) → gradient-boosted trees,
                 one per label (StatNNClassifier multilabel), as Unterthiner et al. use all layers
with parameter counts (StatNN: its number of trees), then intra-tree (mean over the trees) against the forest.

Inputs. ProbeX and the dense expert read every layer centred on its train models' mean and scaled to unit RMS norm,
ProbeX's probes starting at those models' principal directions (probex.train's default, ours). ``--paper-settings``
runs every table as the paper does: raw weights, random probes, the paper's ranks r_U = r_V = r_T = 128 and its
recipe (Adam, lr 1e-3, weight decay 1e-5, batch 128, up to 500 epochs, the best val epoch kept; stopped after 100
epochs without a better val score).

Expert sizes are the paper's recipe scaled to these layers: the paper's r_U = r_V = 128 read 768-wide layers, ours
are 16–256 wide, so r_U = r_V = 16 here; r_T = 128 as the paper; Adam with the public release's lr 2e-3 and 200
epochs (the paper: lr 1e-3, up to 500 — measured on cnn-a conv3 and mixer-a, 1e-3 × 300 epochs gives the same ProbeX
test accuracy to ±0.002 and the dense expert +0.00–0.02, in 1.5× the time), weight decay 1e-5, batch 128, best val
epoch kept, stop after 40 epochs without a better val score. ``--epochs``/``--lr``/``--patience`` change them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probex.errors import ProbexError  # noqa: E402
from probex.evaluate import per_label_accuracy  # noqa: E402
from probex.experts import StatNNClassifier, weight_statistics  # noqa: E402
from probex.data import LayerData, task_targets  # noqa: E402
from probex.config import PAPER_OPTIMISER  # noqa: E402
from probex.train import TrainConfig, new_dense, sweep_layers, train_expert  # noqa: E402
from probex.zoo import LayerCache, build_cache  # noqa: E402

DISCRIMINATIVE = TrainConfig.of(epochs=200, lr=2e-3, r_u=16, r_v=16, r_t=128, patience=40)
GENERATIVE = TrainConfig.of(epochs=100, patience=20)   # the pilot's gate 3 (bench/jungle_signal.py) setting, early stop
GENERATIVE_LAYERS = r"attn2\.to_v$"  # the 7 cross-attention value layers: where the caption enters the root
DENSE_RAM_GB = 0.25  # four float32 copies of the dense tensor (weights, gradient, Adam moments); see module doc


# ---- discriminative: Table 1 and Fig. 3a ----------------------------------------------------------------------------
def discriminative_populations(zoo_root: Path) -> list[Path]:
    """The population zoos under `zoo_root` (folders with a tree.json), trees first, forests last."""
    found = sorted(p.parent for p in Path(zoo_root).glob("*/tree.json"))
    return sorted(found, key=lambda p: json.loads((p / "tree.json").read_text()).get("root_model") is None)


def probex_row(cache: LayerCache, config: TrainConfig, out_dir: Path) -> dict:
    """The layer sweep (all layers, chosen on val) and the chosen layer's scores."""
    sweep = sweep_layers(cache, "all", "multilabel", config=config, out_dir=out_dir, progress=False)
    row = sweep.best_row
    return {"layer": sweep.best_layer, "val": row["val"], "test": row["test"], "params": row["n_params"],
            "per_layer": {r["layer"]: r["test"] for r in sweep.rows},
            "seconds": round(sum(r["seconds"] for r in sweep.rows), 1)}


def dense_row(cache: LayerCache, config: TrainConfig, ram_budget_gb: float) -> dict:
    """The dense expert on every layer that fits `ram_budget_gb`, the best on val; layers that did not fit listed."""
    targets = task_targets(cache, "multilabel")
    best, skipped, seconds, per_layer = None, [], 0.0, {}
    for name in cache.all_layers:
        data = LayerData.from_cache(cache, name)
        try:
            expert = new_dense(data, targets, config, ram_budget_gb)
        except ProbexError:
            skipped.append(name)
            continue
        fit = train_expert(expert, data, targets, config)
        seconds += fit.seconds
        per_layer[name] = fit.metrics["test"]
        if best is None or fit.metrics["val"] > best["val"]:
            best = {"layer": name, "val": fit.metrics["val"], "test": fit.metrics["test"],
                    "params": sum(p.numel() for p in expert.parameters())}
    return {**(best or {}), "per_layer": per_layer, "skipped": skipped, "seconds": round(seconds, 1)}


def statnn_row(cache: LayerCache, seed: int) -> dict:
    """StatNN on the statistics of all layers together; per-label accuracy at probability ½."""
    targets = task_targets(cache, "multilabel")
    start = time.perf_counter()
    features = torch.cat([weight_statistics(cache.inputs(name)) for name in cache.all_layers], 1).numpy()
    train = targets.split["train"].numpy()
    model = StatNNClassifier("multilabel", seed=seed).fit(features[train], targets.y[train].numpy())
    scores = {}
    for split in ("val", "test"):
        idx = targets.split[split].numpy()
        scores[split] = per_label_accuracy(logit(model.predict_scores(features[idx])), targets.y[idx])
    trees = sum(est.n_iter_ for est in model.model.estimators_)
    return {"layer": f"all {len(cache.all_layers)}", **scores, "params": trees, "params_unit": "trees",
            "seconds": round(time.perf_counter() - start, 1)}


def discriminative_population(zoo_dir: Path, cache_dir: Path, config: TrainConfig = DISCRIMINATIVE,
                              dense_ram_gb: float = DENSE_RAM_GB) -> dict:
    """Every method on one population: {method: row}, plus what the population is."""
    cache = build_cache(zoo_dir, cache_dir)
    tree = cache.index["tree"]
    counts = {s: len(cache.split_indices(s)) for s in ("train", "val", "test")}
    return {"population": zoo_dir.name, "architecture": tree.get("architecture"),
            "kind": "tree" if tree.get("root_model") else "forest", "models": counts,
            "probex": probex_row(cache, config, cache_dir / "sweeps" / "probex"),
            "linear": probex_row(cache, config.replace(relu=False), cache_dir / "sweeps" / "linear"),
            "dense": dense_row(cache, config, dense_ram_gb),
            "statnn": statnn_row(cache, config.optimiser.seed)}


def discriminative_tables(zoo_root: str | Path = ROOT / "zoo" / "discriminative",
                          cache_root: str | Path = ROOT / "cache" / "discriminative",
                          config: TrainConfig = DISCRIMINATIVE, dense_ram_gb: float = DENSE_RAM_GB,
                          only: list[str] | None = None) -> dict:
    """Table 1 (per population and method: test per-label accuracy, parameters) and Fig. 3a (intra-tree vs forest)."""
    populations = discriminative_populations(Path(zoo_root))
    if only:
        populations = [p for p in populations if p.name in only]
    if not populations:
        raise SystemExit(f"no discriminative populations under {zoo_root}: run "
                         "`python -m probex.jungle.discriminative build --zoo {zoo_root}` first")
    rows = []
    for zoo_dir in populations:
        print(f"… {zoo_dir.name}", flush=True)
        rows.append(discriminative_population(zoo_dir, Path(cache_root) / zoo_dir.name, config, dense_ram_gb))
    return {"config": config.as_dict(), "dense_ram_gb": dense_ram_gb, "rows": rows, "summary": summarise(rows)}


METHODS = (("probex", "ProbeX"), ("linear", "linear ProbeX"), ("dense", "dense"), ("statnn", "StatNN"))


def summarise(rows: list[dict]) -> dict:
    """Mean test accuracy per method over the trees and over the forests; ProbeX's parameter advantage over dense."""
    summary = {}
    for kind in ("tree", "forest"):
        group = [r for r in rows if r["kind"] == kind]
        if group:
            summary[kind] = {m: float(np.mean([r[m]["test"] for r in group if "test" in r[m]] or [np.nan]))
                             for m, _ in METHODS}
    trees = [r for r in rows if r["kind"] == "tree" and "params" in r["dense"]]
    if trees:
        summary["dense_over_probex_params"] = [round(r["dense"]["params"] / r["probex"]["params"], 1) for r in trees]
        summary["probex_minus_dense"] = float(np.mean([r["probex"]["test"] - r["dense"]["test"] for r in trees]))
        summary["linear_minus_dense"] = float(np.mean([r["linear"]["test"] - r["dense"]["test"] for r in trees]))
    return summary


def print_discriminative(result: dict) -> None:
    inputs = "tree-centred inputs, principal-direction probes" if result["config"]["model"]["centre"] else \
        "the paper's settings: raw weights, random probes, r_U = r_V = 128, lr 1e-3, up to 500 epochs"
    print("\n== Discriminative (paper Table 1): per-label accuracy on test (chance 0.50), layer chosen on val; "
          f"{inputs} ==")
    header = f"{'population':<10} {'arch':<6} {'models':<11}" + "".join(f" | {label:<21}" for _, label in METHODS)
    print(header + "\n" + "-" * len(header))
    for r in result["rows"]:
        m = r["models"]
        cells = [f"{r['population']:<10} {r['architecture']:<6} {m['train']}/{m['val']}/{m['test']:<4}"]
        for key, _ in METHODS:
            row = r[key]
            if "test" not in row:
                cells.append(f"{'does not fit':<21}")
                continue
            params = f"{row['params']:,}" + (" trees" if row.get("params_unit") == "trees" else " par.")
            cells.append(f"{row['test']:.3f} {params:>15}")
        print(" | ".join(cells))
    print("layer chosen on val: " + "; ".join(
        f"{r['population']}: " + ", ".join(f"{label} {r[key].get('layer', '—')}" for key, label in METHODS[:3])
        for r in result["rows"]))
    with_layers = [r for r in result["rows"] if r["probex"].get("per_layer")]
    if with_layers:
        print("test accuracy of every layer (ProbeX / linear ProbeX / dense; — where dense is over the RAM budget):")
    for r in with_layers:
        shown = lambda key, layer: f"{r[key]['per_layer'][layer]:.3f}" if layer in r[key].get("per_layer", {}) \
            else "—"  # noqa: E731
        print(f"  {r['population']}: " + ", ".join(
            f"{layer} {'/'.join(shown(key, layer) for key in ('probex', 'linear', 'dense'))}"
            for layer in r["probex"].get("per_layer", {})))
    s = result["summary"]
    print("\n== Intra-tree vs forest (paper Fig. 3a: linear metanetwork 0.844 vs 0.502) ==")
    for kind in ("tree", "forest"):
        if kind in s:
            label = "intra-tree (mean)" if kind == "tree" else "forest"
            print(f"{label:<18}" + "  ".join(f"{name} {s[kind][key]:.3f}" for key, name in METHODS))
    if "probex_minus_dense" in s:
        print(f"ProbeX − dense on the trees: {s['probex_minus_dense']:+.3f} (paper: > +0.10), linear ProbeX − dense "
              f"{s.get('linear_minus_dense', float('nan')):+.3f}; dense has "
              f"{', '.join(f'{x:g}×' for x in s['dense_over_probex_params'])} ProbeX's parameters (paper ≈ 30×)")
    skipped = {r["population"]: r["dense"]["skipped"] for r in result["rows"] if r["dense"]["skipped"]}
    if skipped:
        print(f"dense expert over the {result['dense_ram_gb']:g} GB budget on: {skipped}")


# ---- generative: Tables 2 and 3 --------------------------------------------------------------------------------------
def generative_tables(zoo_root: str | Path = ROOT / "zoo" / "emoji-mini",
                      bundle_dir: str | Path = ROOT / "checkpoints" / "emoji-mini",
                      cache_root: str | Path = ROOT / "cache", config: TrainConfig = GENERATIVE,
                      layers: str = GENERATIVE_LAYERS, dense_ram_gb: float = DENSE_RAM_GB,
                      trained: bool = True, shipped: bool = True) -> dict:
    """``trained``: the rows of the methods trained here; ``shipped``: the bundle's expert and router (its own part,
    so the trained rows can be computed while the bundle is still being built)."""
    import re

    from probex.evaluate import evaluate_expert
    from probex.text import load_text_encoder
    from probex.train import class_text_embeddings
    from probex.zoo import Zoo

    trees = sorted(p for p in Path(zoo_root).iterdir() if (p / "tree.json").is_file())
    if not trees:
        raise SystemExit(f"no built jungle under {zoo_root}: run `python -m probex zoo build --preset emoji-mini`")
    # the tree with the most classes (held-out ones included) is the one the tables are about
    main_tree = max(trees, key=lambda t: len(json.loads((t / "tree.json").read_text()).get("classes", [])))
    cache = build_cache(Zoo.scan(main_tree), Path(cache_root) / main_tree.name, layers="all")
    n_seen = sum(not c["holdout"] for c in cache.classes)
    result = {"tree": cache.index["tree"].get("name", main_tree.name),
              "classes": {"training": n_seen, "held_out": len(cache.classes) - n_seen},
              "models": {s: len(cache.split_indices(s)) for s in ("train", "val", "test", "val_holdout", "test_holdout")},
              "config": config.as_dict(), "rows": {}}
    rows = result["rows"]
    if trained:
        sentence = class_text_embeddings(cache, load_text_encoder("minilm"))
        swept = [n for n in cache.all_layers if re.search(layers, n)]
        for relu in (True, False):
            cfg = config.replace(relu=relu)
            cls = sweep_layers(cache, swept, "multiclass", config=cfg, progress=False)
            align = sweep_layers(cache, swept, "align", sentence, config=cfg, progress=False)
            extra = evaluate_expert(align.best.expert, cache, align.best_layer, "align", sentence)
            rows["probex" if relu else "linear"] = {
                "in_dist": cls.best_row["test"], "zero_shot": align.best_row["test_holdout"],
                "layers": [cls.best_layer, align.best_layer],
                "params": [cls.best_row["n_params"], align.best_row["n_params"]],
                "knn5": extra["knn5_test"], "occ_auc": extra["occ_auc5_holdout"],
                "seconds": round(sum(r["seconds"] for r in cls.rows + align.rows), 1)}
            print(f"  {'ProbeX' if relu else 'linear ProbeX'}: {rows['probex' if relu else 'linear']}", flush=True)
        rows["dense"] = generative_dense(cache, sentence, rows["probex"]["layers"], config, dense_ram_gb)
        rows["statnn"] = generative_statnn(cache, sentence, config)
    if shipped:
        result.update(shipped_rows(zoo_root, main_tree.name, bundle_dir, cache_root))
        rows["shipped"] = result.pop("shipped_row")
    return result


def shipped_rows(zoo_root, main_name: str, bundle_dir, cache_root) -> dict:
    """The bundle's expert on every tree as `probex eval` reads it (known classes by class means), and its router."""
    from probex.evaluate import evaluate_jungle

    per_tree = evaluate_jungle(bundle_dir, zoo_root, cache_root)
    main = per_tree[main_name]
    return {"shipped_row": {"in_dist": main["class_mean_top1_test"], "in_dist_text": main["top1_test"],
                            "zero_shot": main["zero_shot_test_holdout"], "knn5": main["knn5_test"],
                            "occ_auc": main["occ_auc5_holdout"], "layers": main["layer"],
                            **{k: main[k] for k in main if k.startswith(("concept_top1_", "search_p@"))}},
            "router": {name: {"accuracy": r["router_accuracy"],
                              "models": sum(v for k, v in r.items() if k.startswith("n_"))}
                       for name, r in per_tree.items()},
            "shipped_per_tree": per_tree}


def generative_dense(cache: LayerCache, sentence, layers: list[str], config: TrainConfig, ram_gb: float) -> dict:
    """The dense expert (Eq. 1) with a classifier head and with an align head, each on the layer ProbeX chose."""
    row = {"layers": layers, "params": []}
    for (task, key), layer in zip((("multiclass", "in_dist"), ("align", "zero_shot")), layers):
        targets = task_targets(cache, task, sentence if task == "align" else None)
        data = LayerData.from_cache(cache, layer)
        try:
            expert = new_dense(data, targets, config, ram_gb)
        except ProbexError:
            row[key] = None
            continue
        fit = train_expert(expert, data, targets, config)
        row[key] = fit.metrics["test_holdout" if task == "align" else "test"]
        row["params"].append(sum(p.numel() for p in expert.parameters()))
    print(f"  dense: {row}", flush=True)
    return row


def generative_statnn(cache: LayerCache, sentence, config: TrainConfig) -> dict:
    """StatNN: gradient-boosted trees on every layer's 7 weight statistics (in-distribution); zero-shot needs a text
    side, so an MLP align head on the same statistics (probex.experts.StatMLP)."""
    from probex.experts import StatMLP

    stats = torch.cat([weight_statistics(cache.inputs(n)) for n in cache.all_layers], 1)
    targets = task_targets(cache, "multiclass")
    train, test = targets.split["train"], targets.split["test"]
    gbt = StatNNClassifier("multiclass", seed=config.optimiser.seed).fit(stats[train].numpy(), targets.y[train].numpy())
    in_dist = float((torch.from_numpy(gbt.predict(stats[test].numpy())) == targets.y[test]).float().mean())
    align = task_targets(cache, "align", sentence)
    torch.manual_seed(config.optimiser.seed)
    mlp = StatMLP(stats.shape[1], head="align", text_dim=sentence.shape[1]).fit_normaliser(stats[train])
    fit = train_expert(mlp, LayerData(stats), align, config)
    row = {"in_dist": in_dist, "zero_shot": fit.metrics["test_holdout"], "layers": f"all {len(cache.all_layers)}"}
    print(f"  StatNN: {row}", flush=True)
    return row


GENERATIVE_METHODS = (("probex", "ProbeX (ReLU)"), ("linear", "linear ProbeX"), ("dense", "dense expert"),
                      ("statnn", "StatNN"), ("shipped", "shipped expert (app)"))


def print_generative(result: dict) -> None:
    c, m = result["classes"], result["models"]
    print(f"\n== Generative (paper Tables 2–3) on {result['tree']}: {c['training']} training classes "
          f"(chance {1 / c['training']:.3f}), {c['held_out']} held-out (chance {1 / c['held_out']:.3f}); models "
          + "/".join(str(m[s]) for s in m) + " (train/val/test/val_holdout/test_holdout) ==")
    print("trained experts read " + ("tree-centred inputs, ProbeX from principal-direction probes"
                                     if result["config"]["model"]["centre"] else "the paper's settings: raw weights, "
                                     "random probes, r_U = r_V = 128, lr 1e-3, up to 500 epochs"))
    shown = lambda v: "     —" if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"{'method':<22} {'in-dist':>7} {'zero-shot':>9} {'kNN-5':>6} {'1-class AUC':>11}  layers / parameters")
    for key, label in GENERATIVE_METHODS:
        if key not in result["rows"]:
            continue
        r = result["rows"][key]
        layers = r["layers"] if isinstance(r["layers"], str) else (
            f"{len(r['layers'])} layers" if key == "shipped" else " / ".join(r["layers"]))
        params = f"  ({' / '.join(f'{p:,}' for p in r['params'])} par.)" if r.get("params") else ""
        print(f"{label:<22} {shown(r.get('in_dist')):>7} {shown(r.get('zero_shot')):>9} {shown(r.get('knn5')):>6} "
              f"{shown(r.get('occ_auc')):>11}  {layers}{params}")
    if "shipped" in result["rows"]:
        s = result["rows"]["shipped"]
        print(f"shipped expert, known classes by text instead of class means: {s['in_dist_text']:.3f}")
        for kind, label in (("", "z-normed"), ("raw_", "raw cosine"),
                            ("open_", f"open-set (the app: unseen classes +{s.get('unseen_offset', 0):.2f})")):
            if f"concept_top1_{kind}test" in s:
                print(f"concept list over all classes together, {label}: top-1 " + ", ".join(
                    f"{split} {s[f'concept_top1_{kind}{split}']:.3f}"
                    for split in ("val", "test", "val_holdout", "test_holdout") if f"concept_top1_{kind}{split}" in s))
        if "unseen_auc_test" in s:
            print(f"'none of the known classes' (best unseen minus best known score), test vs test_holdout AUC: "
                  f"{s['unseen_auc_test']:.3f}")
        for kind, label in (("", "z-normed (the app)"), ("_raw", "raw cosine")):
            if f"search_p@5_known{kind}" in s:
                print(f"text search, each class's caption as the query, share of the top 5 of its class, {label}: "
                      + ", ".join(f"{g} classes {s[f'search_p@5_{g}{kind}']:.3f}" for g in ("known", "unseen")
                                  if f"search_p@5_{g}{kind}" in s))
    for name, r in result.get("shipped_per_tree", {}).items():
        if name != result["tree"]:
            print(f"shipped expert on {name}: " + ", ".join(f"{k} {r[k]:.3f}" for k in (
                "class_mean_top1_test", "class_mean_top1_val", "knn5_test") if r.get(k) is not None))
    for name, r in result.get("router", {}).items():
        print(f"router: {name}'s {r['models']} LoRAs routed to their tree: {r['accuracy']:.3f}")
    best_in = max(r["in_dist"] for r in result["rows"].values() if r.get("in_dist") is not None)
    best_zero = max(r["zero_shot"] for r in result["rows"].values() if r.get("zero_shot") is not None)
    router = min((r["accuracy"] for r in result.get("router", {}).values()), default=None)
    print(f"targets: in-distribution ≥ 0.95 → best {best_in:.3f}; zero-shot ≥ 0.70 → best {best_zero:.3f}; "
          f"router 100 % → {'not measured' if router is None else f'{router:.1%}'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "generative", "discriminative", "generative-trained", "shipped"),
                        default="all", help="generative = generative-trained + shipped (the bundle's rows, which "
                        "with --json are merged into the file's earlier generative results)")
    parser.add_argument("--zoo", default=str(ROOT / "zoo" / "discriminative"))
    parser.add_argument("--cache", default=str(ROOT / "cache" / "discriminative"))
    parser.add_argument("--jungle", default=str(ROOT / "zoo" / "emoji-mini"), help="the generative population")
    parser.add_argument("--bundle", default=str(ROOT / "checkpoints" / "emoji-mini"), help="the shipped bundle")
    parser.add_argument("--gen-epochs", type=int, default=GENERATIVE.optimiser.epochs, help="generative experts' epochs")
    parser.add_argument("--layers", default=GENERATIVE_LAYERS, help="generative sweep: layers matching this regex")
    parser.add_argument("--only", nargs="*", help="only these populations")
    parser.add_argument("--epochs", type=int, default=DISCRIMINATIVE.optimiser.epochs)
    parser.add_argument("--lr", type=float, default=DISCRIMINATIVE.optimiser.lr)
    parser.add_argument("--patience", type=int, default=DISCRIMINATIVE.optimiser.patience)
    parser.add_argument("--dense-ram-gb", type=float, default=DENSE_RAM_GB)
    parser.add_argument("--paper-settings", action="store_true", help="the paper's inputs, ranks and recipe: raw "
                        "weights, random probes, r_U = r_V = 128, lr 1e-3, up to 500 epochs (default: tree-centred "
                        "inputs, principal-direction probes, the sizes and recipe above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paper = dict(centre=False, init="random", r_u=128, r_v=128, r_t=128, epochs=PAPER_OPTIMISER.epochs,
                 lr=PAPER_OPTIMISER.lr, weight_decay=PAPER_OPTIMISER.weight_decay, patience=100)
    inputs = paper if args.paper_settings else {}
    start = time.perf_counter()
    result = json.loads(Path(args.json).read_text()) if args.part == "shipped" and args.json and \
        Path(args.json).exists() else {}
    if args.part in ("all", "generative", "generative-trained", "shipped"):
        print("… generative", flush=True)
        fresh = generative_tables(args.jungle, args.bundle, Path(args.cache).parent,  # where ship caches
                                  GENERATIVE.replace(**{"epochs": args.gen_epochs, **inputs}), args.layers,
                                  args.dense_ram_gb,
                                  trained=args.part != "shipped", shipped=args.part != "generative-trained")
        if "generative" in result:  # --part shipped: add the bundle's rows to the trained ones
            result["generative"]["rows"].update(fresh.pop("rows"))
            result["generative"].update({k: v for k, v in fresh.items() if k not in ("config",)})
        else:
            result["generative"] = fresh
        print_generative(result["generative"])
    if args.part in ("all", "discriminative"):
        config = DISCRIMINATIVE.replace(**{"epochs": args.epochs, "lr": args.lr, "patience": args.patience, **inputs})
        result["discriminative"] = discriminative_tables(args.zoo, args.cache, config, args.dense_ram_gb, args.only)
        print_discriminative(result["discriminative"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\npaper tables ({args.part}): {result['seconds']} s on {args.threads} thread(s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
