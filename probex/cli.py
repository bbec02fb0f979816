"""`python -m probex …`: the service's verbs on the command line, plus training, evaluation and Model-J download.

    predict FILE [--bundle DIR] [--top-k K] [--json]     tree, concepts, nearest models of a LoRA
    zero-shot FILE LABEL… [--bundle DIR] [--json]        scores over labels you choose (true zero-shot)
    search TEXT [--bundle DIR] [--top-k K] [--json]      known models that best match a text
    route FILE [--bundle DIR] [--json]                   which tree a file belongs to
    card FILE [--bundle DIR] [--out README.md]           a Hub model card draft for a LoRA
    samples MODEL [--bundle DIR] [-n N] [--seed S] --out DIR   images drawn by a known model (id) or a LoRA file
    train --zoo DIR --out DIR … [--ray [ADDRESS]]        fit a tree's expert (layer sweep) and build a bundle
    eval --bundle DIR --zoo DIR [--json] [--ray [ADDR]]  the bundle's accuracy on a population
    zoo build --preset P [--ray [ADDRESS]]               train an emoji LoRA population (resumable)
    modelj download …                                    Model-J from the Hub (when probex.modelj is present)

FILE may be a local path, an https URL or a Hub repo id (`user/name[/file.safetensors]`).
A user's mistake exits with status 2 and ONE line `error: …` on stderr; anything unexpected exits 1, also one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from probex.config import RELEASE_OPTIMISER, ProbeXConfig, TrainConfig
from probex.errors import ProbexError

TRAIN_OPTIMISER = RELEASE_OPTIMISER  # `probex train` trains as the public release does


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message over several lines; the CLI's contract is one `error:` line."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------- verbs
def load_studio(args):
    """The studio of ``--bundle``; the text encoder loads only if the verb needs it."""
    from probex.service import Studio

    return Studio.load(args.bundle, warm=False)


def read_file(ref: str):
    """The user's file (a path, link or Hub id), read and checked BEFORE the bundle and text encoder load, so a bad
    file is answered in the time it takes to import torch, not to start the whole studio."""
    from probex.service import read_upload

    with local_file(ref) as path:
        return read_upload(path)


def local_file(ref: str):
    """A path, link or Hub id as a local path for a ``with`` block (probex.fetch.local_file at the service's caps)."""
    from probex.fetch import local_file
    from probex.service import FETCH_TIMEOUT_S, MAX_UPLOAD_BYTES

    return local_file(ref, max_bytes=MAX_UPLOAD_BYTES, timeout=FETCH_TIMEOUT_S)


def run_predict(args) -> int:
    weights = read_file(args.file)
    result = load_studio(args).predict(weights, top_k=args.top_k)
    print(as_json(result) if args.json else format_prediction(result))
    return 0


def run_zero_shot(args) -> int:
    weights = read_file(args.file)
    scores = load_studio(args).zero_shot(weights, args.labels)
    print(as_json(scores) if args.json else format_scores(scores))
    return 0


def run_search(args) -> int:
    result = load_studio(args).search(args.text, top_k=args.top_k)
    if args.json:
        print(as_json(result))
    else:
        read = ", ".join(f"{r['class']} ({r['similarity']:.2f})" for r in result["read_as"])
        print(f"read as   {read}" if read else "read as   no known class: found by the weights alone")
        print(format_models(result["models"]))
    return 0


def run_route(args) -> int:
    weights = read_file(args.file)
    result = load_studio(args).route(weights)
    if args.json:
        print(as_json(result))
    else:
        how = "by its root's listeners" if result["router"]["method"] == "root" else "nearest tree centre"
        print(f"tree {result['tree']}  ({how}; router confidence {result['router']['confidence']:.2f}, "
              f"distance {result['router']['distance']:.4g}, routing layer {result['router']['layer']})")
        if result["notice"]:
            print(f"notice    {result['notice']}")
    return 0


def run_card(args) -> int:
    weights = read_file(args.file)
    card = load_studio(args).model_card(weights)
    if args.out:
        Path(args.out).write_text(card)
        print(f"model card written to {args.out}")
    else:
        print(card)
    return 0


def run_samples(args) -> int:
    studio = load_studio(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if studio.is_known_model(args.model, args.tree):
        images = studio.samples(args.model, n=args.n, seed=args.seed, tree=args.tree)
    else:
        with local_file(args.model) as path:
            images = studio.samples(path, n=args.n, seed=args.seed)
    stem = args.model.replace("/", "_").removesuffix(".safetensors")
    for i, image in enumerate(images):
        image.save(out / f"{Path(stem).name}_{i}.png")
    print(f"{len(images)} images written to {out}")
    return 0


def train_config(args):
    """`probex train`'s options as a TrainConfig."""
    return TrainConfig(ProbeXConfig(r_u=args.r_u, r_v=args.r_v, r_t=args.r_t, relu=not args.linear,
                                    **(dict(centre=False, init="random") if args.paper_inputs else {})),
                       replace(TRAIN_OPTIMISER, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       seed=args.seed, patience=args.patience))


def run_train(args) -> int:
    import torch

    from probex.build import train_bundle

    torch.set_num_threads(args.threads)
    config = train_config(args)
    summary = train_bundle(args.zoo, args.out, layers=args.layers, config=config, profile=args.profile,
                           task=args.task, cache_dir=args.cache, routing_layer=args.routing_layer, ray=args.ray)
    if args.json:
        print(as_json(summary))
    else:
        for tree, row in summary["trees"].items():
            scores = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
            print(f"{tree}: layer {row['layer']} ({scores})")
        print(f"bundle written to {summary['bundle']}")
    return 0


def run_eval(args) -> int:
    """The bundle's experts on a population: every metric of probex.evaluate that fits each tree's task."""
    import torch

    from probex.evaluate import evaluate_tree
    from probex.zoo import Zoo, build_cache

    torch.set_num_threads(args.threads)
    studio = load_studio(args)
    zoo = Zoo.scan(args.zoo)
    name = zoo.name
    tree = studio.bundle.trees.get(name) or (studio.bundle.trees.get(studio.trees[0]) if len(studio.trees) == 1
                                             else None)
    if tree is None:
        raise ProbexError(f"the bundle has no tree named {name!r} (trees: {', '.join(studio.trees)}); "
                          "name the zoo's tree in its tree.json")
    cache = build_cache(zoo, Path(args.cache) / name, layers=tree.layers, ray=args.ray)
    text = tree.class_text_input() if tree.expert.head_kind == "align" else None
    report = {"tree": tree.name, **evaluate_tree(tree, cache, tree.task, text)}
    if args.json:
        print(as_json(report))
    else:
        for key, value in report.items():
            print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0


# ----------------------------------------------------------------------------------------------- output
def as_json(result) -> str:
    """Strict JSON: a NaN or Inf is an error here rather than invalid JSON on stdout."""
    return json.dumps(result, indent=1, default=str, allow_nan=False)


def format_prediction(result: dict) -> str:
    router = result["router"]
    lines = [f"tree      {result['tree']}  (router confidence {router['confidence']:.2f})",
             f"layer     {result['layer']}"]
    if result.get("instance_prompt"):
        lines += [f"expert    {result['expert']}",
                  f"prompt    {result['instance_prompt']}  ({result['prompt_source']})"]
    lines.append("")
    if result.get("notice"):
        return "\n".join([*lines, f"notice    {result['notice']}"])
    lines.append("concepts")
    lines += format_scores(result["classes"]).splitlines()
    lines += ["", "nearest known models"]
    lines += format_models(result["neighbors"]).splitlines() or ["  none: this tree has no known models"]
    return "\n".join(lines)


def format_scores(scores: list[dict]) -> str:
    width = max((len(s["name"]) for s in scores), default=0)
    top = max((s["score"] for s in scores), default=1.0) or 1.0
    return "\n".join(f"  {i:>2}. {s['name']:<{width}}  {s['score']:+.3f}  {'█' * max(0, round(12 * s['score'] / top))}"
                     for i, s in enumerate(scores, 1))


def format_models(models: list[dict]) -> str:
    return "\n".join(f"  {i:>2}. {m['score']:.3f}  {m['class']:<24} {m['id']:<28} {m.get('split', ''):<13} "
                     f"{m.get('tree', '')}".rstrip() for i, m in enumerate(models, 1))


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m probex", description="ProbeX Studio: learn on model weights.")
    verbs = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def verb(name: str, run, help: str, bundle: bool = True, as_json: bool = True):
        p = verbs.add_parser(name, help=help, description=help)
        if bundle:
            p.add_argument("--bundle", default=None,
                           help="bundle dir or Hub repo id (default: the shipped bundle of PROBEX_PROFILE)")
        if as_json:
            p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.set_defaults(run=run)
        return p

    p = verb("predict", run_predict, "which tree, which concepts and which known models a LoRA is closest to")
    p.add_argument("file", help="a .safetensors LoRA: path, https URL or Hub repo id")
    p.add_argument("--top-k", type=positive, default=5)
    p = verb("zero-shot", run_zero_shot, "score a LoRA against labels you choose")
    p.add_argument("file")
    p.add_argument("labels", nargs="+", help="candidate labels, e.g. tiger lion 'house cat'")
    p = verb("search", run_search, "known models that best match a text")
    p.add_argument("text")
    p.add_argument("--top-k", type=positive, default=5)
    p = verb("route", run_route, "which Model Tree a file belongs to")
    p.add_argument("file")
    p = verb("card", run_card, "a Hub README.md draft for a LoRA", as_json=False)
    p.add_argument("file")
    p.add_argument("--out", default=None, help="write the card here instead of printing it")
    p = verb("samples", run_samples, "images drawn by a known model (its id) or a LoRA file", as_json=False)
    p.add_argument("model", help="a known model id (e.g. train/model_idx_0003) or a LoRA file")
    p.add_argument("--tree", default=None, help="the model's tree, when several trees use the same id")
    p.add_argument("-n", type=positive, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the PNG files")

    p = verb("train", run_train, "fit a tree expert on a population (layer chosen on val) and write a bundle",
             bundle=False)
    p.add_argument("--zoo", required=True, nargs="+", help="population dir(s) in Model-J layout, one per tree")
    p.add_argument("--out", required=True, help="bundle dir to write")
    p.add_argument("--cache", default="cache", help="layer cache dir (default ./cache)")
    p.add_argument("--task", default=None, choices=["align", "multiclass", "multilabel"],
                   help="default: align for LoRA trees, multilabel for discriminative ones")
    p.add_argument("--routing-layer", default=None, help="the router's layer (default: the first in sorted order)")
    p.add_argument("--patience", type=positive, default=None, help="stop after this many epochs without progress")
    p.add_argument("--profile", default=None, help="profile the bundle is for (default PROBEX_PROFILE)")
    p.add_argument("--layers", default=None, help="layers to sweep: all (default), names, or index ranges 40-47")
    p.add_argument("--epochs", type=positive, default=TRAIN_OPTIMISER.epochs)
    p.add_argument("--lr", type=float, default=TRAIN_OPTIMISER.lr)
    p.add_argument("--batch-size", type=positive, default=TRAIN_OPTIMISER.batch_size)
    p.add_argument("--r-u", type=positive, default=ProbeXConfig.r_u)
    p.add_argument("--r-v", type=positive, default=ProbeXConfig.r_v)
    p.add_argument("--r-t", type=positive, default=ProbeXConfig.r_t)
    p.add_argument("--linear", action="store_true", help="linear ProbeX (no ReLU)")
    p.add_argument("--paper-inputs", action="store_true",
                   help="raw weights and random probes, as the paper (default: centred inputs, principal-direction probes)")
    p.add_argument("--seed", type=int, default=TRAIN_OPTIMISER.seed)
    add_job_options(p, "layer")
    p = verb("eval", run_eval, "the bundle's expert scored on a population (top-1, zero-shot, kNN, AUC…)",
             bundle=False)
    p.add_argument("--bundle", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--cache", default="cache", help="layer cache dir (default ./cache)")
    add_job_options(p, "cache pass")
    mount_optional_parsers(verbs)
    return parser


def add_job_options(parser, job: str, threads: int = 1) -> None:
    """--ray [ADDRESS] (probex.cluster.map_jobs) and --threads: the thread count fixes the numbers and how many CPUs
    each Ray task reserves."""
    parser.add_argument("--ray", nargs="?", const=True, default=False, metavar="ADDRESS",
                        help=f"run each {job} as a Ray task: on the cluster at ADDRESS (HOST:PORT), or without one "
                             "on the Ray instance of this machine (pip install 'probex[cluster]')")
    parser.add_argument("--threads", type=positive, default=threads,
                        help=f"torch threads per {job}, here or in each Ray task (default {threads})")


def add_zoo_parser(verbs) -> None:
    """`probex zoo build --preset emoji-mini`: the offline profile's LoRA populations (probex/jungle/presets.py)."""
    from probex.jungle.presets import PRESETS

    parser = verbs.add_parser("zoo", help="build a LoRA population on the emoji roots (resumable)")
    sub = parser.add_subparsers(dest="zoo_command", required=True)
    build = sub.add_parser("build", help="train a preset's LoRAs in Model-J layout; existing files are skipped")
    build.add_argument("--preset", default="emoji-mini", choices=sorted(PRESETS))
    build.add_argument("--zoo", default="zoo", help="parent folder (LoRAs go to <zoo>/<preset>/<root>/)")
    build.add_argument("--roots", nargs="*", help="only these roots' trees")
    build.add_argument("--roots-dir", type=Path, default=None,
                       help="where the preset's roots are (default: the shipped checkpoints/roots)")
    build.add_argument("--adapters-per-pass", type=positive, default=10)
    build.add_argument("--device", default="cpu", help="cpu or cuda (a Ray task then reserves one GPU)")
    add_job_options(build, "pass")
    build.set_defaults(run=run_zoo_build)


def run_zoo_build(args) -> int:
    import torch

    from probex.jungle.presets import build_preset
    from probex.jungle.root import ROOTS_DIR

    torch.set_num_threads(args.threads)
    for record in build_preset(args.preset, Path(args.zoo), args.roots_dir or ROOTS_DIR, args.roots, args.adapters_per_pass,
                               args.device, args.ray):
        print(json.dumps(record))
    return 0


def mount_optional_parsers(verbs) -> None:
    """Subcommands other modules provide, mounted only when their module offers a parser builder."""
    add_zoo_parser(verbs)
    try:
        from probex.modelj import add_modelj_parser
    except ImportError:
        return
    add_modelj_parser(verbs)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, got {text!r}"[:120]) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


# ------------------------------------------------------------------------------------------------- main
def quiet_libraries() -> None:
    """Library warnings and progress bars go to stderr, where the CLI promises one line on failure."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ProbexError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `… | head` closed the pipe: not an error of ours
        return 0
    except OSError as err:  # a path the user named (--out in a missing or read-only folder, a name too long…)
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or type(err).__name__}{where}"[:400], file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 — the contract: one line, never a traceback
        detail = " ".join(str(err).split())[:300]
        print(f"error: unexpected {type(err).__name__}: {detail} (please report this)", file=sys.stderr)
        return 1
