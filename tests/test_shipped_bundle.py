"""The committed bundle that `python app.py` serves (checkpoints/emoji-mini), through the service."""
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from probex.service import Studio

BUNDLE = Path(__file__).resolve().parents[1] / "checkpoints" / "emoji-mini"


@pytest.fixture(scope="module")
def studio():
    return Studio.load(BUNDLE, warm=False)


def example_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_every_example_names_its_class_in_the_top_five(studio):
    for example in studio.examples():
        result = studio.predict(str(example["path"]), top_k=5)
        assert example_meta(example["path"])["class_name"] in [c["name"] for c in result["classes"]], example


def test_a_gallery_members_own_file_is_named_as_that_model(studio, tmp_path):
    example = next(e["path"] for e in studio.examples() if "__test__" in Path(e["path"]).name)
    meta = example_meta(example)
    known = studio.predict(str(example))["known_as"]
    assert known is not None and known["id"] == meta["model_id"] and known["class"] == meta["class_name"]
    changed = tmp_path / "changed.safetensors"
    tensors = {k: v * 1.3 if k.endswith("lora_B.weight") else v for k, v in load_file(str(example)).items()}
    save_file(tensors, str(changed), metadata=meta)
    assert studio.predict(str(changed))["known_as"] is None


def test_a_description_finds_models_of_its_class(studio):
    result = studio.search("a planet with rings around it", top_k=3)
    assert result["read_as"][0]["class"] == "ringed planet"
    assert [m["class"] for m in result["models"]] == ["ringed planet"] * 3


def test_novelty_is_calibrated_on_validation_models_and_spares_known_classes(studio):
    import torch
    import torch.nn.functional as F

    results = [(Path(e["path"]).name, studio.predict(str(e["path"]))["novelty"]) for e in studio.examples()]
    assert all(n is not None for _, n in results)
    assert not any(n["unlike_known"] for name, n in results if "__test__" in name)  # known classes pass
    g = studio.bundle.trees["emoji-root-1"].gallery
    x = F.normalize(g.encodings.float(), dim=-1)
    train = [i for i, s in enumerate(g.splits) if s == "train"]
    val = [i for i, s in enumerate(g.splits) if s == "val"]
    kept = (x[val] @ x[train].T).max(1).values >= results[0][1]["threshold"]
    assert abs(float(kept.float().mean()) - 0.95) < 0.02
