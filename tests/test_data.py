"""Datasets (real Fashion-MNIST, digits, CIFAR-format and image-folder files written here) and the loader."""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pnnh.data import (DatasetFormatError, DatasetNotFoundError, TensorLoader, balanced_indices, list_datasets,
                       load_dataset)
from pnnh.cli import data as data_cli
from pnnh.data import datasets as datasets_module
from pnnh.data.formats import read_idx, safe_extract_tar

from datafiles import FASHION_FILES, fashion_with_bad_label, png_declaring, tar_gz, write_cifar10, write_cifar100, write_idx

# --- Fashion-MNIST and IDX ---------------------------------------------------------

def test_fashion_mnist_real_files(fashion, fashion_dir):
    assert fashion.train_x.shape == (60000, 1, 28, 28) and fashion.train_x.dtype == torch.uint8
    assert fashion.test_x.shape == (10000, 1, 28, 28)
    assert fashion.train_y.dtype == torch.int64
    assert fashion.train_y.bincount().tolist() == [6000] * 10
    assert fashion.test_y.bincount().tolist() == [1000] * 10
    assert fashion.mean[0] == pytest.approx(0.2860, abs=5e-4)
    assert fashion.std[0] == pytest.approx(0.3530, abs=5e-4)
    # the histogram statistics equal the direct float computation
    sub = load_dataset("fashion-mnist", data_dir=fashion_dir, train_subset=5000)
    pixels = sub.train_x.double() / 255
    assert sub.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-12)
    assert sub.std[0] == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-9)
    assert (fashion.in_chans, fashion.img_size, fashion.num_classes, fashion.hflip) == (1, 28, 10, True)


def test_raw_and_gz_idx_read_alike_and_data_dir_wins(fashion, fashion_dir, tmp_path):
    mine = tmp_path / "fashion-mnist"
    mine.mkdir()
    for f in FASHION_FILES[:2]:
        (mine / f).symlink_to(fashion_dir / f)
    for f in FASHION_FILES[2:]:  # the test files decompressed, as some mirrors ship them
        (mine / f.removesuffix(".gz")).write_bytes(gzip.decompress((fashion_dir / f).read_bytes()))
    # a decoy in the root: data_dir/<name> is looked at first
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"junk")
    got = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert torch.equal(got.test_x, fashion.test_x) and torch.equal(got.test_y, fashion.test_y)
    assert torch.equal(got.train_y, fashion.train_y)


def test_pnnh_data_env_is_searched(fashion_dir, tmp_path, monkeypatch):
    (tmp_path / "fashion-mnist").mkdir()
    for f in FASHION_FILES:
        (tmp_path / "fashion-mnist" / f).symlink_to(fashion_dir / f)
    write_idx(tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte", np.zeros(10000, np.uint8))
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("PNNH_DATA", str(tmp_path))
    got = load_dataset("fashion-mnist")
    assert got.test_y.sum() == 0  # the env copy (all-zero labels) was read, not Debian's


def test_idx_parses_other_types_and_dims(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "a.idx", a)
    got = read_idx(tmp_path / "a.idx")
    assert got.dtype == np.int32 and np.array_equal(got, a)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x01\x02" + raw[2:], "bad IDX magic"),
    (lambda raw: raw[:4] + b"\x00" * 3, "truncated IDX header"),
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: raw + b"\x00", "trailing bytes"),
])
def test_corrupt_idx_names_file_and_fault(fashion_dir, tmp_path, damage, message):
    raw = gzip.decompress((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(damage(raw))
    with pytest.raises(DatasetFormatError, match=message) as err:
        read_idx(bad)
    assert str(bad) in str(err.value)


def test_corrupt_gzip_and_count_mismatch_through_load(fashion_dir, tmp_path):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for f in FASHION_FILES:
        (d / f).symlink_to(fashion_dir / f)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(9999, np.uint8))
    with pytest.raises(DatasetFormatError, match="count mismatch.*10000 images.*9999 labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    (d / "t10k-labels-idx1-ubyte").unlink()
    gz = (fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte.gz: not a valid gzip"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_missing_dataset_names_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("PNNH_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
    places = msg.split("looked in ")[1].split("; to get it")[0].split(", ")
    assert places == [str(p) for p in (tmp_path / "env" / "mnist", tmp_path / "env",
                                       tmp_path / "cache" / "pnnh" / "data" / "mnist")]
    assert "--data-dir" in msg and "$PNNH_DATA" in msg and "--download" in msg
    assert "apt-get" not in msg  # only fashion-mnist has a Debian package

    monkeypatch.setattr(datasets_module, "_FASHION_SYSTEM_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_explicit_data_dir_is_used_or_fails(fashion_dir, tmp_path, monkeypatch):
    """A named data_dir is the only place searched: never the env copy, the cache or Debian's."""
    monkeypatch.setenv("PNNH_DATA", str(fashion_dir))
    with pytest.raises(DatasetNotFoundError, match=f"data_dir {tmp_path / 'nowhere'} does not exist; pass --download"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert f"looked in {tmp_path / 'empty' / 'fashion-mnist'}, {tmp_path / 'empty'};" in str(err.value)
    assert f"put the files in {tmp_path / 'empty'}" in str(err.value) and "apt-get" not in str(err.value)
    assert "\n" not in str(err.value)
    assert load_dataset("fashion-mnist", test_subset=10).name == "fashion-mnist"  # no data_dir: the fallbacks


def test_labels_outside_the_classes_are_refused_at_load(fashion_dir, tmp_path):
    fashion_with_bad_label(fashion_dir, tmp_path, index=17, label=10)
    with pytest.raises(DatasetFormatError, match=r"t10k-labels-idx1-ubyte: label 10 at index 17 is outside the "
                                                 r"10 classes 0..9 \(1 such labels\)"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# --- digits, synthetic, CIFAR, folder ------------------------------------------------

def test_digits_fixed_split_and_resize():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=7)
    assert len(a.train_x) + len(a.test_x) == 1797 and len(a.test_x) == 449
    assert torch.equal(a.test_x, b.test_x)  # the split does not move with the seed
    assert a.train_x.shape[1:] == (1, 8, 8) and int(a.train_x.max()) == 255 and a.hflip is False
    big = load_dataset("digits", img_size=32)
    assert big.train_x.shape[1:] == (1, 32, 32) and big.train_x.dtype == torch.uint8
    # bilinear upsampling keeps the picture (blurred): block means follow the original pixels
    blocks = big.train_x.double().reshape(-1, 1, 8, 4, 8, 4).mean((3, 5))
    assert torch.corrcoef(torch.stack([blocks.flatten(), a.train_x.double().flatten()]))[0, 1] > 0.9


def test_synthetic_shape_and_classes():
    s = load_dataset("synthetic", synthetic_shape=(3, 16, 24), synthetic_size=64, num_classes=5)
    assert s.train_x.shape == (64, 3, 16, 24) and s.test_x.shape == (16, 3, 16, 24)
    assert s.num_classes == 5 and int(s.train_y.max()) < 5 and len(s.mean) == 3
    assert torch.equal(s.train_x, load_dataset("synthetic", synthetic_shape=(3, 16, 24), synthetic_size=64,
                                               num_classes=5).train_x)


def test_cifar10_pickle_dir_and_archive(tmp_path):
    d = write_cifar10(tmp_path / "a")
    s = load_dataset("cifar10", data_dir=tmp_path / "a")
    assert s.train_x.shape == (30, 3, 32, 32) and s.test_x.shape == (8, 3, 32, 32) and s.num_classes == 10
    first = pickle.loads((d / "data_batch_1").read_bytes())
    # the row layout is 1024 red, then green, then blue values, each row-major
    assert np.array_equal(s.train_x[0, 1].numpy().ravel(), first[b"data"][0, 1024:2048])
    assert s.train_y[:6].tolist() == first[b"labels"]
    assert torch.equal(load_dataset("cifar10", data_dir=d).train_x, s.train_x)  # pointing at the batch dir

    tar_gz(d, tmp_path / "cifar-10-python.tar.gz")
    shutil.rmtree(tmp_path / "a")
    t = load_dataset("cifar10", data_dir=tmp_path)
    assert torch.equal(t.train_x, s.train_x) and torch.equal(t.test_y, s.test_y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # an incomplete batch dir beside the archive is never overwritten
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileExistsError, match="would overwrite"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert len(list((tmp_path / "cifar-10-batches-py").iterdir())) == 6


def test_cifar100_fine_labels(tmp_path):
    d = write_cifar100(tmp_path)
    s = load_dataset("cifar100", data_dir=tmp_path)
    assert s.num_classes == 100 and s.train_y.tolist() == pickle.loads((d / "train").read_bytes())[b"fine_labels"]


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DatasetFormatError, match="test_batch.*not allowed"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_tar_extraction_refuses_escapes(tmp_path, kind):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo({"traversal": "../escaped", "absolute": "/tmp/escaped"}.get(kind, "link"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    dest = tmp_path / "dest"
    with pytest.raises(DatasetFormatError, match="refusing member"):
        safe_extract_tar(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escaped").exists()


def test_tar_with_a_dot_member_extracts(tmp_path):
    """`tar czf x.tar.gz -C dir .` archives start with a "." member: dest itself, not an escape."""
    batches = write_cifar10(tmp_path / "src")
    archive = tmp_path / "dot.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches.parent, arcname=".")
    assert tarfile.open(archive).getnames()[0] == "."
    assert safe_extract_tar(archive, tmp_path / "dest") == [tmp_path / "dest" / "cifar-10-batches-py"]
    assert load_dataset("cifar10", data_dir=tmp_path / "dest").train_x.shape == (30, 3, 32, 32)


@pytest.mark.parametrize("side", [10_000, 100_000])  # Pillow warns above 89.5 Mpx, raises above twice that
def test_image_folder_refuses_a_decompression_bomb(tmp_path, side):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "ok.png")
    (tmp_path / "train" / "a" / "bomb.png").write_bytes(png_declaring(side, side))
    with pytest.raises(DatasetFormatError, match=r"bomb.png: refused, the image declares more pixels"):
        load_dataset("folder", data_dir=tmp_path)


def test_image_folder_refuses_an_empty_class_and_a_symlink_loop(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "0.png")
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(DatasetFormatError, match=r"train/b: class folder holds no images; remove it"):
        load_dataset("folder", data_dir=tmp_path)
    (tmp_path / "train" / "b").rmdir()
    (tmp_path / "train" / "loop").symlink_to(".")  # a link to its own folder
    with pytest.raises(DatasetFormatError, match=r"train/loop: class folder holds no images \(a symlink to \.\)"):
        load_dataset("folder", data_dir=tmp_path)


def test_image_folder(tmp_path):
    colors = {"blue": (0, 0, 255), "red": (255, 0, 0), "white": (255, 255, 255)}
    for split, n in (("train", 3), ("val", 2)):
        for name, rgb in colors.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + 8 * i, 24), rgb).save(tmp_path / split / name / f"{i}.png")
    Image.new("L", (20, 20), 255).save(tmp_path / "val" / "white" / "gray.png")  # grayscale -> RGB
    (tmp_path / "train" / "red" / "notes.txt").write_text("not an image")
    s = load_dataset("folder", data_dir=tmp_path, img_size=16)
    assert s.train_x.shape == (9, 3, 16, 16) and s.test_x.shape == (7, 3, 16, 16)
    assert s.num_classes == 3 and s.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted class names
    for x, y in zip(s.test_x, s.test_y):
        want = torch.tensor(list(colors.values())[int(y)], dtype=torch.uint8)
        assert torch.equal(x, want.view(3, 1, 1).expand(3, 16, 16))
    assert load_dataset("folder", data_dir=tmp_path).img_size == 32  # the documented default

    (tmp_path / "val" / "green").mkdir()
    with pytest.raises(DatasetFormatError, match=r"\['green'\] are not among the train classes"):
        load_dataset("folder", data_dir=tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DatasetNotFoundError, match="train/<class>/<image> and val/"):
        load_dataset("folder", data_dir=tmp_path)


# --- splits and subsets -------------------------------------------------------------

def test_balanced_indices_fill_small_classes_first():
    y = np.array([0] * 3 + [1] * 50 + [2] * 50)
    idx = balanced_indices(y, 30, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [3, 13, 14] and len(set(idx)) == 30
    assert np.array_equal(idx, balanced_indices(y, 30, np.random.default_rng(0)))
    assert not np.array_equal(idx, balanced_indices(y, 30, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="cannot take 104"):
        balanced_indices(y, 104, np.random.default_rng(0))


def test_subsets_are_class_balanced_and_seeded():
    a = load_dataset("digits", train_subset=200, test_subset=50, seed=3)
    assert a.train_y.bincount().tolist() == [20] * 10 and a.test_y.bincount().tolist() == [5] * 10
    assert torch.equal(a.train_x, load_dataset("digits", train_subset=200, seed=3).train_x)
    assert not torch.equal(a.train_x, load_dataset("digits", train_subset=200, seed=4).train_x)


def test_val_split_is_disjoint_and_complete():
    full = load_dataset("synthetic", synthetic_size=500)
    s = load_dataset("synthetic", synthetic_size=500, val_size=100)
    assert len(s.val_x) == 100 and len(s.train_x) == 400
    rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}  # random images: no duplicates
    assert not rows(s.val_x) & rows(s.train_x)
    assert rows(s.val_x) | rows(s.train_x) == rows(full.train_x)
    assert s.val_y.bincount(minlength=10).tolist() == [10] * 10
    assert s.mean != full.mean  # statistics come from the remaining train images


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown dataset 'fashion_mnist'.*did you mean fashion-mnist"):
        load_dataset("fashion_mnist")
    with pytest.raises(ValueError, match="val_size=1348 leaves no training data"):
        load_dataset("digits", val_size=1348)
    with pytest.raises(ValueError, match="num_classes=7 but digits has 10"):
        load_dataset("digits", num_classes=7)
    with pytest.raises(ValueError, match="img_size must be a positive int, got 0"):
        load_dataset("digits", img_size=0)
    assert list_datasets() == ["fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "digits", "synthetic"]


# --- loader --------------------------------------------------------------------------

def batches(loader: TensorLoader, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", img_size=16)


def make(d, batch_size=64, **kw) -> TensorLoader:
    return TensorLoader(d.train_x, d.train_y, batch_size, mean=d.mean, std=d.std, **kw)


def test_test_loader_is_ordered_complete_and_normalized(digits):
    loader = TensorLoader(digits.test_x, digits.test_y, 100, mean=digits.mean, std=digits.std, train=False)
    got = batches(loader)
    assert len(loader) == len(got) == 5 and [len(y) for _, y in got] == [100, 100, 100, 100, 49]
    x = torch.cat([b[0] for b in got])
    assert x.dtype == torch.float32 and torch.equal(torch.cat([b[1] for b in got]), digits.test_y)
    want = (digits.test_x.float() / 255 - digits.mean[0]) / digits.std[0]
    torch.testing.assert_close(x, want)
    assert torch.equal(unnormalize(x, digits.mean, digits.std), digits.test_x)


def test_loader_replays_epochs_exactly(digits):
    kw = dict(train=True, crop_pad=2, hflip=True, seed=5)
    a, b = batches(make(digits, **kw), 3), batches(make(digits, **kw), 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_epoch, other_seed = batches(make(digits, **kw), 4), batches(make(digits, **{**kw, "seed": 6}), 3)
    assert not torch.equal(a[0][1], other_epoch[0][1]) and not torch.equal(a[0][1], other_seed[0][1])
    assert len(a) == len(digits.train_x) // 64  # train drops the last partial batch


def test_two_ranks_split_the_single_process_batches(digits):
    kw = dict(train=True, crop_pad=2, hflip=True, seed=1)
    single = batches(make(digits, batch_size=64, **kw), 2)
    ranks = [batches(make(digits, batch_size=32, rank=r, world_size=2, **kw), 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (x, y) in enumerate(single):  # same global batch, same augmentation, split in two
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)
    # every sample at most once per epoch; all but the dropped remainder seen
    seen = torch.cat([torch.cat([b[0] for b in r]) for r in ranks])
    assert len(seen) == len(digits.train_x) // 64 * 64


def test_eval_sharding_sees_every_sample_once():
    s = load_dataset("synthetic", synthetic_shape=(1, 4, 4), synthetic_size=100, num_classes=100)
    y = torch.arange(100)  # labels as sample ids
    shards = [list(TensorLoader(s.train_x, y, 16, mean=s.mean, std=s.std, train=False, rank=r, world_size=3))
              for r in range(3)]
    assert len({len(b) for b in shards}) == 1
    ids = torch.cat([yb for shard in shards for _, yb in shard])
    assert sorted(ids.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="100 samples cannot fill one step of 4 rank\\(s\\) x batch 32 = 128"):
        TensorLoader(s.train_x, y, 32, mean=s.mean, std=s.std, train=True, world_size=4, rank=1)
    with pytest.raises(ValueError, match="rank must be in \\[0, 2\\), got 2"):
        TensorLoader(s.train_x, y, 8, mean=s.mean, std=s.std, train=True, world_size=2, rank=2)
    with pytest.raises(ValueError, match="x must be uint8"):
        TensorLoader(s.train_x.float(), y, 8, mean=s.mean, std=s.std, train=True)


def test_augmentation_shifts_and_flips(fashion):
    pad = 2
    x, y = fashion.train_x[:2048], fashion.train_y[:2048]
    kw = dict(mean=fashion.mean, std=fashion.std, train=True, seed=0)
    plain = next(iter(TensorLoader(x, y, 512, **kw)))
    aug = next(iter(TensorLoader(x, y, 512, crop_pad=pad, hflip=True, **kw)))
    assert torch.equal(plain[1], aug[1])  # the augmentation does not change the order
    src, got = unnormalize(plain[0], fashion.mean, fashion.std), unnormalize(aug[0], fashion.mean, fashion.std)
    padded = torch.nn.functional.pad(src, (pad,) * 4)
    # every output must be one of the 2 x 5 x 5 flipped/shifted crops of its source image
    candidates = torch.stack([padded[..., dy:dy + 28, dx:dx + 28].flip(-1) if f else padded[..., dy:dy + 28, dx:dx + 28]
                              for f in (0, 1) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)], 1)
    match = (candidates == got[:, None]).flatten(2).all(-1)
    assert match.any(1).all()
    which = match.float().argmax(1)
    flipped, shift = which // 25, which % 25
    assert 0.4 < flipped.float().mean() < 0.6
    assert (shift != 12).float().mean() > 0.8  # 12 = no shift; 24/25 of samples should move
    assert len(shift.unique()) == 25


def test_channels_last_batches():
    s = load_dataset("synthetic", synthetic_size=256)
    kw = dict(mean=s.mean, std=s.std, train=True, crop_pad=4, hflip=True)
    a = next(iter(TensorLoader(s.train_x, s.train_y, 64, channels_last=True, **kw)))[0]
    b = next(iter(TensorLoader(s.train_x, s.train_y, 64, **kw)))[0]
    assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert torch.equal(a, b)


def test_cli_info_and_list(capsys):
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "info", "digits", "--img-size", "16"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"] == [1348, 1, 16, 16] and info["num_classes"] == 10 and info["hflip"] is False
    args = parser.parse_args(["data", "list"])
    assert args.func(args) == 0 and capsys.readouterr().out.split() == list_datasets()
