"""The streaming data path on a generated class-folder dataset and its webdataset tar shards
(2,000 train and 400 val 16x16 PNGs, written once per session): coverage across ranks and
DataLoader worker processes, determinism, resume mid-epoch, the augmentation, bad shards."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pnnh.data import DatasetFormatError, TensorLoader
from pnnh.data.streaming import (StreamingLoader, eval_image, index_split, load_streaming, make_image_folder,
                                 make_loader, random_resized_crop_box, stream_choice, train_image, write_shards)

SIZE = 16
IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)  # the crop is the whole image: pixels kept


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=2000, test=400, size=(SIZE, SIZE))


@pytest.fixture(scope="session")
def shards(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    _, classes = write_shards(folder / "train", root / "train", per_shard=300)
    write_shards(folder / "val", root / "val", per_shard=300, classes=classes)
    return root


@pytest.fixture(scope="session")
def splits(folder):
    return load_streaming(folder, img_size=SIZE)


def decoded(index) -> torch.Tensor:
    """Every image of the index as uint8 (N, 3, S, S), in index order."""
    return torch.from_numpy(np.stack([np.asarray(index.image(i)) for i in range(len(index))])).permute(0, 3, 1, 2)


def ids_of(x: torch.Tensor, lookup: dict[bytes, int], mean, std) -> list[int]:
    """Which image each (normalized, unaugmented) row of x is."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pixels = ((x * s + m) * 255).round().to(torch.uint8).contiguous()
    return [lookup[bytes(p.numpy())] for p in pixels]


def stream(index, splits, batch_size=64, **kw) -> StreamingLoader:
    kw = {"train": True, "workers": 0, **kw}
    return StreamingLoader(index, batch_size, img_size=SIZE, mean=splits.mean, std=splits.std, **kw)


def epoch(loader, e=0, start=0):
    loader.set_epoch(e, start)
    return list(loader)


def test_folder_and_shards_index_the_same_images(folder, shards, splits):
    s = load_streaming(shards, img_size=SIZE)
    assert (len(s.train), len(s.test), s.num_classes) == (2000, 400, 10) == (len(splits.train), len(splits.test),
                                                                              splits.num_classes)
    assert len(s.train.files) == 7 and s.train.size.min() > 0  # 300 per shard; members read by offset
    assert np.array_equal(s.train.labels, splits.train.labels) and np.array_equal(s.test.labels, splits.test.labels)
    for i in (0, 299, 300, 1999):
        assert np.array_equal(np.asarray(s.train.image(i)), np.asarray(splits.train.image(i)))
    np.testing.assert_allclose(s.mean, splits.mean) and np.testing.assert_allclose(s.std, splits.std)
    with tarfile.open(shards / "train" / "shard-000000.tar") as tar:  # plain webdataset members
        assert tar.getnames()[:4] == ["00000000.png", "00000000.cls", "00000001.png", "00000001.cls"]
        assert tar.extractfile("00000001.cls").read() == b"0"
    # the same seeded subsets and validation split as the in-memory path's rule
    sub = load_streaming(folder, img_size=SIZE, val_size=100, train_subset=500, test_subset=50, seed=3)
    assert (len(sub.val), len(sub.train), len(sub.test)) == (100, 500, 50)
    assert np.bincount(sub.train.labels).tolist() == [50] * 10
    val_files = {bytes(sub.val.files[f]) for f in sub.val.file}
    assert not val_files & {bytes(sub.train.files[f]) for f in sub.train.file}


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_every_image_once_per_epoch_across_2_ranks_x_2_workers(layout, folder, shards, splits):
    s = splits if layout == "folder" else load_streaming(shards, img_size=SIZE)
    lookup = {bytes(x.contiguous().numpy()): i for i, x in enumerate(decoded(s.train))}
    assert len(lookup) == 2000  # generated images are distinct
    kw = dict(workers=2, seed=7, drop_last=False, **IDENTITY)
    ranks = [epoch(stream(s.train, s, 48, rank=r, world_size=2, **kw), 3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 21  # ceil(2000 / 96)
    ids = [[ids_of(x, lookup, s.mean, s.std) for x, _ in r] for r in ranks]
    assert sorted(i for r in ids for b in r for i in b) == list(range(2000))
    assert all(torch.equal(y, torch.from_numpy(s.train.labels[ids[r][k]])) for r in range(2)
               for k, (_, y) in enumerate(ranks[r]))
    # same order as TensorLoader over the same images: step k is rank 0's slice then rank 1's
    memory = TensorLoader(decoded(s.train), torch.from_numpy(s.train.labels), 96, mean=s.mean, std=s.std,
                          train=True, seed=7, drop_last=False)
    for k, (x, y) in enumerate(epoch(memory, 3)):
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), x)
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), y)
    # training's default drops the last incomplete step: no image twice, all but < 96 seen
    dropped = [epoch(stream(s.train, s, 48, rank=r, world_size=2, workers=2, seed=7, **IDENTITY), 3)
               for r in range(2)]
    seen = [i for r in dropped for x, _ in r for i in ids_of(x, lookup, s.mean, s.std)]
    assert len(seen) == len(set(seen)) == 2000 // 96 * 96


def test_evaluation_covers_the_split_in_order_over_ranks(splits):
    lookup = {bytes(x.contiguous().numpy()): i for i, x in enumerate(decoded(splits.test))}
    shards = [epoch(stream(splits.test, splits, 64, train=False, eval_crop=1.0, rank=r, world_size=3))
              for r in range(3)]
    assert len({len(b) for b in shards}) == 1
    ids = [i for r in shards for x, _ in r for i in ids_of(x, lookup, splits.mean, splits.std)]
    assert sorted(ids) == list(range(400))
    assert ids_of(shards[0][0][0], lookup, splits.mean, splits.std) == list(range(64))  # rank 0: first slice


def test_same_seed_and_epoch_give_the_same_batches_and_augmentation(splits):
    """Random-resized crops and flips depend on (seed, epoch, image), not on workers or batch size."""
    def images(**kw):
        return torch.cat([x for x, _ in epoch(stream(splits.train, splits, drop_last=False, **kw), 2)])

    a = images(seed=1)
    assert torch.equal(a, images(seed=1, workers=2, batch_size=100, channels_last=True))
    assert not torch.equal(a, images(seed=2)) and not torch.equal(a[:64], epoch(stream(splits.train, splits,
                                                                                       seed=1), 3)[0][0])
    centre = torch.cat([x for x, _ in epoch(stream(splits.train, splits, train=False, drop_last=False))])
    order = torch.randperm(2000, generator=__import__("pnnh").data.loader.epoch_generator(1, 2))
    assert (a - centre[order]).abs().mean() > 0.3  # augmented, not the centre crops


def test_resume_mid_epoch_skips_the_seen_batches(splits):
    loader = stream(splits.train, splits, 64, seed=4, workers=2)
    full = epoch(loader, 5)
    resumed = epoch(loader, 5, start=20)
    assert len(full) == len(loader) == 31 and len(resumed) == 11
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[20:], resumed))
    memory = TensorLoader(decoded(splits.train), torch.from_numpy(splits.train.labels), 64, mean=splits.mean,
                          std=splits.std, train=True, seed=4)
    assert [y.tolist() for _, y in epoch(memory, 5, start=20)] == [y.tolist() for _, y in resumed]
    with pytest.raises(ValueError, match="start must be an int in \\[0, 31\\], got 32"):
        loader.set_epoch(5, start=32)


def test_random_resized_crop_and_eval_crop():
    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop_box(300, 200, rng) for _ in range(2000)])
    area, aspect = boxes[:, 2] * boxes[:, 3] / 60000, boxes[:, 2] / boxes[:, 3]
    assert area.min() >= 0.075 and area.max() <= 1 and np.median(area) < 0.6
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    assert ((boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 300).all()
            and (boxes[:, 1] + boxes[:, 3] <= 200).all())
    assert random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)  # no try fits: centre, ratio clamped
    stripes = Image.fromarray(np.repeat(np.repeat(np.arange(40, dtype=np.uint8)[None, :, None] * 6, 20, 0), 3, 2))
    flips = [train_image(stripes, 8, np.random.default_rng(i), hflip=True) for i in range(400)]
    mirrored = np.mean([f[0, 0, 0] > f[0, -1, 0] for f in flips])
    assert 0.4 < mirrored < 0.6  # the left edge is the brighter one after a flip
    half = np.zeros((20, 40, 3), np.uint8)
    half[:, 20:] = 255  # 40 x 20: the centre square spans columns 10..30, half black, half white
    out = eval_image(Image.fromarray(half), 10, crop=1.0)
    assert (out[:, :4] == 0).all() and (out[:, 6:] == 255).all()


def _shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind != "link" else None)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("members, message", [
    ([("a.png", b"", "link")], "refusing member 'a.png' \\(not a regular file\\)"),
    ([("../a.png", _png(), "file"), ("../a.cls", b"1", "file")], "refusing member '../a.png'"),
    ([("a.png", _png(), "file")], "sample 'a' has an image but no a .cls label"),
    ([("a.png", _png(), "file"), ("a.cls", b"cat", "file")], "a.cls holds 'cat', not a class index"),
    ([("a.png", _png(), "file"), ("a.jpg", _png(), "file")], "sample 'a' has two images"),
])
def test_bad_shards_are_refused(tmp_path, members, message):
    _shard(tmp_path / "s.tar", members)
    with pytest.raises(DatasetFormatError, match=message):
        index_split(tmp_path)


def test_compressed_corrupt_and_mixed_layouts_are_named(tmp_path, splits):
    (tmp_path / "gz").mkdir()
    _shard(tmp_path / "plain.tar", [("a.png", _png(), "file"), ("a.cls", b"1", "file")])
    import gzip

    (tmp_path / "gz" / "s.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    with pytest.raises(DatasetFormatError, match="not an uncompressed tar shard.*must be plain .tar"):
        index_split(tmp_path / "gz")
    (tmp_path / "class_a").mkdir()
    with pytest.raises(DatasetFormatError, match="holds both tar shards \\(plain.tar, ...\\) and class folders"):
        index_split(tmp_path)
    root = tmp_path / "data"
    make_image_folder(root, train=20, test=10, classes=2)
    (root / "train" / "class_00" / "000000.png").write_bytes(b"not a png")
    index, _ = index_split(root / "train")
    loader = StreamingLoader(index, 20, img_size=SIZE, mean=splits.mean, std=splits.std, train=False, workers=1)
    with pytest.raises(DatasetFormatError, match="000000.png.*cannot read image"):
        list(loader)


def test_stream_choice_weighs_the_decoded_size_against_the_budget(folder, shards):
    # 2,400 images x 3 x 16 x 16 bytes = 1.84 MB
    assert stream_choice("auto", "folder", folder, 16, 0.01) == (
        False, "held in memory: 2,400 images are 0.00184 GB at 16 px <= memory_budget_gb=0.01")
    assert stream_choice("auto", "folder", folder, 64, 0.01)[0]  # 29.5 MB at 64 px
    assert stream_choice(True, "folder", folder, 16, 8.0) == (True, "streamed from disk (stream: true)")
    assert stream_choice("auto", "folder", shards, 16, 8.0) == (True, "streamed from disk (tar shards)")
    assert stream_choice("auto", "digits", None, None, 8.0) == (False, "held in memory")
    with pytest.raises(ValueError, match="stream: true reads class folders or tar shards .*'digits'"):
        stream_choice(True, "digits", None, None, 8.0)


def test_make_loader_serves_both_kinds_of_dataset(splits):
    from pnnh.data import load_dataset

    memory = load_dataset("digits")
    assert isinstance(make_loader(memory, "test", 64, train=False, workers=3), TensorLoader)
    assert len(make_loader(memory, "test", 64, train=False, first=100)) == 2
    streamed = make_loader(splits, "test", 64, train=False, first=100, crop_pad=4)
    assert isinstance(streamed, StreamingLoader) and len(streamed) == 2
    assert torch.equal(next(iter(streamed))[1], torch.from_numpy(splits.test.labels[:64]))


def test_train_streams_a_folder_beyond_the_memory_budget_and_resumes(folder, tmp_path):
    from pnnh.train.trainer import train

    cfg = {"model": "resnet8", "data": "folder", "data_dir": str(folder), "img_size": SIZE, "train_subset": 512,
           "test_subset": 100, "batch_size": 128, "epochs": 1, "memory_budget_gb": 0.001, "workers": 1,
           "device": "cpu", "precision": "fp32", "out": str(tmp_path / "run")}
    first = train(cfg, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["stream"] is True and saved["workers"] == 1  # auto chose streaming: 1.8 MB > 1 MB
    assert first.metrics["epoch"] == 1 and 0 < first.metrics["test_acc"] <= 1
    again = train({**cfg, "epochs": 2}, resume=True, progress=False)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2] and again.metrics["epoch"] == 2
    memory = train({**cfg, "memory_budget_gb": 8.0, "out": str(tmp_path / "memory")}, progress=False)
    assert yaml.safe_load((tmp_path / "memory" / "config.yaml").read_text())["stream"] is False
    assert memory.metrics["epoch"] == 1


def test_cli_writes_a_generated_folder_and_its_shards(tmp_path, capsys):
    from pnnh.cli import main

    assert main(["data", "make-folder", str(tmp_path / "f"), "--train", "30", "--test", "10", "--classes", "3",
                 "--size", "20", "12", "--ext", ".jpg"]) == 0
    assert main(["data", "shards", str(tmp_path / "f"), str(tmp_path / "s"), "--per-shard", "8"]) == 0
    assert "train/ and val/ as tar shards (3 classes)" in capsys.readouterr().out
    s = load_streaming(tmp_path / "s", img_size=8)
    assert (len(s.train), len(s.test), s.num_classes, len(s.train.files)) == (30, 10, 3, 4)
    assert s.train.image(0).size == (20, 12)
    assert main(["data", "shards", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "dataset 'folder' needs a data_dir" in capsys.readouterr().err


def test_a_sweep_cell_on_streamed_data_is_probed_streamed(folder, tmp_path):
    from pnnh.experiments.sweep import load_sweep, run_sweep

    spec = load_sweep(models=["resnet"], depths=[8], seeds=1, train={
        "data": "folder", "data_dir": str(folder), "img_size": SIZE, "epochs": 1, "stream": True, "workers": 1,
        "train_subset": 256, "test_subset": 64, "device": "cpu", "precision": "fp32"})
    [record] = run_sweep(spec, tmp_path, progress=False)
    assert record["status"] == "ok" and "probe_error" not in record
    assert set(record["probe"]) == {"init", "end"} and len(record["probe"]["end"]["cka"]) > 1
