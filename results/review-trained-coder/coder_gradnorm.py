"""Gradient norms at initialisation of pnnh56 with a trainable coder: the coders' share of the
global norm that ``grad_clip: 1.0`` clips (one batch of 128 Fashion-MNIST training images, fp32).

    OMP_NUM_THREADS=1 python results/review-trained-coder/coder_gradnorm.py   # output: coder_gradnorm.txt
"""
import torch
import torch.nn.functional as F

import pnnh
from pnnh.data import load_dataset
from pnnh.models import PNNHConv

torch.set_num_threads(1)
ds = load_dataset("fashion-mnist")
x = (ds.train_x[:128].float() / 255 - ds.mean[0]) / ds.std[0]
y = ds.train_y[:128].long()
for seed in (0, 1, 2):
    torch.manual_seed(seed)
    m = pnnh.create_model("pnnh56", num_classes=10, in_chans=1, coder_trainable=True)
    F.cross_entropy(m(x), y).backward()
    coder_ids = {id(layer.coder.weight) for layer in m.modules() if isinstance(layer, PNNHConv)}

    def sq(params):
        return sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)

    c = sq(p for p in m.parameters() if id(p) in coder_ids)
    r = sq(p for p in m.parameters() if id(p) not in coder_ids)
    print(f"seed {seed}: coder grad norm {c**0.5:.3f}, rest {r**0.5:.3f}, global {(c + r)**0.5:.3f}; "
          f"clip 1.0 scales every gradient by {min(1, 1 / (c + r)**0.5):.3f} (without the coder: {min(1, 1 / r**0.5):.3f})")
