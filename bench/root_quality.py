"""Can a visitor recognise what the roots draw? The judge (probex/jungle/judge.py, trained on atlas renders only)
grades samples of today's roots and of roots v2, side by side in one run.

    python bench/root_quality.py --v2 DIR_A DIR_B [--quick] [--threads 2] [--out runs/root_quality]

Printed, for each root of both sets:
1. a sampling sweep (scheduler × steps × guidance) on pretraining classes outside the jungle's (so the settings are
   not chosen on the classes the gates read), and the defaults it chooses (best judge top-1; among settings within
   0.02 of it, the fewest steps) — with ``--write-sampling`` written into the v2 roots' recipe.json, which the
   app's pipeline reads;
2. judge top-1 / top-5 of "an emoji of {name}" samples over the jungle's 180 classes (4 seeds) and over every
   pretraining class (1 seed), time per image on this CPU;
3. LoRAs trained by the jungle's recipe on each root (jungle classes and, on v2, classes the roots never saw:
   the atlas's people), prompted "an emoji of sks": judge top-1 per sample, training time per LoRA (the same jobs on
   today's root and on v2, for the ratio), and the share of v2 LoRAs the listener router sends to their own root;
4. the gates (gate 3 as a number too: the per-pixel noise left in the samples, ``pixel_noise``), and one last line: ``roots v2: samples top-1 X, LoRA samples top-1 Y``.

Top-1 counts each sample: the judge must name the prompted class among all 1,048 atlas classes. Per-class tables
(CSV), sample grids (PNG) and the LoRAs go under ``--out``; LoRAs already there are reused (their training time is
read from the build record). ``--quick`` (≤ 10 min on 2 cores) uses fewer classes, seeds, settings and LoRAs.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from probex.generate import load_emoji, sample  # noqa: E402
from probex.jungle.atlas import load_atlas  # noqa: E402
from probex.jungle.judge import load_judge  # noqa: E402
from probex.jungle.lora import INSTANCE_PROMPT, build_population, sample_jobs  # noqa: E402
from probex.jungle.pipeline import SAMPLERS  # noqa: E402
from probex.jungle.presets import jungle_split  # noqa: E402
from probex.jungle.root import RootRecipe, augment, caption  # noqa: E402

BUNDLE = REPO / "checkpoints" / "emoji-mini"


def shipped_roots() -> list[Path]:
    """The roots the shipped bundle draws with (bundle.json's trees), in tree order: "today's roots"."""
    return [REPO / t["root_model"] for t in json.loads((BUNDLE / "bundle.json").read_text())["trees"]]


GATE_SAMPLES, GATE_LORAS = 0.80, 0.80
GATE_SPECKLE = 4.0  # grey levels of per-pixel noise left in samples (atlas renders under augmentation: ≈ 1.4)


def set_scheduler(pipe, name: str):
    pipe.scheduler = SAMPLERS[name].from_config(pipe.scheduler.config)
    return pipe


def draw(pipe, prompts: list[str], seeds: int, steps: int, guidance: float, batch: int = 128) -> tuple[torch.Tensor, float]:
    """``seeds`` images of every prompt, as (N, 3, 32, 32) in [-1, 1] (prompt-major), and seconds per image."""
    images, started = [], time.perf_counter()
    per_call = max(1, batch // seeds)
    for i in range(0, len(prompts), per_call):
        generator = torch.Generator().manual_seed(i)
        out = pipe(prompts[i:i + per_call], num_images_per_prompt=seeds, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generator, output_type="np").images
        images.append(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2) * 2 - 1)
    images = torch.cat(images)
    return images, (time.perf_counter() - started) / len(images)


def grade(judge, images: torch.Tensor, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: judge top-1 correct, top-5 correct."""
    top5 = judge(images).topk(5, 1).indices
    y = torch.tensor(labels)[:, None]
    return (top5[:, :1] == y).any(1).numpy(), (top5 == y).any(1).numpy()


def pixel_noise(images: torch.Tensor) -> np.ndarray:
    """Per image, the per-pixel noise left in it, in grey levels (0–255): Donoho's estimate σ = median |HH| / 0.6745
    over the finest diagonal Haar band, which edges barely touch — the speckle gate 3 looks for, as a number."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    hh = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return (hh.abs().flatten(1).median(1).values / 0.6745).numpy()


def save_grid(path: Path, images: torch.Tensor, rows: int, clean: np.ndarray | None = None, zoom: int = 2):
    """Rows of samples (prompt-major), the atlas render of each row's class first when given."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    per_row = len(pixels) // rows
    grid_rows = []
    for r in range(rows):
        cells = list(pixels[r * per_row:(r + 1) * per_row])
        if clean is not None:
            cells.insert(0, clean[r])
        grid_rows.append(np.concatenate([np.pad(c, ((1, 1), (1, 1), (0, 0)), constant_values=255) for c in cells], 1))
    grid = np.concatenate(grid_rows, 0)
    image = Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST)
    image.quantize(256).save(path, optimize=True)  # a palette PNG: a third of the bytes, no visible change


def clean_renders(rgba: np.ndarray, rows: list[int]) -> np.ndarray:
    x = rgba[rows].astype(np.float32) / 255
    on_white = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    return (on_white * 255).round().astype(np.uint8)


def sweep(pipe, judge, names, labels, seeds, configs) -> list[dict]:
    rows = []
    for scheduler, steps, guidance in configs:
        set_scheduler(pipe, scheduler)
        images, per_image = draw(pipe, [caption(pipe.recipe, n) for n in names], seeds, steps, guidance)
        top1, top5 = grade(judge, images, [y for y in labels for _ in range(seeds)])
        rows.append({"scheduler": scheduler, "steps": steps, "guidance": guidance, "top1": float(top1.mean()),
                     "top5": float(top5.mean()), "noise": float(pixel_noise(images).mean()), "s_per_image": per_image})
    return rows


def choose(rows: list[dict]) -> dict:
    best = max(r["top1"] for r in rows)
    near = [r for r in rows if r["top1"] >= best - 0.02]
    return min(near, key=lambda r: (r["steps"], -r["top1"]))


def lora_jobs(root: str, classes: list[dict], seed: int):
    return sample_jobs(root, classes, {"test": 1}, seed=seed)


def lora_samples(root_dir: Path, zoo: Path, jobs, judge, row_of: dict, seeds: int, settings: dict):
    pipe = load_emoji(str(root_dir))
    set_scheduler(pipe, settings["scheduler"])
    correct, images_all = [], []
    for job in jobs:
        images = sample(pipe, zoo / job.model_id / "pytorch_lora_weights.safetensors", INSTANCE_PROMPT, n=seeds,
                        seed=0, num_inference_steps=settings["steps"], guidance_scale=settings["guidance"])
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
        images_all.append(x)
        correct.append(grade(judge, x, [row_of[job.class_id]] * seeds)[0])
    return np.stack(correct), torch.cat(images_all)


def routed_to_own_root(v2: list[Path], zoos: list[Path], jobs: list[list]) -> float:
    """Share of the v2 LoRAs the listener router (probex.router, as the shipped bundle routes) sends to their root."""
    from probex.jungle.root import load_root
    from probex.jungle.ship import root_listeners
    from probex.router import Router
    from probex.weights import read_weights

    models = [read_weights(z / j.model_id / "pytorch_lora_weights.safetensors") for z, js in zip(zoos, jobs)
              for j in js]
    owner = [k for k, js in enumerate(jobs) for _ in js]
    layer = models[0].signature.modules[0][0]
    router = Router()
    router.add_group(models[0].signature, "lora", layer, [m.layers[layer] for m in models], members=owner)
    for tree, root_dir in zip(router.groups[0].trees, v2):
        tree.listeners = root_listeners(load_root(root_dir)[0])
    routed = [router.route(m) for m in models]
    assert all(r.method == "root" for r in routed)
    names = [t.name for t in router.groups[0].trees]
    return float(np.mean([r.tree == names[k] for r, k in zip(routed, owner)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v2", nargs=2, required=True, metavar="DIR", help="the two v2 root folders (A, B)")
    parser.add_argument("--today", nargs=2, metavar="DIR", help="the roots to compare with (default: the two the "
                        "shipped bundle draws with)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "root_quality"))
    parser.add_argument("--readme-grid", help="also write the v2 root A grid here (PNG)")
    parser.add_argument("--write-sampling", action="store_true",
                        help="write the sampling the sweep chose for v2 into the v2 roots' recipe.json (the app's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected, once per LoRA
    quick = args.quick
    out = Path(args.out) / ("quick" if quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    v2 = [Path(p).resolve() for p in args.v2]
    today = [Path(p).resolve() for p in args.today] if args.today else shipped_roots()
    sets = {"today": today, "v2": v2}

    judge = load_judge()
    rgba, atlas = load_atlas()
    row_of = {c["id"]: i for i, c in enumerate(atlas)}
    train, holdout = jungle_split()
    jungle = train + holdout
    people = [c for c in atlas if c["subject"] == "human"]
    people = [people[i] for i in np.random.default_rng(5).permutation(len(people))]
    n_jungle, seeds = (40, 2) if quick else (len(jungle), 4)
    jungle_here = jungle[:: len(jungle) // n_jungle][:n_jungle]

    # 1. sampling sweep, per root A of each set, on pretraining classes outside the jungle (the gates' classes)
    in_jungle = {c["id"] for c in jungle}
    outside = [atlas[row_of[i]] for i in RootRecipe.load(today[0] / "recipe.json").classes if i not in in_jungle]
    sweep_classes = outside[::40][:12] if quick else outside[::12][:45]
    configs = ([("ddim", 20, 3.0), ("ddim", 20, 6.0), ("ddim", 10, 6.0), ("dpm++", 10, 6.0)] if quick else
               [(s, n, g) for s in SAMPLERS for n in (10, 20, 30) for g in (3.0, 4.5, 6.0, 9.0)])
    print(f"1. sampling sweep: {len(sweep_classes)} pretraining classes outside the jungle × 2 seeds, judge top-1 / "
          "top-5, pixel noise, s per image")
    chosen = {}
    for set_name, roots in sets.items():
        pipe = load_emoji(str(roots[0]))
        rows = sweep(pipe, judge, [c["name"] for c in sweep_classes], [row_of[c["id"]] for c in sweep_classes], 2,
                     configs)
        chosen[set_name] = choose(rows)
        for r in rows:
            mark = "  ← chosen" if r is chosen[set_name] else ""
            print(f"   {set_name:>5} {roots[0].name:<16} {r['scheduler']:>6} {r['steps']:>3} steps  guidance "
                  f"{r['guidance']:<4} top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  noise {r['noise']:.1f}  "
                  f"{r['s_per_image']:.3f} s{mark}")
    (out / "sweep.json").write_text(json.dumps(chosen, indent=1))
    if args.write_sampling:  # the app draws with what the judge chose: the roots' recipes carry it
        for root_dir in v2:
            recipe = RootRecipe.load(root_dir / "recipe.json")
            recipe.sampling = {"scheduler": chosen["v2"]["scheduler"], "num_inference_steps": chosen["v2"]["steps"],
                               "guidance_scale": chosen["v2"]["guidance"]}
            recipe.save(root_dir / "recipe.json")
        print(f"   written to the v2 roots' recipe.json: {recipe.sampling}")

    # 2. samples of the jungle's classes and of every pretraining class, with each set's chosen settings
    print(f"\n2. root samples: jungle {len(jungle_here)} classes × {seeds} seeds; pretraining classes × 1 seed")
    summary = {}
    table = open(out / "per_class.csv", "w", newline="")
    writer = csv.writer(table)
    writer.writerow(["set", "root", "class_id", "class", "seeds", "top1", "top5"])
    for set_name, roots in sets.items():
        s = chosen[set_name]
        for root_dir in roots:
            pipe = set_scheduler(load_emoji(str(root_dir)), s["scheduler"])
            recipe = RootRecipe.load(root_dir / "recipe.json")
            names = [c["name"] for c in jungle_here]
            images, per_image = draw(pipe, [caption(recipe, n) for n in names], seeds, s["steps"], s["guidance"])
            top1, top5 = grade(judge, images, [row_of[c["id"]] for c in jungle_here for _ in range(seeds)])
            for i, c in enumerate(jungle_here):
                part = slice(i * seeds, (i + 1) * seeds)
                writer.writerow([set_name, root_dir.name, c["id"], c["name"], seeds, top1[part].mean(),
                                 top5[part].mean()])
            pretrain = [atlas[row_of[i]] for i in recipe.classes]
            if quick:
                pretrain = pretrain[::8]
            p_images, _ = draw(pipe, [caption(recipe, c["name"]) for c in pretrain], 1, s["steps"], s["guidance"])
            p_top1, p_top5 = grade(judge, p_images, [row_of[c["id"]] for c in pretrain])
            noise = float(pixel_noise(images).mean())
            summary[(set_name, root_dir.name)] = {"top1": top1.mean(), "top5": top5.mean(), "pre_top1": p_top1.mean(),
                                                  "pre_top5": p_top5.mean(), "n_pre": len(pretrain),
                                                  "s_per_image": per_image, "noise": noise}
            grid_rows = list(range(0, len(jungle_here), max(1, len(jungle_here) // 12)))[:12]
            picked = torch.cat([images[r * seeds:(r + 1) * seeds] for r in grid_rows])
            clean = clean_renders(rgba, [row_of[jungle_here[r]["id"]] for r in grid_rows])
            grid_path = out / f"grid_{set_name}_{root_dir.name}.png"
            save_grid(grid_path, picked, len(grid_rows), clean)
            if args.readme_grid and set_name == "v2" and root_dir == v2[0]:
                Path(args.readme_grid).parent.mkdir(parents=True, exist_ok=True)
                save_grid(Path(args.readme_grid), picked, len(grid_rows), clean)
            print(f"   {set_name:>5} {root_dir.name:<16} jungle top-1 {top1.mean():.3f} top-5 {top5.mean():.3f}  |  "
                  f"pretraining ({len(pretrain)}) top-1 {p_top1.mean():.3f} top-5 {p_top5.mean():.3f}  |  "
                  f"pixel noise {noise:.1f}  |  {per_image:.3f} s per image  grid {grid_path.relative_to(REPO) if grid_path.is_relative_to(REPO) else grid_path}")
    table.close()

    # 3. LoRAs by the jungle's recipe
    n_known, n_new, n_b, n_today = (8, 4, 6, 6) if quick else (30, 12, 20, 12)
    classes_a = holdout[:n_known] + people[:n_new]  # held-out jungle classes and classes no root was trained on
    jobs_a = lora_jobs(v2[0].name, classes_a, seed=501)
    jobs_b = lora_jobs(v2[1].name, train[:n_b], seed=502)
    # the same jobs on today's root and on v2 root A, trained back to back, for the time ratio
    timing = [jobs_a[:n_today], [replace(j, root=today[0].name) for j in jobs_a[:n_today]]]
    print(f"\n3. LoRAs by the recipe, \"{INSTANCE_PROMPT}\", {2 if quick else 4} seeds each")
    seconds_file = out / "lora_seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    for jobs, root_dir in zip(timing, (v2[0], today[0])):
        record = build_population(root_dir, jobs, out / "loras" / root_dir.name, adapters_per_pass=10)
        if record["trained"] == len(jobs):
            seconds[root_dir.name] = record["seconds"] / len(jobs)
    seconds_file.write_text(json.dumps(seconds))
    plan = [("v2", v2[0], jobs_a), ("v2", v2[1], jobs_b), ("today", today[0], timing[1])]
    lora_rows, zoos = {}, {}
    for set_name, root_dir, jobs in plan:
        zoo = out / "loras" / root_dir.name
        build_population(root_dir, jobs, zoo, adapters_per_pass=10)
        zoos[root_dir.name] = zoo
        correct, images = lora_samples(root_dir, zoo, jobs, judge, row_of, 2 if quick else 4, chosen[set_name])
        new = np.array([j.class_id in {c["id"] for c in people} for j in jobs])
        lora_rows[root_dir.name] = correct.mean()
        save_grid(out / f"grid_loras_{root_dir.name}.png", images[: 12 * correct.shape[1]],
                  min(12, len(jobs)), clean_renders(rgba, [row_of[j.class_id] for j in jobs[:12]]))
        seen = f"{correct[~new].mean():.3f}" if (~new).any() else "—"
        unseen = f"{correct[new].mean():.3f}" if new.any() else "—"
        print(f"   {set_name:>5} {root_dir.name:<16} {len(jobs)} LoRAs: sample top-1 {correct.mean():.3f} "
              f"(jungle classes {seen}, classes the root never saw {unseen})")
    t_v2, t_today = seconds.get(v2[0].name), seconds.get(today[0].name)
    ratio = t_v2 / t_today if t_v2 and t_today else float("nan")
    print(f"   training time per LoRA, the same {n_today} jobs: v2 {t_v2 or float('nan'):.1f} s, today "
          f"{t_today or float('nan'):.1f} s, ratio {ratio:.2f} (target ≤ 1.5)")
    own = routed_to_own_root(v2, [zoos[v2[0].name], zoos[v2[1].name]], [jobs_a, jobs_b])
    print(f"   v2 LoRAs routed to their own root by the listener router: {own:.3f} ({len(jobs_a) + len(jobs_b)} LoRAs)")

    # 4. gates
    v2_top1 = np.mean([summary[("v2", r.name)]["top1"] for r in v2])
    today_top1 = np.mean([summary[("today", r.name)]["top1"] for r in today])
    lora_top1 = lora_rows[v2[0].name]
    print("\n4. gates" + (" (--quick: few classes and seeds, indicative only; the full run decides)" if quick else ""))
    print(f"   1. v2 samples of the jungle's classes, judge top-1 {v2_top1:.3f} (today's roots {today_top1:.3f}; "
          f"gate ≥ {GATE_SAMPLES}): {'pass' if v2_top1 >= GATE_SAMPLES else 'FAIL'}")
    print(f"   2. LoRA samples on v2 root A, judge names the class {lora_top1:.3f} over {len(jobs_a)} LoRAs "
          f"(gate ≥ {GATE_LORAS} over ≥ 40): {'pass' if lora_top1 >= GATE_LORAS and len(jobs_a) >= 40 else 'FAIL'}")
    v2_noise = np.mean([summary[("v2", r.name)]["noise"] for r in v2])
    today_noise = np.mean([summary[("today", r.name)]["noise"] for r in today])
    g = torch.Generator().manual_seed(0)
    renders = pixel_noise(augment(torch.from_numpy(rgba[torch.randint(0, len(rgba), (256,), generator=g).numpy()]), g))
    print(f"   3. per-pixel noise left in v2 samples {v2_noise:.1f} grey levels (today's roots {today_noise:.1f}, atlas "
          f"renders under augmentation {renders.mean():.1f}; gate ≤ {GATE_SPECKLE}): "
          f"{'pass' if v2_noise <= GATE_SPECKLE else 'FAIL'}; and look at {out}/grid_v2_*.png")
    print(f"   4. routed to own root {own:.3f} (gate 1.0): {'pass' if own == 1.0 else 'FAIL'}")
    print(f"   LoRA training time v2 / today {ratio:.2f} (≤ 1.5): {'pass' if ratio <= 1.5 else 'FAIL'}")
    print(f"roots v2: samples top-1 {v2_top1:.3f}, LoRA samples top-1 {lora_top1:.3f}")


if __name__ == "__main__":
    main()
