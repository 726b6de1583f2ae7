"""pnnh export: a trained run, folded, exported, verified on real test images, and timed."""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys

import pytest
import torch

import pnnh
from pnnh.cli import export as export_cli
from pnnh.data import load_dataset
from pnnh.models import fold as fold_module
from pnnh.experiments.export import ExportError, ExportMismatch, check_batch, export_run, residual_counterpart
from pnnh.train import train

# TorchScript is the requested format; its upstream deprecation notice is not this test's concern.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
FAST = {"check_images": 64, "batch_size": 32, "repeats": 1, "steps": 1, "progress": False}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) training run on sklearn digits: 5 SGD steps of pnnh8, width 8."""
    out = tmp_path_factory.mktemp("runs") / "pnnh8"
    train({"model": "pnnh8", "data": "digits", "model_kwargs": {"width": 8}, "epochs": 1, "max_steps": 5,
           "batch_size": 32, "out": str(out)}, progress=False)
    return out


def trained_logits(run_dir, x):
    """The trained model's logits, rebuilt from the run's files independently of pnnh.export."""
    model = pnnh.create_model("pnnh8", num_classes=10, in_chans=1, img_size=8, width=8)
    model.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        return model.eval()(x)


def digits_batch(n):
    return check_batch(load_dataset("digits"), n)


def test_torchscript_export_round_trip(run_dir, tmp_path):
    out = tmp_path / "pnnh8.pt"
    report = export_run(run_dir, out, "torchscript", **FAST)
    assert report.max_abs_diff < 1e-4 and report.check_images == 64 and report.argmax_agreement == 1.0
    x, _ = digits_batch(100)  # more images than were checked, another batch size: the file is general
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["input_size"] == [1, 8, 8] and meta["mean"] == pytest.approx(load_dataset("digits").mean)
    with torch.no_grad():
        assert (loaded(x) - trained_logits(run_dir, x)).abs().max().item() < 1e-4
    graph = str(loaded.inlined_graph)
    assert "aten::_convolution" in graph and "batch_norm" not in graph  # BN folded away
    assert [s["model"] for s in report.speed] == ["exported (torchscript)", "folded (eager)",
                                                  "pnnh8 (trained, eager)", "resnet8 (fresh, eager)"]
    assert report.speed[2]["ratio_to_trained"] == 1.0
    assert all(s["images_per_s_min"] <= s["images_per_s"] <= s["images_per_s_max"] for s in report.speed)


def test_onnx_export_round_trip_with_onnxruntime(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="optional: pip install 'pnnh[onnx]'")
    pytest.importorskip("onnxscript", reason="optional: pip install 'pnnh[onnx]'")
    out = tmp_path / "pnnh8.onnx"
    report = export_run(run_dir, out, "onnx", **FAST)
    assert report.max_abs_diff < 1e-4
    x, _ = digits_batch(77)  # dynamic batch axis
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (got - trained_logits(run_dir, x)).abs().max().item() < 1e-4
    # A plain chain: stem conv + ReLU, then one Conv and one Max (the partial ReLU) per PNNH layer.
    assert onnx_ops(out) == {"Conv": 7, "Relu": 1, "Max": 6, "ReduceMean": 1, "Reshape": 1, "Gemm": 1}
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    splits = load_dataset("digits")
    assert meta["input_size"] == [1, 8, 8] and meta["num_classes"] == 10 and meta["model"] == "pnnh8"
    assert meta["mean"] == pytest.approx(splits.mean) and meta["std"] == pytest.approx(splits.std)
    assert meta["model_kwargs"] == {"width": 8} and meta["pnnh_version"] == pnnh.__version__


def onnx_ops(path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph in ``path`` has."""
    import onnx

    return dict(collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def test_folded_pnnh20_exports_as_conv_and_max_per_layer(tmp_path):
    pytest.importorskip("onnxscript", reason="optional: pip install 'pnnh[onnx]'")
    model = pnnh.create_model("pnnh20", num_classes=10, in_chans=1, img_size=28).eval()
    folded = fold_module.fold(model)
    x = torch.randn(2, 1, 28, 28)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(folded, (x,), str(tmp_path / "p20.onnx"), dynamo=True, external_data=False)
    # 19 convolutions (stem + 18 PNNH layers), a Max per PNNH layer, no Slice/ScatterND/Transpose.
    assert onnx_ops(tmp_path / "p20.onnx") == {"Conv": 19, "Relu": 1, "Max": 18, "ReduceMean": 1, "Reshape": 1,
                                              "Gemm": 1}


def test_onnx_without_its_packages_says_how_to_get_them(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"pip install 'pnnh\[onnx\]'"):
        export_run(run_dir, tmp_path / "m.onnx", "onnx", **FAST)
    assert not (tmp_path / "m.onnx").exists()


def test_failed_verification_is_loud_and_keeps_the_previous_file(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"an earlier export")
    real_fold = fold_module.fold

    def broken_fold(model):  # a folding bug: the head's bias drifts by 1e-3
        folded = real_fold(model)
        with torch.no_grad():
            folded.head.bias += 1e-3
        return folded

    monkeypatch.setattr(fold_module, "fold", broken_fold)
    with pytest.raises(ExportMismatch, match=r"differs from the trained one.*not written"):
        export_run(run_dir, out, "torchscript", overwrite=True, **FAST)
    assert out.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def _cli(argv):
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def test_cli_writes_model_and_report(run_dir, tmp_path, capsys):
    out = tmp_path / "exported" / "m.pt"
    assert _cli([str(run_dir), "--out", str(out), "--check-images", "32", "--repeats", "1", "--batch-size", "32",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "verified on 32 test images" in text and "resnet8 (fresh, eager)" in text
    report = json.loads((tmp_path / "exported" / "m.pt.report.json").read_text())
    assert report["model"] == "pnnh8" and report["checkpoint"].endswith("model.safetensors") and report["max_abs_diff"] < 1e-4
    assert (tmp_path / "exported" / "m.pt.report.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_names_it(run_dir, tmp_path, capsys):
    assert _cli([str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    assert f"{tmp_path} is not a pnnh run directory" in capsys.readouterr().err
    assert _cli([str(run_dir), "--out", str(tmp_path / "m.pt"), "--check-images", "0"]) == 2
    assert "check_images=0 is not valid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli([str(run_dir), "--out", str(tmp_path / "m.x"), "--format", "tflite"])


@pytest.mark.parametrize("name, residual", [("pnnh56", "resnet56"), ("plain20", "resnet20"), ("pnnh18", "resnet18"),
                                            ("resnet20", "resnet20"), ("pnnh_vit_tiny", "vit_tiny"),
                                            ("plain_mlp", "residual_mlp"), ("pnnh_mlp", "residual_mlp")])
def test_residual_counterpart(name, residual):
    assert residual_counterpart(name) == residual
