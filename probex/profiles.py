"""Named setups: which text encoder, prompt, bundle and image generator belong together.

- ``emoji-mini`` (default): everything embedded and CPU-sized — MiniLM text, our tiny emoji roots, the bundle in
  ``checkpoints/emoji-mini``.
- ``sd15-modelj``: the paper's setting — CLIP ViT-L/14 text, Stable Diffusion 1.5 as the root. Every SD 1.5 LoRA is
  read without training (probex.sd15, from the root's cross-attention blocks); experts trained on Model-J join it
  when their bundle is there: a local dir or a Hub repo id (a Space with Hub access downloads it once).

``PROBEX_PROFILE`` picks the profile; ``PROBEX_BUNDLE``, ``PROBEX_SD15_MODEL`` and ``PROBEX_CLIP_MODEL`` override
its bundle, its SD 1.5 model id and its CLIP model id without code changes (a Space sets them as variables).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from probex.errors import InputError, first_line
from probex.fetch import HUB_ID
from probex.text import prompt

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = "emoji-mini"
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_MODEL_ID = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class Profile:
    name: str
    text_encoder: str        # a `probex.text.load_text_encoder` name
    prompt_template: str     # how a class name becomes the text the expert is aligned with
    bundle: str              # local dir (relative to the project root) or a Hub repo id
    pipeline: str            # which `probex.generate` loader draws samples: "emoji" | "sd15"
    root_model: str | None   # the tree's root for generation: a diffusers model id or dir
    roots_dir: str | None = None   # where locally trained roots live (emoji-mini builds its own)
    reader: str | None = None      # a base family read without training (probex.sd15), beside any bundle's trees

    def prompt(self, class_name: str) -> str:
        return prompt(self.prompt_template, class_name)


PROFILES = {
    "emoji-mini": Profile(
        name="emoji-mini", text_encoder="minilm", prompt_template="an emoji of {name}",
        bundle="checkpoints/emoji-mini", pipeline="emoji", root_model=None, roots_dir="checkpoints/roots"),
    "sd15-modelj": Profile(
        name="sd15-modelj", text_encoder=f"clip:{CLIP_MODEL_ID}", prompt_template="a photo of a {name}",
        bundle="checkpoints/sd15-modelj", pipeline="sd15", root_model=SD15_MODEL_ID, reader="sd15"),
}


def get_profile(name: str | None = None) -> Profile:
    """The named profile (None → ``PROBEX_PROFILE`` or emoji-mini) with its environment overrides applied."""
    name = name or os.environ.get("PROBEX_PROFILE") or DEFAULT_PROFILE
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    overrides = {"bundle": os.environ.get("PROBEX_BUNDLE")}
    if profile.pipeline == "sd15":
        overrides["root_model"] = os.environ.get("PROBEX_SD15_MODEL")
        if os.environ.get("PROBEX_CLIP_MODEL"):
            overrides["text_encoder"] = f"clip:{os.environ['PROBEX_CLIP_MODEL']}"
    return replace(profile, **{k: v for k, v in overrides.items() if v})


def is_hub_repo_id(ref: str) -> bool:
    """"owner/name" alone (probex.fetch.HUB_ID without a file in the repo)."""
    match = HUB_ID.match(ref)
    return bool(match) and match["file"] is None


def resolve_bundle_dir(profile: Profile | str | None = None, *, endpoint: str | None = None) -> Path:
    """A local bundle dir for the profile: an existing path as is (relative paths from the project root), otherwise
    the Hub repo it names, downloaded once into the Hub cache (only JSON and safetensors: nothing to unpickle)."""
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    ref = profile.bundle
    for candidate in (Path(ref).expanduser(), PROJECT_ROOT / ref):
        if candidate.is_dir():
            return candidate
    if not is_hub_repo_id(ref):
        raise InputError(f"bundle {ref!r} of profile {profile.name} is neither a local dir nor a Hub repo id")
    return download_bundle(ref, endpoint=endpoint)


def download_bundle(repo_id: str, *, revision: str | None = None, endpoint: str | None = None) -> Path:
    try:
        path = snapshot_download(repo_id, revision=revision, endpoint=endpoint,
                                 allow_patterns=["*.json", "*.safetensors", "*.md"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise InputError(f"cannot download bundle {repo_id}: {first_line(exc, None)}") from None
    path = Path(path)
    if not (path / "bundle.json").is_file():
        raise InputError(f"Hub repo {repo_id} holds no bundle.json: not a ProbeX Studio bundle")
    return path
