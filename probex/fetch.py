"""Bring a user's link (an https URL or a Hugging Face Hub repo id) to a temporary local file, safely.

URL rules (a public Space must not become a proxy into its own network):
- https only; no ``user:password@`` in links;
- the host name is resolved here and EVERY address it resolves to must be public: loopback, private, link-local,
  multicast, reserved, unspecified, carrier-grade NAT and cloud metadata-service addresses are refused;
- the connection goes to the address that was checked (the URL's host is sent as Host header and TLS SNI, so the
  certificate is still verified for the name), so a second DNS answer cannot swap in an internal address;
- redirects are followed by hand, each hop checked by the same rules;
- Content-Length over the cap is refused before reading; the body is streamed with the cap and an overall deadline;
- the file lives in a fresh temp dir that is deleted on failure, and by the caller's ``cleanup()`` after use.
Proxy environment variables are ignored (a proxy would connect to addresses we did not check).

Hub ids (``user/name`` or ``user/name/path/in/repo.safetensors``) go through ``huggingface_hub``, which honours
``HF_HUB_OFFLINE``; an unreachable Hub is a clear one-line error. ``local_file`` tells a link or Hub id from a path on
disk (``is_remote``) and fetches only the former.
"""
from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import huggingface_hub
from huggingface_hub import constants, errors

from probex.errors import InputError
from probex.weights import human_bytes, size_pair

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200",
                                                        "192.0.0.192", "fd00:ec2::254")}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# LoRA file names the Hub's own tools write, in the order we prefer them when a repo id names no file
HUB_LORA_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "model.safetensors")
# A Hub repo id, "owner/name" with the Hub's characters (no leading dot or dash), and an optional file path in the repo
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:/(?P<file>[\w. /-]+))?$")


def address_problem(ip: IPAddress) -> str | None:
    """Why an address must not be fetched from, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for check, what in ((ip in METADATA_ADDRESSES, "metadata-service"), (ip.is_loopback, "loopback"),
                        (ip.is_unspecified, "unspecified"), (ip.is_link_local, "link-local"),
                        (ip.is_multicast, "multicast"), (ip.is_private, "private"), (ip.is_reserved, "reserved"),
                        (not ip.is_global, "non-public")):
        if check:
            return what
    return None


def is_public_address(ip: IPAddress) -> bool:
    return address_problem(ip) is None


@dataclass(frozen=True)
class FetchPolicy:
    """What a link may point at. The default is the public policy; tests inject a loopback-only http policy."""

    schemes: tuple[str, ...] = ("https",)
    allow_address: Callable[[IPAddress], bool] = is_public_address
    max_redirects: int = 5


@dataclass
class Fetched:
    """A downloaded file inside its own temp dir; ``cleanup()`` (or leaving a ``with`` block) deletes both."""

    path: Path
    directory: Path = field(repr=False)

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Fetched":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def fetch_to_temp(ref: str, *, max_bytes: int, timeout: float, policy: FetchPolicy = FetchPolicy()) -> Fetched:
    """Download an https URL or a Hub repo id (``user/name[/file]``) into a fresh temp dir."""
    ref = ref.strip()
    if "://" in ref:
        return fetch_url(ref, max_bytes=max_bytes, timeout=timeout, policy=policy)
    if HUB_ID.match(ref):
        return fetch_hub(ref, max_bytes=max_bytes, timeout=timeout)
    raise InputError(f"{clip(ref)} is neither an https:// link nor a Hub repo id like user/name")


@contextmanager
def local_file(ref: str | Path, *, max_bytes: int, timeout: float):
    """A local path for a path, an https URL or a Hub repo id; downloads are deleted when the block ends."""
    if not is_remote(ref):
        yield Path(ref)  # read_weights names a missing file in its error
        return
    fetched = fetch_to_temp(str(ref), max_bytes=max_bytes, timeout=timeout)
    try:
        yield fetched.path
    finally:
        fetched.cleanup()


def is_remote(ref: str | Path) -> bool:
    """A link (``…://…``) or a Hub repo id — unless it names something on disk: ``dir/file.safetensors`` whose first
    folder exists here is a local path, even though it has the shape of ``user/name``."""
    if not isinstance(ref, str) or exists(ref):
        return False
    ref = ref.strip()
    if "://" in ref:
        return True
    return bool(HUB_ID.match(ref)) and not ref.startswith((".", "/")) and not exists(ref.split("/")[0])


def exists(path: str | Path) -> bool:
    """Path.exists that answers False for names the OS refuses to look up (too long, NUL bytes)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------- URLs
def fetch_url(url: str, *, max_bytes: int, timeout: float, policy: FetchPolicy) -> Fetched:
    directory = Path(tempfile.mkdtemp(prefix="probex-fetch-"))
    try:
        path = directory / file_name_from_url(url)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(policy.max_redirects + 1):
                request = pinned_request(client, url, policy)
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urljoin(url, redirect_target(response, url))
                        continue
                    if response.status_code != 200:
                        raise InputError(f"{host_of(url)} answered HTTP {response.status_code} for {clip(url)}")
                    stream_to_file(response, path, max_bytes, deadline, timeout)
                    return Fetched(path, directory)
                finally:
                    response.close()
        raise InputError(f"more than {policy.max_redirects} redirects starting from {clip(url)}")
    except httpx.TimeoutException:
        shutil.rmtree(directory, ignore_errors=True)
        raise InputError(f"download from {host_of(url)} timed out after {timeout:g} s") from None
    except httpx.HTTPError as err:
        shutil.rmtree(directory, ignore_errors=True)
        raise InputError(f"download from {host_of(url)} failed: {whole_message(err)}") from None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def pinned_request(client: httpx.Client, url: str, policy: FetchPolicy) -> httpx.Request:
    """A GET to the checked IP address of the URL's host, keeping the host name for Host and TLS."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.schemes:
        allowed = " or ".join(f"{s}://" for s in policy.schemes)
        raise InputError(f"only {allowed} links are accepted (got {clip(scheme)}://)")
    if parts.username is not None or parts.password is not None:
        raise InputError("links with user:password@ in them are refused")
    host = parts.hostname
    if not host:
        raise InputError(f"{clip(url)} has no host name")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{clip(url)} has an invalid port") from None
    ip = checked_address(host, port, policy)
    target = httpx.URL(url).copy_with(host=str(ip))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return client.build_request("GET", target, headers=headers, extensions=extensions)


def checked_address(host: str, port: int, policy: FetchPolicy) -> IPAddress:
    addresses = resolve(host, port)
    if not addresses:
        raise InputError(f"cannot resolve the host name {clip(host)}")
    for ip in addresses:
        if not policy.allow_address(ip):
            why = address_problem(ip) or "disallowed"
            raise InputError(f"{clip(host)} resolves to {ip}, a {why} address; links into internal networks are "
                             "refused")
    return addresses[0]


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host name resolves to (one place, so tests can stand in for DNS)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"cannot resolve the host name {clip(host)}") from None
    found = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])  # drop an IPv6 zone id
        if ip not in found:
            found.append(ip)
    return found


def redirect_target(response: httpx.Response, url: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise InputError(f"{host_of(url)} sent a redirect without a Location")
    return location


def stream_to_file(response: httpx.Response, path: Path, max_bytes: int, deadline: float, timeout: float) -> None:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        size, limit = size_pair(int(declared), max_bytes)
        raise InputError(f"the file is {size}, over the {limit} limit")
    received = 0
    with path.open("wb") as f:
        for chunk in response.iter_bytes():  # as it arrives: fixed-size chunks would hide a slow drip from the deadline
            received += len(chunk)
            if received > max_bytes:
                raise InputError(f"the download passed the {human_bytes(max_bytes)} limit; stopped")
            if time.monotonic() > deadline:
                raise InputError(f"the download took longer than {timeout:g} s; stopped")
            f.write(chunk)


def file_name_from_url(url: str) -> str:
    """The URL's last path segment, reduced to safe characters (the extension matters to read_weights)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(urlsplit(url).path.rsplit("/", 1)[-1]))[-100:]
    return name if name.strip("._") else "download.safetensors"


def host_of(url: str) -> str:
    return clip(urlsplit(url).hostname or url)


def clip(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def whole_message(err: BaseException) -> str:
    """Every line of an httpx or Hub error, joined and clipped: the Hub says what went wrong after its first line
    (first_line would keep only "404 Client Error. (Request ID: …)")."""
    return clip(str(err) or type(err).__name__, 200)


# ---------------------------------------------------------------------------------------------------- Hub
def fetch_hub(ref: str, *, max_bytes: int, timeout: float) -> Fetched:
    # huggingface_hub's functions are looked up on the module at call time: tests stand in for the Hub there
    m = HUB_ID.match(ref)
    repo, filename = m["repo"], m["file"]
    if filename and (".." in filename.split("/") or filename.startswith("/")):
        raise InputError(f"{clip(ref)}: the file path may not leave the repository")
    if constants.is_offline_mode():
        raise InputError(f"the Hugging Face Hub is unreachable (offline mode, HF_HUB_OFFLINE=1); cannot fetch {repo}")
    directory = Path(tempfile.mkdtemp(prefix="probex-hub-"))
    try:
        with hub_errors(repo):
            filename = filename or choose_hub_file(repo, huggingface_hub.HfApi().list_repo_files(repo))
            info = huggingface_hub.hf_hub_download(repo, filename, local_dir=directory, dry_run=True)
            if info.file_size is not None and info.file_size > max_bytes:
                size, limit = size_pair(info.file_size, max_bytes)
                raise InputError(f"{repo}/{filename} is {size}, over the {limit} limit")
            path = Path(huggingface_hub.hf_hub_download(repo, filename, local_dir=directory, etag_timeout=timeout))
        if path.stat().st_size > max_bytes:
            raise InputError(f"{repo}/{filename} is over the {human_bytes(max_bytes)} limit")
        return Fetched(path, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def choose_hub_file(repo: str, files: list[str]) -> str:
    candidates = [f for f in files if f.endswith(".safetensors")]
    for preferred in HUB_LORA_NAMES:
        if preferred in candidates:
            return preferred
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"{repo} has no .safetensors file")
    raise InputError(f"{repo} has {len(candidates)} .safetensors files; name one, e.g. {repo}/{candidates[0]}")


@contextmanager
def hub_errors(repo: str):
    """Turn huggingface_hub's failures into one-line InputErrors."""
    try:
        yield
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError):
        # LocalEntryNotFound: the Hub could not be reached and the file is not cached
        raise InputError(f"the Hugging Face Hub is unreachable (offline); cannot fetch {repo}") from None
    except errors.GatedRepoError:
        raise InputError(f"{repo} is gated on the Hub; it cannot be fetched without access") from None
    except errors.RepositoryNotFoundError:
        raise InputError(f"no Hub model repository named {repo} (or it is private)") from None
    except errors.EntryNotFoundError as err:
        raise InputError(f"{repo} has no such file ({whole_message(err)})") from None
    except errors.HfHubHTTPError as err:
        raise InputError(f"the Hub refused the request for {repo}: {whole_message(err)}") from None
    except Exception as err:
        if isinstance(err, OSError) or any(c.__name__ == "TransportError" for c in type(err).__mro__):
            raise InputError(f"the Hugging Face Hub is unreachable (offline or blocked): {whole_message(err)}") from None
        raise
