"""python -m probex.jungle.discriminative build …"""
from __future__ import annotations

import argparse
import json

import torch

from .builder import PRESETS, build


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m probex.jungle.discriminative")
    sub = parser.add_subparsers(dest="cmd", required=True)
    cmd = sub.add_parser("build", help="train the discriminative trees and the forest (resumable)")
    cmd.add_argument("--zoo", default="zoo/discriminative")
    cmd.add_argument("--preset", choices=sorted(PRESETS), default="full")
    cmd.add_argument("--only", nargs="*", help="only these populations")
    cmd.add_argument("--threads", type=int, default=1)
    cmd.add_argument("--no-measure", action="store_true", help="skip the grouped-vs-single speed measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = build(args.zoo, PRESETS[args.preset], args.only, measure=not args.no_measure)
    for row in record.get("grouping", []):
        print(f"grouping {row['arch']}: {row['group']} at once {row['grouped_ms_per_model_step']} ms vs one at a time "
              f"{row['single_ms_per_model_step']} ms per model-step (×{row['speedup']})")
    for name, rec in record["populations"].items():
        print(json.dumps({name: rec}))
    print(f"build: {record['seconds']} s on {record['threads']} thread(s)")
