"""Tree experts, one a file: ProbeX (Eq. 4), the dense expert (Eq. 1), StatNN, root-anchored ProbeX, the
attention reader the emoji bundle ships, and ProbeX over several layers (stacked). Each class registers itself in
``EXPERTS`` when it is defined; importing this package defines them all, so ``load_expert`` finds any saved one."""
from probex.experts.base import (EXPERTS, HEADS, CentredInput, Expert, Factors, LayerInput, dense_from_factors,
                                 input_stats, load_expert, per_model)
from probex.experts.probex import INITS, ProbeX, principal_directions
from probex.experts.dense import DenseExpert
from probex.experts.statnn import StatMLP, StatNNClassifier, weight_statistics
from probex.experts.attention_reader import PROJECTIONS, AttentionReader, Block
from probex.experts.anchored import AnchoredProbeX, anchored_layer_names, training_free_scores
from probex.experts.stacked import StackedProbeX

__all__ = ["EXPERTS", "HEADS", "INITS", "PROJECTIONS", "AnchoredProbeX", "AttentionReader", "Block", "CentredInput",
           "DenseExpert", "Expert", "Factors", "LayerInput", "ProbeX", "StatMLP", "StatNNClassifier",
           "anchored_layer_names", "dense_from_factors", "input_stats", "load_expert", "per_model",
           "StackedProbeX", "principal_directions", "training_free_scores", "weight_statistics"]
