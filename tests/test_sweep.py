"""pnnh sweep / report: a real (tiny) grid on sklearn digits, resumability, failures, report files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from pnnh.cli import main
from pnnh.experiments.report import write_report
from pnnh.experiments.sweep import load_sweep, read_cells, run_sweep, unfinished_cells
from pnnh.train.config import ConfigError
from pnnh.train.trainer import train

TINY = {"data": "digits", "epochs": 2, "batch_size": 64, "precision": "fp32"}


def tiny_spec(**overrides):
    return load_sweep(models=["plain", "resnet", "pnnh"], depths=[8], seeds=1, train=TINY,
                      model_kwargs={"width": 4}, **overrides)


def test_sweep_trains_every_cell_and_reports(tmp_path):
    out = tmp_path / "sweep"
    records = run_sweep(tiny_spec(), out, command="pnnh sweep (test)", progress=False)
    assert [r["id"] for r in records] == ["plain-d8-s0", "resnet-d8-s0", "pnnh-d8-s0"]
    for r in records:
        assert r["status"] == "ok"
        assert 0.3 < r["test_acc"] <= 1.0  # digits after 2 epochs: well above chance (0.1)
        assert r["params"] > 0 and r["images_per_s"] > 0
        assert len(r["probe"]["init"]["cka"]) == len(r["probe"]["end"]["cka"]) == 7
    assert records[2]["model_kwargs"] == {"width": 4}

    report = write_report(out)
    text = report.read_text()
    assert "pnnh sweep (test)" in text and "torch" in text
    for name in ("accuracy_vs_depth.png", "accuracy_vs_params.png", "learning_curves.png", "throughput.png",
                 "similarity_to_input.png"):
        assert (out / name).stat().st_size > 1000
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["id"] for r in rows} == {r["id"] for r in records}
    summary = json.loads((out / "results.json").read_text())
    assert {row["variant"] for row in summary["rows"]} == {"plain", "resnet", "pnnh"}
    assert "Each variant against resnet, seed by seed" in text and "| pnnh | 8 |" in text


def test_report_reference_option(tmp_path, capsys):
    out = tmp_path / "sweep"
    run_sweep(load_sweep(models=["plain", "pnnh"], depths=[8], seeds=1, train=TINY, model_kwargs={"width": 4}),
              out, progress=False, command="t")
    assert "Each variant against" not in write_report(out).read_text()  # no resnet: no default reference
    (out / "notes.md").write_text("Ran on a shared machine.\n")
    assert write_report(out).read_text().startswith("# pnnh sweep report\n\nRan on a shared machine.\n\nCommand:")
    assert main(["report", str(out), "--reference", "plain"]) == 0
    assert "| pnnh | 8 |" in (out / "report.md").read_text()
    assert main(["report", str(out), "--reference", "resnet"]) == 2
    err = capsys.readouterr().err
    assert "'resnet' is not in this sweep's results; it has: plain, pnnh" in err


def test_finished_cells_are_skipped_and_interrupted_cell_resumes(tmp_path):
    out = tmp_path / "sweep"
    spec = load_sweep(models=["pnnh"], depths=[8], seeds=2, train=TINY, model_kwargs={"width": 4})
    first, second = spec.cells()
    # Seed 1 is "interrupted" after its first epoch: its directory holds last.pt, no cell.json.
    train({**second.config(out).to_dict(), "epochs": 1}, progress=False)
    run_sweep(spec, out, progress=False, command="t")
    records = {r["id"]: r for r in read_cells(out)}
    assert records[second.id]["status"] == "ok" and records[second.id]["epochs"] == 2
    lines = (out / "cells" / second.id / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # resumed, not restarted

    stamp = (out / "cells" / first.id / "cell.json").stat().st_mtime_ns
    run_sweep(spec, out, progress=False, command="t")
    assert (out / "cells" / first.id / "cell.json").stat().st_mtime_ns == stamp  # skipped


def test_failed_and_diverged_cells_are_recorded_and_do_not_stop_the_sweep(tmp_path):
    out = tmp_path / "sweep"
    raw = {"sweep": {"depths": [8], "seeds": [0], "variants": {
        "broken": {"model": "pnnh", "model_kwargs": {"coder_init": "nonsense"}},
        "exploding": {"model": "plain", "train": {"lr": 1e9}},
        "fine": {"model": "plain"}}},
        "train": TINY}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    records = {r["variant"]: r for r in run_sweep(load_sweep(path, model_kwargs={"width": 4}), out, progress=False)}
    assert records["broken"]["status"] == "failed" and "nonsense" in records["broken"]["reason"]
    assert records["exploding"]["status"] == "diverged" and "nan" in records["exploding"]["reason"].lower()
    assert records["fine"]["status"] == "ok"
    assert "did not finish" in write_report(out).read_text()


def test_sweep_refuses_a_directory_holding_another_sweep(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    spec = load_sweep(models=["plain"], depths=[8], seeds=1, train=TINY, model_kwargs={"width": 4})
    run_sweep(spec, out, progress=False, command="pnnh sweep first")
    manifest = (out / "sweep.yaml").read_bytes()
    other = load_sweep(models=["plain"], depths=[8], seeds=1, train={**TINY, "epochs": 1}, model_kwargs={"width": 4})
    with pytest.raises(ConfigError, match="different sweep"):
        run_sweep(other, out, progress=False, command="pnnh sweep other")
    assert (out / "sweep.yaml").read_bytes() == manifest  # a refused sweep leaves no trace
    # How a cell runs is not part of the sweep: a process may join compiled or on another device.
    argv = ["sweep", "--models", "plain", "--depths", "8", "--seeds", "1", "--data", "digits", "--epochs", "2",
            "--batch-size", "64", "--precision", "fp32", "--set", "width=4", "--compile", "--device", "cpu",
            "--checkpoint-every", "5", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["pnnh", *argv])
    assert main(argv) == 0  # the recorded cell is reported, not retrained
    run_sweep(spec, out, progress=False, command="pnnh sweep first")  # the first command again: nothing to add
    saved = yaml.safe_load((out / "sweep.yaml").read_text())
    assert saved["command"] == "pnnh sweep first" and saved["also_run_as"] == ["pnnh " + " ".join(argv)]
    assert f"`pnnh {' '.join(argv)}`" in write_report(out).read_text()  # the report names both ways it ran


@pytest.mark.parametrize("kwargs,match", [
    ({"seeds": 0}, "seeds=0"),
    ({"depths": [0]}, "depths"),
])
def test_bad_sweep_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(models=["plain"], **kwargs)


def test_unknown_sweep_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sweep: {familes: [plain]}\n")
    with pytest.raises(ConfigError, match="familes"):
        load_sweep(path)


def test_coder_options_reach_pnnh_only():
    spec = load_sweep(models=["resnet", "pnnh"], model_kwargs={"coder_init": "copy", "width": 8})
    kwargs = {v: spec.variants[v].get("model_kwargs") for v in spec.variants}
    assert kwargs == {"resnet": {"width": 8}, "pnnh": {"coder_init": "copy", "width": 8}}


def test_named_recipes_load_and_validate(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        if "sweep" not in raw:
            continue
        spec = load_sweep(path)
        for cell in spec.cells():
            cell.config(tmp_path)  # every cell's training config validates


def test_report_cli_on_empty_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished cell" in capsys.readouterr().err


def test_shards_split_the_grid_without_overlap(tmp_path, capsys):
    out = tmp_path / "sweep"
    spec = tiny_spec()
    first = run_sweep(spec, out, progress=False, command="t", shard=(0, 2))
    second = run_sweep(spec, out, progress=False, command="t", shard=(1, 2))
    assert [r["id"] for r in first] == ["plain-d8-s0", "pnnh-d8-s0"]
    assert [r["id"] for r in second] == ["resnet-d8-s0"]
    assert {r["id"] for r in read_cells(out)} == {c.id for c in spec.cells()}
    with pytest.raises(ConfigError, match="shard"):
        run_sweep(spec, out, progress=False, shard=(2, 2))
    # A grid whose inner loop is depth still gives every shard both depths, deepest first.
    deep = load_sweep(models=["plain", "resnet"], depths=[8, 14], seeds=1, train=TINY, model_kwargs={"width": 4})
    records = run_sweep(deep, tmp_path / "deep", progress=False, command="t", shard=(0, 2))
    assert [r["id"] for r in records] == ["plain-d14-s0", "plain-d8-s0"]
    # Seed by seed: both shards finish the first seed's grid before either starts the second.
    seeds = load_sweep(models=["plain", "resnet"], depths=[8, 14], seeds=[3, 1], train=TINY,
                       model_kwargs={"width": 4})
    order = [r["id"] for r in run_sweep(seeds, tmp_path / "seeds", progress=False, command="t", shard=(1, 2))]
    assert order == ["resnet-d14-s3", "resnet-d8-s3", "resnet-d14-s1", "resnet-d8-s1"]
    with pytest.raises(SystemExit):
        main(["sweep", "--models", "plain", "--depths", "8", "--out", str(out), "--shard", "3/2"])
    assert "0 <= I < N" in capsys.readouterr().err



def test_only_trains_the_named_variants_and_keeps_the_whole_recipe(tmp_path, capsys, monkeypatch):
    """--only: part of a recipe now (cells recorded elsewhere, or first things first), the rest later."""
    out = tmp_path / "sweep"
    base = ["sweep", "--models", "plain,resnet", "--depths", "8", "--seeds", "2", "--data", "digits", "--epochs", "1",
            "--train-subset", "128", "--test-subset", "64", "--batch-size", "64", "--precision", "fp32",
            "--set", "width=4", "--out", str(out)]
    cells = lambda: sorted(p.name for p in (out / "cells").iterdir())  # noqa: E731
    monkeypatch.setattr(sys, "argv", ["pnnh", *base, "--only=resnet", "--shard", "0/1"])  # the recorded command
    assert main(sys.argv[1:]) == 0  # a variant: all its cells
    assert cells() == ["resnet-d8-s0", "resnet-d8-s1"]
    assert yaml.safe_load((out / "sweep.yaml").read_text())["command"] == "pnnh " + " ".join(base)
    assert main([*base, "--only", "plain-d8-s1"]) == 0  # one cell
    assert cells() == ["plain-d8-s1", "resnet-d8-s0", "resnet-d8-s1"]
    assert main([*base, "--only", "resnet,nonesuch,plain-d9-s0"]) == 2
    err = capsys.readouterr().err
    assert "'nonesuch', 'plain-d9-s0'" in err and "plain, resnet" in err and "resnet-d8-s1" in err
    assert main(base) == 0  # the rest of the same sweep, in the same directory
    assert cells() == ["plain-d8-s0", "plain-d8-s1", "resnet-d8-s0", "resnet-d8-s1"]


def test_a_cell_locked_by_another_process_is_skipped_until_that_process_dies(tmp_path, capsys):
    """Two processes on one sweep never train the same cell; a killed holder frees its cell."""
    out = tmp_path / "sweep"
    spec = tiny_spec()
    lock = out / ".locks" / "resnet-d8-s0"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        records = run_sweep(spec, out, progress=True, command="t")
        assert [r["id"] for r in records] == ["plain-d8-s0", "pnnh-d8-s0"]
        said = capsys.readouterr()
        assert "resnet-d8-s0: being trained by another process, skipped" in said.out + said.err
        assert not (out / "cells" / "resnet-d8-s0").exists()
        assert unfinished_cells(out) == (["resnet-d8-s0"], [])
        assert "Part-way: 2 of 3 cells recorded.** Training now: resnet-d8-s0." in write_report(out).read_text()
    finally:
        holder.kill()
        holder.wait()
    assert unfinished_cells(out) == ([], ["resnet-d8-s0"])  # SIGKILL released the lock
    records = run_sweep(spec, out, progress=False, command="t")
    assert sorted(r["id"] for r in records) == ["plain-d8-s0", "pnnh-d8-s0", "resnet-d8-s0"]
    assert all(r["status"] == "ok" for r in records)
    assert unfinished_cells(out) == ([], [])
    assert "Part-way" not in write_report(out).read_text()


def test_a_sweep_waits_out_a_lock_held_for_a_moment(tmp_path):
    """A lock taken briefly (how ``pnnh report`` asks whether a cell is training) does not make a
    sweep skip the cell: the claim retries for a while before it calls the cell busy."""
    import threading

    from pnnh.experiments.sweep import _claim, _held_elsewhere

    lock = tmp_path / ".locks" / "resnet-d8-s0"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.readline(); "
         "fcntl.flock(f, fcntl.LOCK_UN); print('released', flush=True); time.sleep(600)", str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _held_elsewhere(lock)
        with _claim(lock, patience=0.2) as mine:
            assert not mine  # still held when patience runs out: busy
        release = threading.Timer(0.3, lambda: (holder.stdin.write("go\n"), holder.stdin.flush()))
        release.start()
        with _claim(lock, patience=60) as mine:
            assert mine
        release.join()
        assert holder.stdout.readline().strip() == "released"
        assert holder.poll() is None  # the holder is alive: the lock was let go, not dropped by death
    finally:
        holder.kill()
        holder.wait()


def test_history_keeps_one_entry_per_epoch_and_survives_a_cut_line(tmp_path):
    from pnnh.experiments.report import read_history

    assert read_history(tmp_path) == []
    lines = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}, {"epoch": 2, "test_acc": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"epoch": 3, "te')
    assert read_history(tmp_path) == [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.7}]


def test_table_against_the_reference_pairs_seeds():
    from pnnh.experiments.report import table_vs_reference

    def cell(variant, depth, seed, acc, params, status="ok"):
        return {"variant": variant, "depth": depth, "seed": seed, "status": status,
                "test_acc": acc if status == "ok" else None, "params": params}

    cells = [cell("resnet", 56, 0, 0.90, 1000), cell("resnet", 56, 1, 0.92, 1000),
             cell("pnnh", 56, 0, 0.91, 500), cell("pnnh", 56, 1, 0.915, 500),
             cell("pnnh", 56, 2, 0.99, 500),  # no resnet seed 2: not compared
             cell("plain", 56, 0, None, 1000, status="diverged"), cell("plain", 20, 0, 0.8, 300)]
    lines = table_vs_reference(cells, "resnet").splitlines()
    assert lines[0].startswith("| variant | depth | test accuracy − resnet (points)")
    assert lines[2:] == ["| pnnh | 56 | +0.25 [-0.50, +1.00] | +1.00 / -0.50 | 0, 1 | 0.50x |"]
    assert table_vs_reference(cells, "nothing") is None
    for c, val in zip(cells, (0.80, 0.84, 0.83, 0.83, 0.9, None, 0.7)):
        c["val_acc"] = val
    lines = table_vs_reference(cells, "resnet", "val_acc").splitlines()
    assert lines[0].startswith("| variant | depth | validation accuracy − resnet (points)")
    assert lines[2:] == ["| pnnh | 56 | +1.00 [-1.00, +3.00] | +3.00 / -1.00 | 0, 1 | 0.50x |"]


def test_variant_by_depth_table():
    from pnnh.experiments.report import aggregate, table_by_depth

    def cell(variant, depth, seed, acc, status="ok"):
        return {"id": f"{variant}-d{depth}-s{seed}", "variant": variant, "model": variant, "depth": depth,
                "seed": seed, "status": status, "test_acc": acc if status == "ok" else None, "val_acc": None,
                "params": 1000 * depth, "images_per_s": 500.0, "reason": ""}

    cells = [cell("plain", 8, 0, 0.80), cell("plain", 8, 1, 0.82), cell("plain", 56, 0, 0.5),
             cell("fixup", 8, 0, 0.9), cell("fixup", 56, 0, None, status="failed")]
    table = table_by_depth(aggregate(cells)).splitlines()
    assert table[0].startswith("| variant | depth 8: accuracy") and "depth 56" in table[0]
    assert table[2] == "| plain | 81.00 ± 1.41 · 0.01M · 500 | 50.00 · 0.06M · 500 |"
    assert table[3] == "| fixup | 90.00 · 0.01M · 500 | failed |"
    assert table_by_depth(aggregate(cells[:2])) is None  # one variant, one depth: nothing to pivot


def test_recipes_and_records_from_before_family_became_model_still_load(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("sweep: {families: [plain], variants: {}, depths: [8]}\n")
    with pytest.warns(DeprecationWarning, match="'families' is now 'models'"):
        assert load_sweep(old).variants == {"plain": {"model": "plain"}}
    old.write_text("sweep: {variants: {copy: {family: pnnh, model_kwargs: {coder_init: copy}}}}\n")
    with pytest.warns(DeprecationWarning, match="'family' is now 'model'"):
        assert load_sweep(old).variants == {"copy": {"model": "pnnh", "model_kwargs": {"coder_init": "copy"}}}
    old.write_text("sweep: {models: [plain], families: [pnnh]}\n")
    with pytest.raises(ConfigError, match="give 'models' only"):
        load_sweep(old)
    cell = tmp_path / "cells" / "plain-d8-s0"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"id": "plain-d8-s0", "variant": "plain", "family": "plain"}))
    assert read_cells(tmp_path)[0]["model"] == "plain" and "family" not in read_cells(tmp_path)[0]
