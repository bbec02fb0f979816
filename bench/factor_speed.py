"""ProbeX training on SD1.5-shaped LoRA layers: the factor-space forward vs materialising B·A per batch.

    python bench/factor_speed.py                 # default: 1,200 LoRAs per layer (1,000 train), 2 epochs, ~4 min
    python bench/factor_speed.py --epochs 4 --models 2400

For each layer shape (SD1.5's largest attention projection 1280×1280 and a cross-attention key 320×768) it builds a
LoRA population in memory — ranks cycling 4, 8, 16, 32, 64 (zero-padded to 64, as the layer cache stores them) and a
planted class (10 classes; the class is written along a fixed input direction, as in tests/synthetic.py) — then
trains the same ProbeX (paper sizes r_U = r_V = r_T = 128, Adam lr 1e-3, batch 128, same seed) two ways:
  factor       Vᵀ·B·(A·U)·scale, never forming B·A (probex.experts.ProbeX)
  materialise  X = scale·B·A formed per batch, then Vᵀ·X·U — what the public release does (`inputs = B @ A`)
Both go through probex.train's own epoch loop (which encodes each batch one LoRA rank at a time, so neither variant
pays for padding). Reported per variant: seconds per training epoch, wall clock and CPU time (mean over epochs; on a
shared machine CPU time is the steadier of the two), memory, and test accuracy after the same epochs (the two
variants compute the same function, so they should agree).

Memory, measured honestly for torch (tracemalloc does not see its allocations): each variant runs in its own
subprocess; after the population is built, freed memory is returned to the OS (malloc_trim) and the resident set
size of anonymous memory (RssAnon in /proc/self/status: the heap, where tensors live; not library code pages) is the
baseline; a thread samples it every 2 ms during training. "train MB" is the peak above that baseline — the memory
training itself needs on top of the data, which both variants hold identically — and "peak RSS MB" is the process's
lifetime peak RSS (getrusage), data, interpreter and libraries included. torch's one-off autograd set-up is done on
a toy tensor before the baseline (it is the same ~80 MB for both variants).

Threads: 1 torch thread per variant by default (this machine's cores are shared); --threads to change.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probex.experts import ProbeX, dense_from_factors  # noqa: E402
from probex.data import LayerData, Targets  # noqa: E402
from probex.train import evaluate_split, train_epoch  # noqa: E402

SHAPES = {"1280x1280": (1280, 1280), "320x768": (320, 768)}
RANKS = (4, 8, 16, 32, 64)
N_CLASSES = 10


class MaterialisingProbeX(ProbeX):
    """The release's input path: B·A formed for every model of the batch, then the dense forward."""

    def responses(self, x):
        return super().responses(dense_from_factors(x))


def make_population(n: int, d_out: int, d_in: int, seed: int = 0):
    """LoRA factors (ranks cycling RANKS, padded to the largest) with a planted class, and the class labels."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(RANKS)
    text = torch.nn.functional.normalize(torch.randn(N_CLASSES, 16, generator=g), dim=1)
    P = 3 * torch.randn(d_out, 16, generator=g) / d_out ** 0.5
    a = torch.nn.functional.normalize(torch.randn(d_in, generator=g), dim=0)
    y = torch.arange(n) % N_CLASSES
    rank = torch.tensor([RANKS[i % len(RANKS)] for i in range(n)], dtype=torch.int32)
    up, down = torch.zeros(n, d_out, r_max), torch.zeros(n, r_max, d_in)
    for i in range(n):
        r = int(rank[i])
        up[i, :, :r] = torch.nn.functional.normalize(torch.randn(d_out, r, generator=g), dim=0)
        down[i, :r] = torch.nn.functional.normalize(torch.randn(r, d_in, generator=g), dim=1)
        # class part ‖P t‖ ≈ 3 against unit-norm noise terms: learnable within the bench's few epochs
        up[i, :, 0] = P @ text[y[i]] + 0.9 * torch.nn.functional.normalize(torch.randn(d_out, generator=g), dim=0)
        down[i, 0] = a
    return LayerData((up, down, torch.ones(n)), rank), y


def rss_bytes() -> int:
    """Anonymous resident memory (heap: where tensors live), from /proc/self/status — file-backed pages such as
    torch's own library code, which fault in as kernels are first used, are left out."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)


def run_variant(variant: str, shape: str, n_models: int, epochs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    d_out, d_in = SHAPES[shape]
    data, y = make_population(n_models, d_out, d_in)
    n_test = n_val = max(N_CLASSES, n_models // 12)
    order = torch.randperm(n_models, generator=torch.Generator().manual_seed(1))
    split = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    targets = Targets("multiclass", y, split, [str(c) for c in range(N_CLASSES)])
    warm = torch.ones(64, 64, requires_grad=True)   # torch's one-off autograd set-up (~80 MB, the same for both
    (warm @ warm).relu().sum().backward()            # variants) happens before the baseline, not inside "train MB"
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the population build's temporaries back: a clean baseline
    baseline = rss_bytes()
    sampler = PeakSampler()
    sampler.start()

    torch.manual_seed(0)
    cls = ProbeX if variant == "factor" else MaterialisingProbeX
    model = cls(d_out, d_in, 128, 128, 128, relu=True, head="multiclass", n_out=N_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        train_epoch(model, data, targets, opt, 128, generator)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    accuracy = evaluate_split(model, data, targets, "test", batch_size=128)["score"]
    sampler.running = False
    sampler.join()
    up, down, scale = data.x
    return {"variant": variant, "shape": shape, "n_train": len(split["train"]), "epoch_s": sum(times) / len(times),
            "epoch_cpu_s": sum(cpu_times) / len(cpu_times), "epoch_times": times, "train_mb": (sampler.peak - baseline) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data_mb": (up.nbytes + down.nbytes) / 2**20, "test_acc": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1200, help="LoRAs per layer shape (1/12 val, 1/12 test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(*args.child, args.models, args.epochs, args.threads)))
        return

    print(f"ProbeX r_U=r_V=r_T=128, batch 128, Adam 1e-3; ranks {RANKS} padded to {max(RANKS)}; {args.models} LoRAs "
          f"per shape; {args.epochs} epoch(s); {args.threads} torch thread(s); one subprocess per variant\n")
    rows = []
    for shape in args.shapes.split(","):
        for variant in ("factor", "materialise"):
            cmd = [sys.executable, __file__, "--child", variant, shape, "--models", str(args.models),
                   "--epochs", str(args.epochs), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{shape:>10} {variant:<12} {r['epoch_s']:7.2f} s/epoch (CPU {r['epoch_cpu_s']:6.2f} s)  "
                  f"train {r['train_mb']:7.1f} MB  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  (data {r['data_mb']:.0f} MB, {r['n_train']} train LoRAs)  "
                  f"test acc {r['test_acc']:.3f}", flush=True)
    print("\nratios (materialise ÷ factor):")
    for shape in args.shapes.split(","):
        f, m = (next(r for r in rows if r["shape"] == shape and r["variant"] == v) for v in ("factor", "materialise"))
        print(f"{shape:>10}  time {m['epoch_s'] / f['epoch_s']:5.1f}× (CPU time {m['epoch_cpu_s'] / f['epoch_cpu_s']:5.1f}×)   "
              f"train memory "
              f"{m['train_mb'] / max(f['train_mb'], 1e-9):6.1f}×   peak RSS {m['peak_rss_mb'] / f['peak_rss_mb']:4.1f}×   "
              f"test acc {f['test_acc']:.3f} vs {m['test_acc']:.3f}")


if __name__ == "__main__":
    main()
