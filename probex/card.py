"""A Hub-style ``README.md`` draft for an undocumented LoRA, written from what ProbeX inferred about its weights.

The paper's point is documenting models nobody documented: the card states the base model (the tree), the concepts
the weights most likely encode, the nearest documented models, how this was inferred, and where it can be wrong.
YAML front matter comes from ``huggingface_hub.ModelCardData`` so the Hub reads it as it reads any model card.
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData


@dataclass
class CardFacts:
    """What the card says; the service fills it from a prediction."""

    file_name: str
    description: str                 # weights.describe(): "LoRA, 56 modules, rank 4, …"
    tree: str                        # the router's tree name
    base_model: str                  # the tree's root: a Hub id or a local root name
    layers: list[str]                # the layers the expert read
    router_confidence: float
    classes: list[dict]              # [{"name", "score"}], best first
    neighbors: list[dict]            # [{"id", "class", "split", "score"}], best first
    profile: str
    text_encoder: str
    instance_prompt: str | None = None   # the trigger prompt, when the file's metadata names one
    metadata: dict[str, str] = field(default_factory=dict)
    score_unit: str = "z"            # what concept scores are: "z" / "cosine" (align experts) or "probability"
    notice: str | None = None        # set when no concept is claimed (a LoRA that changes nothing)
    expert: str | None = None        # which expert read the file, in words (Studio.expert_note)
    prompt_source: str | None = None  # where the reading's instance prompt came from ("default": none in the file)


MAX_FIELD_CHARS = 200  # one value copied from the file (metadata, prompt, name) as the card shows it
MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]|~!#])")


def one_line(value, limit: int = MAX_FIELD_CHARS) -> str:
    """A value from the user's file as one line of at most ``limit`` characters, control characters dropped."""
    text = " ".join("".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_text(value, limit: int = MAX_FIELD_CHARS) -> str:
    """A value from the user's file as inert card text: ``one_line``, HTML escaped and Markdown's inline markup
    (links, images, emphasis, code, tables) escaped."""
    return MARKDOWN_INLINE.sub(r"\\\1", html.escape(one_line(value, limit), quote=False))


def front_matter_text(value, limit: int = MAX_FIELD_CHARS) -> str:
    """A value from the file as a YAML scalar's content: ``one_line``, HTML escaped (the YAML writer quotes it;
    without newlines nothing in it can end the front matter, and no tag survives into a page that shows it)."""
    return html.escape(one_line(value, limit), quote=False)


# metadata keys worth repeating in the card (kohya, diffusers, our jungle); everything else stays in the file
METADATA_SHOWN = ("ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_output_name",
                  "ss_training_comment", "rank", "lora_alpha", "learning_rate", "steps", "base_model")


def front_matter(facts: CardFacts) -> ModelCardData:
    top = facts.classes[0]["name"] if facts.classes else None
    tags = ["lora", "text-to-image", "diffusers", "probex-inferred", f"tree:{facts.tree}"]
    if top:
        tags.append(f"concept:{top}")
    prompt = front_matter_text(facts.instance_prompt) if facts.instance_prompt else None
    return ModelCardData(base_model=facts.base_model, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=tags, instance_prompt=prompt)


def concepts_table(classes: list[dict]) -> str:
    rows = [f"| {i} | {c['name']} | {c['score']:.3f} |" for i, c in enumerate(classes, 1)]
    return "\n".join(["| rank | concept | score |", "|---:|---|---:|", *rows])


def neighbors_table(neighbors: list[dict]) -> str:
    if not neighbors:
        return "None: this tree has no known models to compare with."
    rows = [f"| `{n['id']}` | {n['class']} | {n.get('split', '')} | {n['score']:.3f} |" for n in neighbors]
    return "\n".join(["| model | class | split | similarity |", "|---|---|---|---:|", *rows])


# gaps between the two best concept scores that read as "clear" and "likely", per score unit: a z-score's unit is
# one standard deviation of an anchor's cosine over known models (about 0.1 cosine on the emoji trees)
CONFIDENCE_GAPS = {"z": (1.0, 0.3), "cosine": (0.05, 0.01), "probability": (0.1, 0.03)}


def confidence_words(score_gap: float, unit: str = "z") -> str:
    """How sure the top concept is, from the gap between the two best scores."""
    clear, likely = CONFIDENCE_GAPS[unit]
    if score_gap >= clear:
        return "clear"
    if score_gap >= likely:
        return "likely"
    return "uncertain: the top concepts score almost the same"


SCORE_WORDS = {
    "z": "Each concept's score is the cosine between the LoRA's encoding and the concept's anchor — the mean encoding "
         "of the known LoRAs of that concept, or its text where none is known — as a z-score against that anchor's "
         "usual cosine on the tree's known models (0: typical, 1: one standard deviation above).",
    "cosine": "Each concept's score is the cosine between the LoRA's reading and the reading of the concept's "
              "caption: no known models calibrate it, so compare the scores of one file with each other only.",
    "probability": "Concept scores are the probabilities of the expert's classifier head.",
}


def layers_read(names: list[str]) -> str:
    """'one layer, `x`' or 'N layers, `first` … `last`'."""
    return f"one layer, `{names[0]}`" if len(names) == 1 else f"{len(names)} layers, `{names[0]}` … `{names[-1]}`"


def render_card(facts: CardFacts) -> str:
    """The README.md text: YAML front matter, then the inferred facts and how they were inferred."""
    classes = facts.classes
    top = classes[0]["name"] if classes else "unknown"
    gap = classes[0]["score"] - classes[1]["score"] if len(classes) > 1 else 1.0
    if facts.prompt_source == "default":
        trigger = (f"The file names no trigger prompt; it was read with the default "
                   f"\u201c{as_text(facts.instance_prompt)}\u201d. Try the concept's name.")
    elif facts.instance_prompt:
        trigger = f"The file's metadata names the trigger prompt **\u201c{as_text(facts.instance_prompt)}\u201d**."
    else:
        trigger = "The file names no trigger prompt; try the concept's name."
    shown_meta = [f"- `{k}`: {as_text(facts.metadata[k])}" for k in METADATA_SHOWN if k in facts.metadata]
    name = as_text(facts.file_name, 120)
    if facts.notice:
        headline = f"# {name}: a LoRA for **{facts.base_model}** that changes (almost) nothing"
        verdict = f"- **Concept:** none — {as_text(facts.notice, 400)}"
    else:
        headline = f"# {name}: a LoRA for **{facts.base_model}** that most likely draws *{top}*"
        verdict = f"- **Most likely concept:** {top} ({confidence_words(gap, facts.score_unit)})"
    routing = (f"The router recognised the LoRA's base by its module names and shapes and sent it to `{facts.tree}`, "
               "the base's training-free reader." if facts.prompt_source else
               f"A router compared the LoRA's weights with the centres of the Model Trees it knows and sent it to "
               f"`{facts.tree}`.")
    body = f"""
{headline}

> Draft card written by ProbeX Studio from the weights alone. Check it and edit before publishing.

- **Base model (Model Tree):** `{facts.base_model}` (tree `{facts.tree}`, router confidence \
{facts.router_confidence:.2f})
- **File:** {facts.description}
{verdict}

{trigger}

## Inferred concepts

{concepts_table(classes)}

## Nearest known models

{neighbors_table(facts.neighbors)}

## How this was inferred

ProbeX ("Learning on Model Weights using Tree Experts", Horwitz et al., CVPR 2025) reads the weights, not images.
{routing}
{facts.expert[:1].upper() + facts.expert[1:] + ". " if facts.expert else ""}That tree's expert read {layers_read(facts.layers)} and mapped the weights into a space shared with text
({facts.text_encoder}, profile `{facts.profile}`). {SCORE_WORDS[facts.score_unit]} Nearest models are the known LoRAs
with the most similar encodings. No image was generated to produce this card.

## Limits

- Scores rank concepts; they are not probabilities. A concept the expert never saw can still score high when its
  text is close to one it did see.
- The expert only knows its own tree: a LoRA trained on another base model can be routed to the closest known tree.
- LoRAs that change style, composition or many subjects at once are summarised by one subject here.
{chr(10).join(["", "## Training metadata found in the file", "", *shown_meta]) if shown_meta else ""}
"""
    return str(ModelCard(f"---\n{front_matter(facts).to_yaml()}\n---\n{body}"))
