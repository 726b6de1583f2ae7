"""Your own tensors as training data (issue 17): pnnh.data.memory and pnnh.train(..., data=...)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pnnh.data import load_dataset
from pnnh.data.memory import IN_MEMORY, memory_splits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_uint8_pair_holds_out_a_fixed_balanced_quarter(digits):
    x, y = digits.train_x, digits.train_y
    splits = memory_splits((x, y), val_size=100, seed=3)
    assert splits.name == IN_MEMORY and splits.num_classes == 10 and splits.in_chans == 1
    assert len(splits.test_y) == round(len(y) / 4) and len(splits.val_y) == 100
    assert len(splits.train_y) + len(splits.val_y) + len(splits.test_y) == len(y)
    counts = torch.bincount(splits.test_y, minlength=10)
    assert counts.max() - counts.min() <= 1  # class-balanced
    assert torch.equal(memory_splits((x, y), seed=7).test_x, memory_splits((x, y), seed=0).test_x)  # fixed


def test_float_images_are_an_affine_image_of_uint8(digits):
    """Any affine map of the images gives the same uint8 data, so the same normalised batches."""
    x, y = digits.train_x, digits.train_y
    given = {"train": (x, y), "test": (digits.test_x, digits.test_y)}
    as_float = {"train": (x.float() / 255 * 4 - 1, y.numpy()), "test": (digits.test_x.float() / 255 * 4 - 1,
                                                                          digits.test_y)}
    a, b = memory_splits(given), memory_splits(as_float)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert a.mean == b.mean and a.std == b.std and torch.equal(a.test_y, digits.test_y)


def test_a_dataset_of_tensors_arrays_or_pil_images(digits):
    x, y = digits.train_x[:40], digits.train_y[:40]

    class Items(torch.utils.data.Dataset):
        def __init__(self, make):
            self.make = make

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return self.make(x[i]), y[i]

    reference = memory_splits((x, y))
    for make in (lambda t: t, lambda t: t.numpy()[0], lambda t: Image.fromarray(t.numpy()[0])):
        splits = memory_splits(Items(make))
        assert torch.equal(splits.train_x, reference.train_x) and torch.equal(splits.test_y, reference.test_y)


@pytest.mark.parametrize("data,message", [
    (torch.zeros(4, 1, 8, 8), r"data is a Tensor of shape \(4, 1, 8, 8\) \(torch.float32\)"),
    ("fashion", r"data is the str 'fashion'"),
    ((torch.zeros(4, 1, 8, 6), torch.zeros(4, dtype=torch.long)), r"square.*shape \(4, 1, 8, 6\)"),
    ((torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long)), r"\(N, C, H, W\).*shape \(4, 8, 8\)"),
    ((torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long)), r"one per image: 4 images, labels of shape \(3,\)"),
    ((torch.zeros(4, 1, 8, 8), torch.zeros(4)), r"labels must be integers 0..K-1, got torch.float32"),
    ((torch.zeros(4, 1, 8, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.long)), r"uint8 .* or floating point"),
    ((torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long)), r"NaN or infinite"),
    ({"train": None, "valid": 1}, r"the key 'train' .*got keys \['train', 'valid'\]"),
    ((torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)), r"needs at least 2"),
])
def test_wrong_data_is_a_short_error_without_values(data, message):
    with pytest.raises(ValueError, match=message) as err:
        memory_splits(data)
    assert len(str(err.value)) < 300 and "tensor(" not in str(err.value)


def test_train_on_tensors_a_dataset_and_by_name(digits, tmp_path):
    """pnnh.train takes uint8 or float tensors, a Dataset, or a name; the run records in-memory data."""
    import pnnh
    from pnnh.train.config import load_config

    base = {"model": "pnnh8", "epochs": 1, "max_steps": 3, "batch_size": 64}
    x, y = digits.train_x, digits.train_y
    first = pnnh.train({**base, "data": (x, y), "out": str(tmp_path / "a")}, progress=False)
    again = pnnh.train({**base, "out": str(tmp_path / "b")}, data=(x.float() / 255, y), progress=False)
    dataset = torch.utils.data.TensorDataset(x, y)
    third = pnnh.train({**base, "out": str(tmp_path / "c")}, data=dataset, progress=False)
    for key in ("train_loss", "test_loss", "test_acc"):  # the same images, so the same run
        assert first.metrics[key] == again.metrics[key] == third.metrics[key]
    assert load_config(tmp_path / "a" / "config.yaml").data == IN_MEMORY
    named = pnnh.train({**base, "out": str(tmp_path / "d")}, data="digits", progress=False)
    assert load_config(tmp_path / "d" / "config.yaml").data == "digits" and named.metrics["step"] == 3


def test_train_refuses_bad_data_in_one_short_line(tmp_path):
    import pnnh
    from pnnh.train.config import ConfigError

    cfg = {"model": "pnnh8", "epochs": 1, "out": str(tmp_path / "r")}
    with pytest.raises(ConfigError, match=r"^data is a Tensor of shape \(10, 3\)|data must be .*Tensor of shape \(10, 3\)") as err:
        pnnh.train({**cfg, "data": torch.zeros(10, 3)}, progress=False)
    assert "tensor(" not in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(ConfigError, match="given twice"):
        pnnh.train({**cfg, "data": (torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))},
                   data=(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), progress=False)
    with pytest.raises(ConfigError, match="names data held in memory: pass it as pnnh.train"):
        pnnh.train({**cfg, "data": IN_MEMORY}, progress=False)
    assert not (tmp_path / "r").exists()
