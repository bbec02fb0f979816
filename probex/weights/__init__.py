"""Model files → canonical named layers, safely.

- ``guard``: the safetensors guard. Only safetensors is ever parsed, its header validated before the `safetensors`
  library sees the file; pickles and other formats are refused by their bytes. Nothing is ever unpickled.
- ``read``: ``read_weights`` / ``weights_from_tensors``, the guard's float tensors read as a LoRA or a full checkpoint.
- ``keys``: key names of every dialect (diffusers/peft, Model-J, kohya, LDM single-file) → canonical names.
- ``canonical``: what comes out (``ModelWeights``, ``LoraFactors``, ``Signature``), SD family detection, ``describe``.
- ``writers``: ``save_lora`` in diffusers/peft, Model-J or kohya form.
- ``messages``: the pieces of one-line error messages (clipped names, sizes).

What comes out (``ModelWeights``) is the same whatever the file's dialect:
- LoRAs keep their factors, ``LoraFactors(up=B, down=A, scale)``, under canonical diffusers module names
  (``down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_q``). Dialects read: diffusers/peft (``lora_A/lora_B``),
  Model-J / old diffusers (``.lora.down/.lora.up``, ``processor.to_q_lora``), kohya-ss/A1111 (``lora_unet_…``,
  ``.alpha``; LDM-named SDXL keys ``input_blocks_4_1_…`` are converted to diffusers names).
- Full checkpoints: every ≥2-D float weight as a 2-D matrix (conv kernels reshaped output-channels first);
  SD single-file checkpoints (``model.diffusion_model.…``) are renamed to diffusers UNet names, the VAE is dropped.
- Text-encoder entries go to ``text_encoder`` (first encoder: bare module name; second: ``text_encoder_2.`` prefix).
"""
from probex.weights.canonical import (FAMILY_NAMES, MAX_UPDATE_NORM, NEGLIGIBLE_UPDATE_NORM, LoraFactors, ModelWeights,
                                      Signature, describe, detect_family, layer_shape, negligible, update_norm)
from probex.weights.guard import MAX_HEADER_BYTES
from probex.weights.keys import ldm_to_diffusers, parse_lora_key, unflatten_kohya_name
from probex.weights.messages import first_line, human_bytes, short, size_pair
from probex.weights.read import read_weights, weights_from_tensors
from probex.weights.writers import save_lora

__all__ = ["FAMILY_NAMES", "MAX_HEADER_BYTES", "MAX_UPDATE_NORM", "NEGLIGIBLE_UPDATE_NORM", "LoraFactors",
           "ModelWeights", "Signature", "describe", "detect_family", "first_line", "human_bytes", "layer_shape",
           "ldm_to_diffusers", "negligible", "parse_lora_key", "read_weights", "save_lora", "short", "size_pair",
           "unflatten_kohya_name", "update_norm", "weights_from_tensors"]
