"""The jungle's discriminative Model Trees: small emoji classifiers fine-tuned from a few roots (the paper's Table 1 /
Fig. 3a analogue), plus a "forest" whose models each start from their own random init.

Class pool. The atlas's 'thing' classes (probex.jungle.atlas.subject) shuffled once with ``POOL_SEED``: the first
``pool_size`` (20) are the pool every fine-tuned model draws its classes from; roots are pretrained on slices of the
remaining thing classes, so no root has seen a pool class.

Trees (``POPULATIONS``). A root = an image classifier pretrained on a broad set of other classes; its models are
fine-tuned from it, each on a random 10 of the 20 pool classes as a 10-way task with a fresh head (the paper: a random
50 of 100 CIFAR classes). The label of a model is which classes it was trained on. Four trees differ in architecture
(CNN, MLP, MLP-Mixer) and/or pretraining (two CNN roots: other seed, other classes). The forest: CNNs trained on a
random 10 of the pool from their own random init (no shared root), the paper's population where a linear
metanetwork is at chance.

Data. A fixed bank of augmented images per class (probex.jungle.root.augment), drawn once from ``bank_seed``: every
model fine-tunes on all bank images of its 10 classes, in its own shuffled order; a second bank (another seed) gives
each model's held-out accuracy (metadata ``eval_accuracy``), evidence that the models learned their task.

Recipe. Adam, per-model learning rate and epochs drawn from a small grid (``RecipeSpace``: models on the Hub are not
trained alike), batch 16. The fine-tuning head starts at zero, as the ViT paper fine-tunes: with Adam even a small
random head (N(0, 0.02²), Hugging Face's init) sends the body along a random direction for the first steps, and in
fine-tunes this short that noise swamps the class signal (docs/RESULTS.md has the comparison). Forest models train
longer (from scratch).

Layout (each population is a zoo probex.zoo reads as a multilabel zoo):
    <zoo>/<population>/{train,val,test}/model_idx_NNNN/model.safetensors   split 70/10/20 by model index
    <zoo>/<population>/tree.json        the class pool, architecture, recipe
    <zoo>/<population>/root.safetensors the root (trees only)
    <zoo>/build.json                    timings, seeds, versions, the grouping speed measurement
Each model file holds the full weights and metadata ``dataset_chosen_targets`` = JSON list of its class names in
the order of its head's outputs (random: the head's rows say nothing by position), plus seed and hyperparameters.

Full build: ``full``, 4 trees + forest, 1,250 models (its time: docs/RESULTS.md).

Modules: ``classes`` (the class pool, image banks), ``models`` (the three architectures), ``train`` (training many
models at once), ``builder`` (populations, presets, the resumable build), ``cli``.

    python -m probex.jungle.discriminative build --zoo zoo/discriminative [--preset full|tiny] [--only cnn-a …]
"""
from .builder import (POPULATIONS, PRESETS, SPLIT_SHARES, WEIGHTS_FILE, BuildConfig, Job, Population, build,
                      build_population, plan_jobs, split_of)
from .classes import POOL_SEED, class_split, image_bank
from .cli import main
from .models import ARCHITECTURES, MixerBlock, SmallCNN, SmallMixer, SmallMLP, initial_state
from .train import Recipe, RecipeSpace, accuracy, batch_orders, grouping_speed, stacked_forward, train_models

__all__ = ["ARCHITECTURES", "POOL_SEED", "POPULATIONS", "PRESETS", "SPLIT_SHARES", "WEIGHTS_FILE", "BuildConfig", "Job",
           "MixerBlock", "Population", "Recipe", "RecipeSpace", "SmallCNN", "SmallMLP", "SmallMixer", "accuracy",
           "batch_orders", "build", "build_population", "class_split", "grouping_speed", "image_bank",
           "initial_state", "main", "plan_jobs", "split_of", "stacked_forward", "train_models"]
