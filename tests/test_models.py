"""The model zoo: registry, shapes, gradients, parameter counts, shortcuts, the PNNH layer."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

import pnnh
from pnnh.models.layers import Coder, CoderSpec, PNNHConv, code_read_matrix

# Small widths keep the whole zoo fast; the structure (depth, stages, coders) is unchanged.
SMALL = {"cnn": {"width": 4}, "imagenet": {"width": 4}, "vit": {"width": 24, "heads": 2, "depth": 2},
         "mlp": {"width": 16, "depth": 6}}
IMAGENET = {"18", "34", "50"}


def small_kwargs(name: str) -> dict:
    if "vit" in name:
        return SMALL["vit"]
    if "mlp" in name:
        return SMALL["mlp"]
    return SMALL["imagenet"] if name[-2:] in IMAGENET else SMALL["cnn"]


# The plain / residual / PNNH kinds; the other ways to train deep nets (baselines) have tests of their own
# (zero-initialised branches legitimately give some parameters no gradient at init).
ALL_MODELS = [n for n in pnnh.list_models() if n.startswith(("plain", "resnet", "pnnh", "vit", "residual_mlp"))]


def test_registry_lists_required_names():
    required = [f"{f}{d}" for f in ("plain", "resnet", "pnnh") for d in (8, 20, 32, 44, 56, 110, 18, 34, 50)]
    required += ["vit_tiny", "plain_vit_tiny", "pnnh_vit_tiny", "plain_mlp", "residual_mlp", "pnnh_mlp"]
    assert set(required) <= set(ALL_MODELS)
    assert pnnh.list_models("pnnh*") == [n for n in ALL_MODELS if n.startswith("pnnh")]
    assert "pnnh56" in pnnh.list_models("pnnh5?")


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_forward_backward_every_model(name, in_chans, size):
    torch.manual_seed(0)
    model = pnnh.create_model(name, num_classes=7, in_chans=in_chans, img_size=size, **small_kwargs(name))
    x = torch.randn(3, in_chans, size, size)
    out = model(x)
    assert out.shape == (3, 7)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"{name}: no gradient reaches {missing[:5]}"


def test_shared_coder_gets_gradient_from_every_layer():
    """Untie the shared coder into per-layer copies: each copy gets gradient, and their sum is
    the shared coder's gradient (autograd accumulates over every use)."""
    import copy

    torch.manual_seed(0)
    model = pnnh.create_model("pnnh20", in_chans=1, width=4, coder_trainable=True)
    layers = [m for m in model.modules() if isinstance(m, PNNHConv)]
    coder = layers[1].coder
    users = [layer for layer in layers if layer.coder is coder]
    assert len(users) == 6  # stage 1 of pnnh20: 6 layers share one coder (no transition there)
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    shared_grad = coder.weight.grad.clone()

    untied = copy.deepcopy(model)
    untied.zero_grad()
    copies = []
    for layer in (m for m in untied.modules() if isinstance(m, PNNHConv)):
        if layer.coder is untied.body[1].coder:
            copies.append(copy.deepcopy(layer.coder))
    users_untied = [m for m in untied.modules() if isinstance(m, PNNHConv) and m.coder is untied.body[1].coder]
    for layer, own in zip(users_untied, copies):
        layer.coder = own
    untied(x).sum().backward()
    grads = [own.weight.grad for own in copies]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(sum(grads), shared_grad, rtol=1e-4, atol=1e-6)


def test_pnnh_params_at_most_0_6_of_resnet():
    assert pnnh.count_params(pnnh.create_model("pnnh56")) <= 0.6 * pnnh.count_params(pnnh.create_model("resnet56"))


def test_coder_is_frozen_by_default():
    """The default coder keeps its identity weights: no gradient, so no optimizer moves it."""
    model = pnnh.create_model("pnnh20", in_chans=1, width=4)
    coders = [m.coder.weight for m in model.modules() if isinstance(m, PNNHConv)]
    assert coders and not any(w.requires_grad for w in coders)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert all(w.grad is None for w in coders)
    learners = [m.weight for m in model.modules() if isinstance(m, PNNHConv)]
    assert all(w.grad is not None for w in learners)


def test_count_params_counts_shared_coder_once():
    model = pnnh.create_model("pnnh20", width=8)
    every_use = model.named_modules(remove_duplicate=False)
    naive = sum(p.numel() for _, m in every_use for p in m.parameters(recurse=False))
    coder_elems = {id(m.coder.weight): m.coder.weight.numel() for m in model.modules() if isinstance(m, PNNHConv)}
    assert pnnh.count_params(model) < naive
    assert len(coder_elems) == 5  # one shared coder per stage + two transition coders


@pytest.mark.parametrize("name", ALL_MODELS)
def test_find_shortcuts(name):
    size = 32
    model = pnnh.create_model(name, in_chans=3, img_size=size, **small_kwargs(name))
    found = pnnh.find_shortcuts(model, torch.randn(2, 3, size, size))
    if name.startswith(("resnet", "residual", "vit")):
        assert found, f"{name} is residual but no shortcut was found"
    else:
        assert found == [], f"{name} should be a plain chain, found {found}"


# Every option differs from the default (the {} case), so each case tests something of its own.
@pytest.mark.parametrize("option", [
    {}, {"coder_form": "looks-linear"}, {"coder_kernel": 3}, {"coder_fusion": "sum"}, {"coder_norm": "bn"},
    {"coder_sharing": "none"}, {"coder_init": "accumulate"}, {"coder_ratio": 0.25}, {"coder_norm": "stage_end"}])
def test_pnnh_design_space_is_plain(option):
    model = pnnh.create_model("pnnh20", in_chans=1, width=8, **option)
    assert pnnh.find_shortcuts(model, torch.randn(2, 1, 28, 28)) == []


def test_default_pnnh_layer_is_a_1x1_coder_conv_beside_a_3x3_learner_conv():
    layer = pnnh.create_model("pnnh8", width=8).body[1]
    assert isinstance(layer, PNNHConv)
    kinds = [type(m).__name__ for m in layer.children()]
    assert kinds == ["Coder", "PartialBatchNorm", "PartialReLU"]
    graph = torch.fx.symbolic_trace(layer).graph
    convs = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.conv2d]
    assert len(convs) == 2  # the 1x1 coder and the 3x3 learner
    assert [n.target for n in graph.nodes if n.op == "call_function"].count(torch.add) == 0


def test_split_coder_conv_saves_the_code_channels_flops():
    from pnnh.experiments.bench import count_flops
    x = torch.randn(2, 1, 28, 28)
    flops = {name: count_flops(pnnh.create_model(name, in_chans=1), x) for name in ("resnet56", "pnnh56")}
    # half the output channels come from a 1x1 conv (1/9 of a 3x3's FLOPs): ~0.5 + 0.5 / 9
    assert 0.5 < flops["pnnh56"] / flops["resnet56"] < 0.62


# A coder kernel smaller than the learner's runs as its own convolution; with coder_kernel=3 the
# layer IS the fused convolution, so that case belongs to the two-call test below.
@pytest.mark.parametrize("option", [{}, {"coder_form": "looks-linear"}, {"coder_init": "accumulate"},
                                    {"coder_fusion": "sum"}, {"coder_norm": "bn"}, {"coder_norm": "stage_end"}])
def test_split_forward_equals_one_fused_conv(option):
    torch.manual_seed(0)
    model = pnnh.create_model("pnnh20", in_chans=1, width=8, **option)
    for layer in model.body:
        assert layer.coder_pad == 1  # the 1x1 coder under the 3x3 learner: forward takes the split path
        layer.norm.train()
        x = torch.randn(4, layer.weight.shape[1], 8, 8)
        torch.testing.assert_close(layer(x.clone()), layer.forward_fused(x.clone()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", [{}, {"coder_form": "looks-linear"}, {"coder_kernel": 3},
                                    {"coder_fusion": "sum"}, {"coder_norm": "bn"}, {"coder_norm": "stage_end"}])
def test_fused_conv_equals_two_call_form(option):
    torch.manual_seed(0)
    model = pnnh.create_model("pnnh20", in_chans=1, width=8, **option)
    for layer in model.body:
        x = torch.randn(4, layer.weight.shape[1], 8, 8)
        torch.testing.assert_close(layer(x.clone()), layer.forward_two_calls(x.clone()))


def test_coder_inits():
    spec = CoderSpec()
    R = code_read_matrix(CoderSpec(init="accumulate"), 4, 8, 4)
    assert torch.equal(R, torch.cat([torch.eye(4), torch.eye(4)], 1))  # accumulate: [I | I]
    assert spec.init == "signed" and spec.norm == "none" and not spec.trainable and spec.kernel == 1
    assert torch.equal(code_read_matrix(CoderSpec(init="copy"), 4, 8, 4), torch.cat([torch.eye(4), torch.zeros(4, 4)], 1))
    signed = code_read_matrix(CoderSpec(init="signed"), 4, 8, 4)
    assert torch.equal(signed[:, 4:].sum(0), torch.zeros(4))  # each learner added once, subtracted once
    ll = code_read_matrix(CoderSpec(form="looks-linear", init="copy"), 2, 8, 4)
    assert torch.equal(ll[:, :4], torch.tensor([[1.0, 0, -1, 0], [0, 1, 0, -1]]))
    coder = Coder(CoderSpec(init="orthogonal"), 4, 8, 4, 3)
    flat = coder.weight.flatten(1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(4))


def test_looks_linear_code_passes_exactly_at_init():
    """The looks-linear coder reads relu(+c) - relu(-c) = c back: a copy coder is an exact identity."""
    torch.manual_seed(0)
    spec = CoderSpec(form="looks-linear", init="copy", kernel=1)
    layer = pnnh.create_model("pnnh8", width=8, coder_form="looks-linear", coder_init="copy", coder_kernel=1,
                              coder_norm="bn").body[1]
    x = torch.relu(torch.randn(16, 8, 6, 6))
    out = layer(x)
    code = out[:, :2] - out[:, 2:4]
    ref_bn = torch.nn.functional.batch_norm(x[:, :2] - x[:, 2:4], None, None, training=True)
    torch.testing.assert_close(code, ref_bn, atol=1e-4, rtol=1e-4)
    assert spec.code_channels(8) == 4


def _linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def _last_hidden(model, x):
    out = {}
    model.feature_layers()[-1][1].register_forward_hook(lambda m, i, o: out.setdefault("h", o.detach()))
    with torch.no_grad():
        model(x)
    return out["h"]


def test_pnnh56_keeps_input_better_than_plain56_at_init():
    digits = torch.tensor(load_digits().images[:256], dtype=torch.float32)[:, None] / 16
    x = (digits - digits.mean()) / digits.std()
    scores = {}
    for name in ("plain56", "pnnh56"):
        ckas = []
        for seed in range(3):
            torch.manual_seed(seed)
            model = pnnh.create_model(name, in_chans=1, img_size=8, width=32)
            ckas.append(_linear_cka(x, _last_hidden(model, x)))
        scores[name] = sum(ckas) / len(ckas)
    assert scores["pnnh56"] > scores["plain56"], scores


def test_feature_layers_count_weight_layers():
    for name, expected in (("plain56", 55), ("resnet56", 55), ("pnnh56", 55), ("resnet18", 17)):
        assert len(pnnh.create_model(name, width=4).feature_layers()) == expected


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'pnhh56'.*pnnh56"):
        pnnh.create_model("pnhh56")


@pytest.mark.parametrize("name,depth", [("pnnh", 21), ("resnet", 7), ("plain", 0)])
def test_invalid_depth_says_which_are_valid(name, depth):
    with pytest.raises(ValueError, match=r"depth=.*6n\+2"):
        pnnh.create_model(name, depth=depth)


def test_named_depth_cannot_be_overridden():
    with pytest.raises(ValueError, match="fixes depth=56"):
        pnnh.create_model("pnnh56", depth=20)
    assert len(pnnh.create_model("pnnh", depth=26).feature_layers()) == 25


@pytest.mark.parametrize("kwargs,match", [
    ({"coder_init": "zeros"}, "coder_init='zeros'.*accumulate"),
    ({"coder_ratio": 1.5}, "coder_ratio"),
    ({"coder_kernel": 5}, "coder_kernel"),
    ({"coder_form": "crelu"}, "coder_form"),
])
def test_invalid_pnnh_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pnnh.create_model("pnnh20", **kwargs)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="coder_inti"):
        pnnh.create_model("pnnh20", coder_inti="copy")
    with pytest.raises(TypeError, match="coder_init"):
        pnnh.create_model("resnet20", coder_init="copy")


def test_vit_rejects_incompatible_image_size():
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        pnnh.create_model("vit_tiny", img_size=30)


def test_state_dict_round_trip_keeps_sharing():
    a = pnnh.create_model("pnnh20", width=8)
    b = pnnh.create_model("pnnh20", width=8, coder_init="kaiming")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x))
    layers = [m for m in b.modules() if isinstance(m, PNNHConv)]
    assert layers[1].coder is layers[2].coder


def test_per_layer_frozen_coders_compute_the_shared_coders_function():
    """A frozen coder is deterministic, so one coder per layer equals one per stage (the ablation's
    sharing-none cell trained bit-for-bit like the default); only the parameter count differs."""
    torch.manual_seed(0)
    shared = pnnh.create_model("pnnh20", width=8)
    torch.manual_seed(0)
    own = pnnh.create_model("pnnh20", width=8, coder_sharing="none")
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(shared(x), own(x), rtol=0, atol=0)
    coders = lambda m: {id(layer.coder) for layer in m.modules() if isinstance(layer, PNNHConv)}
    assert len(coders(own)) > len(coders(shared))
    assert sum(p.numel() for p in own.parameters()) > sum(p.numel() for p in shared.parameters())
