"""Zero-shot reading of held-out classes: the output-space score, its stored forms, attention blocks, and text space.

    python bench/zero_shot_inversion.py [--jungle zoo/emoji-mini] [--tree emoji-root-1] [--cache cache]

The training-free expert (probex/experts/anchored.py) compares, in each cross-attention value layer's OUTPUT space,
ΔW·H_sᵀ (what the LoRA does to the instance prompt "an emoji of sks") with W·(H_c − H_s)ᵀ (what caption c asks of the
root), each layer scaled to unit norm. Stored, it keeps only the instance prompt's top principal token directions
(rows "token rank k"; at all 16 tokens it is the exact score); up to commit 514f35d it stored a Gaussian projection
of all tokens (rows "projected to r_t", what that cost). Rows "blocks": the reading through the root's whole
cross-attention blocks (probex.experts.AttentionReader) — with the LoRA's changes of the projections listed (k,v is
what the expert of commit 96f2194 added to its token-rank reading, at 6 queries and scale 2), at ship's query counts
and more, and at five query draws for ship's largest count (seed 0 is what ship uses). The alternative measured here goes back to the TEXT space:
it solves for the token-state change δ (d_text × n_tokens) that the LoRA's updates of all read layers imitate,
    min_δ  Σ_l ‖W_l·δ − ΔW_l·H_sᵀ‖² / ‖W_l‖²  +  λ·‖δ‖²        (λ relative to the mean diagonal of Σ W_lᵀW_l/‖W_l‖²)
and scores caption c by cos(δ, (H_c − H_s)ᵀ). λ → ∞ is the adjoint, δ ∝ Σ_l W_lᵀ·ΔW_l·H_sᵀ / ‖W_l‖². Training-free
both; λ is chosen on val_holdout. Prints top-1 among the held-out classes (zero-shot) and, by text alone, among the
known classes. Needs the built jungle (``python -m probex zoo build --preset emoji-mini``); not what the app ships.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probex.gallery import class_means  # noqa: E402  (after the path is set)

LAMBDAS = (0.01, 1.0, 10.0, 100.0, float("inf"))
PROJECTIONS = (1024, 2048, 4096)  # r_t of the Gaussian projection the expert stored up to 514f35d
TOKEN_RANKS = (2, 3, 4)           # what it stores now (ship chooses the rank on val); all tokens is printed too
ATTENTION_SEEDS = (1, 2, 3, 4)     # more query draws of the block reading at ship's largest count (ship: seed 0)
# (projections whose LoRA changes are read, queries, feature scale): the reading 96f2194 shipped, then what is added
BLOCK_READINGS = [(("to_k", "to_v"), 6, 2.0), (("to_k", "to_v"), 16, 4.0), (("to_k", "to_v", "to_out.0"), 16, 4.0),
                  *((("to_q", "to_k", "to_v", "to_out.0"), n, 4.0) for n in (8, 12, 16, 24, 64))]
SPLITS = ("val_holdout", "test_holdout", "val", "test")
MEANS = ("val means", "test means")  # known classes by the nearest mean of their train LoRAs: what the app does


def top1(lora: torch.Tensor, text: torch.Tensor, y: torch.Tensor, splits: list[str], held_out: torch.Tensor) -> dict:
    """Top-1 per split by text (held-out splits among the held-out classes, the others among the known classes), and
    on val / test by the nearest class mean of the train LoRAs' encodings."""
    lora, out = F.normalize(lora, dim=-1), {}
    scores = lora @ F.normalize(text, dim=-1).T
    where = {s: torch.tensor([i for i, x in enumerate(splits) if x == s], dtype=torch.long) for s in SPLITS + ("train",)}
    for s in SPLITS:
        if len(where[s]):
            pool = held_out if s.endswith("holdout") else ~held_out
            out[s] = float((scores[where[s]].masked_fill(~pool, -2).argmax(1) == y[where[s]]).float().mean())
    means, _ = class_means(lora[where["train"]], y[where["train"]], len(held_out))
    for s in ("val", "test"):
        out[f"{s} means"] = float(((lora[where[s]] @ means.T).argmax(1) == y[where[s]]).float().mean())
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jungle", default=str(ROOT / "zoo" / "emoji-mini"))
    parser.add_argument("--tree", default="emoji-root-1")
    parser.add_argument("--cache", default=str(ROOT / "cache"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from probex.experts import AnchoredProbeX, AttentionReader
    from probex.jungle.ship import READER, READER_QUERIES
    from probex.jungle.lora import INSTANCE_PROMPT
    from probex.jungle.root import caption, load_root
    from probex.text import load_text_encoder
    from probex.zoo import Zoo, build_cache

    zoo = Zoo.scan(Path(args.jungle) / args.tree)
    unet, _, recipe = load_root(ROOT / zoo.tree["root_model"])
    cache = build_cache(zoo, Path(args.cache) / args.tree, layers="all")
    names = [n for n in cache.all_layers if n.endswith("attn2.to_v")]
    encoder = load_text_encoder("minilm")
    h_s = encoder.token_states([INSTANCE_PROMPT], recipe.token_length)[0]                       # (T, d)
    h_c = encoder.token_states([caption(recipe, c["name"]) for c in cache.classes], recipe.token_length)
    change = (h_c - h_s).transpose(1, 2)                                                         # (C, d, T)
    row = {c["id"]: i for i, c in enumerate(cache.classes)}
    y = torch.tensor([row[m["class_id"]] for m in cache.models])
    splits = [m["split"] for m in cache.models]
    held_out = torch.tensor([c["holdout"] for c in cache.classes])

    weights = [unet.get_submodule(n).weight.detach() for n in names]
    anchored = AnchoredProbeX.from_root(weights, h_s)  # its responses: ΔW_l·H_sᵀ and W_l·(H_c − H_s)ᵀ, layers stacked
    with torch.no_grad():
        responses = anchored.responses([cache.inputs(n) for n in names]).split(anchored.d_ws, dim=1)
        asked = anchored.text_responses(h_c).split(anchored.d_ws, dim=1)

    results = {}
    # the shipped reading without its projection: output space, each layer to unit norm, exact cosines
    lora_side = torch.cat([F.normalize(r.flatten(1), dim=-1) for r in responses], 1)
    text_side = torch.cat([F.normalize(t.flatten(1), dim=-1) for t in asked], 1)
    results["output space, exact"] = top1(lora_side, text_side, y, splits, held_out)
    # the earlier stored form: a Gaussian projection (seed 0) of the same per-layer-normalised responses to r_t dims
    for r_t in PROJECTIONS:
        g = torch.Generator().manual_seed(0)
        projection = torch.randn(lora_side.shape[1], r_t, generator=g) / r_t**0.5
        results[f"projected to {r_t}"] = top1(lora_side @ projection, text_side @ projection, y, splits, held_out)
    # the stored form now: the instance prompt's top principal token directions
    for rank in (*TOKEN_RANKS, len(h_s)):
        stored = AnchoredProbeX.training_free(weights, h_s, token_rank=rank)
        with torch.no_grad():
            encoded = stored.encode([cache.inputs(n) for n in names])
            results[f"token rank {rank}"] = top1(encoded, stored.text_features(h_c), y, splits, held_out)
    # through the root's cross-attention blocks (AttentionReader, as ship builds them)
    shipped = ("to_q", "to_k", "to_v", "to_out.0"), max(READER_QUERIES), READER["scale"]
    for projections, n_queries, scale, seed in [(*r, READER["seed"]) for r in BLOCK_READINGS] + [
            (*shipped, s) for s in ATTENTION_SEEDS]:
        read = [n for n in cache.all_layers if "attn2." in n and n.endswith(projections)]
        reader = AttentionReader.from_root(unet, read, h_s, n_queries, seed, scale)
        with torch.no_grad():
            encoded = reader.encode([cache.inputs(n) for n in read])
            results[f"blocks {','.join(p[3:].split('.')[0] for p in projections)}; {n_queries}q ×{scale:g} "
                    f"s{seed}"] = top1(encoded, reader.text_features(h_c), y, splits, held_out)
    # text space: solve for δ
    a = torch.cat([w / w.norm() for w in weights])                                              # (Σd_l, d)
    b = torch.cat([r / w.norm() for r, w in zip(responses, weights)], 1)                        # (N, Σd_l, T)
    gram = a.T @ a
    for lam in LAMBDAS:
        if lam == float("inf"):
            delta = a.T @ b
        else:
            delta = torch.linalg.solve(gram + lam * gram.diagonal().mean() * torch.eye(len(gram)), a.T) @ b
        results[f"text space, λ = {lam:g}"] = top1(delta.flatten(1), change.flatten(1), y, splits, held_out)

    n_held, n_known = int(held_out.sum()), int((~held_out).sum())
    print(f"\n{args.tree}: {len(names)} attn2.to_v layers; top-1 by text, held-out among {n_held} classes "
          f"(chance {1 / n_held:.3f}), known among {n_known} (chance {1 / n_known:.3f}); 'means': known classes by "
          f"the nearest class mean of the train LoRAs")
    print(f"{'reading':<30}" + "".join(f"{s:>13}" for s in SPLITS + MEANS))
    for label, r in results.items():
        print(f"{label:<30}" + "".join(f"{r.get(s, float('nan')):>13.3f}" for s in SPLITS + MEANS))
    best = max((k for k in results if k.startswith("text")), key=lambda k: results[k]["val_holdout"])
    print(f"chosen on val_holdout: {best} → test_holdout {results[best]['test_holdout']:.3f} "
          f"(output space: exact {results['output space, exact']['test_holdout']:.3f}, "
          f"token rank 3 {results['token rank 3']['test_holdout']:.3f}, "
          f"projected to 1024 {results['projected to 1024']['test_holdout']:.3f})")
    print(f"{time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
