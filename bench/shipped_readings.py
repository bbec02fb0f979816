"""Every reading the shipped bundle gives, as one fingerprint: proof that a refactor changed no behaviour.

    python bench/shipped_readings.py [--out runs/shipped_readings.json] [--against OLD.json]

Runs the app's verbs on the committed checkpoints/emoji-mini — predict (concepts, neighbours, novelty), zero-shot,
card, search and the map — over every LoRA the bundle ships (its examples and its one-per-class sample LoRAs) and a
fixed set of search texts, and writes the answers (scores rounded to 6 decimals) with their sha256. ``--against``
compares with an earlier run and prints what differs. The jungle itself (zoo/, needed by paper_tables and
outside_loras) is not in the repository; these are the readings that ship.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = ["a striped wild cat", "an eight-armed sea creature", "a carved pumpkin for halloween", "a kitten",
         "red apple", "something cold that falls in winter", "a rocket to the moon", "zzz qqq"]
LABELS = ["tiger", "apple", "rocket", "octopus", "snowflake"]


def rounded(value):
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def readings() -> dict:
    import torch

    from probex.service import Studio

    torch.set_num_threads(1)
    studio = Studio.load(ROOT / "checkpoints" / "emoji-mini", warm=False)
    files = sorted({*(Path(e["path"]) for e in studio.examples()),
                    *(Path(p) for t in studio.trees for p in studio.bundle.trees[t].gallery.sample_paths.values())})
    out = {"files": {}, "search": {}, "map": None}
    for path in files:
        result = studio.predict(str(path), top_k=5)
        result.pop("file")
        out["files"][path.name] = {"predict": result, "zero_shot": studio.zero_shot(str(path), LABELS),
                                   "card_sha256": hashlib.sha256(studio.model_card(str(path)).encode()).hexdigest()}
    for text in TEXTS:
        out["search"][text] = studio.search(text, top_k=5)
    figure = studio.map_figure(str(files[0]), query=TEXTS[0])
    out["map"] = [{"name": d.name, "x": list(map(float, d.x)), "y": list(map(float, d.y))} for d in figure.data
                  if d.x is not None]
    return rounded(out)


def differences(new, old, where="") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        return [d for k in sorted(set(new) | set(old)) for d in differences(new.get(k), old.get(k), f"{where}/{k}")]
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if new == old else [f"{where}: {old!r} → {new!r}"[:300]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "shipped_readings.json"))
    parser.add_argument("--against", help="an earlier run's JSON to compare with")
    args = parser.parse_args()
    result = readings()
    text = json.dumps(result, sort_keys=True, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"{len(result['files'])} shipped LoRAs, {len(result['search'])} searches, map of "
          f"{sum(len(d['x']) for d in result['map'])} points; sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    if args.against:
        diff = differences(result, json.loads(Path(args.against).read_text()))
        print("identical to " + args.against if not diff else f"{len(diff)} differences:\n" + "\n".join(diff[:40]))


if __name__ == "__main__":
    main()
