"""Load on the app: many concurrent gradio_client calls of every API endpoint against `python app.py` on localhost.

    python bench/load.py [--bundle DIR] [--clients 16] [--rounds 5] [--requests 200] [--max-seconds 300] [--compare]

Each round, ``--clients`` threads (one client each) make ``--requests`` calls in all, mixed in a fixed cycle of ten:
six `/predict` uploads of the bundle's examples, two `/search` texts, one `/predict_link` to a link that cannot be
fetched here and one broken upload. The last two must come back as error answers (counted apart) and the app must
keep serving. Printed per round: calls answered, unexpected failures, latency p50 / p95 (queueing included) and the
server's resident memory (VmRSS); then the growth after the first round (caches fill in round 1; growth that repeats
every round is a leak; target ≤ 50 MB), whether the server is still alive, and what Gradio's upload cache still holds
once the deletion grace time and a sweep have passed. ``--compare`` first runs the same load on a server left with
glibc's dynamic mmap threshold (PROBEX_MMAP_THRESHOLD_KB=0) and prints both growths.
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


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (Linux): VmRSS in kB, Threads…"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_mb(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


MIX = ("predict", "predict", "search", "predict", "predict", "link", "predict", "search", "predict", "broken")
SEARCHES = ("a striped wild cat", "red apple", "something that flies", "a musical instrument")


def run_load(url: str, files: list[Path], broken: Path, clients: int, requests: int, max_seconds: float) -> dict:
    from gradio_client import Client, handle_file

    counter = itertools.count()
    lock = threading.Lock()
    latencies, outcomes = [], {"ok": 0, "refused_as_expected": 0, "unexpected": 0}
    deadline = time.monotonic() + max_seconds
    errors: list[str] = []

    def call(client, kind: str, i: int) -> bool:
        """True when the answer is the one this kind of call must get."""
        if kind == "predict":
            return "tree" in client.predict(handle_file(str(files[i % len(files)])), 5, api_name="/predict")
        if kind == "search":
            return "models" in client.predict(SEARCHES[i % len(SEARCHES)], 5, api_name="/search")
        try:
            if kind == "link":
                client.predict("https://unreachable.invalid/lora.safetensors", 5, api_name="/predict_link")
            else:
                client.predict(handle_file(str(broken)), 5, api_name="/predict")
        except Exception as err:  # noqa: BLE001 — the expected error answer
            return "unexpected" not in str(err) and bool(str(err).strip())
        return False

    def worker():
        client = Client(url, verbose=False)
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= requests:
                return
            kind = MIX[i % len(MIX)]
            start = time.perf_counter()
            try:
                good = call(client, kind, i)
            except Exception as err:  # noqa: BLE001 — a failure is data here
                good = False
                errors.append(f"{kind}: {type(err).__name__}: {str(err)[:200]}")
            with lock:
                latencies.append(time.perf_counter() - start)
                outcomes["unexpected" if not good else "ok" if kind in ("predict", "search")
                         else "refused_as_expected"] += 1

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="calls per round")
    parser.add_argument("--max-seconds", type=float, default=300, help="per round")
    parser.add_argument("--compare", action="store_true",
                        help="first the same load on a server left with glibc's dynamic mmap threshold")
    args = parser.parse_args()
    from probex.service import Studio

    studio = Studio.load(args.bundle)  # resolves the default bundle and lists its examples
    files = [e["path"] for e in studio.examples()]
    if not files:
        sys.exit("the bundle lists no example LoRAs to predict on")
    runs = {"shipped": {}}
    if args.compare:  # glibc's own dynamic mmap threshold first, then the app's fixed one (app.py)
        runs = {"glibc's dynamic mmap threshold (PROBEX_MMAP_THRESHOLD_KB=0)": {"PROBEX_MMAP_THRESHOLD_KB": "0"},
                "shipped (fixed 128 KiB threshold)": {}}
    print(f"{args.clients} concurrent clients, {args.rounds} rounds of {args.requests} mixed calls "
          f"({', '.join(f'{MIX.count(k)} {k}' for k in dict.fromkeys(MIX))} in every ten)")
    growths = {}
    for label, env in runs.items():
        started, rounds, alive, left = measure(studio, files, args, env)
        print(f"\n{label}: server RSS {started:.0f} MB after start-up")
        for n, r in enumerate(rounds, 1):
            print(f"round {n}: answered {r['answered']}/{r['sent']} in {r['seconds']:.1f} s: ok {r['ok']}, refused as "
                  f"expected {r['refused_as_expected']}, unexpected {r['unexpected']}; p50 {r['p50_ms']:.0f} ms, "
                  f"p95 {r['p95_ms']:.0f} ms; RSS {r['rss_mb']:.0f} MB, {r['threads']} threads")
            for line in r["errors"]:
                print(f"  e.g. {line}")
        growths[label] = rounds[-1]["rss_mb"] - rounds[0]["rss_mb"]
        calls = sum(r["answered"] for r in rounds[1:])
        print(f"memory growth after round 1: {growths[label]:+.0f} MB over {calls} calls (target ≤ 50 MB)")
        print(f"server alive after the run: {alive}; files left in Gradio's upload cache 80 s later: {len(left)} "
              f"{dict((s, left.count(s)) for s in set(left)) if left else ''}")
    if len(growths) > 1:
        print("\n" + "; ".join(f"{label}: {g:+.0f} MB" for label, g in growths.items()))


def measure(studio, files: list, args, env: dict) -> tuple[float, list[dict], bool, list[str]]:
    """One server under args.rounds rounds of load: RSS after start-up, the rounds, alive at the end, what
    Gradio's upload cache still holds once a grace time and a sweep have passed."""
    from test_app import running_app

    rounds = []
    with tempfile.TemporaryDirectory(prefix="probex-load-") as tmp:
        broken = Path(tmp) / "broken.safetensors"
        broken.write_bytes(b"\x00" * 256)
        # the app's own deletion grace time (60 s), not the tests' short one
        with running_app(studio.bundle_dir, Path(tmp) / "app", env={"PROBEX_UPLOAD_GRACE_S": "60", **env}) as app:
            pid = app.process.pid
            started = rss_mb(pid)
            for _ in range(args.rounds):
                rounds.append({**run_load(app.url, files, broken, args.clients, args.requests, args.max_seconds),
                               "rss_mb": rss_mb(pid), "threads": proc_status(pid, "Threads")})
            alive = app.process.poll() is None
            time.sleep(80)  # one grace time, one sweep interval (15 s) and a margin
            left = sorted(p.suffix or p.name for p in app.temp_dir.rglob("*") if p.is_file())
    return started, rounds, alive, left


if __name__ == "__main__":
    main()
