"""Which Model Tree does a model belong to?

Models are first grouped by architecture (``Signature.digest``): trees only exist among models of one architecture.
Within a group, trees are found as the paper does: scipy hierarchical clustering (``linkage``, its default single
linkage) on ℓ2 distances of ONE layer; a model is routed to the nearest tree centre (mean of the tree's layer).

Distances between LoRAs are distances between their products scale·B@A, computed from the factors only:
‖ΔW_i − ΔW_j‖² = ‖ΔW_i‖² + ‖ΔW_j‖² − 2⟨ΔW_i, ΔW_j⟩ with ⟨B_iA_i, B_jA_j⟩ = Σ (B_iᵀB_j) ⊙ (A_iA_jᵀ), i.e.
tr((B_iᵀB_j)(A_jA_iᵀ)): r×r matrices instead of d_out×d_in ones. Sums run in float64 because within-tree distances
are small next to the norms they are computed from.

A LoRA tree's centre (the mean of its members' products) is exact in either of two forms, and the router keeps the
smaller one: dense (d_out × d_in), or factors concatenated, up = [s_1B_1, …, s_nB_n]/n and down = [A_1; …; A_n]
(Σr × (d_out + d_in) numbers). Small trees of big layers stay factors; big trees become one dense matrix.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from probex.errors import InputError, NoExpertError, ProbexError
from probex.weights import FAMILY_NAMES, LoraFactors, ModelWeights, Signature, layer_shape

Item = LoraFactors | torch.Tensor

# One tree unless the largest gap between consecutive merge heights is over GAP_RATIO × the median merge height
# and leaves every tree at least MIN_TREE_SIZE models (see count_trees).
GAP_RATIO = 1.0
MIN_TREE_SIZE = 2
GRAM_CHUNK_ELEMENTS = 2**24  # bounds the (chunk, r, N, r) products of the factor Gram (~128 MB of float64)


@dataclass(frozen=True)
class Route:
    tree: str
    distance: float  # ℓ2 distance of the model's routing layer to the tree centre
    confidence: float  # ≥ 2 trees: 1 − d_nearest / d_second (0 = halfway, 1 = on the centre); 1 tree: min(1, radius/d)
    layer: str
    exact_signature: bool  # False: routed on a compatible routing layer although the module set differs
    method: str = "centre"  # "centre": nearest tree centre; "root": the tree whose root listens loudest (see Tree)


@dataclass
class Tree:
    name: str
    centre: Item
    radius: float  # largest member distance to the centre when the tree was found
    size: int
    # LoRA layer → the tree root's matrix that reads that layer's output, at unit Frobenius norm (to_v → to_out.0).
    # A LoRA is trained by gradients its own root sends back through that matrix, so its update is amplified more by
    # its own root's listener than by another root's — what tells apart trees whose roots differ only in their seed.
    listeners: dict = field(default_factory=dict)


@dataclass
class Group:
    """The trees of one architecture, found on one layer."""

    digest: str
    family: str | None
    kind: str
    layer: str
    shape: tuple[int, int]
    trees: list[Tree]
    heights: list[float] = field(default_factory=list)  # dendrogram merge heights, for plots and audits


# --------------------------------------------------------------------------------------------- geometry
def inner(x: Item, y: Item) -> float:
    """Frobenius ⟨x, y⟩ of two layers (dense or LoRA factors) without forming a LoRA product."""
    if isinstance(x, torch.Tensor) and isinstance(y, LoraFactors):
        x, y = y, x
    if isinstance(x, LoraFactors) and isinstance(y, LoraFactors):
        ups = x.up.double().T @ y.up.double()
        downs = x.down.double() @ y.down.double().T
        return x.scale * y.scale * float((ups * downs).sum())
    if isinstance(x, LoraFactors):
        return x.scale * float(((x.up.double().T @ y.double()) * x.down.double()).sum())
    return float((x.double() * y.double()).sum())


def distance(x: Item, y: Item) -> float:
    return float(np.sqrt(max(inner(x, x) + inner(y, y) - 2 * inner(x, y), 0.0)))


def gram(items: list[Item]) -> np.ndarray:
    """All pairwise inner products ⟨x_i, x_j⟩, batched; LoRAs of mixed ranks are zero-padded (exact)."""
    if all(isinstance(x, torch.Tensor) for x in items):
        flat = torch.stack([x.double().reshape(-1) for x in items])
        return (flat @ flat.T).numpy()
    if not all(isinstance(x, LoraFactors) for x in items):
        raise ValueError("a group mixes LoRA factors and dense layers")
    n, rank = len(items), max(x.rank for x in items)
    d_out, d_in = items[0].shape
    ups = torch.zeros(d_out, n, rank, dtype=torch.float64)  # (d_out, N·r): one matmul gives every BᵢᵀBⱼ
    downs = torch.zeros(n, rank, d_in, dtype=torch.float64)
    for i, x in enumerate(items):
        ups[:, i, : x.rank] = x.scale * x.up.double()
        downs[i, : x.rank] = x.down.double()
    ups, downs = ups.reshape(d_out, n * rank), downs.reshape(n * rank, d_in)
    result = np.empty((n, n))
    chunk = max(1, GRAM_CHUNK_ELEMENTS // (n * rank * rank))
    for start in range(0, n, chunk):
        rows = slice(start * rank, min(start + chunk, n) * rank)
        up_products = ups[:, rows].T @ ups  # (c·r, N·r): BᵢᵀBⱼ blocks
        down_products = downs[rows] @ downs.T  # (c·r, N·r): AᵢAⱼᵀ blocks
        blocks = (up_products * down_products).reshape(-1, rank, n, rank)
        result[start: start + blocks.shape[0]] = blocks.sum(dim=(1, 3)).numpy()
    return result


def distances_from_gram(g: np.ndarray) -> np.ndarray:
    norms = np.diag(g)
    return np.sqrt(np.maximum(norms[:, None] + norms[None, :] - 2 * g, 0.0))


def pairwise_distances(items: list[Item]) -> np.ndarray:
    """(N, N) ℓ2 distances between layers (between scale·B@A products for LoRAs)."""
    d = distances_from_gram(gram(items))
    np.fill_diagonal(d, 0.0)
    return d


def mean_layer(items: list[Item]) -> Item:
    """The exact mean, as dense or concatenated factors, whichever stores fewer numbers."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack([x.double() for x in items]).mean(0).float()
    d_out, d_in = items[0].shape
    up = torch.cat([x.scale * x.up.double() for x in items], dim=1) / len(items)
    down = torch.cat([x.down.double() for x in items], dim=0)
    if up.shape[1] * (d_out + d_in) < d_out * d_in:
        return LoraFactors(up.float(), down.float(), 1.0)
    return (up @ down).float()


# ------------------------------------------------------------------------------------------- tree finding
def count_trees(merges: np.ndarray, gap_ratio: float = GAP_RATIO, min_tree_size: int = MIN_TREE_SIZE) -> int:
    """Number of trees read off a single-linkage dendrogram (scipy ``linkage`` output).

    Rule: the merge heights h_1 ≤ … ≤ h_{N−1} are cut at their largest gap h_{k+1} − h_k, leaving N − k trees —
    if that gap is larger than ``gap_ratio`` × the median merge height (the typical distance at which models of one
    tree join). Otherwise everything is ONE tree. A cut that would leave a "tree" with fewer than ``min_tree_size``
    models is an outlier, not a tree: the next largest gap is tried, under the same test.
    Fewer than 3 models (at most one merge, nothing to compare) → 1 tree.

    Why these numbers: weight layers are high-dimensional, where distances within one population concentrate, so its
    merges happen at nearly the same height and a gap as big as a whole merge height stands out. Measured on single
    Gaussian clouds (N = 10…300, 30–40 draws each, dimension 8…2000, also with log-normal member norms and
    Student-t entries): no false split with these defaults; without the size rule, clouds whose member norms vary
    log-normally (σ = 0.5) split off their largest model in up to 9 of 30 draws. (Dimension 2: 3 of 40 — weight
    layers are never that small.)
    """
    heights = np.asarray(merges)[:, 2] if len(merges) else np.zeros(0)
    if len(heights) < 2:
        return 1
    gaps = np.diff(heights)
    typical = np.median(heights)
    for cut in np.argsort(gaps)[::-1]:
        if gaps[cut] <= gap_ratio * typical:
            break
        k = len(heights) - cut
        sizes = np.bincount(fcluster(merges, k, criterion="maxclust"))[1:]
        if sizes.min() >= min_tree_size:
            return int(k)
    return 1


def find_trees(items: list[Item], *, n_trees: int | None = None, gap_ratio: float = GAP_RATIO):
    """Cluster one layer of a population → (labels 0..k−1 ordered by first member, merge heights, Gram)."""
    g = gram(items)
    if len(items) == 1:
        return np.zeros(1, dtype=int), np.zeros(0), g
    d = distances_from_gram(g)
    np.fill_diagonal(d, 0.0)
    merges = linkage(squareform(d, checks=False), method="single")
    heights = merges[:, 2]
    k = n_trees or count_trees(merges, gap_ratio)
    raw = fcluster(merges, k, criterion="maxclust")
    first_seen = {c: i for i, c in reversed(list(enumerate(raw)))}
    order = {c: rank for rank, c in enumerate(sorted(first_seen, key=first_seen.get))}
    return np.array([order[c] for c in raw]), heights, g


def member_radius(g: np.ndarray, members: np.ndarray) -> float:
    """Largest member distance to the members' mean, from the Gram matrix alone."""
    sub = g[np.ix_(members, members)]
    sq = np.diag(sub) - 2 * sub.mean(1) + sub.mean()
    return float(np.sqrt(np.maximum(sq, 0.0)).max())


def listener_scores(group: Group, layers: dict[str, Item]) -> np.ndarray | None:
    """Per tree: Σ over listened layers of log(‖L·ΔW‖ / ‖ΔW‖), L the tree root's listener (see Tree). None when a
    tree has no listeners or the model lacks one of their layers."""
    names = list(group.trees[0].listeners)
    if not names or any(set(t.listeners) != set(names) for t in group.trees) or any(n not in layers for n in names):
        return None
    scores = np.zeros(len(group.trees))
    for name in names:
        x = layers[name]
        delta = (x.scale * x.up.double() @ x.down.double()) if isinstance(x, LoraFactors) else x.double()
        norm = float(delta.norm())
        for k, t in enumerate(group.trees):
            scores[k] += math.log(max(float((t.listeners[name].double() @ delta).norm()), 1e-30) / max(norm, 1e-30))
    return scores


# ------------------------------------------------------------------------------------------------ router
class Router:
    """Per architecture: trees found on one layer, routing to the nearest tree centre."""

    def __init__(self, groups: list[Group] | None = None):
        self.groups = list(groups or [])
        # base family → the tree that reads every LoRA of that base no group takes (a training-free reader, which has
        # no population and so no centre); in memory only, not part of the saved state
        self.base_trees: dict[str, str] = {}

    @property
    def trees(self) -> list[str]:
        return [t.name for g in self.groups for t in g.trees]

    def fit(self, models: list[ModelWeights], *, layer: str | None = None, n_trees: int | None = None,
            gap_ratio: float = GAP_RATIO) -> "Router":
        """Find trees in a population; sets ``labels_``, each model's tree name in input order (as scikit-learn's
        estimators do, the fitted attribute exists only after ``fit``).

        ``layer``: the routing layer (default: each architecture's first module in sorted order).
        ``n_trees``: force the number of trees per architecture instead of reading it off the dendrogram.
        """
        by_digest: dict[str, list[int]] = {}
        for i, m in enumerate(models):
            by_digest.setdefault(m.signature.digest, []).append(i)
        labels = [""] * len(models)
        for indices in by_digest.values():
            first = models[indices[0]]
            group_layer = layer or first.signature.modules[0][0]
            items = [models[i].layers[group_layer] for i in indices]
            for i, name in zip(indices, self.add_group(first.signature, first.kind, group_layer, items,
                                                       n_trees=n_trees, gap_ratio=gap_ratio)):
                labels[i] = name
        self.labels_ = labels
        return self

    def add_group(self, signature: Signature, kind: str, layer: str, items: list[Item], *,
                  n_trees: int | None = None, gap_ratio: float = GAP_RATIO,
                  members: list[int] | None = None) -> list[str]:
        """Find the trees of one architecture from its routing-layer items; returns each item's tree name.

        ``members``: each item's tree (0..k−1) when it is known — a population built from one root — instead of
        found by clustering; the trees' centres are then their members' means all the same."""
        if members is None:
            labels, heights, g = find_trees(items, n_trees=n_trees, gap_ratio=gap_ratio)
        else:
            labels, heights, g = np.asarray(members), np.zeros(0), gram(items)
        base = self.unique_base(signature, kind)
        trees = []
        for k in range(labels.max() + 1):
            members = np.flatnonzero(labels == k)
            trees.append(Tree(f"{base}-{k}", mean_layer([items[i] for i in members]), member_radius(g, members),
                              len(members)))
        self.groups.append(Group(signature.digest, signature.family, kind, layer, layer_shape(items[0]), trees,
                                 [float(h) for h in heights]))
        return [trees[k].name for k in labels]

    def unique_base(self, signature: Signature, kind: str) -> str:
        base = (signature.family or "tree") + ("-full" if kind == "full" else "")
        taken = {g.trees[0].name.rsplit("-", 1)[0] for g in self.groups if g.trees}
        return base if base not in taken else f"{base}-{signature.digest[:6]}"

    def rename(self, names: dict[str, str]) -> None:
        """Give discovered trees human names (e.g. the root model's)."""
        for g in self.groups:
            for t in g.trees:
                t.name = names.get(t.name, t.name)

    # ------------------------------------------------------------------------------------------- routing
    def route(self, weights: ModelWeights) -> Route:
        """The tree of the nearest centre in the model's architecture group; a LoRA no group takes goes to its base's
        reader where there is one (method "base": distance 0 and confidence 1, as there is no centre to measure)."""
        try:
            group, exact = self.matching_group(weights)
        except NoExpertError:
            tree = self.base_trees.get(weights.signature.family) if weights.kind == "lora" else None
            if tree is None:
                raise
            return Route(tree, 0.0, 1.0, "", weights.signature.family is not None, "base")
        return self.route_layers(group, weights.layers, exact)

    def route_layers(self, group: Group, layers: dict[str, Item], exact: bool = True) -> Route:
        """Route one model (its layers by name) within its architecture's group: by the roots' listeners when every
        tree has them and the model has their layers, else to the nearest tree centre."""
        scores = listener_scores(group, layers)
        if scores is None:
            return self.route_item(group, layers[group.layer], exact)
        order = np.argsort(-scores)
        best = group.trees[order[0]]
        margin = float(scores[order[0]] - scores[order[1]]) if len(order) > 1 else float("inf")
        return Route(best.name, distance(layers[group.layer], best.centre), 1.0 - math.exp(-margin), group.layer,
                     exact, "root")

    def route_item(self, group: Group, item: Item, exact: bool = True) -> Route:
        """Route one routing-layer item within its architecture's group: the nearest tree centre."""
        dists = np.array([distance(item, t.centre) for t in group.trees])
        order = np.argsort(dists)
        nearest, d1 = group.trees[order[0]], float(dists[order[0]])
        if len(order) > 1:
            d2 = float(dists[order[1]])
            confidence = 1.0 - d1 / d2 if d2 > 0 else 0.0
        else:
            confidence = 1.0 if d1 <= nearest.radius else nearest.radius / d1
        return Route(nearest.name, d1, confidence, group.layer, exact)

    def matching_group(self, weights: ModelWeights) -> tuple[Group, bool]:
        """The group with the same signature and kind, else one of the same kind whose routing layer the model has
        with the same shape (a LoRA that skipped some modules still belongs to its tree)."""
        sig = weights.signature
        for g in self.groups:
            if g.digest == sig.digest and g.kind == weights.kind:
                return g, True
        for g in self.groups:
            layer = weights.layers.get(g.layer)
            same_family = g.family is None or sig.family is None or g.family == sig.family
            if layer is not None and g.kind == weights.kind and same_family and layer_shape(layer) == g.shape:
                return g, False
        raise NoExpertError(self.no_expert_message(weights))

    def no_expert_message(self, weights: ModelWeights) -> str:
        kind = "LoRAs" if weights.kind == "lora" else "full checkpoints"
        if not weights.layers:
            return (f"no tree expert for text-encoder-only {kind}: {weights.source} has no UNet / main-model "
                    "layers to route on")
        family = FAMILY_NAMES.get(weights.signature.family)
        n = len(weights.layers)
        looks = f"{family} UNet {kind}" if family else f"this architecture ({kind}, {n} layer{'s' * (n != 1)})"
        if self.base_trees and not self.groups:
            read = " and ".join(FAMILY_NAMES.get(f, f) for f in self.base_trees)
            return f"no tree expert for {looks}: this bundle reads {read} LoRAs only"
        if not self.groups:
            return f"no tree expert for {looks}: no trees are loaded"
        for g in self.groups:
            if g.kind == weights.kind and g.family is not None and g.family == weights.signature.family:
                layer = weights.layers.get(g.layer)
                found = "lacks" if layer is None else f"has a {'×'.join(map(str, layer_shape(layer)))}"
                return (f"no tree expert for {looks}: {weights.source} {found} {g.layer}, the layer its trees are "
                        "told apart by")
        return f"no tree expert for {looks}: {weights.source} matches no known tree (known: {self.known_trees()})"

    def known_trees(self, limit: int = 4) -> str:
        described = []
        for g in self.groups:
            names = [t.name for t in g.trees]
            shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
            base = FAMILY_NAMES.get(g.family, "custom architecture")
            described.append(f"{shown} for {base} {'LoRAs' if g.kind == 'lora' else 'full checkpoints'}")
        return "; ".join(described)

    # ---------------------------------------------------------------------------------------------- state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors for a safetensors file + a JSON-able dict; ``from_state`` inverts it. No pickle."""
        tensors, groups = {}, []
        for gi, g in enumerate(self.groups):
            trees = []
            for ti, t in enumerate(g.trees):
                key = f"groups.{gi}.trees.{ti}"
                if isinstance(t.centre, LoraFactors):
                    tensors[f"{key}.up"], tensors[f"{key}.down"] = t.centre.up.contiguous(), t.centre.down.contiguous()
                else:
                    tensors[f"{key}.centre"] = t.centre.contiguous()
                for li, listener in enumerate(t.listeners.values()):
                    tensors[f"{key}.listeners.{li}"] = listener.contiguous()
                trees.append({"name": t.name, "size": t.size, "radius": t.radius,
                              "centre": "factors" if isinstance(t.centre, LoraFactors) else "dense",
                              "listeners": list(t.listeners)})
            groups.append({"digest": g.digest, "family": g.family, "kind": g.kind, "layer": g.layer,
                           "shape": list(g.shape), "heights": g.heights, "trees": trees})
        return tensors, {"format": "probex-router", "version": 1, "groups": groups}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], state: dict) -> "Router":
        try:
            if state.get("format") != "probex-router" or state.get("version") != 1:
                raise KeyError("format/version")
            groups = []
            for gi, g in enumerate(state["groups"]):
                trees = []
                for ti, t in enumerate(g["trees"]):
                    key = f"groups.{gi}.trees.{ti}"
                    centre = (LoraFactors(tensors[f"{key}.up"].float(), tensors[f"{key}.down"].float(), 1.0)
                              if t["centre"] == "factors" else tensors[f"{key}.centre"].float())
                    listeners = {name: tensors[f"{key}.listeners.{li}"].float()
                                 for li, name in enumerate(t.get("listeners", []))}
                    trees.append(Tree(t["name"], centre, float(t["radius"]), int(t["size"]), listeners))
                groups.append(Group(g["digest"], g["family"], g["kind"], g["layer"], tuple(g["shape"]), trees,
                                    [float(h) for h in g["heights"]]))
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"router state is incomplete or malformed (missing {err})") from None
        return cls(groups)

    def __repr__(self) -> str:
        return f"Router({json.dumps({g.layer: [t.name for t in g.trees] for g in self.groups})})"


@dataclass
class Population:
    """One tree's known models as the router is fitted on them: ``cache`` a probex.zoo.LayerCache holding
    ``layer`` (the routing layer) and any listener layers; ``listeners`` LoRA layer → matrix (see Tree)."""
    name: str
    signature: Signature
    cache: object
    layer: str
    listeners: dict = field(default_factory=dict)


def fit_router(populations: list[Population]) -> Router:
    """Trees per architecture from the routing layer of every known model; each tree must be one population.

    Trees are first found by clustering, as the paper does. Where clustering cannot tell same-architecture
    populations apart (LoRAs of two roots that differ only in their pretraining seed, for example), each population
    is taken as a tree, with its root's listeners, and the router is kept only if every known model routes back to
    its own population."""
    router = Router()
    by_digest: dict[str, list[int]] = {}
    for i, p in enumerate(populations):
        by_digest.setdefault(p.signature.digest, []).append(i)
    for members in by_digest.values():
        first = populations[members[0]]
        layer = first.layer
        items = [item for i in members for item in populations[i].cache.router_items(layer)]
        owner = [i for i in members for _ in populations[i].cache.models]
        found = router.add_group(first.signature, first.cache.kind, layer, items, n_trees=len(members))
        names = {}
        for i in members:
            votes = [f for f, o in zip(found, owner) if o == i]
            majority = max(set(votes), key=votes.count)
            if majority in names or votes.count(majority) != len(votes):
                names = None
                break
            names[majority] = populations[i].name
        if names is None:  # clustering mixes the populations: take them as given, keep them only if routing separates
            router.groups.pop()
            index = {i: k for k, i in enumerate(members)}
            found = router.add_group(first.signature, first.cache.kind, layer, items,
                                     members=[index[o] for o in owner])
            group = router.groups[-1]
            heard = sorted({n for i in members for n in populations[i].listeners})
            for i in members:
                group.trees[index[i]].listeners = dict(populations[i].listeners)
            per_layer = {layer: items, **{n: [x for i in members for x in populations[i].cache.router_items(n)]
                                          for n in heard if n != layer}}
            routed = [router.route_layers(group, {n: xs[j] for n, xs in per_layer.items()}).tree
                      for j in range(len(items))]
            if routed != found:
                wrong = next(populations[o].name for o, r, f in zip(owner, routed, found) if r != f)
                raise ProbexError(f"the router could not separate tree {wrong} from the other populations "
                                  f"of its architecture on layer {layer}")
            names = {found[owner.index(i)]: populations[i].name for i in members}
        router.rename(names)
    return router


def separating_router(populations: list[Population], layers: list[str]) -> tuple[Router, str]:
    """The router fitted on the first of ``layers`` on which every known model routes back to its own population."""
    for layer in layers:
        try:
            return fit_router([replace(p, layer=layer) for p in populations]), layer
        except ProbexError:
            continue
    raise ProbexError("no layer separates the trees: the router cannot tell these roots' LoRAs apart")
