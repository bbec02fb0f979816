"""Memory and time of the training-free SD 1.5 reader (probex.sd15) on this machine, with SD 1.5's real shapes.

    python bench/sd15_reader.py [--work runs/sd15_reader] [--threads 2]

No download: the UNet is a randomly initialised SD 1.5 UNet (diffusers layout, fp16, 1.7 GB) and the text tower is
CLIP ViT-L/14's, built from its config (12 layers, width 768) with random weights and a byte-level tokenizer, so
only sizes and costs are real, not readings. Each stage runs in a fresh process, as a Space starts:
  first start   the studio builds the reader and computes the 1,000 ImageNet captions' block outputs (then cached)
  start         the same with the cache on disk
  read          one SD 1.5-shaped rank-16 kohya LoRA (fp16, 128 modules) read with its own trigger prompt from
                ``ss_tag_frequency`` (a prompt the studio has not seen: its class features are computed too), then
                a second file with the default prompt
Printed per stage: wall seconds and the process's peak resident memory (VmHWM; libraries, weights, the caption
outputs and everything read included). Targets: reading one LoRA ≤ 3 s, resident ≤ 2 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def stage(name: str, work: Path) -> dict:
    """One stage in this process: its figures as a dict."""
    import torch

    from probex.service import Studio

    started = time.perf_counter()
    studio = Studio.load()
    out = {"load_s": time.perf_counter() - started}
    if name == "read":
        for key, path in (("read_s", work / "tagged.safetensors"), ("read_again_s", work / "plain.safetensors")):
            started = time.perf_counter()
            result = studio.predict(path, top_k=5)
            out[key] = time.perf_counter() - started
        prompted = studio.prompted["sd15"]
        out.update(tree=result["tree"], prompt=studio.analyse(work / "tagged.safetensors").instance_prompt,
                   encoding_floats=prompted.reader.r_t,
                   caption_outputs_mb=sum(o.numel() * o.element_size() for o in prompted.caption_outputs) / 2**20,
                   reader_buffers_mb=sum(b.numel() * b.element_size() for b in prompted.reader.buffers()) / 2**20,
                   threads=torch.get_num_threads())
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM): unlike getrusage's ru_maxrss, which Linux carries over a fork and
    exec from the parent, it starts anew with the process's own memory."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**20


def prepare(work: Path) -> None:
    import torch

    from sd15_fixtures import (CLIP_L_TEXT_DIMS, kohya_metadata, lora_shapes, random_factors, save_random_sd15,
                               save_tiny_clip_text, write_lora)

    if not (work / "sd15" / "unet" / "config.json").is_file():
        save_random_sd15(work / "sd15")
    if not (work / "clip" / "config.json").is_file():
        save_tiny_clip_text(work / "clip", **CLIP_L_TEXT_DIMS)
    factors = random_factors(lora_shapes("sd15"), rank=16, seed=0)
    meta = kohya_metadata("sd_v1", 16, 8.0)
    write_lora(work / "tagged.safetensors", factors, "kohya", alpha=8.0, dtype=torch.float16,
               metadata={**meta, "ss_tag_frequency": json.dumps({"10_zzk": {"zzk": 40, "portrait": 22}})})
    write_lora(work / "plain.safetensors", factors, "kohya", alpha=8.0, dtype=torch.float16, metadata=meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "sd15_reader"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    env = {**os.environ, "PROBEX_PROFILE": "sd15-modelj", "PROBEX_SD15_MODEL": str(work / "sd15"),
           "PROBEX_CLIP_MODEL": str(work / "clip"), "PROBEX_CACHE_DIR": str(work / "cache"),
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    if args.stage:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(stage(args.stage, work)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    for cached in (work / "cache" / "sd15-reader").glob("*.safetensors"):
        cached.unlink()  # the first start computes the caption outputs
    rows = {}
    for name in ("first start", "start", "read"):
        run = subprocess.run([sys.executable, __file__, "--work", str(work), "--threads", str(args.threads),
                              "--stage", name.split()[-1]], env=env, cwd=work, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"stage {name} failed:\n{run.stderr[-3000:]}")
        rows[name] = json.loads(run.stdout.strip().splitlines()[-1])
    read = rows["read"]
    print(f"SD 1.5 reader, random SD 1.5 UNet + CLIP ViT-L/14 text tower shapes, {read['threads']} torch threads")
    print(f"  first start (1,000 captions computed): {rows['first start']['load_s']:6.1f} s   "
          f"peak RSS {rows['first start']['peak_rss_gb']:.2f} GB")
    print(f"  start (captions from the disk cache):  {rows['start']['load_s']:6.1f} s   "
          f"peak RSS {rows['start']['peak_rss_gb']:.2f} GB")
    print(f"  read one rank-16 kohya LoRA, own trigger “{read['prompt']}”: {read['read_s']:.2f} s (target ≤ 3); "
          f"a second file, default prompt: {read['read_again_s']:.2f} s")
    print(f"  peak RSS after reading: {read['peak_rss_gb']:.2f} GB (target ≤ 2)")
    print(f"  encoding: {read['encoding_floats']:,} floats ({read['encoding_floats'] * 4 / 2**10:.0f} KiB fp32); "
          f"caption outputs {read['caption_outputs_mb']:.0f} MiB; reader weights {read['reader_buffers_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
