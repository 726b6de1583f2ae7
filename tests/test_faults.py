"""Bad input and faults, as a hostile or careless user meets them: every case ends in exit code 2,
one line on stderr that names the problem, no foreign code run, and nothing of the user's changed.

Each case runs the real command in-process (``pnnh.cli.main``) on real files: a tiny trained run
on sklearn digits, checkpoints with a live payload, a read-only and a full filesystem (tmpfs,
mounted where the test may mount), a closed port for "no network".
"""
from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

import pnnh
from datafiles import fashion_with_bad_label, png_declaring
from pnnh.cli import main
from pnnh.experiments.sweep import load_sweep, probe_curves
from pnnh.models import create_model
from pnnh.train import train
from pnnh.train.checkpoint import CheckpointError

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")]
TINY = ["--model", "pnnh8", "--set", "width=8", "--data", "digits", "--epochs", "1", "--max-steps", "1",
        "--batch-size", "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run: 3 SGD steps of pnnh8 (width 8) on digits, with best.pt and last.pt."""
    out = tmp_path_factory.mktemp("runs") / "pnnh8"
    train({"model": "pnnh8", "data": "digits", "model_kwargs": {"width": 8}, "epochs": 1, "max_steps": 3,
           "batch_size": 32, "out": str(out)}, progress=False)
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots``: path -> SHA-256 of the bytes ("dir" for a folder)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for ``text``: a carriage return (a progress bar
    redrawing or clearing itself) overwrites what came before it on the line."""
    return [shown for line in text.split("\n") if (shown := line.rpartition("\r")[2].strip())]


def fails_cleanly(capsys, argv: list[str], *needles: str, untouched: tuple[Path, ...] = ()) -> str:
    """Run ``pnnh ARGV``: exit 2, exactly one stderr line naming the problem, ``untouched`` unchanged."""
    before = tree_digest(*untouched)
    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = terminal_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"pnnh {argv[0]}: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert tree_digest(*untouched) == before
    return lines[0]


# --- 1. checkpoints never run code ----------------------------------------------------------

class Payload:
    """Unpickling this calls ``os.system`` to create ``marker``: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, kind: str, marker: Path, good: bytes) -> None:
    """Replace the checkpoint ``path`` by a malicious, truncated or foreign file."""
    if kind == "malicious":
        torch.save({"model": Payload(marker)}, path)  # a real torch file whose unpickling runs a command
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_text("model: not a checkpoint\n")


def test_the_payload_is_live(tmp_path):
    """Guards the test below: loaded without weights_only, the planted file does run its command."""
    marker = tmp_path / "ran"
    plant(tmp_path / "evil.pt", "malicious", marker, b"")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


READERS = {  # where a checkpoint is read -> the command, given the run directory and a scratch dir
    "resume": lambda run, tmp: ["train", "--resume", "--out", run],
    "export": lambda run, tmp: ["export", run, "--out", tmp / "model.pt", "--repeats", "1"],
    "probe": lambda run, tmp: ["probe", "--models", "pnnh8", "--checkpoint", run, "--out", tmp / "probe"],
    "guide": lambda run, tmp: ["train", *TINY, "--guide", f"pnnh8:{run}", "--out", tmp / "guided"],
}  # and pnnh.load, the Python call they share: test_pnnh_load_refuses_a_bad_checkpoint
WHAT = {"malicious": "refused to unpickle it (Trying to load unsupported GLOBAL posix.system",
        "truncated": "is not a pnnh checkpoint", "foreign": "is not a pnnh checkpoint"}


WEIGHTS = ("best.pt", "last.pt", "model.safetensors")  # every file a run's weights may be read from


def plant_everywhere(run: Path, kind: str, marker: Path, legacy: bool) -> None:
    """Damage every weights file of ``run``; ``legacy``: first drop the safetensors copy, as a run
    saved before it existed, so the readers fall back to the .pt files."""
    if legacy:
        for name in ("model.safetensors", "config.json"):
            (run / name).unlink(missing_ok=True)
    for name in WEIGHTS:
        if (run / name).exists():
            plant(run / name, kind, marker, (run / name).read_bytes())


@pytest.mark.parametrize("legacy", [False, True], ids=["run", "legacy-run"])
@pytest.mark.parametrize("kind", WHAT)
@pytest.mark.parametrize("reader", READERS)
def test_a_bad_checkpoint_is_refused_in_one_line(capsys, run, tmp_path, reader, kind, legacy):
    marker = tmp_path / "ran"
    plant_everywhere(run, kind, marker, legacy)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    line = fails_cleanly(capsys, READERS[reader](run, scratch), str(run), untouched=(run,))
    if legacy or reader == "resume":  # a .pt file was read: the loader's own words
        assert WHAT[kind] in line and (f"{run}/best.pt" in line or f"{run}/last.pt" in line), line
    assert not marker.exists()
    assert list(scratch.iterdir()) == []  # no output started


@pytest.mark.parametrize("legacy", [False, True], ids=["run", "legacy-run"])
@pytest.mark.parametrize("kind", WHAT)
def test_pnnh_load_refuses_a_bad_checkpoint(run, tmp_path, kind, legacy):
    marker = tmp_path / "ran"
    plant_everywhere(run, kind, marker, legacy)
    for path, which in ((run, "best"), (run, "last"), (run / "last.pt", "best")):
        with pytest.raises(CheckpointError) as err:
            pnnh.load(path, which)
        assert str(run) in str(err.value) and "\n" not in str(err.value)
        if legacy or which == "last" or path.suffix == ".pt":
            assert WHAT[kind] in str(err.value)
    assert not marker.exists()


def test_one_function_unpickles_torch_files():
    """Every torch.load in the package is the one in pnnh.io.load_torch_file, with weights_only=True."""
    src = Path(pnnh.__file__).parent
    calls = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls.append((str(path.relative_to(src)), ast.unparse(node)))
    assert calls == [("io.py", "torch.load(path, map_location='cpu', weights_only=True)")]


@pytest.mark.parametrize("legacy", [False, True], ids=["run", "legacy-run"])
@pytest.mark.parametrize("kind", WHAT)
def test_sweep_probe_refuses_a_checkpoint_swapped_in_after_training(tmp_path, kind, legacy):
    spec = load_sweep(models=["pnnh"], depths=[8], seeds=1,
                      train={"data": "digits", "epochs": 1, "max_steps": 2, "batch_size": 32},
                      model_kwargs={"width": 8})
    cell = spec.cells()[0]
    cfg = cell.config(tmp_path / "sweep")
    train(cfg, progress=False)
    marker = tmp_path / "ran"
    plant_everywhere(Path(cfg.out), kind, marker, legacy)
    with pytest.raises(CheckpointError) as err:
        probe_curves(cell, cfg)
    assert cfg.out in str(err.value) and "\n" not in str(err.value) and not marker.exists()
    if legacy:
        assert WHAT[kind] in str(err.value)


# --- 2. an explicit data path is used or fails --------------------------------------------------

def test_an_explicit_data_dir_is_never_replaced(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for given in (tmp_path / "nowhere", tmp_path / "empty"):
        fails_cleanly(capsys, ["train", *TINY, "--data", "fashion-mnist", "--data-dir", given,
                               "--out", tmp_path / "run"], f"dataset 'fashion-mnist' not found", given)
        assert not (tmp_path / "run").exists()
    fails_cleanly(capsys, ["data", "info", "mnist", "--data-dir", tmp_path / "empty"],
                  f"looked in {tmp_path / 'empty' / 'mnist'}, {tmp_path / 'empty'};", untouched=(tmp_path / "empty",))


# --- 3. a sweep with failed cells fails ---------------------------------------------------------

def test_a_sweep_with_a_failed_cell_exits_1_naming_it(capsys, tmp_path):
    status = main(["sweep", "--models", "pnnh", "--depths", "7", "--data", "digits", "--epochs", "1",
                   "--set", "width=4", "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert status == 1
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("pnnh sweep: 1 of 1 cells failed: pnnh-d7-s0 (ConfigError: cannot build model")
    assert "depth=7 is not valid" in summary and "--retry-failed" in summary
    assert (tmp_path / "sweep" / "report.md").exists()  # the report is written all the same


def test_the_demo_with_a_failed_cell_exits_1_naming_it(capsys, tmp_path, monkeypatch):
    from pnnh.cli import sweep as cli_sweep

    # the demo's grid with a depth pnnh cannot build (7) beside one it can (8), on tiny settings
    tiny = {"models": ["pnnh"], "depths": [7, 8], "seeds": 1, "train": {"epochs": 1, "batch_size": 64}}
    monkeypatch.setattr(cli_sweep, "DEMO", tiny)
    status = main(["demo", "--data", "digits", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert status == 1
    assert "pnnh demo: 1 of 2 cells failed: pnnh-d7-s0 (ConfigError: cannot build model" in err
    assert (tmp_path / "demo" / "report.md").exists()


# --- 4. one line, exit 2, for what users get wrong ------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only; skips elsewhere: nothing else gives a real full or
    read-only filesystem)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


OUT_COMMANDS = {
    "train": lambda run, out: ["train", *TINY, "--out", out],
    "sweep": lambda run, out: ["sweep", "--models", "pnnh", "--depths", "8", "--data", "digits", "--epochs", "1",
                               "--out", out],
    "export": lambda run, out: ["export", run, "--out", out / "model.pt", "--repeats", "1"],
}


@pytest.mark.parametrize("where", ["proc", "under a file", "read-only"])
@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_unwritable_out_is_one_line(capsys, run, tmp_path, command, where):
    with contextlib.ExitStack() as stack:
        if where == "proc":
            out, reason = Path("/proc/pnnh-run"), "No such file or directory"
        elif where == "under a file":
            (tmp_path / "notes.txt").write_text("mine")
            out, reason = tmp_path / "notes.txt" / "run", "is a file"
        else:
            out, reason = stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=64k")) / "run", "Read-only file system"
        fails_cleanly(capsys, OUT_COMMANDS[command](run, out), reason, untouched=(tmp_path,))


def fsync_on_a_small_disk(fsync):
    """``os.fsync`` on a disk that holds 4 KiB per file: a bigger file (a checkpoint) gets ENOSPC,
    where a real disk with delayed allocation reports it."""
    def small_fsync(fd: int) -> None:
        if os.fstat(fd).st_size > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    return small_fsync


def test_disk_full_while_saving_is_one_line_and_leaves_no_temp_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", fsync_on_a_small_disk(os.fsync))
    fails_cleanly(capsys, ["train", *TINY, "--out", tmp_path / "run"], f"{tmp_path / 'run'}/",
                  "No space left on device")
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_a_really_full_disk_is_one_line(capsys, tmp_path):
    with tmpfs(tmp_path / "small", "size=16k") as small:  # 4 pages: config.yaml and the log fit, last.pt not
        fails_cleanly(capsys, ["train", *TINY, "--out", small / "run"], f"{small / 'run'}/", "No space left on device")
        assert not [p for p in (small / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_bad_width_is_refused_before_the_run_directory_exists(capsys, tmp_path, value):
    fails_cleanly(capsys, ["train", *TINY, "--set", f"width={value}", "--out", tmp_path / "run"], f"width={value}")
    assert not (tmp_path / "run").exists()


def test_data_download_into_a_read_only_disk_is_one_line(capsys, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        fails_cleanly(capsys, ["data", "download", "mnist", "--data-dir", ro / "data"],
                      f"{ro / 'data'}: Read-only file system")


def test_labels_outside_the_classes_are_one_line(capsys, fashion_dir, tmp_path):
    fashion_with_bad_label(fashion_dir, tmp_path, index=5, label=255)
    fails_cleanly(capsys, ["data", "info", "fashion-mnist", "--data-dir", tmp_path], "label 255 at index 5",
                  untouched=(tmp_path,))


def test_a_decompression_bomb_is_one_line(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "ok.png")
    (tmp_path / "train" / "a" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    fails_cleanly(capsys, ["data", "info", "folder", "--data-dir", tmp_path], "bomb.png: refused", "decompression bomb",
                  untouched=(tmp_path,))


# --- 5. smaller ones ------------------------------------------------------------------------------

def test_set_coerces_a_number_yaml_reads_as_text(tmp_path):
    """YAML 1.1 reads 1e-3 as text; the coder field is a float, so the text becomes that float."""
    assert main(["train", *TINY, "--set", "coder_scale=1e-3", "--out", str(tmp_path / "run")]) == 0
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    as_text = create_model("pnnh8", width=8, coder_scale="1e-3").eval()
    torch.manual_seed(0)
    as_float = create_model("pnnh8", width=8, coder_scale=0.001).eval()
    assert torch.equal(as_text(x), as_float(x))
    with pytest.raises(ValueError, match="coder_scale='big' is not valid: it must be a number"):
        create_model("pnnh8", coder_scale="big")
    # the same for a constructor's own typed argument (TAT's eta: float)
    torch.manual_seed(0)
    as_text = create_model("tat_plain8", width=4, eta="5e-1").eval()
    torch.manual_seed(0)
    assert torch.equal(as_text(x), create_model("tat_plain8", width=4, eta=0.5).eval()(x))
    with pytest.raises(ValueError, match="eta='x' is not valid: it must be a number"):
        create_model("tat_plain8", eta="x")


def test_out_naming_a_file_says_file(capsys, tmp_path):
    (tmp_path / "run").write_text("mine")
    line = fails_cleanly(capsys, ["train", *TINY, "--out", tmp_path / "run"], f"{tmp_path / 'run'} is a file",
                         untouched=(tmp_path,))
    assert "directory" not in line.split("is a file")[0]


def test_export_does_not_overwrite_a_file_without_force(capsys, run, tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("my other model")
    fails_cleanly(capsys, ["export", run, "--out", target, "--repeats", "1"], f"{target} exists", "--force",
                  untouched=(target,))
    assert main(["export", str(run), "--out", str(target), "--repeats", "1", "--force", "--no-progress"]) == 0
    assert torch.jit.load(str(target)) is not None


def test_batch_size_error_names_an_option_that_exists(capsys, tmp_path):
    line = fails_cleanly(capsys, ["train", *TINY, "--batch-size", "5000", "--out", tmp_path / "run"],
                         "batch_size=5000", "--batch-size")
    assert "drop_last" not in line and "world_size" not in line
