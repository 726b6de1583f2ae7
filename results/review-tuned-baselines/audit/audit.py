"""Issue 19, objection 2: why Fixup and TAT do not train in our tuning search (session 9).

Two measurements on 4,096 Fashion-MNIST training images (normalised like pnnh train does, no
augmentation, fp32, one thread), models built by pnnh.create_model exactly as a sweep builds them:

1. at initialisation, on 512 images: the pooled features the head reads (their mean square over
   channels, their variance across images, and the ratio), and the second moment of every 4th
   block's output;
2. the training loss of the first 160 steps (batch 128, SGD momentum 0.9 Nesterov, wd 5e-4, no
   warm-up; Fixup's scalars at 0.1 x lr as its paper does), averaged per 20 steps.

Fixup is also run with the parameter-free "option A" shortcut of the authors' CIFAR code (stride-2
subsampling, zero channels appended) instead of pnnh's 1x1 projection, to see whether that
difference matters.

    OMP_NUM_THREADS=1 python results/review-tuned-baselines/audit/audit.py > results/review-tuned-baselines/audit/audit.txt
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.data.datasets import load_dataset
from pnnh.models import create_model


class OptionA(nn.Module):
    """The authors' CIFAR Fixup shortcut: subsample by the stride, append zero channels."""

    def __init__(self, out_ch: int, stride: int):
        super().__init__()
        self.out_ch, self.stride = out_ch, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return torch.cat([x, x.new_zeros(x.shape[0], self.out_ch - x.shape[1], *x.shape[2:])], 1)


def build(name: str) -> nn.Module:
    option_a = name.endswith("+optionA")
    model = create_model(name.removesuffix("+optionA"), num_classes=10, in_chans=1, img_size=28)
    if option_a:
        for block in model.body:
            if isinstance(block.shortcut, nn.Conv2d):
                block.shortcut = OptionA(block.shortcut.out_channels, block.shortcut.stride[0])
    return model


def at_init(name: str, x: torch.Tensor) -> str:
    torch.manual_seed(0)
    model = build(name)
    pooled, blocks = {}, []
    model.pool.register_forward_hook(lambda m, i, o: pooled.__setitem__("f", o.flatten(1)))
    for block in model.body[::4]:
        block.register_forward_hook(lambda m, i, o: blocks.append(o.pow(2).mean().item()))
    with torch.no_grad():
        model(x)
    f = pooled["f"]
    mean_sq, var = f.mean(0).pow(2).mean().item(), f.var(0).mean().item()
    return (f"{name:26s} pooled mean^2 {mean_sq:7.3f}  across-image var {var:7.4f}  ratio {var / mean_sq:6.3f}"
            f"  | block E[h^2] every 4th: {' '.join(f'{q:.2f}' for q in blocks)}")


def first_steps(name: str, lr: float, x: torch.Tensor, y: torch.Tensor, steps: int = 160) -> str:
    torch.manual_seed(0)
    model = build(name)
    scalars = [p for n, p in model.named_parameters() if "fixup_scalar" in n]
    rest = [p for n, p in model.named_parameters() if "fixup_scalar" not in n]
    groups = [{"params": rest}] + ([{"params": scalars, "lr": 0.1 * lr}] if scalars else [])
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    means = [sum(losses[k:k + 20]) / 20 for k in range(0, steps, 20)]
    return f"{name:26s} lr {lr:<6g} loss per 20 steps: {' '.join(f'{m:.3f}' for m in means)}"


def main() -> None:
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (ds.train_x[:4096].float().div(255) - mean) / std
    y = ds.train_y[:4096]
    print("== 1. at initialisation (512 images)")
    for name in ("resnet56", "skipinit_resnet56", "fixup_resnet56", "fixup_resnet56+optionA", "plain56",
                 "tat_plain20", "tat_plain56"):
        print(at_init(name, x[:512]), flush=True)
    print("== 2. first 160 steps")
    for name, lr in (("resnet56", 0.1), ("skipinit_resnet56", 0.05), ("fixup_resnet56", 0.1),
                     ("fixup_resnet56", 0.02), ("fixup_resnet56+optionA", 0.02),
                     ("tat_plain56", 0.02), ("tat_plain56", 0.005)):
        print(first_steps(name, lr, x, y), flush=True)


if __name__ == "__main__":
    main()
