"""Model-J-style LoRAs on an emoji root: one LoRA personalises the root on 5–10 augmented images of ONE class under
a DreamBooth prompt without the class name ("an emoji of sks").

Recipe (what a user reproduces with plain diffusers + peft, see README):
- LoRA on attn1 and attn2 ``to_q, to_k, to_v, to_out.0``; ``lora_alpha = r`` (scale 1); B = 0 and A from peft's
  default init drawn right after ``torch.manual_seed(init_seed)`` (``init_seed`` 0 unless the job samples another);
- Adam, per-model learning rate and steps, batches of 4 noisy views of the model's own images, the root's loss
  (v-prediction, half the timesteps from the high-noise range).

Speed: adapters of one rank are trained K at a time in a single UNet forward — every targeted Linear is wrapped so
sample block k goes through adapter k (``BatchedLoRALinear``). Each adapter has its own optimiser group, so per-model
learning rates and step counts stay exact. The saved files are ordinary diffusers LoRA files
(``unet.<module>.lora_A.weight`` / ``lora_B.weight``), loadable with ``pipe.load_lora_weights``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..cluster import map_jobs
from ..text import load_text_encoder
from .atlas import load_atlas
from .root import RootRecipe, augment, diffusion_loss, load_root, make_scheduler, sample_timesteps, to_latent

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INSTANCE_PROMPT = "an emoji of sks"
VIEWS_PER_STEP = 4


@dataclass
class LoraJob:
    model_id: str          # e.g. "train/model_idx_0007"
    class_id: str          # atlas id, e.g. "U+1F42F"
    class_name: str
    root: str              # root name
    rank: int
    lr: float
    steps: int
    seed: int              # images, noise and timesteps
    n_images: int
    init_seed: int = 0     # torch seed before peft creates A

    def metadata(self, recipe: RootRecipe) -> dict[str, str]:
        meta = {k: str(v) for k, v in asdict(self).items()}
        meta.update(format="diffusers-lora", lora_alpha=str(self.rank), prompt=INSTANCE_PROMPT,
                    targets=",".join(TARGETS), base_model=recipe.name, text_encoder=recipe.text_encoder)
        return meta


def target_modules(unet) -> list[str]:
    return sorted(n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS))


def peft_initial_a(unet, rank: int, init_seed: int) -> dict[str, torch.Tensor]:
    """The A matrices peft draws for this root and rank after ``torch.manual_seed(init_seed)``."""
    # imported here: peft (with diffusers) takes seconds, and every `python -m probex` call imports this module to
    # list the presets
    from peft import LoraConfig

    probe = copy.deepcopy(unet)
    torch.manual_seed(init_seed)
    probe.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=True))
    return {name: module.lora_A["default"].weight.detach().clone()
            for name, module in probe.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}


class BatchedLoRALinear(nn.Module):
    """A frozen Linear plus K independent LoRAs; the batch is K equal blocks, block k uses adapter k."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, k: int):
        super().__init__()
        self.base = base
        self.a = nn.ParameterList([nn.Parameter(a.clone()) for _ in range(k)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, a.shape[0])) for _ in range(k)])

    def forward(self, x):
        k = len(self.a)
        blocks = x.reshape(k, -1, x.shape[-1])
        a, b = torch.stack(list(self.a)), torch.stack(list(self.b))
        delta = torch.bmm(torch.bmm(blocks, a.transpose(1, 2)), b.transpose(1, 2))
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)


def wrap_unet(unet, initial_a: dict[str, torch.Tensor], k: int) -> dict[str, BatchedLoRALinear]:
    """Replace every targeted Linear of ``unet`` (in place) with a K-adapter wrapper; return the wrappers."""
    wrappers = {}
    for name in target_modules(unet):
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        wrappers[name] = BatchedLoRALinear(getattr(parent, child), initial_a[name], k)
        setattr(parent, child, wrappers[name])
    return wrappers


def lora_state(wrappers: dict[str, BatchedLoRALinear], k: int) -> dict[str, torch.Tensor]:
    """Adapter k in diffusers' LoRA key format."""
    state = {}
    for name, w in wrappers.items():
        state[f"unet.{name}.lora_A.weight"] = w.a[k].detach().clone().contiguous()
        state[f"unet.{name}.lora_B.weight"] = w.b[k].detach().clone().contiguous()
    return state


def instance_images(job: LoraJob, rgba: torch.Tensor) -> torch.Tensor:
    """The job's own 5–10 training images: augmented views of its class emoji, fixed by the job's seed."""
    g = torch.Generator().manual_seed(job.seed)
    return augment(rgba[None].expand(job.n_images, -1, -1, -1), g)


def train_batch(unet, recipe: RootRecipe, jobs: list[LoraJob], rgba_by_class: dict[str, torch.Tensor],
                instance_states: torch.Tensor, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Train len(jobs) LoRAs of one rank together; return their diffusers state dicts."""
    k, rank = len(jobs), jobs[0].rank
    assert all(j.rank == rank for j in jobs)
    model = copy.deepcopy(unet).requires_grad_(False)
    wrappers = wrap_unet(model, _initial_a(unet, rank, jobs[0].init_seed), k)
    for i, job in enumerate(jobs):  # a job with its own init seed gets its own A
        if job.init_seed != jobs[0].init_seed:
            for name, a in _initial_a(unet, rank, job.init_seed).items():
                wrappers[name].a[i].data.copy_(a)
    scheduler = make_scheduler(recipe)
    groups = [{"params": [p for w in wrappers.values() for p in (w.a[i], w.b[i])], "lr": job.lr}
              for i, job in enumerate(jobs)]
    optimizer = torch.optim.Adam(groups)
    pools = [to_latent(instance_images(job, rgba_by_class[job.class_id]), recipe) for job in jobs]
    gens = [torch.Generator().manual_seed(job.seed + 1) for job in jobs]
    states = instance_states.expand(k * VIEWS_PER_STEP, -1, -1).to(device)
    for step in range(max(j.steps for j in jobs)):
        for group, job in zip(optimizer.param_groups, jobs):
            group["lr"] = job.lr if step < job.steps else 0.0  # a finished adapter stays where it stopped
        latents, t, noise = [], [], []
        for pool, g in zip(pools, gens):
            latents.append(pool[torch.randint(0, len(pool), (VIEWS_PER_STEP,), generator=g)])
            t.append(sample_timesteps(recipe, VIEWS_PER_STEP, g))
            noise.append(torch.randn(latents[-1].shape, generator=g))
        loss_each = diffusion_loss(model, scheduler, torch.cat(latents).to(device), states, torch.cat(t).to(device),
                                   torch.cat(noise).to(device), reduce=False)
        optimizer.zero_grad(set_to_none=True)
        loss_each.view(k, -1).mean(1).sum().backward()  # sum over adapters: each gets its own mean loss
        optimizer.step()
    return [lora_state(wrappers, i) for i in range(k)]


_A_CACHE: dict = {}


def _initial_a(unet, rank, init_seed):
    # peft's A depends on the architecture, rank and seed, not on the weights (every pass loads its own root)
    key = (json.dumps(unet.config, sort_keys=True, default=str), str(unet.device), rank, init_seed)
    if key not in _A_CACHE:
        _A_CACHE[key] = peft_initial_a(unet, rank, init_seed)
    return _A_CACHE[key]


def sample_jobs(root: str, classes: list[dict], per_class: dict[str, int] | list[dict[str, int]], seed: int,
                start_index: int = 0, init_seed_random_share: float = 0.0) -> list[LoraJob]:
    """Jobs for ``classes`` with per-model hyperparameters; ``per_class`` maps split → LoRAs per class, or is a list
    of such maps that classes take in turn (class i the (i mod len)-th: exact split shares with few LoRAs per class).

    Hyperparameter ranges: rank ∈ {4, 8}, lr log-uniform in [3e-3, 1e-2], steps ∈ {100, 125, 150},
    5–10 images.
    """
    rng = np.random.default_rng(seed)
    jobs, index = [], start_index
    patterns = per_class if isinstance(per_class, list) else [per_class]
    for i, c in enumerate(classes):
        for split, n in patterns[i % len(patterns)].items():
            for _ in range(n):
                random_init = rng.random() < init_seed_random_share
                jobs.append(LoraJob(
                    model_id=f"{split}/model_idx_{index:04d}", class_id=c["id"], class_name=c["name"], root=root,
                    rank=int(rng.choice([4, 8])), lr=float(math.exp(rng.uniform(math.log(3e-3), math.log(1e-2)))),
                    steps=int(rng.choice([100, 125, 150])), seed=int(rng.integers(1 << 30)),
                    n_images=int(rng.integers(5, 11)), init_seed=int(rng.integers(1, 1 << 30)) if random_init else 0))
                index += 1
    return jobs


def build_population(root_dir: Path, jobs: list[LoraJob], zoo_dir: Path, adapters_per_pass: int = 10,
                     device: str = "cpu", seed: int | None = None, ray: bool | str = False) -> dict:
    """Train every job whose file does not exist yet (resumable) into ``zoo_dir`` in Model-J layout. Each pass is
    one job of `probex.cluster.map_jobs`, here or on Ray (``ray``): the passes are the same either way, so are the
    files (an adapter's numbers depend on the batch it trained in)."""
    root_dir, zoo_dir = Path(root_dir).resolve(), Path(zoo_dir).resolve()   # a Ray task elsewhere: the same files
    recipe = RootRecipe.load(root_dir / "recipe.json")
    states = load_text_encoder("minilm").token_states([INSTANCE_PROMPT], recipe.token_length)
    todo = [j for j in jobs if not (zoo_dir / j.model_id / "pytorch_lora_weights.safetensors").exists()]
    by_rank: dict[int, list[LoraJob]] = {}
    for job in sorted(todo, key=lambda j: (j.init_seed != 0, j.steps)):
        by_rank.setdefault(job.rank, []).append(job)
    batches = [group[i:i + adapters_per_pass] for group in by_rank.values()
               for i in range(0, len(group), adapters_per_pass)]
    started = time.time()
    train = partial(train_pass, root_dir, zoo_dir, states, device)
    for _ in map_jobs(train, batches, ray, gpus=1 if device.startswith("cuda") else 0,
                      desc=f"LoRA passes on {recipe.name}"):
        pass

    record = {"root": recipe.name, "trained": len(todo), "skipped": len(jobs) - len(todo),
              "seconds": round(time.time() - started, 1), "adapters_per_pass": adapters_per_pass, "device": device,
              "threads": torch.get_num_threads(), "job_seed": seed, "ray": ray,
              "versions": {"torch": torch.__version__, "diffusers": version("diffusers"), "peft": version("peft")}}
    (zoo_dir / "build_record.jsonl").open("a").write(json.dumps(record) + "\n")
    return record


def train_pass(root_dir: Path, zoo_dir: Path, states: torch.Tensor, device: str, batch: list[LoraJob]) -> None:
    """One pass of a population build: the batch's LoRAs (one rank) trained together, each written to its file."""
    unet, _, recipe = load_root(root_dir, device)
    images, classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(classes)}
    rgba_by_class = {j.class_id: torch.from_numpy(images[row[j.class_id]]) for j in batch}
    for job, state in zip(batch, train_batch(unet, recipe, batch, rgba_by_class, states, device)):
        out = zoo_dir / job.model_id
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "pytorch_lora_weights.safetensors"), metadata=job.metadata(recipe))
