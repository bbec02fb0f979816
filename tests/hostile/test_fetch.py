"""probex.fetch: https only, no internal addresses (also after redirects), size cap, timeout, temp files cleaned up.

The public policy refuses loopback, so the streaming tests inject a loopback-only, plain-http policy and serve files
from a tiny local server; the refusals are tested with the real policy and a stand-in for DNS.
"""
import http.server
import ipaddress
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import probex.fetch as fetch
from probex.errors import InputError
from probex.fetch import FetchPolicy, choose_hub_file, fetch_to_temp

LOCAL = FetchPolicy(schemes=("http",), allow_address=lambda ip: ip.is_loopback)
PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class Handler(http.server.BaseHTTPRequestHandler):
    hosts: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hosts.append(self.headers.get("Host"))
        route = self.path.split("?")[0]
        if route == "/lora.safetensors":
            self.reply(200, PAYLOAD, {"Content-Length": str(len(PAYLOAD))})
        elif route == "/no-length.safetensors":  # body delimited by closing the connection
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif route == "/redirect":
            self.reply(302, b"", {"Location": "/lora.safetensors"})
        elif route == "/redirect-private":
            self.reply(302, b"", {"Location": "http://10.0.0.7/lora.safetensors"})
        elif route == "/loop":
            self.reply(302, b"", {"Location": "/loop"})
        elif route == "/slow":
            time.sleep(1.5)
            self.reply(200, PAYLOAD, {"Content-Length": str(len(PAYLOAD))})
        elif route == "/drip":  # every chunk in time, the whole far too slow
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 100))
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(bytes(100))
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):   # the client gave up on it: what the test wants
                pass
        else:
            self.reply(404, b"not here", {"Content-Length": "8"})

    def reply(self, status, body, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://probex.test:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def dns(monkeypatch):
    """A stand-in for DNS: host name → addresses (IP literals resolve to themselves, as with real DNS)."""
    table = {"probex.test": ["127.0.0.1"]}
    real = fetch.resolve
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [ipaddress.ip_address(a) for a in table[host]]
                        if host in table else real(host, port))
    return table


@pytest.fixture
def temp_dirs(monkeypatch):
    """Every temp dir fetch creates, to prove failures leave none behind."""
    made = []
    real = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(Path(real(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(fetch.tempfile, "mkdtemp", mkdtemp)
    return made


def refused(ref, fragment, **kwargs):
    with pytest.raises(InputError) as caught:
        fetch_to_temp(ref, max_bytes=kwargs.pop("max_bytes", 10**6), timeout=kwargs.pop("timeout", 5), **kwargs)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("ref", ["http://example.com/x.safetensors", "ftp://example.com/x", "file:///etc/passwd",
                                 "gopher://127.0.0.1:6379/_FLUSHALL"])
def test_only_https(ref):
    refused(ref, "only https:// links")


def test_neither_link_nor_repo_id():
    refused("just some words", "neither an https:// link nor a Hub repo id")


def test_credentials_in_links_are_refused():
    refused("https://user:secret@example.com/x.safetensors", "user:password@")


@pytest.mark.parametrize("addresses, why", [
    (["127.0.0.1"], "loopback"), (["10.1.2.3"], "private"), (["192.168.0.10"], "private"),
    (["169.254.169.254"], "metadata-service"), (["100.100.100.200"], "metadata-service"),
    (["::1"], "loopback"), (["::ffff:10.0.0.1"], "private"), (["fe80::1"], "link-local"),
    (["224.0.0.251"], "multicast"), (["0.0.0.0"], "unspecified"), (["100.64.1.1"], "non-public"),
    (["93.184.216.34", "10.0.0.1"], "private"),  # one bad answer among good ones is enough to refuse
])
def test_internal_addresses_are_refused_after_dns(dns, addresses, why):
    dns["files.example"] = addresses
    refused("https://files.example/lora.safetensors", f"a {why} address")


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "2130706433", "0x7f000001", "169.254.169.254", "localhost"])
def test_literal_and_encoded_internal_hosts_are_refused(host):
    refused(f"https://{host}/lora.safetensors", "address; links into internal networks are refused")


def test_requests_go_to_the_checked_address_with_the_name_for_host_and_tls(dns):
    dns["files.example"] = ["93.184.216.34"]
    with httpx.Client() as client:
        request = fetch.pinned_request(client, "https://files.example:8443/a/b.safetensors?x=1", FetchPolicy())
    assert str(request.url) == "https://93.184.216.34:8443/a/b.safetensors?x=1"
    assert request.headers["Host"] == "files.example:8443"
    assert request.extensions["sni_hostname"] == "files.example"  # certificate checked for the name, not the IP


# ---------------------------------------------------------------------------------------------- streaming
def test_download_lands_in_its_own_temp_dir_and_cleanup_removes_it(server, dns):
    Handler.hosts.clear()
    fetched = fetch_to_temp(f"{server}/lora.safetensors", max_bytes=10**6, timeout=5, policy=LOCAL)
    assert fetched.path.read_bytes() == PAYLOAD and fetched.path.name == "lora.safetensors"
    assert Handler.hosts == [server.split("//")[1]]  # connected to the checked address, asked for the named host
    fetched.cleanup()
    assert not fetched.directory.exists()


def test_redirects_are_followed_by_hand(server, dns):
    with fetch_to_temp(f"{server}/redirect", max_bytes=10**6, timeout=5, policy=LOCAL) as fetched:
        assert fetched.path.read_bytes() == PAYLOAD
    assert not fetched.directory.exists()


@pytest.mark.parametrize("route, fragment, kwargs", [
    ("/redirect-private", "resolves to 10.0.0.7, a private address", {}),
    ("/loop", "more than 5 redirects", {}),
    ("/missing", "answered HTTP 404", {}),
    ("/lora.safetensors", "10 KiB, over the 1,000 B limit", {"max_bytes": 1000}),  # Content-Length says so
    ("/no-length.safetensors", "passed the 1,000 B limit", {"max_bytes": 1000}),  # counted while streaming
    ("/slow", "timed out after 0.5 s", {"timeout": 0.5}),
    ("/drip", "took longer than 1 s", {"timeout": 1}),
])
def test_failures_are_one_line_and_leave_no_files(server, dns, temp_dirs, route, fragment, kwargs):
    refused(f"{server}{route}", fragment, policy=LOCAL, **kwargs)
    assert temp_dirs and not any(d.exists() for d in temp_dirs)


# ---------------------------------------------------------------------------------------------------- Hub
def test_hub_offline_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    refused("ProbeX/Model-J__SD_200", "Hub is unreachable (offline mode")


def test_hub_unreachable_is_a_clear_error(monkeypatch, temp_dirs):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def no_network(self, repo_id, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", no_network)
    refused("someone/some-lora", "Hub is unreachable (offline or blocked)")
    assert not any(d.exists() for d in temp_dirs)


def fake_hub(monkeypatch, size):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def download(repo_id, filename, *, local_dir, dry_run=False, **kwargs):
        if dry_run:
            return SimpleNamespace(file_size=size)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(size))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)


def test_hub_file_download_and_size_cap(monkeypatch, temp_dirs):
    fake_hub(monkeypatch, size=500)
    with fetch_to_temp("someone/some-lora/sub/pytorch_lora_weights.safetensors", max_bytes=1000, timeout=5) as f:
        assert f.path.stat().st_size == 500 and f.path.is_relative_to(f.directory)
    assert not f.directory.exists()
    fake_hub(monkeypatch, size=5000)
    refused("someone/some-lora/pytorch_lora_weights.safetensors", "4.9 KiB, over the 1,000 B limit", max_bytes=1000)
    assert not any(d.exists() for d in temp_dirs)


def test_hub_paths_may_not_leave_the_repo():
    refused("someone/some-lora/../../etc/passwd", "may not leave the repository")


def test_choosing_the_lora_file_of_a_repo():
    assert choose_hub_file("a/b", ["README.md", "x.safetensors", "pytorch_lora_weights.safetensors"]) == \
        "pytorch_lora_weights.safetensors"
    assert choose_hub_file("a/b", ["README.md", "style.safetensors"]) == "style.safetensors"
    with pytest.raises(InputError, match="has 2 .safetensors files; name one"):
        choose_hub_file("a/b", ["one.safetensors", "two.safetensors"])
    with pytest.raises(InputError, match="no .safetensors file"):
        choose_hub_file("a/b", ["model.ckpt"])
