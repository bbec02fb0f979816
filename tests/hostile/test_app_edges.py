"""The app's edge as a hostile client meets it: `python app.py` on the shipped bundle (checkpoints/emoji-mini), called
through gradio_client AND through raw HTTP, which sends what gradio_client never would (a server path as a file, too
few arguments, a UI handler's arguments by fn_index). Every refusal must carry its message; nothing a request names
may be deleted but its own upload.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "checkpoints" / "emoji-mini"
EXAMPLE = sorted((BUNDLE / "examples").glob("emoji-root-1__test__*.safetensors"))[0]
FILE_ARGUMENT = "file must be a .safetensors file uploaded to this app"
FD = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def app(running_app, tmp_path_factory):
    with running_app(BUNDLE, tmp_path_factory.mktemp("edge-app")) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def lora(tmp_path: Path, name: str, change) -> str:
    """The shipped example with ``change(key, tensor)`` applied to every tensor."""
    path = tmp_path / name
    save_file({k: change(k, v).contiguous() for k, v in load_file(str(EXAMPLE)).items()}, str(path))
    return str(path)


def call(app, api: str, data: list) -> dict:
    """One raw /gradio_api/call: the final event's data (an answer, or {"error": …})."""
    started = httpx.post(f"{app.url}gradio_api/call{api}", json={"data": data}, timeout=60)
    started.raise_for_status()
    with httpx.stream("GET", f"{app.url}gradio_api/call{api}/{started.json()['event_id']}", timeout=300) as s:
        lines = [line for line in "".join(s.iter_text()).splitlines() if line.startswith("data:")]
    return json.loads(lines[-1].removeprefix("data:"))


def error_of(answer) -> str:
    assert isinstance(answer, dict) and "error" in answer, answer
    assert answer["error"], f"an error without a message: {answer}"
    assert "\n" not in answer["error"]
    return answer["error"]


# ------------------------------------------------------------------------------------------- hostile files
def test_hostile_uploads_get_a_refusal_or_a_notice_never_nan(client, tmp_path):
    from gradio_client import handle_file

    cases = {
        "v1e30": (lambda k, v: torch.full_like(v, 1e30), "beyond anything trained"),
        "zeros": (lambda k, v: torch.zeros_like(v), None),
    }
    for name, (change, refusal) in cases.items():
        path = lora(tmp_path, f"{name}.safetensors", change)
        if refusal:
            with pytest.raises(Exception, match=refusal):
                client.predict(handle_file(path), 5, api_name="/predict")
        else:
            answer = client.predict(handle_file(path), 5, api_name="/predict")
            json.dumps(answer, allow_nan=False)
            assert answer["notice"] and answer["classes"] == [] and answer["neighbors"] == []
    html = tmp_path / "page.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    with pytest.raises(Exception, match="an HTML page"):
        client.predict(handle_file(str(html)), 5, api_name="/predict")


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("top_k", [0, -1, -1000, True, "abc", None, [1]])
def test_top_k_is_checked_on_every_endpoint(client, top_k):
    from gradio_client import handle_file

    for api, first in (("/predict", handle_file(str(EXAMPLE))), ("/search", "a cat"),
                       ("/predict_link", "someone/some-lora")):
        with pytest.raises(Exception) as err:
            client.predict(first, top_k, api_name=api)
        assert "top_k must be a whole number from 1 to 50" in str(err.value), (api, str(err.value))


def test_links_have_a_named_endpoint_with_the_same_checks(client):
    assert "/predict_link" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for link, fragment in (("", "paste a Hub repo id"), ("x" * 5000, "at most 2,048"),
                           ("http://127.0.0.1/a.safetensors", "only https://"),
                           ("https://169.254.169.254/latest", "metadata-service"),
                           ("/etc/passwd", "neither an https:// link nor a Hub repo id")):
        with pytest.raises(Exception) as err:
            client.predict(link, 5, api_name="/predict_link")
        assert fragment in str(err.value) and "unexpected" not in str(err.value), (link[:40], str(err.value))


def test_crafted_paths_sent_straight_to_predict_get_a_message_and_delete_nothing(app):
    """gradio_client would upload a local path; raw HTTP sends the path itself, as the audit did. The upload folder,
    a folder in it and a file in it must survive: the app deletes what a request names once it is done."""
    folder = app.temp_dir
    keep = folder / ("f" * 64) / "keep.safetensors"  # stands in for another user's upload
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_bytes(EXAMPLE.read_bytes())
    paths = ("/etc/passwd", str(EXAMPLE), "../../../../etc/passwd", "", str(folder), f"{folder}/", str(keep.parent),
             f"{folder}/../x.safetensors", app.url, "https://example.com/a.safetensors")
    answers = [call(app, "/predict", [{"path": path, "meta": FD}, 5]) for path in paths]
    answers += [call(app, "/predict", data) for data in ([{"meta": FD}, 5], ["/etc/passwd", 5], [None, 5])]
    time.sleep(6)  # past the deletion grace time (3 s in tests) and a sweep
    assert keep.is_file() and folder.is_dir(), "a crafted path deleted the upload folder or a folder in it"
    assert Path("/etc/passwd").exists() and EXAMPLE.exists() and app.process.poll() is None
    for answer in answers:
        assert FILE_ARGUMENT in error_of(answer), answer


def test_too_few_arguments_get_a_message(app):
    assert "didn't receive enough input values" in error_of(call(app, "/predict", []))
    assert "didn't receive enough input values" in error_of(call(app, "/search", ["a cat"]))


def ui_call(app, api_name: str, data: list) -> dict:
    """A UI handler called as the page calls it (queue/join by fn_index): its process_completed message."""
    config = httpx.get(f"{app.url}config", timeout=30).json()
    index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    session = uuid.uuid4().hex[:12]
    httpx.post(f"{app.url}gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session},
               timeout=30).raise_for_status()
    with httpx.stream("GET", f"{app.url}gradio_api/queue/data?session_hash={session}", timeout=300) as s:
        events = [json.loads(line[5:]) for line in "".join(s.iter_text()).splitlines() if line.startswith("data:")]
    return next(e for e in events if e.get("msg") == "process_completed")


@pytest.mark.parametrize("index", ["abc", [1], 1.5, True, -1, 10**6, None])
def test_the_example_handler_checks_its_index(app, index):
    done = ui_call(app, "identify_example", [index, 5])
    assert not done["success"] and error_of(done["output"]).startswith("unknown example"), done


def test_the_upload_handler_refuses_server_paths(app):
    done = ui_call(app, "identify_upload", [{"path": "/etc/passwd", "meta": FD}, 5])
    assert not done["success"] and FILE_ARGUMENT in error_of(done["output"]), done


# ----------------------------------------------------------------------------------------------- hygiene
def test_gradio_cache_is_swept(import_app):
    """Gradio's cache (sample PNGs, card copies) is bounded: delete_cache is set, every TTL/3 for files older than
    PROBEX_CACHE_TTL_S."""
    app_module = import_app(BUNDLE)
    demo = app_module.build_demo()
    assert demo.delete_cache == (max(60, app_module.CACHE_TTL_S // 3), app_module.CACHE_TTL_S)
    assert type(demo).__name__ == "StudioBlocks"


def test_the_load_bench_prints_memory_per_round():
    source = (REPO / "bench" / "load.py").read_text()
    assert "VmRSS" in source and "memory growth after round 1" in source
