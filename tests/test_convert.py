"""pnnh.convert and the public PNNH blocks (issue 17): every kind of residual block converts, the
twin has no shortcut, its parameters are what the README says, it trains and folds; what cannot be
converted is refused by name. The torchvision-style nets are written here the way torchvision
writes them (``out += identity``, a ``downsample`` Sequential), without torchvision."""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.models.cnn import cifar_stages
from pnnh.models.convert import ConversionError, convert
from pnnh.models.layers import CoderSpec, PNNHConv, PNNHLinear, PNNHStage, pnnh_layers

pytestmark = pytest.mark.usefixtures("one_thread")


# --- torchvision-style ResNets (basic and bottleneck blocks, projection shortcut as `downsample`) ---

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = torch.add(out, identity)  # the other common spelling
        return F.relu(out)


class TorchvisionResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, in_chans=3, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_convs(model: TorchvisionResNet) -> list[list[tuple[int, int, int, int]]]:
    """The convolutions of each stage's branches, as pnnh_layers takes them."""
    stages = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        convs = [m for block in layer for name, m in block.named_children() if name.startswith("conv")]
        stages.append([(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs])
    return stages


def expected_twin_params(model: TorchvisionResNet) -> int:
    """What the README says: stem and head kept; each block's convolutions become PNNH layers
    (coders shared by the stride-1 layers of equal shape in a stage); shortcuts dropped."""
    kept = [model.conv1, model.bn1, model.fc]
    layers = pnnh_layers(CoderSpec(), tv_convs(model))
    return pnnh.count_params(nn.ModuleList(kept + layers))


def assert_twin(model, x, twin=None):
    """No shortcut; eval outputs of the right shape; fold computes the twin's function."""
    twin = twin if twin is not None else convert(model, x, verbose=False)
    assert pnnh.find_shortcuts(twin) == []
    assert pnnh.find_shortcuts(model), "the test model should be residual"
    twin.eval()
    with torch.no_grad():
        out = twin(x)
        assert out.shape == model.eval()(x).shape
        assert torch.allclose(pnnh.fold(twin)(x), out, atol=1e-4, rtol=1e-4)
    return twin


def train_steps(model, x, y, steps=3):
    """A few SGD steps on one batch: the loss goes down and stays finite."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("block,layers", [(BasicBlock, [2, 2, 2, 2]), (Bottleneck, [2, 1, 1, 1])],
                         ids=["resnet18-basic", "bottleneck"])
def test_torchvision_style_resnet_converts(block, layers):
    torch.manual_seed(0)
    model = TorchvisionResNet(block, layers, num_classes=10, in_chans=1, width=8)
    x = torch.randn(4, 1, 32, 32)
    twin = assert_twin(model, x)
    assert type(twin) is TorchvisionResNet  # blocks were modules: replaced in place, class kept
    assert pnnh.count_params(twin) == expected_twin_params(model)
    report = twin.conversion_report
    assert len(report.blocks) == sum(layers)
    assert report.blocks[0].name == "layer1.0" and report.params_before == pnnh.count_params(model)
    projections = [b.name for b in report.blocks if b.shortcut.startswith("projection")]
    assert projections == ([] if block is BasicBlock else ["layer1.0"]) + ["layer2.0", "layer3.0", "layer4.0"]
    assert report.blocks[0].params_after + report.blocks[1].params_after < report.blocks[0].params_before * 2
    train_steps(twin, x, torch.arange(4) % 10)


@pytest.mark.parametrize("depth", [20, 50])
def test_twin_of_resnet_is_pnnh(depth):
    """convert(resnet{D}) is pnnh{D}: the same layers, state_dict keys, shapes and parameter count."""
    kwargs = dict(num_classes=10, in_chans=1, width=8)
    resnet, hand_built = pnnh.create_model(f"resnet{depth}", **kwargs), pnnh.create_model(f"pnnh{depth}", **kwargs)
    twin = assert_twin(resnet, torch.randn(2, 1, 32, 32))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in hand_built.state_dict().items()}
    assert pnnh.count_params(twin) == pnnh.count_params(hand_built)
    assert twin.prefers_channels_last_on_cpu == hand_built.prefers_channels_last_on_cpu
    twin.load_state_dict(hand_built.state_dict())  # the same net: pnnh{D} weights load into the twin
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), hand_built.eval()(x))


def test_convert_takes_the_coder_options():
    twin = convert(pnnh.create_model("resnet8", num_classes=10, in_chans=1), torch.randn(2, 1, 16, 16),
                   verbose=False, coder_ratio=0.25, coder_init="copy")
    layers = [m for m in twin.modules() if isinstance(m, PNNHConv)]
    assert len(layers) == 6 and all(m.spec.ratio == 0.25 and m.spec.init == "copy" for m in layers)
    assert pnnh.count_params(twin) == pnnh.count_params(
        pnnh.create_model("pnnh8", num_classes=10, in_chans=1, coder_ratio=0.25, coder_init="copy"))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016): BN-ReLU before each conv, no ReLU after the sum."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_planes), conv3x3(in_planes, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), conv3x3(planes, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = conv3x3(1, width)
        self.layers = nn.Sequential(PreActBlock(width, width), PreActBlock(width, 2 * width, 2),
                                    PreActBlock(2 * width, 2 * width))
        self.bn = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, 10)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def test_preactivation_blocks_convert():
    """The BN-ReLU of the projection block's shortcut joins that block (no ReLU cuts the code)."""
    torch.manual_seed(0)
    model, x = PreActNet(), torch.randn(4, 1, 16, 16)
    twin = assert_twin(model, x)
    assert [b.shortcut for b in twin.conversion_report.blocks] == ["identity", "projection (layers.1.shortcut)",
                                                                  "identity"]
    body = list(twin.layers)
    assert len(body) == 6 and all(isinstance(m, PNNHConv) for m in body)  # spliced: a plain chain
    assert [m.stride for m in body] == [1, 1, 2, 1, 1, 1]
    train_steps(twin, x, torch.arange(4))


class Loop(nn.Module):
    """``x = x + block(x)`` written in the parent's loop: no module is a whole block."""

    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(1, width), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU(), conv3x3(width, width),
                          nn.BatchNorm2d(width)) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def test_blocks_written_in_a_loop_convert_to_a_graph_module():
    torch.manual_seed(0)
    model, x = Loop(), torch.randn(4, 1, 12, 12)
    twin = assert_twin(model, x)
    assert isinstance(twin, torch.fx.GraphModule)
    assert sum(isinstance(m, PNNHConv) for m in twin.modules()) == 6
    train_steps(twin, x, torch.arange(4))
    assert pnnh.count_params(model) == sum(p.numel() for p in Loop().parameters())  # the model is untouched


class TransformerBlock(nn.Module):
    """A timm-style pre-LN block: two residual additions in one module."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(0.0))

    def attn(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TinyTransformer(nn.Module):
    def __init__(self, dim=16, depth=2):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.blocks = nn.Sequential(*[TransformerBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_pre_ln_transformer_blocks_convert():
    torch.manual_seed(0)
    model, x = TinyTransformer(), torch.randn(4, 1, 16, 16)
    twin = assert_twin(model, x)
    layers = list(twin.blocks)
    assert len(layers) == 4 and all(isinstance(m, PNNHLinear) for m in layers)
    assert layers[0].coder is layers[2].coder and layers[1].coder is layers[3].coder  # one per kind
    assert layers[0].coder is not layers[1].coder
    n_code = CoderSpec().code_channels(16)
    assert layers[1].fn[2].out_features == 16 - n_code
    assert torch.equal(layers[1].fn[2].weight, model.blocks[0].mlp[2].weight[: 16 - n_code])
    train_steps(twin, x, torch.arange(4))


def test_vit_converts_to_the_pnnh_vit():
    kwargs = dict(num_classes=10, in_chans=1, img_size=16, depth=2, width=24, heads=2)
    vit, hand_built = pnnh.create_model("vit_tiny", **kwargs), pnnh.create_model("pnnh_vit_tiny", **kwargs)
    twin = assert_twin(vit, torch.randn(2, 1, 16, 16))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in hand_built.state_dict().items()}
    assert pnnh.count_params(twin) == pnnh.count_params(hand_built)
    assert type(twin.blocks[0].fn).__name__ == "Attention"  # the sub-layer's own module, narrowed


class SEBlock(BasicBlock):
    def __init__(self, planes):
        super().__init__(planes, planes)
        self.fc = nn.Linear(planes, planes)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out = out * torch.sigmoid(self.fc(out.mean((2, 3))))[:, :, None, None]
        return self.relu(out + x)


def grouped_block() -> BasicBlock:
    """A ResNeXt-style block: a grouped convolution, which a PNNH layer (dense) does not have."""
    block = BasicBlock(4, 4)
    block.conv1 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    return block


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv3x3(1, 4)

    def forward(self, x):
        return x + self.conv(x) if x.sum() > 0 else x


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(conv3x3(4, 4), nn.BatchNorm2d(4))
        self.conv = conv3x3(4, 4)

    def forward(self, x):
        x = F.relu(x + self.block(x))
        return torch.cat([x, self.conv(x)], dim=1)


@pytest.mark.parametrize("model,in_ch,expected", [
    (nn.Sequential(SEBlock(4)), 4, r"branch of the residual block .* not a chain .*'0\.fc'|holds"),
    (nn.Sequential(grouped_block()), 4, r"module '0\.conv1' \(Conv2d\) has groups=2"),
    (Untraceable(), 1, r"cannot trace Untraceable with torch\.fx"),
    (nn.Sequential(conv3x3(1, 4), nn.ReLU(), conv3x3(4, 4)), 1, r"Sequential has no residual block"),
    (Dense(), 4, r"Dense has a shortcut at graph node 'cat' \(cat\) .*DenseNet-style"),
    (pnnh.create_model("rezero_resnet8", num_classes=10, in_chans=1), 1, r"holds graph node .*mul"),
], ids=["squeeze-excitation", "grouped-conv", "untraceable", "plain", "densenet-concat", "rezero-scalar"])
def test_unsupported_models_are_refused_by_name(model, in_ch, expected):
    with pytest.raises(ConversionError, match=expected):
        convert(model, torch.randn(2, in_ch, 8, 8), verbose=False)


def test_conversion_report_is_printed(capsys):
    convert(pnnh.create_model("resnet8", num_classes=10, in_chans=1), torch.randn(2, 1, 16, 16))
    out = capsys.readouterr().out
    assert "body.1  projection (body.1.shortcut)  3x3/2 16->32, 3x3 32->32" in out
    assert "ConvNet: 3 residual blocks -> PNNH layers; parameters 77,754 -> 41,882 (0.54x)" in out


def test_a_convert_model_prints_its_table_once_per_process(capsys):
    """A sweep builds a cell's twin several times (training, probe, reload): one table is enough."""
    first = pnnh.create_model("convert:resnet8", num_classes=10, in_chans=1, img_size=8, coder_ratio=0.25)
    assert "3 residual blocks -> PNNH layers" in capsys.readouterr().out
    again = pnnh.create_model("convert:resnet8", num_classes=10, in_chans=1, img_size=8, coder_ratio=0.25)
    assert capsys.readouterr().out == ""
    assert pnnh.count_params(again) == pnnh.count_params(first)
    pnnh.create_model("convert:resnet8", num_classes=10, in_chans=1, img_size=8, coder_ratio=0.5)  # another: its own table
    assert "3 residual blocks -> PNNH layers" in capsys.readouterr().out


# --- public building blocks ---

def test_pnnh_conv_builds_its_own_coder_and_shares_one():
    layer = PNNHConv(16, 16)
    assert layer.coder.weight.shape == (8, 16, 1, 1) and not layer.coder.weight.requires_grad
    other = PNNHConv(16, 16, coder=layer.coder)
    assert other.coder is layer.coder
    narrow = PNNHConv(16, 16, coder_ratio=0.25, coder_norm="bn")
    assert narrow.coder.weight.shape[0] == 4 and isinstance(narrow.norm, nn.BatchNorm2d)
    assert PNNHConv(16, 16, coder=narrow.coder).spec.ratio == 0.25  # a shared coder brings its design
    with pytest.raises(TypeError, match="in_ch=CoderSpec.* must be a positive int"):
        PNNHConv(CoderSpec(), None, 16, 16)  # the old internal signature
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['coder_ratoi'\]; the PNNH options"):
        PNNHConv(16, 16, coder_ratoi=0.25)
    with pytest.raises(ValueError, match=r"a coder of shape \(8, 16, 1, 1\) does not fit a PNNH layer 16 -> 32"):
        PNNHConv(16, 32, coder=layer.coder)


def test_custom_net_from_public_blocks(digits_batch):
    """A few stages built only from public names: a plain chain that trains and folds."""
    x, y = digits_batch
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        pnnh.PNNHStage(16, 16, depth=3), pnnh.PNNHStage(16, 32, depth=3, stride=2, coder_init="accumulate"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    stage = net[3]
    assert len({id(layer.coder) for layer in stage}) == 1  # one coder for the stage
    assert [layer.spec.init for layer in net[4]] == ["accumulate"] * 3
    assert pnnh.find_shortcuts(net) == []
    train_steps(net, x, y)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(pnnh.fold(net)(x), net(x), atol=1e-4)


def test_pnnh_linear_mlp_and_shared_coder():
    layer = PNNHLinear(32, coder_ratio=0.25)
    assert layer.learner_dim == 24 and layer(torch.randn(5, 32)).shape == (5, 32)
    h = torch.randn(5, 32)
    assert torch.equal(PNNHLinear(32, coder_ratio=0.25, coder_init="copy")(h)[:, :8], h[:, :8])  # the code passes
    net = nn.Sequential(layer, PNNHLinear(32, coder=layer.coder), nn.Linear(32, 3))
    assert net[1].coder is layer.coder and pnnh.find_shortcuts(net) == []
    with pytest.raises(ValueError, match="coder_form='looks-linear'.*partial"):
        PNNHLinear(32, coder_form="looks-linear")


@pytest.fixture(scope="module")
def digits_batch():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:64], dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(data.target[:64])


# --- training a converted model through pnnh.train / pnnh train; register_model as a decorator ---

@pnnh.register_model("tv_resnet18_for_tests")
def tv_resnet18(num_classes=1000, in_chans=3, img_size=224, width=64):
    """A user's model: registered by decorator, no pnnh attributes (arch, ...) at all."""
    return TorchvisionResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, width)


@pnnh.register_model
def tv_bottleneck_for_tests(num_classes=1000, in_chans=3, img_size=224, width=8):
    return TorchvisionResNet(Bottleneck, [1, 1, 1, 1], num_classes, in_chans, width)


def test_register_model_as_decorator_and_call():
    assert {"tv_resnet18_for_tests", "tv_bottleneck_for_tests"} <= set(pnnh.list_models("tv_*"))
    assert tv_resnet18.__name__ == "tv_resnet18"  # the decorator returns the function
    pnnh.register_model("tv_bottleneck_d1_for_tests", tv_bottleneck_for_tests, width=4)  # the call form
    assert pnnh.create_model("tv_bottleneck_d1_for_tests", num_classes=3).fc.in_features == 4 * 8 * 4
    with pytest.raises(ValueError, match="'tv_resnet18_for_tests' is already registered"):
        pnnh.register_model("tv_resnet18_for_tests")(tv_resnet18)
    with pytest.raises(ValueError, match="':' .*convert:"):
        pnnh.register_model("convert:mine", tv_resnet18)


def test_converted_torchvision_resnet18_trains_on_fashion_mnist(fashion_dir, tmp_path):
    result = pnnh.train({"model": "convert:tv_resnet18_for_tests", "data": "fashion-mnist",
                         "data_dir": str(fashion_dir), "train_subset": 640, "test_subset": 500, "epochs": 2,
                         "batch_size": 64, "lr": 0.02, "warmup_epochs": 0,  # 5.8M parameters, 20 steps
                         "out": str(tmp_path / "run")}, progress=False)
    twin = pnnh.create_model("convert:tv_resnet18_for_tests", num_classes=10, in_chans=1, img_size=28)
    assert result.params == pnnh.count_params(twin) == expected_twin_params(
        TorchvisionResNet(BasicBlock, [2, 2, 2, 2], 10, 1))
    assert pnnh.find_shortcuts(twin) == []
    first, last = (pnnh.train.trainer.json.loads(line) for line in
                   (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:2])
    assert last["train_loss"] < first["train_loss"]
    assert result.metrics["test_acc"] > 0.5  # chance is 0.1


def test_converted_model_trains_from_the_command_line(tmp_path):
    from pnnh.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "convert:resnet8", "--data", "digits", "--epochs", "1", "--max-steps", "3",
                 "--set", "coder_ratio=0.25", "--out", str(out)]) == 0
    twin = pnnh.load(out)
    assert pnnh.find_shortcuts(twin) == [] and twin.pretrained_cfg["model"] == "convert:resnet8"
    assert all(m.spec.ratio == 0.25 for m in twin.modules() if isinstance(m, PNNHConv))
