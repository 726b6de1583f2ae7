"""Share of aten::cat (and convolution, BatchNorm) in a training step's self CPU time.

    OMP_NUM_THREADS=1 python results/speed/issue22/cat_share.py    # writes nothing; prints one line per model
"""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import pnnh

torch.set_num_threads(1)
for name, cl in (("pnnh56", True), ("pnnh56", False), ("resnet56", True)):
    torch.manual_seed(0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    m = pnnh.create_model(name, num_classes=10, in_chans=1, img_size=28).to(memory_format=fmt)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (128,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)

    def share(pred):
        return sum(e.self_cpu_time_total for e in ev if pred(e.key)) / total

    print(f"{name} {'channels_last' if cl else 'NCHW'}: self CPU {total / 3e6:.2f} s/step; "
          f"cat {100 * share(lambda k: k == 'aten::cat'):.1f}%, "
          f"copy_ {100 * share(lambda k: k == 'aten::copy_'):.1f}%, "
          f"slice/narrow backward {100 * share(lambda k: 'slice' in k or 'narrow' in k):.1f}%, "
          f"convolution {100 * share(lambda k: 'convolution' in k or 'conv' in k):.1f}%, "
          f"batch_norm {100 * share(lambda k: 'batch_norm' in k):.1f}%")
