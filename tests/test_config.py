"""TrainConfig: validation messages, YAML reading, flag precedence, architecture defaults, fuzzing."""
from __future__ import annotations

import math

import pytest
import yaml

import pnnh
from hypothesis import given, settings
from hypothesis import strategies as st

from pnnh.cli import build_parser
from pnnh.cli.train import config_from_args
from pnnh.train.config import (FIELDS, ConfigError, TrainConfig, bf16_supported, dump_config, load_config,
                               resolve_config)

BASE = {"model": "resnet8", "data": "digits"}


def error_of(values: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, **values})
    return str(info.value)


def test_minimal_config_keeps_arch_fields_unresolved():
    cfg = load_config(BASE)
    assert (cfg.model, cfg.data, cfg.epochs, cfg.batch_size) == ("resnet8", "digits", 10, 128)
    assert cfg.optimizer is None and cfg.lr is None and cfg.precision == "auto"


def test_unknown_model_suggests_close_names():
    message = error_of({"model": "resnet2"})
    assert "'resnet2'" in message and "resnet20" in message


@pytest.mark.parametrize("key, value, valid", [
    ("data", "fashion_mnist", "fashion-mnist"),
    ("optimizer", "adam", "adamw"),
    ("precision", "fp16", "bf16"),
    ("schedule", "cosin", "cosine"),
    ("device", "gpu", "cuda"),
])
def test_unknown_choice_names_value_and_valid_ones(key, value, valid):
    message = error_of({key: value})
    assert repr(value) in message and valid in message


@pytest.mark.parametrize("key, value", [
    ("lr", 0), ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("epochs", 0), ("batch_size", 0),
    ("batch_size", -3), ("momentum", 1.0), ("label_smoothing", 1.5), ("weight_decay", -1e-4), ("val_size", -1),
    ("seed", -1), ("grad_clip", 0), ("coder_lr_scale", -1), ("max_steps", 0),
])
def test_out_of_range_values_are_named(key, value):
    message = error_of({key: value})
    assert key in message and str(float(value) if isinstance(value, float) else value) in message


@pytest.mark.parametrize("key, value, shown", [
    ("epochs", "ten", "str"), ("epochs", 2.5, "float"), ("epochs", True, "bool"), ("lr", "fast", "str"),
    ("lr", [0.1], "list"), ("compile", "yes", "str"), ("model_kwargs", ["width", 8], "list"),
    ("model_kwargs", {"width": object()}, "model_kwargs.width"), ("model", 20, "int"),
    ("channels_last", "on", "'on'"), ("out", 5, "int"), ("nesterov", 1, "int"),
])
def test_wrong_types_are_named(key, value, shown):
    message = error_of({key: value})
    assert key in message and shown in message


def test_numeric_strings_and_integral_floats_are_accepted():
    # YAML 1.1 reads 1e-3 (no dot) as a string; 3.0 epochs is clearly 3.
    cfg = load_config({**BASE, **yaml.safe_load("lr: 1e-3\nepochs: 3.0")})
    assert cfg.lr == 1e-3 and cfg.epochs == 3 and isinstance(cfg.epochs, int)


def test_inconsistent_optimizer_settings():
    assert "nesterov" in error_of({"optimizer": "adamw", "nesterov": True})
    assert "momentum" in error_of({"nesterov": True, "momentum": 0.0})


def test_unknown_key_suggests_and_lists_valid_keys():
    message = error_of({"learning_rate": 0.1})
    assert "'learning_rate'" in message and "Did you mean 'lr'" in message
    assert "Did you mean 'weight_decay'" in error_of({"weight_decy": 0.1})
    assert all(name in message for name in FIELDS)


def test_missing_model_or_data():
    with pytest.raises(ConfigError, match="model is required"):
        load_config({"data": "digits"})
    with pytest.raises(ConfigError, match="data is required"):
        load_config({"model": "resnet8"})


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: resnet8\ndata: digits\nepochs: 2\nlr: 0.1: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)


def test_yaml_must_be_a_mapping_and_readable(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config({**BASE, "lr": 0.05, "model_kwargs": {"width": 8}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def parse(argv: list[str]):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_flags_override_yaml_and_unset_flags_do_not(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lr": 0.05, "epochs": 7, "compile": True, "channels_last": True,
                                    "model_kwargs": {"width": 8, "depth": 8}}))
    cfg = parse(["--config", str(path), "--lr", "0.2", "--no-channels-last", "--set", "width=16",
                 "--set", "coder_init=copy"])
    assert cfg.lr == 0.2 and cfg.channels_last is False  # flags win
    assert cfg.epochs == 7 and cfg.compile is True  # not given on the command line: YAML stays
    assert cfg.model_kwargs == {"width": 16, "depth": 8, "coder_init": "copy"}  # merged key by key


def test_flags_alone_and_bad_set():
    cfg = parse(["--model", "pnnh8", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--compile"])
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.compile) == ("pnnh8", 2, 64, True)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse(["--model", "pnnh8", "--data", "digits", "--set", "width"])


def test_resume_reads_saved_config(tmp_path):
    (tmp_path / "config.yaml").write_text(dump_config(load_config({**BASE, "epochs": 4, "out": str(tmp_path)})))
    cfg = parse(["--resume", "--out", str(tmp_path), "--epochs", "6"])
    assert (cfg.model, cfg.data, cfg.epochs) == ("resnet8", "digits", 6)


def test_arch_defaults_and_batch_scaling():
    cnn = resolve_config(load_config({**BASE, "batch_size": 256, "device": "cpu"}), "cnn", 28)
    assert (cnn.optimizer, cnn.lr, cnn.momentum, cnn.nesterov) == ("sgd", 0.2, 0.9, True)
    assert (cnn.weight_decay, cnn.coder_weight_decay, cnn.warmup_epochs, cnn.schedule) == (5e-4, 5e-4, 1.0, "cosine")
    assert cnn.crop_pad == 4 and cnn.channels_last is True and cnn.device == "cpu"
    vit = resolve_config(load_config({**BASE, "batch_size": 512, "device": "cpu"}), "vit", 8)
    assert vit.optimizer == "adamw" and math.isclose(vit.lr, 2e-3) and vit.nesterov is False
    assert (vit.weight_decay, vit.label_smoothing, vit.crop_pad, vit.channels_last) == (0.05, 0.1, 0, False)


def test_auto_channels_last_follows_the_models_cpu_preference():
    cfg = load_config({**BASE, "device": "cpu"})
    assert resolve_config(cfg, "cnn", 28, channels_last_on_cpu=False).channels_last is False
    assert resolve_config(cfg, "cnn", 28, channels_last_on_cpu=True).channels_last is True
    assert resolve_config(load_config({**BASE, "device": "cpu", "channels_last": True}), "cnn", 28,
                          channels_last_on_cpu=False).channels_last is True
    assert pnnh.create_model("pnnh20").prefers_channels_last_on_cpu is False
    assert pnnh.create_model("pnnh18").prefers_channels_last_on_cpu is True  # wide learners
    assert pnnh.create_model("resnet20").prefers_channels_last_on_cpu is True


def test_user_values_survive_resolution():
    cfg = load_config({**BASE, "optimizer": "adamw", "lr": 0.3, "momentum": 0.8, "coder_weight_decay": 0.0,
                       "crop_pad": 1, "channels_last": False, "precision": "fp32", "device": "cpu"})
    res = resolve_config(cfg, "cnn", 28)
    assert (res.optimizer, res.lr, res.momentum, res.coder_weight_decay, res.crop_pad) == ("adamw", 0.3, 0.8, 0.0, 1)
    assert res.channels_last is False and res.precision == "fp32" and res.weight_decay == 0.05


def test_sgd_without_momentum_drops_nesterov_default():
    res = resolve_config(load_config({**BASE, "momentum": 0.0, "device": "cpu"}), "cnn", 8)
    assert res.nesterov is False


def test_auto_precision_follows_hardware():
    res = resolve_config(load_config({**BASE, "device": "auto"}), "mlp", 8)
    assert res.device in ("cpu", "cuda")
    assert res.precision == ("bf16" if bf16_supported(res.device) else "fp32")
    assert "auto" not in yaml.safe_load(dump_config(res)).values()


CHOICES = {
    "model": st.sampled_from(["resnet8", "pnnh8", "plain_mlp", "nope", ""]),
    "data": st.sampled_from(["digits", "fashion-mnist", "imagenet"]),
    "optimizer": st.sampled_from(["sgd", "adamw", "SGD", "lion"]),
    "precision": st.sampled_from(["auto", "fp32", "bf16", "fp8"]),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "tpu"]),
}
ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE | st.one_of(*CHOICES.values()), max_size=6),
       st.fixed_dictionaries({}, optional=CHOICES),
       st.none() | st.text(max_size=10))
def test_fuzz_load_config_gives_config_or_config_error(values, choices, extra_key):
    if extra_key is not None:
        values[extra_key] = 1
    try:
        cfg = load_config({**BASE, **choices, **values})
    except ConfigError:
        return
    assert isinstance(cfg, TrainConfig)
    assert load_config(yaml.safe_load(dump_config(cfg))) == cfg  # a valid config survives YAML
    try:  # and resolves, unless it asks for hardware that is absent
        resolved = resolve_config(cfg, "cnn", 28)
    except ConfigError as err:
        assert "cuda" in str(err)
        return
    assert None not in (resolved.optimizer, resolved.lr, resolved.precision, resolved.out)
