"""DiracNet's NCReLU form (models/baselines.py): the paper's identity path skips the nonlinearity."""
from __future__ import annotations

import torch

import pnnh
from pnnh.data import load_dataset
from pnnh.models.baselines import DiracConv2d, NCReLU


def test_ncrelu_dirac_layer_passes_x_itself_with_beta_zero():
    torch.manual_seed(0)
    conv = DiracConv2d(2 * 8, 8, 3, 1, beta_init=0.0, ncrelu_input=True)
    x = torch.randn(4, 8, 10, 10)  # negative values too: relu alone would lose them
    torch.testing.assert_close(conv(NCReLU()(x)), x, rtol=0, atol=1e-6)
    plain = DiracConv2d(8, 8, 3, 1, beta_init=0.0)  # the ReLU form's identity passes relu(x) only
    torch.testing.assert_close(plain(torch.relu(x)), torch.relu(x), rtol=0, atol=1e-6)


def test_dirac_ncrelu_net_is_plain_and_trains_on_digits():
    torch.manual_seed(0)
    model = pnnh.create_model("dirac_ncrelu20", num_classes=10, in_chans=1, img_size=8, width=8)
    ncrelu = [m for m in model.modules() if isinstance(m, NCReLU)]
    convs = [m for m in model.modules() if isinstance(m, DiracConv2d)]
    assert len(ncrelu) == len(convs) == 18
    assert convs[1].weight.shape[1] == 2 * convs[1].weight.shape[0]  # reads [relu(x), -relu(-x)]
    assert pnnh.find_shortcuts(model, torch.randn(2, 1, 8, 8)) == []
    splits = load_dataset("digits", img_size=8)
    x = (splits.train_x[:128].float() / 255 - splits.mean[0]) / splits.std[0]
    y = splits.train_y[:128]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
