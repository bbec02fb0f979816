"""How fast the app answers, on this machine: cold start, predict, search and neighbour samples.

    python bench/app_latency.py [--bundle DIR] [--repeats 30] [--sample-repeats 5]

Measured twice where it matters: in-process through ``probex.service`` (the work itself) and through the app's named
API endpoints with gradio_client against ``python app.py`` on localhost (what a client waits for, queue included).
- cold start: ``python app.py`` launched until its page answers (imports, bundle load and check, text encoder, map);
- predict: tree + concepts + neighbours, no generation (targets: p50 ≤ 300 ms);
- search: a text → best-matching models;
- 4 neighbour samples: the tree's root pipeline draws one image for each of 4 neighbours, sample cache cleared each
  time (target ≤ 3 s); the first call, which also loads the pipeline, is reported apart.
Prints one table; the numbers depend on what else runs on the machine, so say so when quoting them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

QUERIES = ["a striped wild cat", "a red fruit", "something that flies", "a vehicle", "a flower", "a sea animal"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"p50_ms": statistics.median(ms), "p95_ms": p95, "n": len(ms)}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def bench_service(studio, examples: list[Path], repeats: int, sample_repeats: int) -> dict:
    rows = {}
    rows["predict (service)"] = percentiles(timed(lambda i: studio.predict(examples[i % len(examples)]), repeats))
    rows["search (service)"] = percentiles(timed(lambda i: studio.search(QUERIES[i % len(QUERIES)]), repeats))
    neighbours = studio.drawable_neighbors(examples[0], 4)

    def draw_neighbours(_):
        studio._sample_cache.clear()  # a bench of drawing, not of the cache
        for n in neighbours:
            studio.samples(n["id"], n=1, tree=n["tree"])

    first = timed(draw_neighbours, 1)[0]
    rows[f"{len(neighbours)} neighbour samples"] = percentiles(timed(draw_neighbours, sample_repeats))
    rows["  first call (loads the pipeline)"] = {"p50_ms": first * 1000, "p95_ms": first * 1000, "n": 1}
    return rows


def bench_api(bundle: Path, examples: list[Path], repeats: int, workdir: Path) -> dict:
    from gradio_client import Client, handle_file
    from test_app import running_app

    start = time.perf_counter()
    with running_app(bundle, workdir) as app:
        cold = time.perf_counter() - start
        client = Client(app.url, verbose=False)
        predict = timed(lambda i: client.predict(handle_file(str(examples[i % len(examples)])), 5,
                                                 api_name="/predict"), repeats)
        search = timed(lambda i: client.predict(QUERIES[i % len(QUERIES)], 5, api_name="/search"), repeats)
    return {"cold start (python app.py → page answers)": {"p50_ms": cold * 1000, "p95_ms": cold * 1000, "n": 1},
            "predict (gradio_client → app)": percentiles(predict),
            "search (gradio_client → app)": percentiles(search)}


def main() -> None:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle dir (default: the shipped one of PROBEX_PROFILE)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sample-repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # in-process numbers on one thread (a shared machine); the app keeps torch's default
    from probex.service import Studio

    start = time.perf_counter()
    studio = Studio.load(args.bundle)
    load_s = time.perf_counter() - start
    examples = [e["path"] for e in studio.examples()]
    if not examples:
        sys.exit("the bundle lists no example LoRAs to predict on")
    rows = {"Studio.load (in-process)": {"p50_ms": load_s * 1000, "p95_ms": load_s * 1000, "n": 1}}
    rows.update(bench_service(studio, examples, args.repeats, args.sample_repeats))
    with tempfile.TemporaryDirectory(prefix="probex-bench-") as tmp:
        rows.update(bench_api(studio.bundle_dir, examples, args.repeats, Path(tmp)))
    print(f"bundle {studio.bundle_dir} · {os.cpu_count()} CPUs · load average {os.getloadavg()[0]:.1f} "
          f"(other jobs on the machine inflate these numbers)")
    print(f"{'':48} {'p50 ms':>10} {'p95 ms':>10} {'n':>5}")
    for name, r in rows.items():
        print(f"{name:48} {r['p50_ms']:10.1f} {r['p95_ms']:10.1f} {r['n']:5d}")


if __name__ == "__main__":
    main()
