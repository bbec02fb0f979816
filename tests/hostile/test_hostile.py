"""Every hostile or malformed file is answered by ONE specific line, or read correctly; no pickle ever runs.

`pytest tests/hostile -v` lists each case by name.
"""
import pickle
import time

import pytest

from probex.errors import InputError, NoExpertError
from probex.router import Router
from probex.weights import read_weights

from hostile.corpus import CASES, code_exec_pickle, marker_for, random_lora, sd_attention_shapes

BAD = [c for c in CASES if c.error]
GOOD = [c for c in CASES if not c.error]


def test_corpus_is_large_enough():
    assert len(BAD) >= 20 and len(GOOD) >= 6


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_gets_one_specific_line(case, tmp_path):
    path = case.write(tmp_path)
    start = time.monotonic()
    with pytest.raises(InputError) as caught:
        read_weights(path, max_bytes=case.max_bytes)
    message = str(caught.value)
    assert case.error in message
    assert "\n" not in message and len(message) < 300
    assert time.monotonic() - start < 5
    assert not marker_for(tmp_path, case.id).exists(), "the pickle payload ran"


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_good_input_reads(case, tmp_path):
    weights = read_weights(case.write(tmp_path))
    case.check(weights)


def test_code_running_payload_is_real(tmp_path):
    # the marker is what unpickling creates — so its absence above means our reader never unpickled
    marker = marker_for(tmp_path, "control")
    pickle.loads(code_exec_pickle(marker))
    assert marker.is_dir()


def sd15_router():
    from probex.weights import ModelWeights, Signature

    layers = random_lora(sd_attention_shapes("sd15"), rank=2)
    model = ModelWeights("lora", layers, {}, {}, Signature.of(layers), "known.safetensors")
    return Router().fit([model, model])


@pytest.mark.parametrize("case_id, fragment", [
    ("text_encoder_only_lora", "text-encoder-only"),
    ("full_sd_checkpoint", "SD 1.5 UNet full checkpoints"),
    ("sdxl_kohya_lora", "SDXL UNet LoRAs"),
    ("non_diffusion_model", "this architecture"),
])
def test_readable_but_no_tree_is_a_clear_refusal(case_id, fragment, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    with pytest.raises(NoExpertError, match=fragment) as caught:
        sd15_router().route(read_weights(case.write(tmp_path)))
    assert "\n" not in str(caught.value)


def test_lora_missing_the_expert_layer_still_routes_on_its_routing_layer(tmp_path):
    case = next(c for c in CASES if c.id == "lora_missing_expert_layer")
    route = sd15_router().route(read_weights(case.write(tmp_path)))
    assert not route.exact_signature  # the service then checks the expert's own layer
