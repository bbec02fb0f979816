"""ProbeX Studio — the Gradio app. Wiring only: every answer comes from ``probex.service``.

Run locally with ``python app.py`` (the embedded emoji-mini bundle, CPU, offline); the same file runs as a Hugging Face
Space. ``PROBEX_PROFILE`` / ``PROBEX_BUNDLE`` pick what is loaded; the banner says what is running.

Uploaded files live only for the request that reads them: after the results and samples are drawn, the upload (or
the downloaded link) and the generated card file are deleted. Shipped examples are read in place and never deleted.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import inspect
import io
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# per-request library chatter (diffusers notes on every LoRA load, weight-loading bars) would bury the server log
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gradio as gr  # noqa: E402  (after the logging settings, which libraries read at import)
from gradio.exceptions import InvalidPathError  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402
from gradio_client.utils import is_file_obj_with_meta, is_http_url_like, traverse  # noqa: E402

from probex import fetch  # noqa: E402
from probex.card import as_text  # noqa: E402
from probex.errors import InputError, ProbexError, first_line  # noqa: E402
from probex.plots import concept_bars  # noqa: E402
from probex.request_files import RequestFiles  # noqa: E402
from probex.service import FETCH_TIMEOUT_S, MAX_UPLOAD_BYTES, check_top_k, load_with_fallback  # noqa: E402
from probex.weights import short  # noqa: E402

try:  # on a ZeroGPU Space, generation runs inside a GPU allocation; elsewhere the decorator is a no-op
    import spaces

    on_gpu, ZERO_GPU = spaces.GPU(duration=120), True
except ImportError:
    def on_gpu(fn):
        return fn
    ZERO_GPU = False

STUDIO, NOTICE = load_with_fallback()
NEIGHBOURS_DRAWN = 4      # nearest models shown with live samples
UPLOAD_SAMPLES = 4        # images of "what does your LoRA draw"
CONCURRENCY = int(os.environ.get("PROBEX_CONCURRENCY", "2"))  # requests running at once; the rest wait in the queue
# uploads, downloads and card files are deleted this long after the last request using them is done
FILES = RequestFiles(grace_s=float(os.environ.get("PROBEX_UPLOAD_GRACE_S", "60")))
# Gradio's own cache (sample PNGs, card copies, uploads it keeps) is swept every CACHE_TTL_S / 3 of files older than it
CACHE_TTL_S = int(os.environ.get("PROBEX_CACHE_TTL_S", "900"))
LOG = logging.getLogger("probex.app")
# An upload's own samples start drawing here as soon as it is identified, while the page shows the summary and asks
# for them (a follow-up event). Not on ZeroGPU, where drawing must run inside the GPU step.
OWN_SAMPLES = None if ZERO_GPU else concurrent.futures.ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="own-samples")
KNOWN_IMAGES = Path(tempfile.mkdtemp(prefix="probex-known-images-"))  # image_file's default folder


@dataclass
class Request:
    """What one identification leaves for its follow-up steps (samples, labels, map), kept in gr.State."""

    analysis: object = None
    lora: str | None = None                     # the file the LoRA's own samples are drawn from
    neighbours: list[dict] = field(default_factory=list)
    owned: list[str] = field(default_factory=list)   # paths this request must delete when it is done
    own_samples: concurrent.futures.Future | None = None   # the LoRA's own images, drawing since identify


def need_studio():
    if STUDIO is None:
        raise gr.Error(NOTICE, duration=None)
    return STUDIO


def answers(fn=None, *, prefix: str = ""):
    """Every handler's one error path: the user's mistakes come back as their one line (after ``prefix``), anything
    else as one line naming the failure (logged with its traceback here), never as Gradio's message-less "Error".
    Streaming handlers (generators) get the same around every step. ``@answers`` or ``@answers(prefix=…)``."""
    if fn is None:
        return functools.partial(answers, prefix=prefix)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            with one_line_errors(prefix):
                yield from fn(*args, **kwargs)
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors(prefix):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def one_line_errors(prefix: str = ""):
    try:
        yield
    except ProbexError as err:
        raise gr.Error(f"{prefix}{err}", duration=12) from None
    except gr.Error:
        raise
    except Exception as err:  # noqa: BLE001 — the contract: one line to the client
        LOG.exception("request failed")
        raise gr.Error(f"unexpected {type(err).__name__}: {first_line(err)} (please report this)") from None
    finally:
        give_back_memory()


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


GLIBC = _glibc()
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_KB = int(os.environ.get("PROBEX_MMAP_THRESHOLD_KB", "128"))  # 0: glibc's own (dynamic) threshold
if GLIBC is not None and MMAP_THRESHOLD_KB > 0:
    # tensors above the threshold get their own mmap, given back to the OS when freed. glibc otherwise raises the
    # threshold after each large free, so later tensors land in per-thread heaps that concurrent requests fragment
    # and resident memory creeps up (bench/load.py --compare measures both)
    GLIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_KB * 1024)


def give_back_memory() -> None:
    """Return freed heap pages to the OS after a request: concurrent requests leave glibc's heaps fragmented, and a
    long-running Space's resident memory otherwise creeps up (bench/load.py prints it per round)."""
    if GLIBC is not None:
        GLIBC.malloc_trim(0)


# ----------------------------------------------------------------------------------------------- identify
def identify(path: str, owned: list[str], top_k: int):
    """Read, route, encode → summary, concept bars, neighbour table, card: one analysis and one prediction, which
    the card and neighbours reuse (the map follows in its own step, ``map_upload``: the summary does not wait for
    it). ``owned``: this request's files, released for deletion when the request is done (or now, if it fails)."""
    studio = need_studio()
    top_k = check_top_k(top_k)
    FILES.hold(*owned)
    try:
        analysis = studio.analyse(path)
        result = studio.predict(analysis, top_k=top_k)
        card_dir = tempfile.mkdtemp(prefix="probex-card-")
        FILES.hold(card_dir)
        owned = [*owned, card_dir]
        card_path = Path(card_dir) / "README.md"
        card_path.write_text(studio.model_card(analysis, prediction=result))
        neighbours = [] if analysis.negligible else studio.drawable_neighbors(analysis, NEIGHBOURS_DRAWN)
    except BaseException:
        FILES.release(*owned)
        raise
    early = OWN_SAMPLES.submit(studio.samples, path, n=UPLOAD_SAMPLES, analysis=analysis) if OWN_SAMPLES else None
    request = Request(analysis, path, neighbours, owned, early)
    title = ("Top concepts (read from their captions)" if result["score_unit"] == "cosine" else
             "Top concepts (known: models' mean · unseen: text)")
    marked = [{**c, "name": c["name"] + (" · unseen" if c.get("known") is False and result["score_unit"] == "z" else "")}
              for c in result["classes"]]   # classes read from text alone, beside classes with known models
    bars = None if result["notice"] else concept_bars(marked, title, score_label=SCORE_LABELS[result["score_unit"]])
    return (summary_markdown(result, analysis.layers), gr.update(value=bars, visible=bars is not None),
            model_rows(result["neighbors"], False), str(card_path), card_path.read_text(), request,
            gr.update(visible=True))


SCORE_LABELS = {"z": "score (z: cosine above its usual on known models)", "cosine": "cosine to the caption",
                "probability": "probability"}


@answers
def identify_upload(file: str | None, top_k: int):
    if not file:
        raise gr.Error("Drop a .safetensors LoRA file first.")
    file = uploaded_path(file)
    return identify(file, [file], top_k)


FILE_ARGUMENT = ("file must be a .safetensors file uploaded to this app (gradio_client: handle_file(path)); paths "
                 "on the server are not accepted, and links go to /predict_link")


def uploaded_path(file) -> str:
    """The path of one file a client uploaded (Gradio keeps each as <upload folder>/<hash>/<name>), else a one-line
    refusal. Gradio itself only checks that a path lies inside its upload folder; the request's files are deleted
    afterwards, so the folder itself, a hash folder, a link or anything but a regular file is refused here."""
    path = file if isinstance(file, str) else file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
    if not isinstance(path, str) or not path or is_http_url_like(path):
        raise InputError(FILE_ARGUMENT)
    try:
        inside = Path(path).resolve().relative_to(Path(get_upload_folder()).resolve())
    except (ValueError, OSError):
        raise InputError(FILE_ARGUMENT) from None
    if len(inside.parts) < 2 or Path(path).is_symlink() or not Path(path).is_file():
        raise InputError(FILE_ARGUMENT)
    return path


@answers
def identify_link(link: str, top_k: int):
    check_top_k(top_k)
    fetched = fetch_link(link)
    return identify(str(fetched.path), [str(fetched.directory)], top_k)


def fetch_link(link) -> object:
    """The link / Hub id checked and fetched into a temp dir (probex.fetch's rules), or a one-line refusal."""
    if not isinstance(link, str) or not link.strip():
        raise InputError("paste a Hub repo id (user/name) or an https:// link first")
    if len(link) > 2048:
        raise InputError(f"the link is {len(link):,} characters; links and Hub ids are at most 2,048")
    return fetch.fetch_to_temp(link.strip(), max_bytes=MAX_UPLOAD_BYTES, timeout=FETCH_TIMEOUT_S)


@answers
def identify_example(index: int, top_k: int):
    examples = need_studio().examples()
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(examples):
        raise InputError(f"unknown example {short(index)}: pick one of the {len(examples)} shipped examples")
    return identify(str(examples[index]["path"]), [], top_k)  # shipped files: never deleted


# on_gpu outermost: errors are already one-line gr.Errors when they leave the GPU worker
@on_gpu
@answers(prefix="Samples could not be drawn: ")
def draw_samples(request: Request | None):
    """Images of the uploaded LoRA and of its nearest known models, drawn live by the tree's root pipeline and shown
    as they come: the LoRA's own first, then each neighbour. A neighbour whose file does not ship is drawn from a
    shipped model of its class, and its caption says so."""
    if request is None or request.analysis is None:
        yield gr.skip(), gr.skip()
        return
    studio = need_studio()
    own, neighbours = [], []
    if request.lora and Path(request.lora).exists():
        own_dir = tempfile.mkdtemp(prefix="probex-own-")   # this request's images: deleted with its other files
        FILES.hold(own_dir)
        request.owned.append(own_dir)
        images = (request.own_samples.result() if request.own_samples
                  else studio.samples(request.lora, n=UPLOAD_SAMPLES, analysis=request.analysis))
        own = [(image_file(im, Path(own_dir)), f"seed {i}") for i, im in enumerate(images)]
        yield own, list(neighbours)
    for i, n in enumerate(request.neighbours, start=1):
        image = studio.samples(n["id"], n=1, tree=n["tree"])[0]
        neighbours.append((image_file(image), f"{n['class']} {n['score']:.2f}" + stand_in_note(studio, n)))
        yield own, list(neighbours)
    if not own and not neighbours:
        yield own, neighbours


def image_file(image, folder: Path | None = None) -> str:
    """A drawn image as a PNG file named by its content, written once, by rename. Galleries get files, not PIL
    images: Gradio saves a PIL image into its cache again at every streamed update, rewriting in place the file a
    browser may still be fetching from the last update (which then gets a truncated image); a file it copies into
    its cache once, atomically. ``folder``: default the known models' images (a bounded set: the shipped samples)."""
    folder = folder or KNOWN_IMAGES
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        staging = folder / f".{path.name}.{uuid.uuid4().hex}"
        staging.write_bytes(data)
        os.replace(staging, path)
    return str(path)


def stand_in_note(studio, model: dict) -> str:
    """Said under a picture drawn by another shipped LoRA of the model's class (its own file does not ship)."""
    return "" if studio.sample_source(model["tree"], model["id"]) == model["id"] else " · drawn by a stand-in of its class"


def forget_upload(request: Request | None):
    """The request is over: release what it owned (upload, download, card file) for deletion; clear the upload box."""
    if request is not None:
        FILES.release(*request.owned)
        request.owned, request.lora = [], None
    return request, None


# --------------------------------------------------------------------------------------------- follow-ups
@answers
def custom_labels(request: Request | None, labels: str):
    if request is None or request.analysis is None:
        raise gr.Error("Identify a LoRA first, then score it against your own labels.")
    scores = need_studio().zero_shot(request.analysis, labels)
    return gr.update(value=concept_bars(scores, "Your labels", score_label="cosine score"), visible=True)


@answers
def run_search(text: str, top_k: int, request: Request | None):
    studio = need_studio()
    result = studio.search(text, top_k=check_top_k(top_k))
    figure = studio.map_figure(request.analysis if request else None, query=text,
                               tree=result["models"][0]["tree"] if result["models"] else None)
    # the previous search's images and label go at once: they would stand over this one's table while it draws
    return (model_rows(result["models"], True), figure, result["models"], reading_markdown(result["read_as"]),
            gr.update(value=[], label="best matches, drawn live"))


def reading_markdown(read_as: list[dict]) -> str:
    """Which search ran: the text read as known classes (text to text), or by the weights alone."""
    if not read_as:
        return "No known class is close to this text: the models below are found by their weights alone."
    classes = ", ".join(f"**{r['class']}** ({r['similarity']:.2f})" for r in read_as)
    return f"Read as {classes}: models of {'this class' if len(read_as) == 1 else 'these classes'} first."


@on_gpu
@answers(prefix="Samples could not be drawn: ")
def draw_search_samples(models: list[dict] | None):
    if not models:
        return []
    studio = need_studio()
    images, drawn = [], studio.drawable(models, NEIGHBOURS_DRAWN)  # held-out-class models ship no LoRA to draw
    if not drawn:
        return gr.update(value=[], label="best matches: none of them can be drawn (their class ships no LoRA)")
    for m in drawn:
        images.append((image_file(studio.samples(m["id"], n=1, tree=m["tree"])[0]),
                       f"{m['class']} {m['score']:.2f}" + stand_in_note(studio, m)))
    return gr.update(value=images, label="best matches, drawn live")


@answers
def show_map(query: str, request: Request | None):
    return need_studio().map_figure(request.analysis if request else None, query=query or None)


@answers
def map_upload(query: str, request: Request | None):
    """The map with the identified LoRA placed (and the map tab's text, if any): a step of its own after identify,
    beside the samples, since building and sending the figure held the summary back. No map for a tree without
    known models."""
    studio = need_studio()
    if request is None or request.analysis is None:
        return gr.skip()
    return show_map(query, request) if studio.has_gallery(request.analysis.tree) else None


# ------------------------------------------------------------------------------------------ API endpoints
@answers
def api_predict(file: gr.FileData, top_k: int = 5) -> dict:
    """Tree, router confidence, top-k concepts and nearest known models of a .safetensors LoRA."""
    top_k = check_top_k(top_k)
    path = uploaded_path(file)
    with FILES.holding(path):  # deleted once no request uses it (identical uploads share one path)
        return need_studio().predict(path, top_k=top_k)


@answers
def api_predict_link(link: str, top_k: int = 5) -> dict:
    """The same answer as /predict for an https link or a Hub repo id (user/name[/file.safetensors]); the download is
    deleted afterwards."""
    top_k = check_top_k(top_k)
    fetched = fetch_link(link)
    try:
        return need_studio().predict(fetched.path, top_k=top_k)
    finally:
        fetched.cleanup()


@answers
def api_search(text: str, top_k: int = 5) -> dict:
    """Known models whose weights best match a text."""
    return need_studio().search(text, top_k=check_top_k(top_k))


# ------------------------------------------------------------------------------------------ presentation
def summary_markdown(result: dict, layers: list[str]) -> str:
    top = result["classes"][0] if result["classes"] else {"name": "—", "score": 0.0}
    confidence = result["router"]["confidence"]
    sure = "sure" if confidence >= 0.5 else ("fairly sure" if confidence >= 0.2 else "unsure")
    headline = (f"### No concept: {result['notice'][:1].upper()}{result['notice'][1:]}.\n" if result.get("notice")
                else f"### Most likely concept: **{top['name']}**\n")
    novelty = result.get("novelty")
    if novelty and novelty["unlike_known"] and not result.get("known_as"):
        why = (f"a class without known models, read from its text, scores above every known class (best known: "
               f"{novelty['best_known']})" if novelty["test"] == "unseen class first" else
               f"nearest training model at cosine {novelty['nearest_known_cosine']:.2f}, below the "
               f"{novelty['threshold']:.2f} that 95 % of validation models reach")
        headline += (f"**This LoRA looks unlike every known class** ({why}): its concept is likely none of the known "
                     "ones — the list leads with classes read from text; try your own labels below.  \n")
    known = result.get("known_as")
    if known:
        headline += (f"This file is known model `{known['id']}` ({known['class']}, {known['split']} split) of the "
                     f"gallery (read at cosine {known['score']:.4f}): its first neighbour below is itself.  \n")
    return (headline +
            f"Tree **{result['tree']}** (base model `{result['base_model']}`), the router is {sure} "
            f"(confidence {confidence:.2f}).  \n"
            f"`{result['file']}` · {result['description']} · {expert_layers(layers)}"
            + expert_markdown(result))


def expert_markdown(result: dict) -> str:
    """Which expert read the file and, for a reader that takes the file's trigger, with which prompt."""
    if not result.get("instance_prompt"):
        return ""
    source = ("the file names none: the default" if result["prompt_source"] == "default"
              else f"from the file's `{result['prompt_source']}`")
    unknown = "" if result["neighbors"] else " This tree has no known models: no neighbours, map or search."
    return (f"  \n{result['expert'][:1].upper()}{result['expert'][1:]}.  \n"
            f"Instance prompt “{as_text(result['instance_prompt'])}” ({source}).{unknown}")


def expert_layers(names: list[str]) -> str:
    """One layer by name; several as a count and what they share ("7 layers …attn2.to_v")."""
    if len(names) == 1:
        return f"expert layer `{names[0]}`"
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*(reversed(p) for p in parts)):
        if len(set(column)) > 1:
            break
        common.insert(0, column[0])
    return f"expert reads {len(names)} layers" + (f" `…{'.'.join(common)}`" if common else "")


def model_rows(models: list[dict], with_tree: bool) -> list[list]:
    """Table rows; the tree column only where results can come from several trees (search)."""
    return [[m["class"], round(m["score"], 3), m["id"], m.get("split", "")] + ([m.get("tree", "")] if with_tree else [])
            for m in models]


def banner_markdown() -> str:
    if STUDIO is None:
        return f"⚠️ **No model bundle is loaded.** {NOTICE}"
    readers = "".join(f"  \nℹ️ Tree {t}: {STUDIO.expert_note(t)}." for t in STUDIO.training_free_trees())
    ready = f"🟢 {STUDIO.describe_bundle()}{readers}"
    return f"⚠️ {NOTICE}  \n{ready}" if NOTICE else ready


HEADER = """
# 🌳 ProbeX Studio
**Drop a LoRA and learn what it is from its weights alone** — which base model it was fine-tuned from, which concept it
was trained on (zero-shot, from text), and which known models are its nearest relatives. No images needed: the
weights are read by a tree expert ([ProbeX](https://arxiv.org/abs/2410.13569), CVPR 2025).
"""

CLIENT_EXAMPLE = """
```python
from gradio_client import Client, handle_file
client = Client("http://127.0.0.1:7860/")          # or the Space id
print(client.predict(handle_file("my_lora.safetensors"), 5, api_name="/predict"))
print(client.predict("user/name", 5, api_name="/predict_link"))   # a Hub repo id or an https link
print(client.predict("a striped wild cat", 5, api_name="/search"))
```
"""

CSS = """
.banner {border-radius: 10px; padding: 2px 14px; background: #f1f5f9; font-size: 0.9em}
.banner.warn {background: #fef3c7}
#summary h3 {margin-top: 0}
.pixel img {image-rendering: pixelated}
footer {opacity: 0.7}
"""

MODEL_HEADERS = ["class", "similarity", "model id", "split"]
START_HINT = ("👈 **Drop a LoRA**, paste a Hub id or link, or **click an example** — the tree, the concepts and the "
              "nearest known models appear here in a moment.")


# ---------------------------------------------------------------------------------------------------- UI
class StudioBlocks(gr.Blocks):
    """gr.Blocks whose own argument checks reach the client as one line. Gradio refuses a file path that was not
    uploaded, or a call with too few arguments, before any handler runs, with an exception it does not show
    (show_error stays off: other internals stay hidden), so the client got an error without a message. A link sent
    as a file would be downloaded by Gradio, past the upload cap: links go to /predict_link."""

    def validate_inputs(self, block_fn, inputs):
        try:
            super().validate_inputs(block_fn, inputs)
        except ValueError as err:
            raise gr.Error(first_line(err), duration=12) from None

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        def no_links(file: dict) -> dict:
            if not isinstance(file.get("path"), str) or is_http_url_like(file["path"]):
                raise gr.Error(FILE_ARGUMENT, duration=12)
            return file

        traverse(inputs, no_links, is_file_obj_with_meta)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except InvalidPathError:
            raise gr.Error(FILE_ARGUMENT, duration=12) from None


def build_demo() -> gr.Blocks:
    examples = STUDIO.examples() if STUDIO else []
    with StudioBlocks(title="ProbeX Studio", delete_cache=(max(60, CACHE_TTL_S // 3), CACHE_TTL_S)) as demo:
        gr.Markdown(HEADER)
        gr.Markdown(banner_markdown(), elem_classes=["banner"] + ([] if STUDIO else ["warn"]), elem_id="banner")
        request = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Identify a LoRA", id="identify"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=300):
                        upload = gr.File(label="Drop a .safetensors LoRA", file_types=[".safetensors"],
                                         file_count="single", type="filepath", height=120, elem_id="upload")
                        with gr.Row():
                            link = gr.Textbox(label="…or a Hub repo id / https link", scale=4,
                                              placeholder="user/name  or  https://…/lora.safetensors")
                            fetch_btn = gr.Button("Fetch", scale=1, min_width=80)
                        top_k = gr.Slider(1, 20, value=5, step=1, label="how many concepts and neighbours")
                        example_set = gr.Dataset(
                            label="…or try a shipped example", components=[gr.Textbox(visible=False)],
                            samples=[[e["label"]] for e in examples], type="index", layout="table",
                            samples_per_page=12, elem_id="examples")
                    with gr.Column(scale=3, min_width=400):
                        summary = gr.Markdown(START_HINT, elem_id="summary")
                        concepts = gr.Plot(label="concepts", show_label=False, elem_id="concepts", visible=False)
                with gr.Column(visible=False) as details:
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3):
                            gr.Markdown("#### Nearest known models, drawn live\n"
                                        "The tree's root with the model's LoRA (or, where that file does not "
                                        "ship, a shipped LoRA of the same class). Held-out classes ship no LoRA: "
                                        "their models are skipped here, so these are the nearest that can be "
                                        "drawn.")
                            neighbour_gallery = gr.Gallery(show_label=False, columns=4, height=230, format="png",
                                                           object_fit="contain", elem_id="neighbour-gallery",
                                                           elem_classes=["pixel"])
                            neighbours = gr.Dataframe(headers=MODEL_HEADERS, interactive=False, wrap=True,
                                                      elem_id="neighbours")
                        with gr.Column(scale=2):
                            gr.Markdown("#### What does your LoRA draw?")
                            own_gallery = gr.Gallery(show_label=False, columns=4, height=230, format="png",
                                                     object_fit="contain", elem_id="own-gallery",
                                                     elem_classes=["pixel"])
                            gr.Markdown("#### Score it against your own labels")
                            with gr.Row():
                                labels = gr.Textbox(show_label=False, placeholder="tiger, lion, house cat", scale=4,
                                                    elem_id="label-input")
                                labels_btn = gr.Button("Score", scale=1, min_width=80)
                            label_plot = gr.Plot(show_label=False, visible=False, elem_id="label-plot")
                    with gr.Accordion("Draft model card (README.md for the Hub)", open=False):
                        card_file = gr.DownloadButton("Download README.md", variant="primary")
                        card_preview = gr.Markdown()
            with gr.Tab("Search models by text", id="search"):
                with gr.Row():
                    query = gr.Textbox(label="Describe what a model should draw", scale=4,
                                       placeholder="a striped wild cat", elem_id="query")
                    search_k = gr.Slider(1, 20, value=5, step=1, label="results", scale=1)
                    search_btn = gr.Button("Search", variant="primary", scale=1)
                gr.Markdown("Your text is first compared with the known class names and their keywords; models of "
                            "the classes it reads as come first, each ordered by how well its weights match. Score: "
                            "how much more a model matches than it usually matches the tree's class names (z). The "
                            "query is also placed on the **Map** tab.")
                search_reading = gr.Markdown(elem_id="search-reading")
                search_gallery = gr.Gallery(label="best matches, drawn live", columns=6, height=220, format="png",
                                            object_fit="contain", fit_columns=False, elem_classes=["pixel"],
                                            elem_id="search-gallery")
                search_table = gr.Dataframe(headers=["class", "score (z)", "model id", "split", "tree"],
                                            interactive=False, wrap=True,
                                            elem_id="search-table")
                search_models = gr.State([])
            with gr.Tab("Map", id="map"):
                gr.Markdown("Every known model of the tree at its place in the weight–text space (UMAP of the "
                            "expert's encodings). Your LoRA ★ and a text ◆ are placed without refitting the map.")
                with gr.Row():
                    map_query = gr.Textbox(show_label=False, placeholder="place a text on the map, e.g. a fruit",
                                           scale=4)
                    map_btn = gr.Button("Place", scale=1)
                weight_map = gr.Plot(show_label=False, elem_id="map",
                                     value=STUDIO.map_figure() if STUDIO and STUDIO.has_gallery() else None)
            with gr.Tab("How it works & API", id="about"):
                gr.Markdown(ABOUT + CLIENT_EXAMPLE)

        identify_outputs = [summary, concepts, neighbours, card_file, card_preview, request, details]

        def then_draw_and_forget(event):
            # "minimal": no overlay; the full one covered the LoRA's own images while the neighbours were drawn
            event.success(draw_samples, request, [own_gallery, neighbour_gallery], api_visibility="private",
                          show_progress="minimal") \
                 .then(forget_upload, request, [request, upload], api_visibility="private")
            event.success(map_upload, [map_query, request], weight_map, api_visibility="private",
                          show_progress="hidden")
            event.failure(lambda: None, None, upload, api_visibility="private")

        # identify: a small progress mark, not the overlay over every output: the page took a while to clear the
        # overlay before it showed the summary (docs/RESULTS.md, browser latency)
        then_draw_and_forget(upload.upload(identify_upload, [upload, top_k], identify_outputs,
                                           api_visibility="private", show_progress="minimal"))
        then_draw_and_forget(gr.on([fetch_btn.click, link.submit], identify_link, [link, top_k], identify_outputs,
                                   api_visibility="private", show_progress="minimal"))
        then_draw_and_forget(example_set.click(identify_example, [example_set, top_k], identify_outputs,
                                               api_visibility="private", show_progress="minimal"))
        gr.on([labels_btn.click, labels.submit], custom_labels, [request, labels], label_plot,
              api_visibility="private")
        gr.on([search_btn.click, query.submit], run_search, [query, search_k, request],
              [search_table, weight_map, search_models, search_reading, search_gallery], api_visibility="private") \
            .success(draw_search_samples, search_models, search_gallery, api_visibility="private", show_progress="minimal")
        gr.on([map_btn.click, map_query.submit], show_map, [map_query, request], weight_map,
              api_visibility="private")
        gr.api(api_predict, api_name="predict")
        gr.api(api_predict_link, api_name="predict_link")
        gr.api(api_search, api_name="search")
    return demo


ABOUT = """
### How it works
1. **Route.** Most public models are fine-tuned from a few base models: they form *Model Trees*. A router compares
   one layer of your LoRA with the centre of every tree it knows and picks the nearest.
2. **Encode.** That tree's expert reads the LoRA straight from its low-rank factors and maps it into a space shared
   with text. The paper's ProbeX reads one layer with learned probes. The offline emoji trees' expert learns nothing:
   it runs the root's cross-attention blocks on fixed synthetic image features and the training prompt, once with the
   LoRA's changes and once with a caption instead of the prompt, and compares how the two move the blocks' outputs.
3. **Compare.** Concepts are the texts closest to the LoRA's encoding — any text, so labels it never saw work too
   (zero-shot). Neighbours are known models with the closest encodings; their samples are drawn live by the tree's
   base model with their LoRA loaded through diffusers.

Accepted: `.safetensors` LoRAs in diffusers/peft, Model-J and kohya formats. Pickled `.ckpt/.bin/.pt` files are
refused, never opened. Uploads are deleted after each request.

### Use it from Python
"""


def warm_samples() -> None:
    """Known models' samples drawn before visitors ask for them (neighbour galleries then show at once); a failure
    here only means they are drawn on first use, as without the warm-up."""
    try:
        drawn = STUDIO.warm_samples()
        print(f"warm-up: {drawn} known models' samples drawn", flush=True)  # the server log, beside Gradio's lines
    except Exception:  # noqa: BLE001 — a background nicety must never take the server down
        LOG.exception("warm-up of known models' samples failed; they are drawn on first use")


def main() -> None:
    # emoji roots draw a sample in a fraction of a second on a CPU; an SD 1.5 bundle's would take minutes
    if STUDIO is not None and STUDIO.profile.pipeline == "emoji" and os.environ.get("PROBEX_WARM_SAMPLES", "1") != "0":
        threading.Thread(target=warm_samples, name="warm-samples", daemon=True).start()
    demo = build_demo()
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=256)
    theme = gr.themes.Soft(primary_hue="rose", secondary_hue="slate",
                           font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
    demo.launch(theme=theme, css=CSS,
                max_file_size=MAX_UPLOAD_BYTES, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
