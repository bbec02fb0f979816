"""What a person waits for after dropping a LoRA on the page: measured in a real headless Chromium (Debian's
/usr/bin/chromium driven by Playwright, as tests/test_browser.py does) against ``python app.py`` on localhost.

    python bench/browser_latency.py [--uploads 10] [--port PORT] [--screenshots DIR]

Each upload opens a fresh page and sets a file on the upload input (``#upload input[type=file]``); a probe in the page
takes the time of that input's ``change`` event as zero and then, on every animation frame, records when
(a) the result summary (``#summary h3``) is shown — target ≤ 0.5 s;
(b) the LoRA's own samples (``#own-gallery img``) are shown for good — target ≤ 1.5 s;
(c) every image of both galleries (``#own-gallery``, ``#neighbour-gallery``) is shown, the event chain being over
    (app.py clears the upload box last) — target ≤ 3 s.
"Shown" means loaded and on top at its place (``document.elementFromPoint``), not merely in the DOM: Gradio draws
its progress overlay over outputs, and an image under it is not seen. The viewport is tall enough to hold the whole
page, so nothing needs scrolling to. Also printed: when the first own image enters the DOM, when it is first shown
even if covered again by the next progress step, and how often that happens.
Two servers, one after the other, the same uploads: without and with the start-up warm-up (``PROBEX_WARM_SAMPLES``:
app.py draws every shipped sample LoRA once in the background when it starts; the bench waits for it to finish, as a
server is up before its visitors), printed side by side.
Files cycle through the bundle's example LoRAs and a few shipped sample LoRAs. The first upload to each tree loads
that tree's image pipeline: one such warm-up per tree is run first and printed apart. Known models' samples are cached
by the app across uploads (as they are for users); an upload's own samples are always drawn.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "checkpoints" / "emoji-mini"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 2000}   # the whole Identify page (≈ 1,820 px at this width) without scrolling
TARGETS_S = {"summary": 0.5, "first": 1.5, "all": 3.0}
UPLOAD_TIMEOUT_MS = 180_000                  # a cold pipeline on a busy 2-core machine

# Runs in every page before the app's own scripts. Times are ms since the file input's change event.
PROBE = """
(() => {
  document.addEventListener('change', e => {
    if (e.target.matches && e.target.matches('#upload input[type=file]'))
      window.__probe = {start: performance.now(), hadFile: false, key: '', done: false};
  }, true);
  // loaded, and what is painted at its centre is the element itself (or its thumbnail's caption), not an overlay
  const shown = el => {
    if (el.tagName === 'IMG' && !(el.complete && el.naturalWidth > 0)) return false;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) return false;
    const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return !!top && (el.closest('.thumbnail-item') || el).contains(top);
  };
  const tick = () => {
    const p = window.__probe;
    if (p && !p.done) {
      const t = performance.now() - p.start;
      const own = [...document.querySelectorAll('#own-gallery img')];
      const nb = [...document.querySelectorAll('#neighbour-gallery img')];
      if (p.summary == null && [...document.querySelectorAll('#summary h3')].some(shown)) p.summary = t;
      if (p.ownDom == null && own.length) p.ownDom = t;
      const ownShown = own.filter(shown).length, nbShown = nb.filter(shown).length;
      // Gradio's progress overlay comes back with every progress step: an image may flash and be covered again.
      // (b) is when the own images became visible for good; the first flash and the times covered are kept too.
      if (ownShown && p.since == null) { p.since = t; if (p.flash == null) p.flash = t; }
      if (!ownShown && p.since != null) { p.since = null; p.covered = (p.covered || 0) + 1; }
      const key = `${ownShown}/${own.length} ${nbShown}/${nb.length}`;
      if (key !== p.key) { p.key = key; p.changed = t; }
      // app.py's last step (forget_upload) empties the upload box: the drop-zone text comes back
      const empty = !!document.querySelector('#upload [data-testid=upload-text]');
      p.hadFile = p.hadFile || !empty;
      const toast = document.querySelector('[data-testid=toast-body]');
      if (toast) { p.error = toast.innerText.trim(); p.done = true; }
      else if (p.hadFile && empty && p.summary != null && ownShown === own.length && nbShown === nb.length) {
        Object.assign(p, {first: p.since, all: p.changed, own: own.length, neighbours: nb.length, done: true});
      }
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();
"""


def upload_files() -> list[Path]:
    """Examples and shipped sample LoRAs interleaved (trees alternating), so that any N covers both kinds."""
    examples = sorted((BUNDLE / "examples").glob("*.safetensors"))
    per_tree = [sorted(d.glob("*.safetensors"))[:2] for d in sorted(BUNDLE.glob("*/samples"))]
    samples = [f for pair in zip_longest(*per_tree) for f in pair if f]
    return [f for pair in zip_longest(examples, samples) for f in pair if f]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, workdir: Path, warm: bool, timeout: float = 900) -> subprocess.Popen:
    """`python app.py` as a user runs it (shipped bundle, offline), returned once its page answers — and, with
    ``warm``, once its start-up warm-up has drawn the known models' samples (a server is up before its visitors)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_TEMP_DIR": str(workdir / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PROBEX_WARM_SAMPLES": "1" if warm else "0"}
    log = workdir / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            up = httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            up = False
        if up and (not warm or "warm-up:" in log.read_text()):
            return process
        time.sleep(0.5)
    process.terminate()
    sys.exit(f"app.py did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def one_upload(context, url: str, file: Path, shots: Path | None = None) -> dict:
    """A fresh page, one file set on the upload input, the probe's times (ms) once everything is shown."""
    page = context.new_page()
    try:
        page.goto(url)
        # the page a person would drop onto: banner rendered, drop zone empty (Gradio keeps a connection open, so
        # Playwright's "networkidle" never comes)
        page.wait_for_selector("#banner :text('bundle')")
        page.wait_for_selector("#upload [data-testid=upload-text]")
        page.set_input_files("#upload input[type=file]", str(file))
        if shots:  # only on warm-ups: a screenshot costs CPU the measured uploads should not lose
            page.wait_for_function("window.__probe && (window.__probe.ownDom != null || window.__probe.done)",
                                   timeout=UPLOAD_TIMEOUT_MS)
            page.screenshot(path=str(shots / f"{file.stem}-own-in-dom.png"), full_page=True)
        page.wait_for_function("window.__probe && window.__probe.done", timeout=UPLOAD_TIMEOUT_MS, polling=100)
        if shots:
            page.screenshot(path=str(shots / f"{file.stem}-done.png"), full_page=True)
        return page.evaluate("window.__probe")
    finally:
        page.close()


def percentile(ms: list[float], q: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]  # nearest rank, as bench/app_latency.py


def machine() -> str:
    """Load average, and how much CPU niced jobs (background training on this shared machine) are taking."""
    ps = subprocess.run(["ps", "-eo", "ni=,pcpu="], capture_output=True, text=True).stdout.split()
    niced = [float(c) for n, c in zip(ps[::2], ps[1::2]) if n.lstrip("-").isdigit() and int(n) > 0]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {load} (1/5/15 min) · {len(niced)} niced processes at {sum(niced):.0f} % CPU (ps)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=10, help="measured uploads (after one warm-up per tree)")
    parser.add_argument("--port", type=int, default=None, help="port for app.py (default: a free one)")
    parser.add_argument("--screenshots", type=Path, default=None, help="save the warm-ups' pages here")
    args = parser.parse_args()
    files = upload_files()
    if not files:
        sys.exit(f"no example or sample LoRAs under {BUNDLE}")
    tree_of = {f: f.parent.parent.name if f.parent.name == "samples" else f.name.split("__")[0] for f in files}
    trees = {tree_of[f]: f for f in reversed(files)}
    warmups = [trees[t] for t in sorted(trees)]  # the first file of each tree
    print(f"{os.cpu_count()} CPUs, shared: niced background training runs on this machine and slows every figure")
    print(f"start: {machine()}")
    variants = {"without the warm-up": False, "with the start-up warm-up": True}
    results = {}
    for variant, warm in variants.items():
        print(f"\n{variant} (PROBEX_WARM_SAMPLES={int(warm)})")
        results[variant] = measure(files, warmups, args.uploads, args.port, warm,
                                   args.screenshots / variant.split()[0] if args.screenshots else None)
    print(f"end:   {machine()}")
    print(f"\n{'from setting the file on #upload to …':50} {'target':>8}" +
          "".join(f" {'p50 / p95 ms, ' + v.split()[0] + ' warm-up':>30}" for v in variants) + "  met")
    for key, name in [("summary", "(a) result summary shown"), ("first", "(b) own sample images shown for good"),
                      ("all", "(c) all images shown (own + neighbours)"),
                      ("ownDom", "    first own image in the DOM (not yet shown)"),
                      ("flash", "    first own image shown, even if covered again")]:
        target = TARGETS_S.get(key)
        cells, met = "", ""
        for variant in variants:
            ms = [r[key] for r in results[variant]]
            cells += f" {f'{statistics.median(ms):.0f} / {percentile(ms, 0.95):.0f}':>30}"
            if target:
                met += ("yes" if percentile(ms, 0.95) <= target * 1000 else "no") + " "
        print(f"{name:50} {f'≤ {target:.1f} s' if target else '':>8}{cells}  {met.strip()}")
    print(f"n = {args.uploads} uploads each; 'met' compares p95 with the target, without / with the warm-up")


def measure(files: list[Path], warmups: list[Path], uploads: int, port: int | None, warm: bool,
            shots: Path | None) -> list[dict]:
    """One app.py, one warm-up upload per tree (it loads the tree's pipeline), then ``uploads`` measured ones."""
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="probex-browser-bench-") as tmp:
        port = port or free_port()
        start = time.perf_counter()
        app = start_app(port, Path(tmp), warm)
        print(f"app.py answered{' and warmed up' if warm else ''} after {time.perf_counter() - start:.1f} s")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport=VIEWPORT)
                context.add_init_script(PROBE)
                url = f"http://127.0.0.1:{port}/"
                for f in warmups:
                    r = one_upload(context, url, f, shots)
                    print(f"first upload to its tree (loads the pipeline) {f.name}: summary {r.get('summary', 0):.0f} "
                          f"ms, own shown {r.get('first') or 0:.0f} ms, all {r.get('all', 0):.0f} ms {r.get('error', '')}")
                for i in range(uploads):
                    f = files[i % len(files)]
                    r = one_upload(context, url, f)
                    if r.get("error") or not r["own"]:
                        sys.exit(f"{f.name}: the page showed {r.get('error') or 'no samples of the LoRA'}")
                    rows.append(r)
                    print(f"  {i + 1:2d} {f.name:56} summary {r['summary']:5.0f} · own in DOM {r['ownDom']:5.0f} · "
                          f"first flash {r['flash']:5.0f} · shown {r['first']:5.0f} · all {r['all']:5.0f} ms "
                          f"({r['own']} own, {r['neighbours']} neighbours; own covered again "
                          f"{r.get('covered', 0)}×)")
                browser.close()
        finally:
            app.terminate()
            app.wait(30)
    return rows


if __name__ == "__main__":
    main()
