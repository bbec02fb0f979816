"""ProbeX training on SD1.5-shaped LoRA layers: the factor-space forward vs materialising B·A per batch, per rank
against its arithmetic bound.

    python bench/factor_speed.py                 # default: 1,200 LoRAs per layer (1,000 train), 2 epochs, 7 repeats
    python bench/factor_speed.py --epochs 4 --models 2400
    python bench/factor_speed.py --device cuda   # the same on a GPU (written for one, never run on these machines)

For each layer shape (SD1.5's largest attention projection 1280×1280 and a cross-attention key 320×768) it builds a
LoRA population in memory — ranks cycling 4, 8, 16, 32, 64 (zero-padded to 64, as the layer cache stores them) and a
planted class (10 classes; the class is written along a fixed input direction, as in tests/synthetic.py) — then
trains the same ProbeX (paper sizes r_U = r_V = r_T = 128, Adam lr 1e-3, batch 128, same seed) two ways:
  factor       Vᵀ·B·(A·U·scale), never forming B·A (probex.experts.ProbeX)
  materialise  X = (scale·B)·A formed per batch, then Vᵀ·(X·U) — what the public release does (`inputs = B @ A`)
Both go through probex.train's own epoch loop (which encodes each batch one LoRA rank at a time, so neither variant
pays for padding). Reported per variant: seconds per training epoch, wall clock and CPU time (mean over epochs; on a
shared machine CPU time is the steadier of the two), memory, and test accuracy after the same epochs (the two
variants compute the same function, so they should agree).

Per rank bucket. An epoch mixes ranks, so each rank r is also timed alone: one training step's forward and backward
(encode, head, loss, backward, as train_epoch runs them; no optimiser step) on a batch of 128 LoRAs all of rank r,
median of --repeats after a warm-up round, factor and materialising steps alternating so that a busy machine slows
both alike (in the parent process, after the epoch runs, on freshly initialised experts of the same seed: the
arithmetic does not depend on the weights). The batch's factors are gathered from the padded population once, before
timing: the gather is data loading, the same for both paths, and no arithmetic. On CPU the step's CPU time is timed
(steady on a shared machine; with several threads it is the total work, which is what a FLOP count measures); on
CUDA the wall time between synchronisations (CUDA is written for, not run on, the machines this was built on).

The arithmetic bound is the ratio of the two steps' multiply-adds as they run. Per model of the batch, for a d_W×d_H
layer (B, A are data: no gradient flows to them, so none is computed):

  both paths   M (r_V·r_U → r_T) and head (r_T → C):  forward r_V·r_U·r_T + r_T·C, backward twice that
               (gradients of the input and of the weight)
  factor       forward   VᵀB r_V·d_W·r  +  AU r·d_H·r_U  +  (VᵀB)(AU) r_V·r·r_U
               backward  ∂(VᵀB), ∂(AU) 2·r_V·r·r_U  +  ∂V d_W·r·r_V  +  ∂U d_H·r·r_U
               total     2·r·(d_W·r_V + d_H·r_U) + 3·r·r_V·r_U + shared
  materialise  forward   B·A d_W·r·d_H  +  XU d_W·d_H·r_U  +  Vᵀ(XU) r_V·d_W·r_U
               backward  ∂(XU), ∂V 2·d_W·r_V·r_U  +  ∂U = Xᵀ∂(XU) d_H·d_W·r_U
               total     d_W·d_H·(r + 2·r_U) + 3·d_W·r_V·r_U + shared
  bound = materialise total / factor total   (elementwise work — scale, ReLU, bias, loss — is counted in neither)
tests/test_factor_speed.py checks these totals against what torch's FlopCounterMode counts in a real step.

"of bound" = measured speed-up / bound = the factor path's multiply-adds per second / the materialising path's. It
can pass 1: the materialising path also moves each model's d_W×d_H matrix through memory, which no FLOP count sees.

Memory, measured honestly for torch (tracemalloc does not see its allocations): each variant runs in its own
subprocess; after the population is built, freed memory is returned to the OS (malloc_trim) and the resident set
size of anonymous memory (RssAnon in /proc/self/status: the heap, where tensors live; not library code pages) is the
baseline; a thread samples it every 2 ms during training. "train MB" is the peak above that baseline — the memory
training itself needs on top of the data, which both variants hold identically — and "peak RSS MB" is the process's
peak RSS (getrusage) up to the end of training, data, interpreter and libraries included. torch's one-off autograd
set-up is done on a toy tensor before the baseline (it is the same ~80 MB for both variants). On CUDA "train MB" is
the GPU's peak allocation above the data instead.

Threads: 1 torch thread per variant by default (this machine's cores are shared); --threads to change.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probex.data import LayerData, Targets  # noqa: E402
from probex.experts import ProbeX  # noqa: E402
from probex.experts import cost  # noqa: E402
from probex.experts.cost import MaterialisingProbeX, training_step  # noqa: E402
from probex.train import evaluate_split, train_epoch  # noqa: E402

SHAPES = {"1280x1280": (1280, 1280), "320x768": (320, 768)}
RANKS = (4, 8, 16, 32, 64)
N_CLASSES = 10
R_U = R_V = R_T = 128
BATCH = 128


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


def step_macs(variant: str, d_w: int, d_h: int, r: int) -> int:
    return cost.step_macs(variant, d_w, d_h, r, R_U, R_V, R_T, N_CLASSES)


def timed_step(model, x, y: torch.Tensor, device: str) -> float:
    """Seconds of one training step: CPU time on CPU, wall time between synchronisations on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        training_step(model, x, y)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    training_step(model, x, y)
    return time.process_time() - start


def rank_step_seconds(shape: str, repeats: int, device: str) -> dict[int, tuple[float, float]]:
    """Per rank: median step time of the factor path and of the materialising one on BATCH LoRAs of that rank. The
    two paths' steps alternate, so a busy machine slows both alike; the first round is a warm-up."""
    d_w, d_h = SHAPES[shape]
    data, y = make_population(len(RANKS) * BATCH, d_w, d_h)  # ranks cycle: BATCH models of each
    torch.manual_seed(0)
    factor = ProbeX(d_w, d_h, R_U, R_V, R_T, relu=True, head="multiclass", n_out=N_CLASSES)
    materialise = MaterialisingProbeX(d_w, d_h, R_U, R_V, R_T, relu=True, head="multiclass", n_out=N_CLASSES)
    materialise.load_state_dict(factor.state_dict())
    models = (factor.to(device), materialise.to(device))
    seconds = {}
    for r in RANKS:
        batch = torch.nonzero(data.rank == r).flatten()
        x, y_batch = tuple(t.to(device) for t in data.take(batch)), y[batch].to(device)
        times = [[timed_step(model, x, y_batch, device) for model in models] for _ in range(repeats + 1)][1:]
        seconds[r] = tuple(statistics.median(column) for column in zip(*times))
    return seconds


def run_variant(variant: str, shape: str, n_models: int, epochs: int, threads: int, device: str) -> dict:
    torch.set_num_threads(threads)
    d_out, d_in = SHAPES[shape]
    data, y = make_population(n_models, d_out, d_in)
    data, y = LayerData(tuple(t.to(device) for t in data.x), data.rank), y.to(device)
    n_test = n_val = max(N_CLASSES, n_models // 12)
    order = torch.randperm(n_models, generator=torch.Generator().manual_seed(1))
    split = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    targets = Targets("multiclass", y, split, [str(c) for c in range(N_CLASSES)])
    warm = torch.ones(64, 64, requires_grad=True, device=device)  # torch's one-off autograd set-up (~80 MB, the
    (warm @ warm).relu().sum().backward()                         # same for both variants) before the baseline
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the population build's temporaries back: a clean baseline
    baseline = rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    sampler = PeakSampler()
    sampler.start()

    torch.manual_seed(0)
    cls = ProbeX if variant == "factor" else MaterialisingProbeX
    model = cls(d_out, d_in, R_U, R_V, R_T, relu=True, head="multiclass", n_out=N_CLASSES).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for _ in range(epochs):
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        train_epoch(model, data, targets, opt, BATCH, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    accuracy = evaluate_split(model, data, targets, "test", batch_size=BATCH)["score"]
    sampler.running = False
    sampler.join()
    peak_bytes = torch.cuda.max_memory_allocated() - gpu_baseline if device == "cuda" else sampler.peak - baseline
    up, down, _ = data.x
    return {"variant": variant, "shape": shape, "n_train": len(split["train"]), "epoch_s": sum(times) / len(times),
            "epoch_cpu_s": sum(cpu_times) / len(cpu_times), "epoch_times": times, "train_mb": peak_bytes / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data_mb": (up.nbytes + down.nbytes) / 2**20, "test_acc": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1200, help="LoRAs per layer shape (1/12 val, 1/12 test)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per rank bucket (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(*args.child, args.models, args.epochs, args.threads, args.device)))
        return

    print(f"ProbeX r_U=r_V=r_T={R_U}, batch {BATCH}, Adam 1e-3; ranks {RANKS} padded to {max(RANKS)}; {args.models} "
          f"LoRAs per shape; {args.epochs} epoch(s); {args.threads} torch thread(s) on {args.device}; one subprocess "
          f"per variant\n")
    shapes = args.shapes.split(",")
    rows = []
    for shape in shapes:
        for variant in ("factor", "materialise"):
            cmd = [sys.executable, __file__, "--child", variant, shape, "--models", str(args.models),
                   "--epochs", str(args.epochs), "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{shape:>10} {variant:<12} {r['epoch_s']:7.2f} s/epoch (CPU {r['epoch_cpu_s']:6.2f} s)  "
                  f"train {r['train_mb']:7.1f} MB  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  (data {r['data_mb']:.0f} MB, {r['n_train']} train LoRAs)  "
                  f"test acc {r['test_acc']:.3f}", flush=True)
    pair = {s: [next(r for r in rows if r["shape"] == s and r["variant"] == v) for v in ("factor", "materialise")]
            for s in shapes}
    print("\nwhole epochs (materialise ÷ factor):")
    for shape, (f, m) in pair.items():
        print(f"{shape:>10}  time {m['epoch_s'] / f['epoch_s']:5.1f}× "
              f"(CPU time {m['epoch_cpu_s'] / f['epoch_cpu_s']:5.1f}×)   "
              f"train memory {m['train_mb'] / max(f['train_mb'], 1e-9):6.1f}×   "
              f"peak RSS {m['peak_rss_mb'] / f['peak_rss_mb']:4.1f}×   "
              f"test acc {f['test_acc']:.3f} vs {m['test_acc']:.3f}")
    torch.set_num_threads(args.threads)
    clock = "synchronised wall time" if args.device == "cuda" else "CPU time"
    print(f"\nper rank bucket: one training step (forward + backward) on {BATCH} LoRAs of one rank, median of "
          f"{args.repeats}, the two paths alternating ({clock}); bound = materialise ÷ factor multiply-adds "
          f"(module docstring)")
    print(f"{'shape':>10} {'rank':>4}  {'factor ms':>9} {'GMAC/s':>6}  {'materialise ms':>14} {'GMAC/s':>6}  "
          f"{'speed-up':>8}  {'bound':>6}")
    for shape in shapes:
        d_w, d_h = SHAPES[shape]
        for r, (t_f, t_m) in rank_step_seconds(shape, args.repeats, args.device).items():
            macs_f, macs_m = (BATCH * step_macs(v, d_w, d_h, r) for v in ("factor", "materialise"))
            speed_up, bound = t_m / t_f, macs_m / macs_f
            print(f"{shape:>10} {r:4d}  {t_f * 1e3:9.1f} {macs_f / t_f / 1e9:6.1f}  {t_m * 1e3:14.1f} "
                  f"{macs_m / t_m / 1e9:6.1f}  {speed_up:7.1f}×  {bound:5.1f}×  {speed_up / bound:.2f} of bound",
                  flush=True)

if __name__ == "__main__":
    main()
