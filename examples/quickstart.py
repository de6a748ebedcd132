"""normlab in five minutes: layers, then the model tools on a small CNN.

Run it: ``python examples/quickstart.py`` (CPU, a few seconds). Every step acts on a
real model trained for a few steps on random data, so each tool has something to do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from normlab import functional as NF
from normlab import nn as nlnn
from normlab.convert import convert_norms, freeze_bn, fuse_conv_bn
from normlab.doctor import diagnose
from normlab.recalibrate import recalibrate
from normlab.registry import create_norm

torch.manual_seed(0)

# 1. Layers: drop-ins for torch.nn, plus the small-batch family.
x = 3.0 + 2.0 * torch.randn(2, 64, 8, 8)  # off-center data, as real activations are
bn = nlnn.BatchNorm2d(64)  # same constructor and state_dict as torch.nn.BatchNorm2d
gn = nlnn.GroupNorm(32, 64)  # torch's argument order
y = NF.group_norm(x, 32)
sn = create_norm("sn", 64)  # registry names: bn, gn, ln, in, sn, frn, mabn, brn, ...
print("layers:", bn(x).shape, gn(x).shape, y.shape, sn(x).shape)


# 2. A small CNN with torch's own BatchNorm, trained a few steps at batch 8.
def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


model = small_cnn()
images = [0.5 + torch.rand(8, 3, 16, 16) for _ in range(20)]
labels = [torch.randint(0, 10, (8,)) for _ in range(20)]
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for xb, yb in zip(images, labels, strict=True):
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()

# 3. The doctor: BN pitfalls for the mode the model is in.
print(diagnose(model.eval(), images[0]).to_table())

# 4. Precise running statistics from 10 batches (one call, right at any depth).
recalibrate(model, images[:10])

# 5. Fold eval BN into the convs; the output check restores the model on a mismatch.
fused = fuse_conv_bn(copy.deepcopy(model).eval(), check_inputs=images[0])
with torch.no_grad():
    print("fused: max |diff| =", float((fused(images[0]) - model(images[0])).abs().max()))

# 6. Freeze BN for fine-tuning at small batch: it stays frozen under .train().
frozen = freeze_bn(copy.deepcopy(model))
frozen.train()
with torch.no_grad():
    same = torch.allclose(frozen(images[0]), model(images[0]), atol=1e-5)
print("frozen model in train mode computes the eval model:", same)

# 7. Or swap every BatchNorm for GroupNorm, with a report of what changed.
gn_model, report = convert_norms(copy.deepcopy(model), "gn")
print(report)
gn_model(images[0]).sum().backward()
