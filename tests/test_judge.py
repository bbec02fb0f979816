"""The committed judge (probex/data/judge.safetensors) reads atlas renders, and train_judge's file loads back."""
import torch

from probex.jungle.atlas import load_atlas
from probex.jungle.judge import Judge, load_judge, train_judge
from probex.jungle.root import augment


def test_the_committed_judge_names_clean_and_augmented_atlas_renders():
    judge = load_judge()
    images, classes = load_atlas()
    assert judge.class_ids == [c["id"] for c in classes]
    rows = torch.arange(0, len(classes), 7)
    rgba = torch.from_numpy(images[rows.numpy()])
    for strength, floor in ((0.0, 0.97), (1.0, 0.9)):
        probs = judge(augment(rgba, torch.Generator().manual_seed(123), strength=strength))
        assert torch.allclose(probs.sum(1), torch.ones(len(rows)), atol=1e-4)
        assert (probs.argmax(1) == rows).float().mean() >= floor, strength


def test_train_judge_writes_a_file_load_judge_reads(tmp_path):
    report = train_judge(steps=2, batch_size=16, out=tmp_path / "judge.safetensors")
    assert report["steps"] == 2 and 0 < report["file_mb"] < 10
    again = load_judge(tmp_path / "judge.safetensors")
    assert isinstance(again, Judge) and len(again.class_ids) == report["classes"]
