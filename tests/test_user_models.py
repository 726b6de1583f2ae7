"""A user's own model through the CLI: ``--import`` (``imports:``) makes ``pnnh train`` and
``pnnh sweep`` know the models a module of theirs registers.

Every command runs as a fresh ``python -P -m pnnh`` process (``-P``: the current directory is not
on sys.path, as for the installed ``pnnh`` script), so nothing the test process imported helps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pnnh.models import list_models
from pnnh.models.registry import ModelImportError, import_models
from pnnh.train import ConfigError, load_config

MYNET = textwrap.dedent('''
    import torch.nn as nn
    import pnnh

    @pnnh.register_model
    def my_tiny(depth=1, num_classes=10, in_chans=3, img_size=32):
        layers = [nn.Conv2d(in_chans, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
''')
TRAIN = ["--data", "digits", "--train-subset", "256", "--test-subset", "128", "--epochs", "1",
         "--batch-size", "64", "--device", "cpu", "--precision", "fp32"]


def pnnh_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-P", "-m", "pnnh", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "mynet.py").write_text(MYNET)
    (tmp_path / "elsewhere").mkdir()
    return tmp_path


def test_train_imports_a_module_from_the_current_directory_and_resumes(project):
    out = project / "run"
    done = pnnh_cli("train", "--import", "mynet", "--model", "my_tiny", "--set", "depth=2", *TRAIN,
                    "--out", str(out), cwd=project)
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["imports"] == ["mynet"] and saved["model"] == "my_tiny"
    assert json.loads((out / "result.json").read_text())["status"] == "ok"
    # the saved config re-imports the module: --resume alone continues the run
    done = pnnh_cli("train", "--resume", "--out", str(out), "--epochs", "2", cwd=project)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # the commands that build a model by name, or load a run, take --import too
    listed = pnnh_cli("models", "--import", "mynet", "my_*", cwd=project)
    assert listed.returncode == 0 and "my_tiny" in listed.stdout, listed.stderr
    exported = pnnh_cli("export", "--import", "mynet", str(out), "--format", "torchscript", "--out",
                        str(project / "my.pt"), cwd=project)
    assert exported.returncode == 0 and (project / "my.pt").is_file(), exported.stderr
    unknown = pnnh_cli("export", str(out), "--format", "torchscript", "--out", str(project / "x.pt"), cwd=project)
    assert unknown.returncode == 2 and "the run imported it from mynet" in unknown.stderr
    bad = pnnh_cli("models", "--import", "nosuch_xyz", cwd=project)
    assert bad.returncode == 2 and bad.stderr.startswith("pnnh models: error: imports: no module named 'nosuch_xyz'")


def test_without_the_import_the_error_says_how_to_give_it(project):
    done = pnnh_cli("train", "--model", "my_tiny", *TRAIN, "--out", str(project / "run"), cwd=project)
    assert done.returncode == 2
    assert "unknown model 'my_tiny'" in done.stderr and "--import" in done.stderr
    assert not (project / "run").exists()


def test_a_python_file_is_kept_as_an_absolute_path_and_reaches_every_sweep_cell(project):
    recipe = project / "elsewhere" / "sweep.yaml"
    recipe.write_text(yaml.safe_dump({"sweep": {"variants": {"tiny": {"model": "my_tiny"},
                                                             "twin": {"model": "convert:resnet"}},
                                                "depths": [2], "seeds": 1},
                                      "train": {"data": "digits", "train_subset": 256, "test_subset": 128,
                                                "epochs": 1, "batch_size": 64, "device": "cpu",
                                                "precision": "fp32", "imports": ["../mynet.py"]}}))
    done = pnnh_cli("sweep", "--config", "sweep.yaml", "--depths", "8", "--out", "sw", cwd=project / "elsewhere")
    assert done.returncode == 0, done.stderr
    for cell in ("tiny-d8-s0", "twin-d8-s0"):
        record = json.loads((project / "elsewhere" / "sw" / "cells" / cell / "cell.json").read_text())
        assert record["status"] == "ok", record
        config = yaml.safe_load((project / "elsewhere" / "sw" / "cells" / cell / "config.yaml").read_text())
        assert config["imports"] == [str(project / "mynet.py")]


def test_loading_a_run_names_the_module_instead_of_running_it(project):
    out = project / "run"
    assert pnnh_cli("train", "--import", "mynet.py", "--model", "my_tiny", *TRAIN, "--out", str(out),
                    cwd=project).returncode == 0
    script = f"import pnnh\ntry:\n    pnnh.load({str(out)!r})\nexcept Exception as err:\n    print(type(err).__name__, err)\n"
    done = subprocess.run([sys.executable, "-P", "-c", script], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert "CheckpointError" in done.stdout and "'my_tiny' is not registered" in done.stdout
    assert str(project / "mynet.py") in done.stdout
    script = f"import sys\nsys.path.insert(0, {str(project)!r})\nimport mynet, pnnh\nprint(pnnh.load({str(out)!r})[0])\n"
    done = subprocess.run([sys.executable, "-P", "-c", script], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("Conv2d(1, 8"), done.stderr


def test_import_errors_name_the_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    cases = {"no_such_module_xyz": "no module named 'no_such_module_xyz'",
             "missing.py": "'missing.py' is not a file",
             "broken.py": "RuntimeError: no GPU here",
             "needs_dep": "No module named 'not_installed_dep_xyz'",
             "not a module": "neither a module name"}
    for entry, expected in cases.items():
        with pytest.raises(ModelImportError, match="imports") as info:
            import_models([entry])
        assert expected in str(info.value), (entry, info.value)
        assert "broken" not in sys.modules
    with pytest.raises(ConfigError, match=r"imports=5 is not valid"):
        load_config({"model": "resnet8", "data": "digits", "imports": 5})
    # --import adds to the config file's list
    (tmp_path / "extra_models.py").write_text("import pnnh, torch.nn as nn\n"
                                             "pnnh.register_model('extra_models_net', lambda **kw: nn.Identity())\n")
    cfg = load_config({"model": "extra_models_net", "data": "digits", "imports": ["extra_models.py"]},
                      {"imports": ["extra_models.py", "json"]})
    assert cfg.imports == [str(tmp_path / "extra_models.py"), "json"] and "extra_models_net" in list_models()
    # importing it again (a resumed run, a second cell) runs the module once: no "already registered"
    assert import_models(str(tmp_path / "extra_models.py")) == [str(tmp_path / "extra_models.py")]


@pytest.mark.parametrize("form", ["halfway_file.py", "halfway_module"])
def test_a_module_that_fails_halfway_leaves_nothing_registered(tmp_path, monkeypatch, form):
    """A module that registers a model and then raises: the fixed module imports cleanly afterwards."""
    monkeypatch.chdir(tmp_path)
    name = form.removesuffix(".py")
    source = (f"import pnnh, torch.nn as nn\n"
              f"pnnh.register_model('{name}_net', lambda **kw: nn.Identity())\n")
    (tmp_path / f"{name}.py").write_text(source + "raise RuntimeError('typo further down')\n")
    with pytest.raises(ModelImportError, match="typo further down"):
        import_models([form])
    assert f"{name}_net" not in list_models() and name not in sys.modules
    (tmp_path / f"{name}.py").write_text(source)  # the user fixes the typo and runs again in the same process
    import_models([form])
    assert f"{name}_net" in list_models()
