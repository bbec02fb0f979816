"""Build the Mini Model Jungle, resumably.

    python -m probex.jungle judge [--steps N | --eval]
    python -m probex.jungle root --name emoji-root-1 --seed 0 [--minutes M] [--steps N]
    python -m probex.jungle build pilot|emoji-mini [--zoo zoo] [--roots emoji-root-1] [--ray [ADDRESS]]
    python -m probex.jungle ship pilot [--roots emoji-root-1] [--out checkpoints/emoji-mini]
    python -m probex.jungle keywords --cldr annotations/en/annotations.json --version V [--bundle DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cli import add_job_options
from .atlas import load_atlas
from .presets import PRESETS, build_preset
from .root import ROOTS_DIR, RootRecipe, pretrain_root


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m probex.jungle")
    sub = parser.add_subparsers(dest="cmd", required=True)
    root = sub.add_parser("root", help="pretrain (or resume) an emoji root")
    root.add_argument("--name", required=True)
    root.add_argument("--seed", type=int, default=0)
    root.add_argument("--steps", type=int, default=4500)
    root.add_argument("--minutes", type=float)
    root.add_argument("--threads", type=int, default=1)
    root.add_argument("--device", default="cpu")
    root.add_argument("--out", help="folder of the root (default: checkpoints/roots/NAME); training state stays there")
    root.add_argument("--ema", type=float, default=0.0, help="EMA decay of the saved weights (0: the raw weights)")
    root.add_argument("--widths", default="64,128",
                      help="UNet block widths. At unshuffle 4, (32,64) trains 2x faster but its first conv squeezes "
                           "each 48-channel 4x4-pixel patch into 32 channels: its samples keep per-pixel noise")
    root.add_argument("--unshuffle", type=int, default=4,
                      help="pixel-unshuffle factor: 2 gives the UNet 16x16 positions of 12 channels, so its convs see "
                           "each pixel's neighbours and can remove per-pixel noise")
    root.add_argument("--plain-blocks", type=int, default=0, help="leading UNet blocks without attention")
    root.add_argument("--norm-groups", type=int, default=32,
                      help="GroupNorm groups; keep ≥ 2 channels a group (at one, each channel's mean colour is lost)")
    judge = sub.add_parser("judge", help="train the image judge on the atlas and print its held-out accuracy")
    judge.add_argument("--steps", type=int, default=3000)
    judge.add_argument("--threads", type=int, default=1)
    judge.add_argument("--eval", action="store_true", help="only print the committed judge's held-out accuracy")
    build = sub.add_parser("build", help="train a preset's LoRA population (resumable)")
    build.add_argument("preset", choices=sorted(PRESETS))
    build.add_argument("--zoo", default="zoo")
    build.add_argument("--roots", nargs="*", help="only these roots")
    build.add_argument("--adapters-per-pass", type=int, default=10)
    build.add_argument("--device", default="cpu")
    add_job_options(build, "pass", threads=2)
    ship = sub.add_parser("ship", help="train the experts and write the emoji-mini bundle from a built preset")
    ship.add_argument("preset", choices=sorted(PRESETS))
    ship.add_argument("--zoo", default="zoo")
    ship.add_argument("--out", default=str(ROOTS_DIR.parent / "emoji-mini"))
    ship.add_argument("--epochs", type=int, default=200)
    ship.add_argument("--roots", nargs="*", help="only these trees")
    ship.add_argument("--threads", type=int, default=2)
    words = sub.add_parser("keywords", help="write the atlas classes' CLDR keywords (what text search reads them by)")
    words.add_argument("--cldr", required=True, help="annotations/en/annotations.json of npm cldr-annotations-full")
    words.add_argument("--version", required=True, help="that package's version (recorded with the keywords)")
    words.add_argument("--bundle", help="also write them into this bundle's galleries (nothing else changes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.cmd == "judge":
        from .judge import evaluate_judge, load_judge, train_judge

        print(json.dumps(evaluate_judge(load_judge()) if args.eval else train_judge(steps=args.steps)))
    elif args.cmd == "root":
        out = Path(args.out) if args.out else ROOTS_DIR / args.name
        if (out / "recipe.json").exists():
            recipe = RootRecipe.load(out / "recipe.json")
            recipe.steps = args.steps
        else:
            _, classes = load_atlas()
            things = [c["id"] for c in classes if c["subject"] == "thing"]
            recipe = RootRecipe(name=args.name, seed=args.seed, steps=args.steps, classes=things,
                                block_out_channels=tuple(int(w) for w in args.widths.split(",")),
                                unshuffle=args.unshuffle, plain_blocks=args.plain_blocks, ema_decay=args.ema,
                                norm_num_groups=args.norm_groups)
        pretrain_root(out, recipe, minutes=args.minutes, device=args.device)
        print(json.dumps({"root": str(out), "steps": recipe.steps}))
    elif args.cmd == "build":
        for record in build_preset(args.preset, Path(args.zoo), ROOTS_DIR, args.roots, args.adapters_per_pass,
                                   args.device, args.ray):
            print(json.dumps(record))
    elif args.cmd == "keywords":
        from ..bundle import Bundle
        from .atlas import build_keywords

        table = build_keywords(Path(args.cldr), args.version)["keywords"]
        print(json.dumps({"classes_with_keywords": len(table)}))
        if args.bundle:
            bundle = Bundle.load(args.bundle)
            for tree in bundle.trees.values():
                g = tree.gallery
                g.vocabulary_keywords = [table.get(i, []) for i in g.vocabulary_ids]
            bundle.save(args.bundle)
    elif args.cmd == "ship":
        from .ship import build_emoji_bundle

        print(json.dumps(build_emoji_bundle(Path(args.zoo) / args.preset, Path(args.out), args.epochs,
                                            roots=args.roots)))


if __name__ == "__main__":
    main()
