"""The emoji atlas: single-codepoint emoji from Debian's Noto Color Emoji font (SIL OFL 1.1) at 32×32 RGBA.

Curation rule (kept in code so it can be audited and re-run): a codepoint is kept when the font draws a real glyph
for it (not .notdef), ``unicodedata`` names it, and its name has none of the words in ``_DROP`` — those mark
letters, keycaps, squared/circled/enclosed symbols, arrows, clock faces, geometric shapes, flag and skin-tone parts,
zodiac and religious signs, media-control buttons: things a person would not call a concept. Class name = the
lower-cased Unicode name.

``subject(name)`` groups concepts (animal, food, face, person, object…) so populations can pick what a 32×32 image
tells apart.
"""
from __future__ import annotations

import json
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size the bitmap (CBDT) font renders
SIZE = 32
RANGES = (range(0x2000, 0x3300), range(0x1F000, 0x1FB00))
ATLAS_DIR = Path(__file__).resolve().parents[2] / "assets" / "emoji"

_DROP = (
    "LETTER", "SQUARED", "CLOCK", "REGIONAL", "INDICATOR", "ARROW", "CIRCLED", "CJK", "KEYCAP", "EMOJI MODIFIER",
    "TAG ", "SQUARE", "LATIN", "SYMBOL", "MARK", "BUTTON", "VARIATION", "COMBINING", "JAPANESE", "NEGATIVE", "DIGIT",
    "NUMBER", "HEAVY", "DOUBLE", "FLAG", "OCLOCK", "CIRCLE", "TRIANGLE", "DIAMOND", "SIGN", "ZODIAC", "ARIES",
    "TAURUS", "GEMINI", "CANCER", "LEO", "VIRGO", "LIBRA", "SCORPIUS", "SAGITTARIUS", "CAPRICORN", "AQUARIUS",
    "PISCES", "OPHIUCHUS", "ENCLOSED", "LEFTWARDS", "RIGHTWARDS", "UPWARDS", "DOWNWARDS", "TRIGRAM", "BALLOT",
    "PARTNERSHIP", "FULLWIDTH", "PLAYING CARD BACK", "MAHJONG", "DOMINO", "SEGMENTED", "LARGE", "MEDIUM", "SMALL",
    "BOX", "WAVY DASH", "DOTTED", "COPYRIGHT", "REGISTERED", "TRADE MARK", "INFORMATION", "VERTICAL", "HORIZONTAL",
    "PART ALTERNATION", "ASTERISK", "STAR OF DAVID", "WHEEL OF DHARMA", "YIN YANG", "ORTHODOX", "LATIN CROSS",
    "MENORAH", "OM ", "ATOM", "PEACE", "RADIOACTIVE", "BIOHAZARD", "MALE", "FEMALE", "MEDICAL", "INFINITY",
    "REVERSE", "BLACK RIGHT", "BLACK LEFT", "EJECT", "PAUSE", "STOP", "RECORD", "HAND WITH INDEX", "CHEQUERED",
)
_HUMAN = ("FACE", "PERSON", "MAN", "WOMAN", "BOY", "GIRL", "BABY", "HAND", "FINGER", "FIST", "PRINCESS", "PRINCE",
          "OLDER", "ADULT", "CHILD", "FAMILY", "COUPLE", "KISS", "DANCER", "GUARDSMAN", "DETECTIVE", "ELF", "FAIRY",
          "MERPERSON", "VAMPIRE", "ZOMBIE", "GENIE", "SUPERHERO", "SUPERVILLAIN", "MAGE", "NINJA", "TROLL", "SKIER",
          "SURFER", "SWIMMER", "ROWBOAT", "BATH", "EAR", "NOSE", "EYE", "TONGUE", "MOUTH", "LEG", "FOOT", "BRAIN",
          "LUNGS", "HEART", "TOOTH", "BONE", "POUTING", "SMILING", "GRINNING", "CONSTRUCTION WORKER", "POLICE OFFICER",
          "SANTA", "FATHER CHRISTMAS", "MOTHER CHRISTMAS", "JOKER", "CLOWN", "OGRE", "GOBLIN", "ALIEN", "ROBOT",
          "SKULL", "GHOST", "IMP", "PILE OF POO", "MUSCLE", "SELFIE", "NAIL POLISH", "LIPS", "SPEAKING HEAD",
          "BUST", "FOOTPRINTS", "PEOPLE", "WRESTLERS", "JUGGLING", "LOTUS POSITION", "GOLFER", "RUNNER", "PEDESTRIAN",
          "HORSE RACING", "SLEUTH", "BICYCLIST", "CARTWHEEL", "WATER POLO", "HANDBALL")


def _keep(name: str) -> bool:
    return not any(word in name + " " for word in _DROP)


def subject(name: str) -> str:
    """Coarse grouping used to pick populations: 'human' (faces, people, body parts) or 'thing'."""
    padded = f" {name.upper()} "
    return "human" if any(f" {w} " in padded or f" {w}S " in padded for w in _HUMAN) else "thing"


def _render(font, char: str) -> np.ndarray:
    canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    return np.asarray(square.resize((SIZE, SIZE), Image.Resampling.LANCZOS))


def build_atlas(out_dir: Path = ATLAS_DIR) -> dict:
    """Render every kept emoji; write ``atlas.npy`` (N,32,32,4 uint8), and ``classes.json``."""
    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    missing = _render(font, chr(0x10FFFD))  # what the font draws for a codepoint it lacks
    images, classes = [], []
    for cp in (cp for block in RANGES for cp in block):
        name = unicodedata.name(chr(cp), "")
        if not name or not _keep(name):
            continue
        image = _render(font, chr(cp))
        if image is None or (missing is not None and np.array_equal(image, missing)):
            continue
        images.append(image)
        classes.append({"id": f"U+{cp:04X}", "name": name.lower(), "subject": subject(name)})
    out_dir.mkdir(parents=True, exist_ok=True)
    atlas = np.stack(images)
    np.save(out_dir / "atlas.npy", atlas)
    info = {
        "font": FONT.name,
        "font_package": "fonts-noto-color-emoji " + _font_version(),
        "licence": "SIL Open Font License 1.1 (Noto Color Emoji); rendered images may be redistributed",
        "size": SIZE,
        "curation": "see probex/jungle/atlas.py (_DROP word list)",
        "classes": classes,
    }
    (out_dir / "classes.json").write_text(json.dumps(info, indent=1))
    return info


def _font_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fonts-noto-color-emoji"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(version unknown)"


def build_keywords(annotations: Path, version: str, out_dir: Path = ATLAS_DIR) -> dict:
    """Write ``keywords.json``: each atlas class's English CLDR keywords (the words people search emoji by: 🐈 cat →
    kitten, pet), from the ``annotations/en/annotations.json`` of the npm package ``cldr-annotations-full``."""
    data = json.loads(Path(annotations).read_text())["annotations"]
    table = data["annotations"]
    _, classes = load_atlas(out_dir)
    words = {}
    for c in classes:
        char = chr(int(c["id"][2:], 16))
        entry = table.get(char) or table.get(char + "\ufe0f") or {}
        found = [w for w in entry.get("default", []) if w.lower() != c["name"]]
        if found:
            words[c["id"]] = found
    info = {"source": f"Unicode CLDR annotations (en), npm cldr-annotations-full {version}",
            "licence": "Unicode License v3 (https://www.unicode.org/license.txt)", "keywords": words}
    (out_dir / "keywords.json").write_text(json.dumps(info, indent=0, ensure_ascii=False))
    return info


def load_keywords(atlas_dir: Path = ATLAS_DIR) -> dict[str, list[str]]:
    """Atlas id → CLDR keywords ({} when the file is absent)."""
    path = atlas_dir / "keywords.json"
    return json.loads(path.read_text())["keywords"] if path.exists() else {}


def load_atlas(atlas_dir: Path = ATLAS_DIR) -> tuple[np.ndarray, list[dict]]:
    """The shipped atlas: images (N,32,32,4) uint8 and class records {id, name, subject}."""
    images = np.load(atlas_dir / "atlas.npy")
    classes = json.loads((atlas_dir / "classes.json").read_text())["classes"]
    return images, classes


if __name__ == "__main__":
    info = build_atlas()
    print(len(info["classes"]), "classes;", sum(c["subject"] == "thing" for c in info["classes"]), "things")
