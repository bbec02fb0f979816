"""Model-J, the paper's model population, from the Hugging Face Hub — download and its specifics.

Layout of a generative subset's model repo (``ProbeX/Model-J__SD_200``, ``ProbeX/Model-J__SD_1k``):
    {split}/model_idx_NNNN/pytorch_lora_weights.safetensors   (+ README.md model card, training_images/)
for the splits train, val, test, val_holdout, test_holdout. Each LoRA's safetensors metadata holds its
``imagenet_class_id`` (a WordNet id such as n02111277) and the training hyperparameters. The metadata dataset
``ProbeX/Model-J`` has one config (folder) per subset. ``download`` mirrors the chosen splits' LoRA files — nothing
else of the model repo: the training images would multiply the size — into ``<out>`` in the layout `probex.zoo`
reads, fetches the subset's metadata config into ``<out>/metadata/``, and writes ``<out>/tree.json`` (the tree's root
model, text encoder and prompt) and ``<out>/modelj.json`` (what arrived, per split, read from the files themselves).

Downloads go through huggingface_hub into a local dir: a rerun skips every file already complete (resumable), each
attempt is retried after transient failures, and tqdm shows the progress.

``probex/data/imagenet_classes.json`` maps each of the 1000 ImageNet-1k WordNet ids to its class name, in the
ImageNet-1k index order: the first WordNet lemma of the synset, as the ProbeX release prompts CLIP with
("a photo of a {name}"), where the two names that two synsets share are told apart the release's way
("crane, bird" / "construction crane", "maillot" / "maillot, tank suit"); `probex.zoo.imagenet_names` reads it.
Model-J's class order is no fixed list: the release encodes each split's classes sorted by WordNet id, as
`probex.zoo.Zoo.classes` orders them too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from tqdm.auto import tqdm

from probex.errors import InputError, ProbexError, first_line
from probex.profiles import PROFILES
from probex.zoo import SPLITS, Zoo

SUBSETS = {"SD_200": "ProbeX/Model-J__SD_200", "SD_1k": "ProbeX/Model-J__SD_1k"}
METADATA_REPO = "ProbeX/Model-J"
LORA_FILE = "pytorch_lora_weights.safetensors"
CLASS_KEY = "imagenet_class_id"


def lora_patterns(splits) -> list[str]:
    return [f"{split}/*/{LORA_FILE}" for split in splits]


def download(subset: str = "SD_200", splits=SPLITS, out: str | Path | None = None, *, repo_id: str | None = None,
             metadata_repo: str | None = METADATA_REPO, revision: str | None = None, max_workers: int = 8,
             retries: int = 3, endpoint: str | None = None) -> Path:
    """Mirror a Model-J generative subset into `out` (default ``zoo/modelj-<subset>``); returns `out`."""
    repo_id = repo_id or SUBSETS.get(subset)
    if repo_id is None:
        raise InputError(f"unknown Model-J subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise InputError(f"unknown Model-J split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    if constants.is_offline_mode():
        raise ProbexError("Hub access is switched off (HF_HUB_OFFLINE=1); unset it to download Model-J")
    out = Path(out or f"zoo/modelj-{subset}")
    out.mkdir(parents=True, exist_ok=True)

    _snapshot(repo_id, "model", lora_patterns(splits), out, revision, max_workers, retries, endpoint)
    if metadata_repo:
        try:  # the labels travel in the LoRA files themselves: a missing metadata config costs nothing essential
            _snapshot(metadata_repo, "dataset", [f"{subset}/*"], out / "metadata", None, max_workers, retries,
                      endpoint)
        except ProbexError as exc:
            print(f"warning: no Model-J metadata config ({exc}); the labels in the LoRA files are used",
                  file=sys.stderr)
    write_tree_json(out, subset, repo_id)
    summary = summarize(out, splits)
    (out / "modelj.json").write_text(json.dumps({"subset": subset, "repo_id": repo_id, **summary}, indent=2))
    return out


def _snapshot(repo_id, repo_type, patterns, local_dir, revision, max_workers, retries, endpoint) -> None:
    """One snapshot_download, retried: files already complete in `local_dir` are skipped on every attempt."""
    for attempt in range(1, retries + 1):
        try:
            # plain tqdm: the bars show even where a CLI has switched huggingface_hub's own bars off
            snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=local_dir,
                              allow_patterns=patterns, max_workers=max_workers, endpoint=endpoint, tqdm_class=tqdm)
            return
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError) as exc:
            # asking again will not help
            raise ProbexError(f"cannot download {repo_id}: {first_line(exc, None)}") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            if attempt == retries:
                raise ProbexError(f"downloading {repo_id} failed {retries} times, last: "
                                  f"{first_line(exc, None)} (rerun to resume)") from None
            time.sleep(min(2 ** (attempt - 1), 30))


def write_tree_json(out: Path, subset: str, repo_id: str) -> None:
    """What `probex.zoo` and training need to know about this tree beyond its files."""
    profile = PROFILES["sd15-modelj"]
    tree = {"name": f"modelj-{subset.lower()}", "root_model": profile.root_model,
            "text_encoder": profile.text_encoder, "prompt_template": profile.prompt_template, "source": repo_id}
    (out / "tree.json").write_text(json.dumps(tree, indent=2))


def summarize(root: str | Path, splits=SPLITS) -> dict:
    """Per split: how many LoRAs arrived and how many distinct classes they hold (labels as `probex.zoo` reads
    them from the files' own metadata); files without a class id are listed, not guessed."""
    models = [m for m in Zoo.scan(root).models if m.split in splits]
    per_split = {split: {"models": sum(m.split == split for m in models),
                         "classes": len({m.class_id for m in models if m.split == split and m.class_id})}
                 for split in splits}
    return {"splits": per_split, "unlabeled": [m.source for m in models if m.class_id is None]}


# ---- CLI: `python -m probex modelj download …` (mounted by probex.cli) ---------------------------------------------
def add_modelj_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("modelj", help="Model-J, the paper's LoRA population, from the Hub")
    verbs = parser.add_subparsers(dest="modelj_command", required=True)
    dl = verbs.add_parser("download", help="download a generative subset's LoRAs (resumable)")
    dl.add_argument("--subset", default="SD_200", choices=sorted(SUBSETS))
    dl.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, metavar="SPLIT",
                    help=f"which splits (default all: {' '.join(SPLITS)})")
    dl.add_argument("--out", default=None, help="target dir (default zoo/modelj-<subset>)")
    dl.add_argument("--repo-id", default=None, help="model repo to read instead of the subset's own")
    dl.add_argument("--revision", default=None, help="branch, tag or commit of the model repo")
    dl.add_argument("--max-workers", type=int, default=8)
    dl.add_argument("--retries", type=int, default=3)
    dl.add_argument("--no-metadata", action="store_true", help=f"skip the {METADATA_REPO} metadata config")
    dl.add_argument("--endpoint", default=None, help="Hub endpoint or mirror (default: HF_ENDPOINT or the Hub)")
    dl.set_defaults(run=run_download)
    return parser


def run_download(args) -> int:
    out = download(args.subset, args.splits, args.out, repo_id=args.repo_id, revision=args.revision,
                   max_workers=args.max_workers, retries=args.retries, endpoint=args.endpoint,
                   metadata_repo=None if args.no_metadata else METADATA_REPO)
    summary = json.loads((out / "modelj.json").read_text())
    for split, counts in summary["splits"].items():
        print(f"{split:>13}: {counts['models']:5d} LoRAs, {counts['classes']:4d} classes")
    if summary["unlabeled"]:
        print(f"warning: {len(summary['unlabeled'])} files carry no {CLASS_KEY}, e.g. {summary['unlabeled'][0]}")
    print(f"Model-J {args.subset} is in {out}")
    return 0


def main_modelj(argv=None) -> int:
    """`python -m probex modelj …` on its own (the CLI mounts `add_modelj_parser` instead)."""
    parser = argparse.ArgumentParser(prog="probex")
    add_modelj_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ProbexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
