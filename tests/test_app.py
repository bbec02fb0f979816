"""The Gradio app as a client sees it: `python app.py` launched on a free localhost port against the test bundle,
called through gradio_client's named endpoints `predict` and `search`. A failing request answers with the error
and the app keeps serving; uploads do not stay on disk after their request."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app(running_app, built, tmp_path_factory):
    with running_app(built["bundle"], tmp_path_factory.mktemp("app")) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def test_named_endpoints(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/search"} <= set(named)


def test_predict_on_a_shipped_example(client, built):
    from gradio_client import handle_file
    from safetensors import safe_open

    examples = sorted((built["bundle"] / "examples").glob("*.safetensors"))
    assert len(examples) == 6   # train_bundle ships three test models of each tree
    for example in examples:
        with safe_open(str(example), framework="pt") as f:
            truth = f.metadata()["class_name"]
        result = client.predict(handle_file(str(example)), 5, api_name="/predict")
        assert {"tree", "layer", "router", "classes", "neighbors"} <= set(result)
        assert truth in [c["name"] for c in result["classes"]], (example.name, result["classes"])


def test_search(client):
    result = client.predict("tiger", 3, api_name="/search")
    assert len(result["models"]) == 3 and result["models"][0]["class"] == "tiger"


def test_a_bad_upload_is_an_error_and_the_app_keeps_serving(zoo_file, client, app, tmp_path, built):
    from gradio_client import handle_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a safetensors file" * 20)
    with pytest.raises(Exception) as err:
        client.predict(handle_file(str(junk)), 5, api_name="/predict")
    assert "junk.safetensors" in str(err.value)
    assert app.process.poll() is None
    path = zoo_file(built["zoos"]["tree-b"], "test", "lion")
    assert client.predict(handle_file(str(path)), 5, api_name="/predict")["tree"] == "tree-b"


def test_uploads_are_not_kept_after_the_request(zoo_file, client, app, built):
    from gradio_client import handle_file

    client.predict(handle_file(str(zoo_file(built["zoos"]["tree-a"], "test", "fish"))), 3, api_name="/predict")
    assert app.uploads_left() == []


def test_concurrent_identical_uploads_all_succeed(zoo_file, app, built):
    """Gradio stores identical uploads at ONE path: deleting it after one request must not break the others."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    path = str(zoo_file(built["zoos"]["tree-b"], "test", "apple"))

    def call(_):
        return Client(app.url, verbose=False).predict(handle_file(path), 3, api_name="/predict")["tree"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(16))) == ["tree-b"] * 16
    assert app.uploads_left() == []


def test_the_app_starts_without_a_bundle_and_says_so(running_app, tmp_path):
    with running_app(tmp_path / "no-bundle", tmp_path / "app") as app:
        config = httpx.get(app.url + "config", timeout=10).text
        assert "No model bundle is loaded" in config and "no-bundle" in config
        from gradio_client import Client

        with pytest.raises(Exception, match="no-bundle"):
            Client(app.url, verbose=False).predict("tiger", 3, api_name="/search")
        assert app.process.poll() is None


def test_request_files_are_deleted_only_when_no_request_holds_them(tmp_path):
    from probex.request_files import RequestFiles

    files = RequestFiles(grace_s=3600)  # the background sweep never fires here; sweep() is called by hand
    upload = tmp_path / "hash123" / "lora.safetensors"
    upload.parent.mkdir()
    upload.write_bytes(b"x")
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("card")
    files.hold(upload)
    files.hold(upload, card)  # a second request with the same upload (Gradio shares the path)
    files.release(upload, card)
    files.grace_s = 0
    assert files.sweep() == [card] and upload.exists() and not card.exists()
    files.release(upload)
    files.grace_s = 60  # the file was (re-)uploaded just now: a queued request may still be waiting for it
    assert files.sweep() == [] and upload.exists()
    files.grace_s = 0
    files.hold(upload)
    files.release(upload)
    assert files.sweep() == [upload] and not upload.exists() and not upload.parent.exists()


@pytest.fixture(scope="module")
def app_module(built, import_app):
    """app.py imported in this process (its handlers called directly, no server)."""
    return import_app(built["bundle"])


def test_a_link_is_fetched_identified_and_deleted_afterwards(zoo_file, app_module, built, tmp_path, monkeypatch):
    import shutil

    import gradio as gr

    import probex.fetch as fetch

    def fake_fetch(ref, *, max_bytes, timeout):  # stands in for the network: fetch.py has its own tests
        directory = tmp_path / "fetched"
        directory.mkdir()
        shutil.copy(zoo_file(built["zoos"]["tree-b"], "test", "rocket"), directory / "lora.safetensors")
        return fetch.Fetched(directory / "lora.safetensors", directory)

    with pytest.raises(gr.Error, match="neither an https:// link nor a Hub repo id"):
        app_module.identify_link("not a link at all", 5)
    monkeypatch.setattr(fetch, "fetch_to_temp", fake_fetch)
    outputs = app_module.identify_link("someone/rocket-lora", 5)
    summary, request = outputs[0], outputs[5]
    assert "rocket" in summary and "tree-b" in summary
    assert request.own_samples is not None   # the LoRA's own samples started drawing when it was identified
    steps = list(app_module.draw_samples(request))
    assert len(steps[0][0]) == app_module.UPLOAD_SAMPLES and steps[0][1] == []  # the LoRA's own samples come first
    own, neighbours = steps[-1]
    assert len(own) == app_module.UPLOAD_SAMPLES and len(neighbours) == len(steps) - 1
    card = Path(outputs[3])
    assert card.read_text().startswith("---")
    app_module.forget_upload(request)
    app_module.FILES.grace_s = 0
    app_module.FILES.sweep()
    assert not (tmp_path / "fetched").exists() and not card.exists()


@pytest.mark.parametrize("top_k", [0, -1, -1000, True, 51, 1.5, "abc", None, [1]])
def test_api_arguments_are_checked_with_a_message(zoo_file, client, built, top_k):
    from gradio_client import handle_file

    path = str(zoo_file(built["zoos"]["tree-b"], "test", "lion"))
    for call in (lambda: client.predict(handle_file(path), top_k, api_name="/predict"),
                 lambda: client.predict("tiger", top_k, api_name="/search")):
        with pytest.raises(Exception) as err:
            call()
        assert "top_k must be a whole number from 1 to 50" in str(err.value), str(err.value)


def test_predict_link_is_a_named_endpoint_with_the_same_checks(client, app):
    assert "/predict_link" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for link, fragment in (("", "paste a Hub repo id"), ("not a link at all", "neither an https:// link"),
                           ("x" * 3000, "at most 2,048"), ("http://127.0.0.1/lora.safetensors", "https"),
                           ("someone/some-lora", "")):
        with pytest.raises(Exception) as err:
            client.predict(link, 5, api_name="/predict_link")
        message = str(err.value)
        assert fragment in message and "unexpected" not in message, (link[:40], message)
    with pytest.raises(Exception, match="top_k"):
        client.predict("someone/some-lora", 0, api_name="/predict_link")
    assert app.process.poll() is None


@pytest.mark.parametrize("file", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                                  {"path": "", "meta": {"_type": "gradio.FileData"}},
                                  {"meta": {"_type": "gradio.FileData"}}])
def test_crafted_file_arguments_get_a_message_and_delete_nothing(client, app, file):
    with pytest.raises(Exception) as err:
        client.predict(file, 5, api_name="/predict")
    assert str(err.value).strip(), "an error with no message"
    assert Path("/etc/passwd").exists() and app.process.poll() is None


def test_handler_failures_are_one_line_messages(app_module, built, monkeypatch):
    """ProbexErrors come back as their line (the sample handlers' after "Samples could not be drawn: "), anything
    else as one line naming it, from plain and streaming handlers alike."""
    import gradio as gr

    from probex.errors import InputError

    studio = app_module.STUDIO
    request = app_module.identify_example(0, 3)[5]
    models = studio.search("tiger", top_k=3)["models"]
    for failure, expected in ((InputError("no such\nthing"), "Samples could not be drawn: no such thing"),
                              (RuntimeError("broke\ndetail"), "unexpected RuntimeError: broke (please report this)")):
        def fail(*args, **kwargs):
            raise failure
        monkeypatch.setattr(studio, "samples", fail)
        for call in (lambda: list(app_module.draw_samples(request)),
                     lambda: app_module.draw_search_samples(models)):
            with pytest.raises(gr.Error) as err:
                call()
            assert err.value.message == expected
    monkeypatch.undo()
    with pytest.raises(gr.Error) as err:
        app_module.custom_labels(request, "")
    assert err.value.message.startswith("no labels given") and err.value.duration == 12
