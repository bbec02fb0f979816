"""Load on the app: many concurrent gradio_client `predict` calls against `python app.py` on localhost.

    python bench/load.py [--bundle DIR] [--clients 16] [--requests 500] [--max-seconds 300] [--bad-every 10]

Each of ``--clients`` threads has its own client and calls `/predict` until ``--requests`` calls are done in all or
``--max-seconds`` pass. Every ``--bad-every``-th call uploads a broken file on purpose: it must come back as an error
answer (counted apart), and the app must keep serving. Reported: calls sent / answered, unexpected failures, latency
p50 / p95 (queueing included: the app runs a bounded number of requests at once), the server's resident memory
(VmRSS) after a warm-up, after the run and after a second identical run (growth that levels off is caches; growth
that repeats is a leak), whether the server is still alive, and whether uploads were deleted.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def rss_mb(pid: int) -> float:
    """Resident memory of a process from /proc (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_load(url: str, files: list[Path], broken: Path, clients: int, requests: int, max_seconds: float,
             bad_every: int) -> dict:
    from gradio_client import Client, handle_file

    counter = itertools.count()
    lock = threading.Lock()
    latencies, outcomes = [], {"ok": 0, "refused_as_expected": 0, "unexpected": 0}
    deadline = time.monotonic() + max_seconds
    errors: list[str] = []

    def worker():
        client = Client(url, verbose=False)
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= requests:
                return
            bad = bad_every > 0 and i % bad_every == bad_every - 1
            start = time.perf_counter()
            try:
                result = client.predict(handle_file(str(broken if bad else files[i % len(files)])), 5,
                                        api_name="/predict")
                kind = "unexpected" if bad or "tree" not in result else "ok"
            except Exception as err:  # noqa: BLE001 — an error answer is data here
                kind = "refused_as_expected" if bad and "broken.safetensors" in str(err) else "unexpected"
                if kind == "unexpected":
                    errors.append(f"{type(err).__name__}: {str(err)[:200]}")
            with lock:
                latencies.append(time.perf_counter() - start)
                outcomes[kind] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = sorted(x * 1000 for x in latencies)
    return {"sent": min(next(counter), requests), "answered": len(latencies), "seconds": time.perf_counter() - start,
            "p50_ms": statistics.median(ms), "p95_ms": ms[round(0.95 * (len(ms) - 1))], **outcomes,
            "errors": errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle dir (default: the shipped one of PROBEX_PROFILE)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-seconds", type=float, default=300)
    parser.add_argument("--bad-every", type=int, default=10, help="every n-th call sends a broken file (0: never)")
    args = parser.parse_args()
    from probex.service import Studio
    from test_app import running_app

    studio = Studio.load(args.bundle)  # resolves the default bundle and lists its examples
    files = [e["path"] for e in studio.examples()]
    if not files:
        sys.exit("the bundle lists no example LoRAs to predict on")
    with tempfile.TemporaryDirectory(prefix="probex-load-") as tmp:
        broken = Path(tmp) / "broken.safetensors"
        broken.write_bytes(b"\x00" * 256)
        # the app's own deletion grace time (60 s), not the tests' short one
        with running_app(studio.bundle_dir, Path(tmp) / "app", env={"PROBEX_UPLOAD_GRACE_S": "60"}) as app:
            pid = app.process.pid
            warm = run_load(app.url, files, broken, 4, 40, args.max_seconds, args.bad_every)
            before = rss_mb(pid)
            result = run_load(app.url, files, broken, args.clients, args.requests, args.max_seconds, args.bad_every)
            after = rss_mb(pid)
            # a second run tells growth that levels off (caches, allocator pools) from a per-request leak
            again = run_load(app.url, files, broken, args.clients, args.requests, args.max_seconds, args.bad_every)
            after_again = rss_mb(pid)
            alive = app.process.poll() is None
            time.sleep(80)  # one grace time, one sweep interval (15 s) and a margin
            left = len(list(app.temp_dir.rglob("*.safetensors")))
    print(f"warm-up: {warm['answered']} calls, {warm['unexpected']} unexpected")
    print(f"{args.clients} concurrent clients, {result['sent']} calls sent in {result['seconds']:.1f} s "
          f"(every {args.bad_every}th a broken file)")
    print(f"answered {result['answered']}/{result['sent']}: ok {result['ok']}, refused as expected "
          f"{result['refused_as_expected']}, unexpected failures {result['unexpected']}")
    for line in result["errors"]:
        print(f"  e.g. {line}")
    print(f"latency p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms (queueing included)")
    print(f"server RSS {before:.0f} MB after warm-up → {after:.0f} MB after the run ({after - before:+.0f} MB) → "
          f"{after_again:.0f} MB after a second run of {again['answered']} calls ({after_again - after:+.0f} MB; "
          f"{again['unexpected']} unexpected failures)")
    print(f"server alive after the run: {alive}; uploads left on disk 80 s later: {left}")


if __name__ == "__main__":
    main()
