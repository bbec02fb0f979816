"""The app's verbs, UI-free: what the Gradio app and the CLI both call.

    studio = Studio.load()                       # the shipped bundle of PROBEX_PROFILE (or a dir / Hub repo id)
    studio.predict(path)                         # tree + router confidence, concepts, nearest known models
    studio.zero_shot(path, ["tiger", "lion"])    # scores over labels the user chooses
    studio.search("a striped wild cat")          # known models that match a text
    studio.map_figure(path, query)               # the tree's weight–text map with the request's points
    studio.model_card(path)                      # a Hub README.md draft
    studio.samples("train/model_idx_0003")       # images the tree's root draws with that LoRA

Every verb that takes a file starts from ``analyse``: read (safetensors only, size-capped) → refuse what is not a
LoRA of a known tree → route → encode the tree's layer. An ``Analysis`` can be passed instead of a path, so the app
reads an upload once and answers the follow-up questions (custom labels, map, card) from memory.

Inputs are paths. Links and Hub ids become temp files through ``probex.fetch.local_file`` (deleted after use); how
long uploads live is the app's business (probex.request_files). Nothing here writes into the bundle or deletes a
file, so a request cannot touch shipped artifacts.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from probex.bundle import Bundle
from probex.card import CardFacts, render_card
from probex.errors import InputError, NoExpertError, ProbexError, first_line
from probex.plots import Mark, weight_text_map
from probex.profiles import DEFAULT_PROFILE, PROJECT_ROOT, get_profile, resolve_bundle_dir
from probex.sd15 import PromptedReading, add_reader_tree, instance_prompt
from probex.text import described, load_text_encoder, prompt
from probex.weights import (
    FAMILY_NAMES,
    NEGLIGIBLE_UPDATE_NORM,
    LoraFactors,
    ModelWeights,
    describe,
    negligible,
    read_weights,
    short,
)

MAX_UPLOAD_BYTES = int(float(os.environ.get("PROBEX_MAX_UPLOAD_MB", "256")) * 2**20)  # rank-128 SD LoRAs ≈ 150 MB
FETCH_TIMEOUT_S = float(os.environ.get("PROBEX_FETCH_TIMEOUT_S", "60"))
MAX_LABELS = 64            # custom zero-shot labels per request
MAX_TEXT_CHARS = 200       # a label or a search text
SAMPLE_CACHE_SIZE = 512    # known models' samples are deterministic: drawn once, then served from memory
# A search text is read as vocabulary classes whose names are this close to it (all-MiniLM-L6-v2 cosine: unrelated
# phrases mostly sit below 0.3, a paraphrase or a kind of the same thing above 0.45), at most TOP of them
VOCAB_MATCH_MIN = {"all-MiniLM-L6-v2": 0.45}  # per text encoder; others search every text as typed
VOCAB_MATCH_TOP = 3
VOCAB_TEMPERATURE = 0.05
CLASS_MATCH_BOOST = 100.0  # ranks a read-as class's models above every weights-only match (z-scores are ≪ 100)
# an upload is "unlike every known class" below the cosine to the nearest train model that this share of validation
# models (known classes) reach
NOVELTY_KEPT = 0.95
SAME_FILE_COSINE = 0.999  # an upload read this close to a gallery model is that model (distinct LoRAs: ≤ 0.75)
MAX_TOP_K = 50             # concepts / neighbours / search results per request
NEGLIGIBLE_NOTICE = (f"this LoRA changes (almost) nothing: every layer's update scale·B·A has norm below "
                     f"{NEGLIGIBLE_UPDATE_NORM:g} (all-zero or untrained factors, or alpha 0), so there is no concept "
                     "to read from its weights")


@dataclass
class ClassText:
    """A tree's class vocabulary as its concept list and text search read it, computed once per tree."""
    anchors: torch.Tensor             # (C, r_T) Gallery.class_anchors
    calibration: tuple                # the anchors' z-norm (Gallery.calibration)
    search_calibration: tuple         # its models' z-norm against the class captions (Gallery.model_calibration)
    unseen_offset: float = 0.0        # added to classes without known models: the open-set list (Gallery.unseen_offset)
    map_points: dict | None = None    # class name → its place on the tree's map (Studio.class_points), on first use


@dataclass
class Analysis:
    """One file read, routed and encoded: what every file verb starts from."""

    source: str                 # file name, for messages and the card
    description: str            # weights.describe()
    metadata: dict[str, str]
    tree: str
    layers: list[str]           # the layers the tree's expert read (predict's "layer" joins them with ", ")
    distance: float
    confidence: float
    encoding: torch.Tensor      # (r_T,), unit norm
    negligible: bool = False    # the LoRA changes (almost) nothing: no concept is claimed for it
    instance_prompt: str | None = None   # the probe a prompted reader pushed through the LoRA (sd15.instance_prompt)
    prompt_source: str | None = None     # where that prompt came from: a metadata key, or "default"
    # filled from the encoding on first use (Studio.similarity, Studio.concept_scores) and kept: predict, card, map
    # and neighbours of one upload read the same tensors instead of recomputing them
    similarity: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    concept_scores: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)


class Studio:
    """A loaded bundle and the verbs on it. Thread-safe for concurrent requests: the experts and text encoder only
    read; each tree's image pipeline is guarded by its own lock (diffusers swaps LoRAs in and out of one model)."""

    def __init__(self, bundle, bundle_dir: Path, profile, warm: bool = True, notice: str = "",
                 prompted: dict[str, PromptedReading] | None = None):
        self.bundle, self.profile = bundle, profile
        self.notice = notice  # why a part of the profile is missing (e.g. its reader could not load), for the banner
        # tree → the reading of a training-free reader that takes each file's own instance prompt (probex.sd15)
        self.prompted: dict[str, PromptedReading] = dict(prompted or {})
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)  # None: only in-memory trees (sd15)
        self._text = None
        self._class_text: dict[str, ClassText | None] = {}  # tree → its class vocabulary read (None: no text head)
        self._text_lock = threading.Lock()
        self._pipelines: dict[str, object] = {}
        self._pipeline_locks: dict[str, threading.Lock] = {name: threading.Lock() for name in bundle.trees}
        self._pipelines_lock = threading.Lock()
        self._sample_cache: OrderedDict[tuple, list] = OrderedDict()
        self._sample_cache_lock = threading.Lock()
        self._novelty_threshold: dict[str, float | None] = {}  # tree → calibrated on its validation models
        # every text tree's class names and (2, C, d) their embeddings, alone and with their keywords
        self._vocabulary: tuple[list[str], torch.Tensor] | None = None
        if warm:  # the app: text encoder and class texts ready before the first request, not during it
            _ = self.text
            for name in bundle.trees:
                self.class_text(name)

    @property
    def text(self):
        """The bundle's text encoder, loaded on first use (the CLI answers a bad file without it)."""
        with self._text_lock:
            if self._text is None and self.bundle.text_encoder:
                self._text = load_text_encoder(self.bundle.text_encoder)
        return self._text

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, bundle_dir: str | Path | None = None, *, profile: str | None = None,
             warm: bool = True) -> "Studio":
        """The bundle in ``bundle_dir`` (a dir or Hub repo id), else the shipped one of ``profile`` (None: of
        ``PROBEX_PROFILE``). ``warm=False`` defers the text encoder to its first use (one-shot CLI calls)."""
        profile = get_profile(profile)
        named = bundle_dir is not None or bool(os.environ.get("PROBEX_BUNDLE"))
        if bundle_dir is not None:
            profile = replace(profile, bundle=str(bundle_dir))
        if profile.reader and not named and is_missing_local_dir(profile.bundle):
            # a training-free reader needs no trained bundle: it is the whole studio until one is built
            bundle, directory = Bundle(profile.name, profile.text_encoder, {}), None
        else:
            if is_missing_local_dir(profile.bundle):  # else "checkpoints/emoji-mini" would be looked up on the Hub
                raise ProbexError(f"no bundle at {profile.bundle}: the folder does not exist (build one with "
                                  "`python -m probex train`, or point --bundle / PROBEX_BUNDLE at one)")
            directory = resolve_bundle_dir(profile)
            bundle = Bundle.load(directory)
        notice, prompted = "", {}
        if profile.reader:
            try:
                name, reading = add_reader_tree(bundle, profile)
                prompted[name] = reading
            except InputError as err:  # offline, or no such base: the trained trees still answer
                if not bundle.trees:
                    raise ProbexError(f"the training-free {profile.reader} reader could not load: {err}") from None
                notice = f"the training-free {profile.reader} reader could not load ({err}); trained trees only"
        return cls(bundle, directory, profile, warm, notice, prompted)

    @property
    def trees(self) -> list[str]:
        return list(self.bundle.trees)

    def describe_bundle(self) -> str:
        """One line for the app's banner and the CLI."""
        sizes = ", ".join(f"{name} ({self.tree_size(name)}, {len(tree.gallery.vocabulary)} classes)"
                          for name, tree in self.bundle.trees.items())
        bundle = self.bundle_dir.name if self.bundle_dir else "none (training-free reader only)"
        return f"profile {self.profile.name} · bundle {bundle} · trees: {sizes}"

    def tree_size(self, tree: str) -> str:
        if tree in self.training_free_trees():
            return "training-free reader"
        return f"{len(self.bundle.trees[tree].gallery.ids)} models"

    def training_free_trees(self) -> list[str]:
        return list(self.prompted)

    def expert_note(self, tree: str) -> str:
        """Which expert reads the tree's files, in words for the banner, results and card."""
        t = self.bundle.trees[tree]
        if tree in self.prompted:
            return (f"read by the training-free {FAMILY_NAMES.get(t.family, t.family)} reader: the base UNet's "
                    f"{len(t.expert.blocks)} cross-attention blocks against {self.text.name} token states (no "
                    "training; the method is validated on the emoji jungle, not on SD 1.5 LoRAs here)")
        return f"read by the {tree} tree's {type(t.expert).__name__} expert"

    def examples(self) -> list[dict]:
        """The bundle's example LoRAs that exist on disk: [{"label", "path"}], labelled from their metadata,
        e.g. "🆕 tiger (a class the expert never saw)"."""
        paths = dict.fromkeys(Path(p) for p in self.bundle.examples if Path(p).is_file())  # unique, in order
        return [{"label": example_label(p), "path": p} for p in paths]

    # --------------------------------------------------------------------------------------------- input
    def read(self, source: str | Path | ModelWeights) -> ModelWeights:
        """The file's weights (size-capped, safetensors only); a full checkpoint is refused unless a tree takes it.
        Weights already read (``read_weights``) are checked the same way."""
        weights = source if isinstance(source, ModelWeights) else read_weights(source, max_bytes=MAX_UPLOAD_BYTES)
        if weights.kind == "full" and not any(g.kind == "full" for g in self.router().groups):
            what = describe(weights).removeprefix("full checkpoint, ")
            raise InputError(f"{weights.source}: this is a full checkpoint ({what}), not a LoRA; upload the LoRA "
                             "file (a few MB of lora_A/lora_B or lora_down/lora_up weights)")
        return weights

    def router(self):
        if self.bundle.router is None:
            raise ProbexError(f"bundle {self.bundle_dir and self.bundle_dir.name} has no router; rebuild it with `python -m probex train`")
        return self.bundle.router

    # ---------------------------------------------------------------------------------------- the pipeline
    def analyse(self, source: str | Path | ModelWeights | Analysis) -> Analysis:
        """Read → route → encode the tree's layer. An Analysis passes through unchanged."""
        if isinstance(source, Analysis):
            return source
        weights = self.read(source)
        route = self.router().route(weights)
        if not (math.isfinite(route.distance) and math.isfinite(route.confidence)):
            raise InputError(f"{weights.source}: its weights are too extreme to compare with any tree (the router's "
                             "distance overflowed)")
        tree = self.bundle.trees.get(route.tree)
        if tree is None:
            raise NoExpertError(f"{weights.source} routes to tree {route.tree}, which has no expert in this bundle")
        names = tree.layers
        missing = [n for n in names if n not in weights.layers]
        if missing and (len(missing) == len(names) or not tree.expert.absent_layers_unchanged):
            raise InputError(f"{weights.source}: has no {missing[0]} module, a layer the {route.tree} expert reads "
                             f"({describe(weights)})")
        prompt, prompt_source = None, None
        if route.tree in self.prompted:
            prompt, prompt_source = instance_prompt(weights.metadata)
        encoding = self.encode(route.tree, [weights.layers.get(n) for n in names], prompt)
        if not torch.isfinite(encoding).all():
            raise InputError(f"{weights.source}: the {route.tree} expert's reading of this file is not finite; its "
                             "weights are too extreme to read")
        return Analysis(weights.source, describe(weights), dict(weights.metadata), route.tree, names,
                        route.distance, route.confidence, encoding, negligible(weights), prompt, prompt_source)

    def expert(self, tree: str, prompt: str | None = None):
        """The tree's expert; for a prompted reader, its reader for that instance prompt (None: the tree's own)."""
        reading = self.prompted.get(tree)
        if reading is not None and prompt is not None:
            return reading.reader_for(prompt)
        return self.bundle.trees[tree].expert

    @torch.no_grad()
    def encode(self, tree: str, layers: list[LoraFactors | torch.Tensor | None],
               prompt: str | None = None) -> torch.Tensor:
        """The expert's unit-norm encoding of one model; multi-layer experts take the list, the others one item.
        None: a layer the model does not adapt (only for experts with ``absent_layers_unchanged``). ``prompt``: the
        instance prompt of a prompted reader."""
        t = self.bundle.trees[tree]
        batch = [None if layer is None else as_batch_of_one(layer) for layer in layers]
        try:
            e = self.expert(tree, prompt).encode(batch[0] if isinstance(t.layer, str) else batch)
        except (InputError, RuntimeError) as err:  # the layer exists with another shape than the expert reads
            raise InputError(f"the {tree} expert cannot read this file's layer: {first_line(err)}") from None
        return F.normalize(e[0], dim=-1)

    @torch.no_grad()
    def class_text(self, tree: str, prompt: str | None = None) -> ClassText | None:
        """The tree's class vocabulary read by its expert, with both z-norms; None without a text head. Cached.
        ``prompt``: a prompted reader's instance prompt (its reader keeps the features per prompt)."""
        t, reading = self.bundle.trees[tree], self.prompted.get(tree)
        if reading is not None and prompt not in (None, t.instance_prompt):
            features = reading.class_features(prompt)
            return ClassText(features, t.gallery.calibration(features), t.gallery.model_calibration(features))
        if tree not in self._class_text:
            text = reading.class_features(t.instance_prompt) if reading is not None else t.class_text_features()
            anchors = None if text is None else t.gallery.class_anchors(text)
            if anchors is None:
                self._class_text[tree] = None
            else:
                calibration = t.gallery.calibration(anchors)
                offset = t.gallery.unseen_offset(t.gallery.concept_scores(t.gallery.encodings, anchors, calibration))
                self._class_text[tree] = ClassText(anchors, calibration, t.gallery.model_calibration(text), offset)
        return self._class_text[tree]

    def class_anchors(self, tree: str) -> torch.Tensor | None:
        """(C, r_T) what each vocabulary class is scored against (Gallery.class_anchors); None without a text head."""
        read = self.class_text(tree)
        return None if read is None else read.anchors

    @torch.no_grad()
    def text_features(self, tree: str, texts: list[str], instance: str | None = None) -> torch.Tensor:
        """(len(texts), r_T) unit vectors of free texts, put in the tree's prompt template first. ``instance``: a
        prompted reader's instance prompt."""
        t = self.bundle.trees[tree]
        if t.expert.head_kind != "align":
            raise ProbexError(f"the {tree} expert has no text head (it was trained on labels, not text); "
                              "zero-shot labels and text search need an aligned expert")
        prompts = [prompt(t.prompt_template, text) for text in texts]
        expert = self.expert(tree, instance)
        return expert.text_features(expert.text_input(self.text, prompts))

    # ------------------------------------------------------------------------------------------- verbs
    def route(self, source: str | Path | ModelWeights) -> dict:
        weights = self.read(source)
        r = self.router().route(weights)
        return require_finite({"tree": r.tree, "router": {"distance": r.distance, "confidence": r.confidence,
                                                          "layer": r.layer, "exact_signature": r.exact_signature,
                                                          "method": r.method},
                               "notice": NEGLIGIBLE_NOTICE if negligible(weights) else None})

    @torch.no_grad()
    def predict(self, source: str | Path | ModelWeights | Analysis, top_k: int = 5) -> dict:
        """Tree, concepts and nearest known models. A LoRA that changes nothing gets ``notice`` and no concepts."""
        top_k = check_top_k(top_k)
        a = self.analyse(source)
        similarity = None if a.negligible else self.similarity(a)
        neighbors = [] if similarity is None else self.ranked(a.tree, similarity, top_k)
        return require_finite({
            "tree": a.tree, "layer": ", ".join(a.layers), "router": {"distance": a.distance, "confidence": a.confidence},
            "classes": [] if a.negligible else self.concepts(a, top_k), "score_unit": self.score_unit(a.tree),
            "neighbors": neighbors, "notice": NEGLIGIBLE_NOTICE if a.negligible else None,
            "known_as": known_as(neighbors), "novelty": None if a.negligible else self.novelty(a, similarity),
            "file": a.source, "description": a.description, "base_model": self.base_model(a.tree),
            "expert": self.expert_note(a.tree), "instance_prompt": a.instance_prompt,
            "prompt_source": a.prompt_source})

    def concepts(self, a: Analysis, top_k: int) -> list[dict]:
        """Top-k of the tree's class vocabulary by ``concept_scores``; "known": whether the class has known models
        (else it is read from its text alone)."""
        g = self.bundle.trees[a.tree].gallery
        scores, known = self.concept_scores(a), g.known_classes
        order = torch.argsort(scores, descending=True)[:top_k].tolist()
        return [{"name": g.vocabulary[i], "score": float(scores[i]), "known": bool(known[i])} for i in order]

    @torch.no_grad()
    def concept_scores(self, a: Analysis) -> torch.Tensor:
        """(C,) scores of the upload over the tree's class vocabulary: cosine to each class's anchor — the mean of its
        known models, else its text (align) — z-normed per anchor (Gallery.concept_scores), with the open-set offset
        on classes without known models (Gallery.unseen_offset); or the classifier head's probabilities. Computed
        once per Analysis."""
        if a.concept_scores is None:
            t = self.bundle.trees[a.tree]
            read = self.class_text(a.tree, a.instance_prompt)
            if read is not None:
                z = t.gallery.concept_scores(a.encoding[None], read.anchors, read.calibration)[0]
                a.concept_scores = t.gallery.open_set_scores(z, read.unseen_offset)
            else:
                logits = t.expert.logits(a.encoding[None])[0]
                a.concept_scores = logits.softmax(-1) if t.expert.head_kind == "multiclass" else logits.sigmoid()
        return a.concept_scores

    def score_unit(self, tree: str) -> str:
        """What the tree's concept scores are: "z" (z-normed cosine to class anchors), "cosine" (a tree without
        known models to z-norm on) or "probability" (a classifier head's)."""
        if self.class_text(tree) is None:
            return "probability"
        return "z" if sum(s == "train" for s in self.bundle.trees[tree].gallery.splits) >= 2 else "cosine"

    @torch.no_grad()
    def zero_shot(self, source: str | Path | ModelWeights | Analysis, labels: list[str]) -> list[dict]:
        """Cosine scores over exactly the user's labels, best first (true zero-shot: any text)."""
        labels = clean_labels(labels)
        a = self.analyse(source)
        if a.negligible:
            raise InputError(f"{a.source}: {NEGLIGIBLE_NOTICE}")
        return top_scores(labels, self.text_features(a.tree, labels, a.instance_prompt) @ a.encoding, len(labels))

    @torch.no_grad()
    def search(self, text: str, top_k: int = 5) -> dict:
        """Known models whose encodings best match the text, over every tree with a text head: each model's cosine
        to the query as a z-score against its cosines with the tree's class captions (Gallery.search_scores).

        The query is first read against the vocabulary, text to text (``read_query``): a description of a known class
        is searched as that class's caption, which the weight-side reading understands, and that class's models come
        first; a text unlike every class is searched as typed. ``read_as`` says which happened."""
        text = clean_text(text)
        top_k = check_top_k(top_k)
        found, read_as = [], self.read_query(text)
        # models of the classes the text was read as come first (known models' classes are known), each group
        # ordered by its weights' reading of the query
        weight = {r["class"]: r["weight"] for r in read_as}
        boost = lambda cls: CLASS_MATCH_BOOST * weight.get(cls, 0.0)  # noqa: E731
        searchable = [name for name, t in self.bundle.trees.items() if t.expert.head_kind == "align" and t.gallery.ids]
        if not any(t.expert.head_kind == "align" for t in self.bundle.trees.values()):
            raise ProbexError("no tree in this bundle has a text head; text search needs an aligned expert")
        if not searchable:
            raise ProbexError("no tree in this bundle has known models to search"
                              + (" (the training-free reader has none: it gives concepts and zero-shot scores)"
                                 if self.prompted else ""))
        for name in searchable:
            t = self.bundle.trees[name]
            query = self.query_features(name, text, read_as)
            scores = t.gallery.search_scores(query, self.class_text(name).search_calibration)[0]
            order = scores + torch.tensor([boost(class_name(c)) for c in t.gallery.model_classes])
            found += [{**m, "found_by": "class" if m["class"] in weight else "weights",
                       "rank": m["score"] + boost(m["class"])}
                      for m in self.ranked(name, scores, top_k, order_by=order)]
        found.sort(key=lambda m: m.pop("rank"), reverse=True)
        return require_finite({"models": found[:top_k], "read_as": read_as})

    @torch.no_grad()
    def vocabulary_similarity(self, text: str, with_keywords: bool = True) -> tuple[list[str], torch.Tensor]:
        """Every text tree's class names, sorted, and (C,) the text's cosine to each, text to text: to the name alone,
        or (``with_keywords``) the closer of the name and the name with its keywords — keywords let "a kitten" find
        cat, and never push a text that matches the name itself lower. The class texts are embedded once."""
        if self._vocabulary is None:
            keywords: dict[str, list[str]] = {}  # class → its keywords (from the first tree that has some)
            for t in self.bundle.trees.values():
                if t.expert.head_kind == "align":
                    for c in t.gallery.vocabulary:
                        keywords.setdefault(c, [])
                    for c, words in zip(t.gallery.vocabulary, t.gallery.vocabulary_keywords):
                        keywords[c] = keywords[c] or words
            names = sorted(keywords)
            texts = names + [described(name, keywords[name]) for name in names]
            self._vocabulary = (names, self.text.embed(texts).reshape(2, len(names), -1) if names
                                else torch.zeros(2, 0, self.text.dim))
        names, embeddings = self._vocabulary
        return names, (embeddings[:2 if with_keywords else 1] @ self.text.embed([text])[0]).amax(0)

    @torch.no_grad()
    def read_query(self, text: str) -> list[dict]:
        """The vocabulary classes (over every tree with a text head) a search text reads as, text to text: those whose
        names, alone or with their keywords where the gallery has some ("cat (kitten, pet)"), are within
        VOCAB_MATCH_MIN (MiniLM cosine) of it, best first, at most VOCAB_MATCH_TOP, with softmax weights of their
        similarities. Empty: no class is that close (or the text encoder has no threshold here)."""
        threshold = VOCAB_MATCH_MIN.get(self.text.name)
        if threshold is None:
            return []
        names, similarity = self.vocabulary_similarity(text)
        close = torch.nonzero(similarity >= threshold).flatten()
        close = close[torch.argsort(similarity[close], descending=True)][:VOCAB_MATCH_TOP]
        weights = torch.softmax(similarity[close] / VOCAB_TEMPERATURE, 0)
        return [{"class": names[i], "similarity": float(similarity[i]), "weight": float(w)}
                for i, w in zip(close.tolist(), weights)]

    @torch.no_grad()
    def query_features(self, tree: str, text: str, read_as: list[dict]) -> torch.Tensor:
        """(1, r_T) weight-side features of a search text: the weighted captions of the classes it reads as, else
        the text's own."""
        if not read_as:
            return self.text_features(tree, [text])
        features = self.text_features(tree, [r["class"] for r in read_as])
        return F.normalize(torch.tensor([r["weight"] for r in read_as]) @ features, dim=-1)[None]

    def novelty(self, a: Analysis, similarity: torch.Tensor | None) -> dict | None:
        """Whether an upload looks unlike every known class. Where the tree's vocabulary has classes with and without
        known models, the open-set concept list decides: an unseen class leads it (test "unseen class first"; how well
        that tells held-out from known LoRAs: bench/novelty.py). Elsewhere: its cosine
        to the nearest train-split model (``similarity`` to every gallery model) against the threshold that
        NOVELTY_KEPT of the tree's validation models reach (test "nearest known model"). None without a reading."""
        tree = a.tree
        g = self.bundle.trees[tree].gallery
        known = g.known_classes
        if self.class_text(tree, a.instance_prompt) is not None and 0 < int(known.sum()) < len(known):
            scores = self.concept_scores(a)
            best_known, best_unseen = (int(torch.where(mask, scores, -torch.inf).argmax()) for mask in (known, ~known))
            return {"test": "unseen class first", "unlike_known": bool(scores[best_unseen] > scores[best_known]),
                    "best_known": g.vocabulary[best_known], "best_unseen": g.vocabulary[best_unseen],
                    "margin": float(scores[best_unseen] - scores[best_known])}
        train = [i for i, s in enumerate(g.splits) if s == "train"]
        if similarity is None or not train:
            return None
        if tree not in self._novelty_threshold:
            x = g.unit_encodings
            val = [i for i, s in enumerate(g.splits) if s == "val"]
            self._novelty_threshold[tree] = (
                float(torch.quantile((x[val] @ x[train].T).max(1).values, 1 - NOVELTY_KEPT)) if len(val) >= 5 else None)
        threshold = self._novelty_threshold[tree]
        if threshold is None:
            return None
        nearest = float(similarity[train].max())
        return {"test": "nearest known model", "nearest_known_cosine": nearest, "threshold": threshold,
                "unlike_known": nearest < threshold}

    def ranked(self, tree: str, scores: torch.Tensor, top_k: int, order_by: torch.Tensor | None = None) -> list[dict]:
        """The tree's top_k gallery models by ``scores`` (one per model; or by ``order_by``), best first."""
        g = self.bundle.trees[tree].gallery
        order = torch.argsort(scores if order_by is None else order_by, descending=True)[:top_k].tolist()
        return [{"id": g.ids[i], "class": class_name(g.model_classes[i]), "split": g.splits[i], "score": float(scores[i]),
                 "tree": tree} for i in order]

    def gallery_similarity(self, tree: str, vector: torch.Tensor) -> torch.Tensor:
        return self.bundle.trees[tree].gallery.unit_encodings @ F.normalize(vector.float(), dim=-1)

    def similarity(self, a: Analysis) -> torch.Tensor:
        """The upload's cosine to every known model of its tree (concept-free: also for a negligible LoRA); computed
        once per Analysis."""
        if a.similarity is None:
            a.similarity = self.gallery_similarity(a.tree, a.encoding)
        return a.similarity

    # ---------------------------------------------------------------------------------------------- map
    @torch.no_grad()
    def map_figure(self, source: str | Path | Analysis | None = None, query: str | None = None,
                   tree: str | None = None):
        """The tree's weight–text map: known models at their build-time UMAP coordinates, class names and the
        request's points (upload, query) placed without refitting UMAP."""
        a = self.analyse(source) if source is not None else None
        tree = a.tree if a else (tree or self.default_tree())
        t = self.bundle.trees[tree]
        g = t.gallery
        if not g.ids:
            raise ProbexError(f"tree {tree} has no known models to map (a training-free reader: concepts and zero-shot "
                              "only; a bundle trained on a population adds the map)")
        marks, labelled, scores = [], [], None  # scores: the models' cosine to the upload, else to the query
        if a is not None:
            marks.append(self.mark(tree, a.encoding, "your LoRA", "upload"))
            labelled = [c["name"] for c in self.concepts(a, 5)]
            scores = self.similarity(a).tolist()
        if query:
            text = clean_text(query)
            q = self.query_features(tree, text, self.read_query(text))[0]
            marks.append(self.mark(tree, q, f"“{query.strip()}”", "query"))
            if scores is None:
                scores = self.gallery_similarity(tree, q).tolist()
        class_points = self.class_points(tree)
        if class_points is not None:
            if len(g.vocabulary) <= 40 and not labelled:
                labelled = list(g.vocabulary)
        return weight_text_map(g.coords.numpy(), g.ids, [class_name(c) for c in g.model_classes], g.splits, scores,
                               class_points, labelled, marks,
                               title=f"Weight–text map of tree {tree}")

    def class_points(self, tree: str) -> dict[str, tuple[float, float]] | None:
        """Each vocabulary class's place on the tree's map (its anchor placed among the known models), computed once
        per tree with its class text: the same for every map drawn."""
        read = self.class_text(tree)
        if read is not None and read.map_points is None:
            xy = self.bundle.place(tree, read.anchors).tolist()
            read.map_points = {name: (float(x), float(y))
                               for name, (x, y) in zip(self.bundle.trees[tree].gallery.vocabulary, xy)}
        return None if read is None else read.map_points

    def mark(self, tree: str, vector: torch.Tensor, label: str, kind: str):
        x, y = self.bundle.place(tree, vector[None])[0]
        return Mark(label, float(x), float(y), kind)

    def has_gallery(self, tree: str | None = None) -> bool:
        """Whether the tree (None: any tree) has known models: neighbours, the map and search need them."""
        names = [tree] if tree else list(self.bundle.trees)
        return any(len(self.bundle.trees[n].gallery.ids) for n in names)

    def default_tree(self) -> str:
        """The tree the map shows before anything is uploaded: the largest one."""
        return max(self.bundle.trees, key=lambda name: len(self.bundle.trees[name].gallery.ids))

    # --------------------------------------------------------------------------------------------- card
    def model_card(self, source: str | Path | ModelWeights | Analysis, top_k: int = 5,
                   prediction: dict | None = None) -> str:
        """The Hub README.md draft. ``prediction``: ``predict``'s answer for this source at ``top_k``, when the
        caller has it already (the app predicts once per upload)."""
        a = self.analyse(source)
        r = prediction if prediction is not None else self.predict(a, top_k)
        return render_card(CardFacts(
            file_name=a.source, description=a.description, tree=a.tree, base_model=r["base_model"], layers=a.layers,
            router_confidence=a.confidence, classes=r["classes"], neighbors=r["neighbors"], profile=self.profile.name,
            notice=r["notice"], text_encoder=self.text.name,
            instance_prompt=a.instance_prompt or a.metadata.get("prompt") or a.metadata.get("instance_prompt"),
            metadata=a.metadata, score_unit=r["score_unit"], expert=r["expert"], prompt_source=a.prompt_source))

    def base_model(self, tree: str) -> str:
        """The tree's root as a card names it: a Hub id as is, a local root folder by its name."""
        root = self.bundle.trees[tree].root_model
        if not root:
            return tree
        local = Path(root) if Path(root).is_absolute() else PROJECT_ROOT / root
        return local.name if local.is_dir() else root

    # ------------------------------------------------------------------------------------------ samples
    def tree_of(self, model_id: str, tree: str | None = None) -> str | None:
        """The tree holding a known model id (ids are unique within a tree; pass ``tree`` when several hold it)."""
        for name in ([tree] if tree else self.bundle.trees):
            if name in self.bundle.trees and model_id in self.bundle.trees[name].gallery.ids:
                return name
        return None

    def is_known_model(self, model_id: str, tree: str | None = None) -> bool:
        return self.tree_of(model_id, tree) is not None

    def samples(self, model: str | Path | Analysis, n: int = 4, seed: int = 0, tree: str | None = None,
                analysis: Analysis | None = None) -> list:
        """``n`` images from the tree's root pipeline with a LoRA on it: a known model (by id; drawn once, then
        cached) or a LoRA file (never cached; routed first, unless ``analysis``, this file's own, is given)."""
        if isinstance(model, str) and self.is_known_model(model, tree):
            tree = self.tree_of(model, tree)
            drawn = self.sample_source(tree, model)
            if drawn is None:
                raise ProbexError(f"model {model} ships no LoRA file to draw samples from")
            return self.shipped_samples(tree, drawn, n, seed)
        if isinstance(model, Analysis):
            raise ProbexError("samples of an upload need its file, not only its analysis")
        a = analysis or self.analyse(model)
        return self.draw(a.tree, Path(model), self.sample_prompt(a.tree, a.metadata), n, seed)

    def shipped_samples(self, tree: str, model_id: str, n: int = 1, seed: int = 0) -> list:
        """Images of a shipped sample LoRA, drawn once and then served from memory (they are deterministic). Keyed
        by the file drawn, so the models of a class drawn by one stand-in share its images."""
        key = (tree, model_id, n, seed)
        with self._sample_cache_lock:
            images = self._sample_cache.get(key)
        if images is None:
            path = Path(self.bundle.trees[tree].gallery.sample_paths[model_id])
            images = self.draw(tree, path, self.sample_prompt(tree, {}), n, seed)
            with self._sample_cache_lock:
                self._sample_cache[key] = images
                while len(self._sample_cache) > SAMPLE_CACHE_SIZE:
                    self._sample_cache.popitem(last=False)
        return images

    def warm_samples(self) -> int:
        """Draw every shipped sample LoRA once, as the neighbour galleries show it (one image, seed 0), so a visitor
        then waits only for the upload's own samples. For a server to run beside its first requests (each draw holds
        its tree's pipeline for one image). Returns how many were drawn."""
        shipped = [(name, model_id) for name, tree in self.bundle.trees.items() if tree.root_model
                   for model_id in tree.gallery.sample_paths][:SAMPLE_CACHE_SIZE // 2]  # room left for the rest
        for name, model_id in shipped:
            self.shipped_samples(name, model_id)
        return len(shipped)

    def sample_source(self, tree: str, model_id: str) -> str | None:
        """The id of the model whose shipped LoRA is drawn for ``model_id``: itself when its file ships, else a
        shipped model of the same class (bundles ship about one LoRA per class to stay small), else None."""
        g = self.bundle.trees[tree].gallery
        if model_id in g.sample_paths:
            return model_id
        wanted = class_name(g.model_classes[g.ids.index(model_id)])
        index = {m: i for i, m in enumerate(g.ids)}
        return next((other for other in g.sample_paths if class_name(g.model_classes[index[other]]) == wanted), None)

    def drawable_neighbors(self, source: str | Path | Analysis, n: int = 4, search_k: int = 50) -> list[dict]:
        """The nearest known models that can be drawn (their LoRA, or one of their class, ships with the bundle)."""
        a = self.analyse(source)
        return self.drawable(self.ranked(a.tree, self.similarity(a), search_k), n)

    def drawable(self, models: list[dict], n: int) -> list[dict]:
        """The first ``n`` of ``models`` (dicts with "id" and "tree") that can be drawn: a held-out-class model has no
        LoRA of its class in the bundle and is passed over."""
        return [m for m in models if self.sample_source(m["tree"], m["id"]) is not None][:n]

    def sample_prompt(self, tree: str, metadata: dict[str, str]) -> str:
        """What the LoRA is prompted with: its own trigger prompt if the file names one, else the tree's."""
        t = self.bundle.trees[tree]
        return (metadata.get("prompt") or metadata.get("instance_prompt") or t.instance_prompt
                or prompt(t.prompt_template, "sks"))

    def draw(self, tree: str, lora: Path, prompt: str, n: int, seed: int) -> list:
        from probex.generate import sample  # diffusers takes seconds to import: only when something is drawn

        pipe = self.pipeline(tree)
        with self._pipeline_locks[tree]:
            return sample(pipe, lora, prompt, n=n, seed=seed)

    def pipeline(self, tree: str):
        """The tree's root pipeline, loaded on first use (the slow part) and kept."""
        from probex.generate import load_pipeline  # diffusers: as in draw

        with self._pipelines_lock:
            if tree not in self._pipelines:
                root = self.bundle.trees[tree].root_model
                if not root:
                    raise ProbexError(f"tree {tree} names no root model; samples cannot be drawn")
                self._pipelines[tree] = load_pipeline(self.profile, root_model=str(root))
            return self._pipelines[tree]


def read_upload(path: str | Path) -> ModelWeights:
    """The file checked and read as every verb reads it, without a bundle: callers fail fast on bad files."""
    return read_weights(path, max_bytes=MAX_UPLOAD_BYTES)


def load_with_fallback(bundle_dir: str | Path | None = None) -> tuple[Studio | None, str]:
    """(studio, notice) for the app: the profile's bundle; if that cannot load and the profile is not the embedded
    one, the embedded emoji-mini bundle; if nothing loads, (None, why) — the app still starts and says so."""
    try:
        studio = Studio.load(bundle_dir)
        return studio, studio.notice
    except ProbexError as err:
        first = str(err)
    profile = get_profile().name
    if bundle_dir is None and profile != DEFAULT_PROFILE and not os.environ.get("PROBEX_BUNDLE"):
        try:
            return (Studio.load(profile=DEFAULT_PROFILE),
                    f"profile {profile} could not load ({first}); running {DEFAULT_PROFILE} instead")
        except ProbexError as err:
            first = f"{first}; {DEFAULT_PROFILE}: {err}"
    return None, first


# ---------------------------------------------------------------------------------------------- helpers
def as_batch_of_one(layer: LoraFactors | torch.Tensor):
    """One model's layer in the experts' batch form: factors (up, down, scale) or a dense (1, d_W, d_H)."""
    if isinstance(layer, LoraFactors):
        return layer.up[None], layer.down[None], torch.tensor([layer.scale])
    return layer[None]


def class_name(label) -> str:
    """A gallery model's class as one name: its name (generative trees) or its label list joined (discriminative
    trees)."""
    return ", ".join(label) if isinstance(label, (list, tuple)) else str(label)


def example_label(path: Path) -> str:
    """"tiger · a class the expert never saw" from the example file's own metadata (header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 — a label is cosmetic; the file is validated when it is used
        meta = {}
    name = meta.get("class_name") or path.stem
    parts = path.stem.split("__")
    tree = f" · tree {parts[0]}" if len(parts) == 3 else ""  # shipped examples are named tree__split__model
    if "holdout" in path.stem:
        return f"{name} · held-out class (never seen in training){tree}"
    return f"{name} · test model{tree}"


def top_scores(names: list[str], scores: torch.Tensor, k: int) -> list[dict]:
    order = torch.argsort(scores, descending=True)[:k].tolist()
    return [{"name": names[i], "score": float(scores[i])} for i in order]


def known_as(neighbors: list[dict]) -> dict | None:
    """The gallery model an upload is: its first neighbour when read within SAME_FILE_COSINE of it (the same file, up
    to the gallery's fp16 storage), else None. That neighbour is then itself, which says nothing about a file the
    gallery lacks."""
    return neighbors[0] if neighbors and neighbors[0]["score"] >= SAME_FILE_COSINE else None


def check_top_k(value) -> int:
    """``top_k`` as API clients send it (an int, or a float slider value that is whole), else a one-line refusal."""
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not whole or not 1 <= value <= MAX_TOP_K:
        raise InputError(f"top_k must be a whole number from 1 to {MAX_TOP_K}; got {short(value)}")
    return int(value)


def require_finite(result):
    """The answer itself, once every number in it is finite (strict JSON, no NaN on screen); else a refusal."""
    def walk(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError("the weights are too extreme to read: a score came out as "
                             f"{value} (the file's values overflow the expert's arithmetic)")
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            walk(item)
    walk(result)
    return result


def clean_text(text: str) -> str:
    text = " ".join(str(text or "").split())
    if not text:
        raise InputError("the text is empty; type what the model should draw, e.g. 'a striped wild cat'")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"the text is {len(text)} characters; keep it under {MAX_TEXT_CHARS}")
    return text


def clean_labels(labels: list[str] | str) -> list[str]:
    """Labels from a list and/or comma-separated strings; blanks dropped, duplicates kept once, order kept."""
    if labels is None or isinstance(labels, str):
        labels = [labels or ""]
    elif not isinstance(labels, (list, tuple)):
        raise InputError(f"labels must be text or a list of texts; got {short(labels)}")
    parts = [part for label in labels for part in str(label).split(",")]
    cleaned = list(dict.fromkeys(" ".join(part.split()) for part in parts))
    cleaned = [label for label in cleaned if label]
    if not cleaned:
        raise InputError("no labels given; type candidates separated by commas, e.g. 'tiger, lion, house cat'")
    if len(cleaned) > MAX_LABELS:
        raise InputError(f"{len(cleaned)} labels is more than the {MAX_LABELS} one request may score")
    for label in cleaned:
        if len(label) > MAX_TEXT_CHARS:
            raise InputError(f"a label is {len(label)} characters; keep each under {MAX_TEXT_CHARS}")
    return cleaned


def is_missing_local_dir(ref: str) -> bool:
    """A bundle reference that names a folder here (absolute, ./…, or under an existing folder of the working dir
    or the project) which does not exist — as opposed to a Hub repo id."""
    path = Path(ref).expanduser()
    if path.is_dir() or (PROJECT_ROOT / ref).is_dir():
        return False
    first = Path(ref).parts[0] if Path(ref).parts else ""
    return (path.is_absolute() or ref.startswith((".", "~")) or Path(first).is_dir()
            or (PROJECT_ROOT / first).is_dir())
