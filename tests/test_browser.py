"""The app in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): upload an example, see the
concepts, the neighbours' live samples and the map; a bad file shows a message and the page keeps working.
Screenshots go to the test's tmp dir, and also to $PROBEX_SCREENSHOT_DIR when set (for people to look at)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000  # first samples load the root pipeline; the shared 2-core machine may be busy

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (/usr/bin/chromium)")


@pytest.fixture(scope="module")
def app(running_app, built, tmp_path_factory):
    with running_app(built["bundle"], tmp_path_factory.mktemp("browser-app")) as running:
        yield running, built


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module: Playwright's sync API allows one instance per thread at a time."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def browser_page(browser, url: str):
    """A page on ``url``, 1400×1000, closed afterwards."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    yield page
    page.close()


@pytest.fixture(scope="module")
def page(app, browser):
    with browser_page(browser, app[0].url) as page:
        yield page


def search(page, text: str) -> None:
    page.get_by_role("tab", name="Search models by text").click()
    page.locator("#query textarea").fill(text)
    page.locator("#query textarea").press("Enter")


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("PROBEX_SCREENSHOT_DIR"):
        target = Path(os.environ["PROBEX_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def test_upload_shows_concepts_neighbours_and_map(zoo_file, page, app, tmp_path):
    running, built = app
    assert "profile emoji-mini" in page.locator("#banner").inner_text()
    example = zoo_file(built["zoos"]["tree-b"], "test", "apple")
    page.set_input_files("#upload input[type=file]", str(example))
    page.wait_for_selector("#summary h3:has-text('apple')")
    assert "tree-b" in page.locator("#summary").inner_text()
    page.wait_for_selector("#concepts .js-plotly-plot")
    assert "apple" in page.locator("#concepts").inner_text()
    page.wait_for_function("document.querySelectorAll('#neighbour-gallery img').length >= 1")
    page.wait_for_function("document.querySelectorAll('#own-gallery img').length >= 4")
    assert page.locator("#neighbours").inner_text().count("apple") >= 1
    screenshot(page, tmp_path, "identify")

    page.locator("#label-input textarea").fill("rocket, apple, tiger")
    page.locator("#label-input textarea").press("Enter")
    page.wait_for_selector("#label-plot .js-plotly-plot")
    assert "rocket" in page.locator("#label-plot").inner_text()

    page.get_by_role("tab", name="Map").click()
    page.wait_for_selector("#map .js-plotly-plot :text('your LoRA')")   # placed by its own step after the summary
    screenshot(page, tmp_path, "map")
    # the upload is gone from the server once its request (results, samples) is done
    assert running.uploads_left() == []


def test_a_bad_file_shows_a_message_and_the_page_keeps_working(page, tmp_path, app):
    junk = tmp_path / "broken.safetensors"
    junk.write_bytes(b"\x00" * 64)
    page.get_by_role("tab", name="Identify a LoRA").click()
    page.set_input_files("#upload input[type=file]", str(junk))
    message = page.get_by_text("broken.safetensors: the header is not valid JSON")  # the error, word for word
    message.wait_for()
    assert message.is_visible()
    screenshot(page, tmp_path, "error")
    search(page, "tiger")
    page.wait_for_function("document.querySelectorAll('#search-gallery img').length >= 1")
    assert "tiger" in page.locator("#search-table").inner_text()
    screenshot(page, tmp_path, "search")


SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "emoji-mini"


@pytest.fixture(scope="module")
def shipped_page(running_app, browser, tmp_path_factory):
    """The committed bundle that app.py serves by default, in its own app and page."""
    with running_app(SHIPPED, tmp_path_factory.mktemp("shipped-app")) as running, \
            browser_page(browser, running.url) as page:
        yield page


def test_a_held_out_class_lora_is_told_it_looks_unlike_every_known_class(shipped_page, tmp_path):
    """A LoRA of a class without known models (bomb) that is not itself in the gallery — the shipped example with
    noise on its up factors, as another training run of it would differ: its class leads, read from text, and the
    summary says the LoRA looks unlike every known class."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    page = shipped_page
    source = SHIPPED / "examples" / "emoji-root-1__test_holdout__model_idx_0903.safetensors"
    with safe_open(str(source), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(0)
    example = tmp_path / "another_bomb.safetensors"
    save_file({k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if "lora_B" in k else v
               for k, v in tensors.items()}, str(example), metadata=metadata)
    page.set_input_files("#upload input[type=file]", str(example))
    page.wait_for_selector("#summary h3:has-text('bomb')")
    assert "looks unlike every known class" in page.locator("#summary").inner_text()
    page.wait_for_selector("#concepts .js-plotly-plot")
    assert "bomb · unseen" in page.locator("#concepts").inner_text()
    screenshot(page, tmp_path, "unseen_class")


def test_a_description_finds_models_of_its_class_in_the_browser(shipped_page, tmp_path):
    page = shipped_page
    search(page, "a planet with rings around it")
    page.wait_for_selector("#search-table:has-text('ringed planet')")
    assert "ringed planet" in page.locator("#search-reading").inner_text()
    screenshot(page, tmp_path, "search_description")
    search(page, "a carved pumpkin for halloween")   # found through the class's keywords, not its name
    page.wait_for_selector("#search-table:has-text('jack-o-lantern')")
    assert "jack-o-lantern" in page.locator("#search-reading").inner_text()
    assert "none of them can be drawn" not in page.locator("#search-gallery").inner_text()  # not the last search's
    page.wait_for_function("document.querySelectorAll('#search-gallery img').length >= 1")
    screenshot(page, tmp_path, "search_keywords")
