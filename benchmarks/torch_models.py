"""torchvision's ResNet50, MobileNetV2 and EfficientNetB0 in plain ``torch.nn``, for the PyTorch
peer where torchvision cannot be loaded (the PyPI torchvision wheel needs the CUDA build of
torch; the CPU wheel ``torch==2.13.0+cpu`` has no matching torchvision here).

The same layers, shapes and order as ``torchvision.models.{resnet50, mobilenet_v2,
efficientnet_b0}`` (default settings, random weights): ResNet50 v1.5 (stride on the 3x3
convolution), MobileNetV2 width 1.0, EfficientNetB0 with squeeze-excitation and stochastic depth
0.2 ("row" mode) in training. Only what the speed benchmarks need: attributes ``fc`` /
``classifier`` hold the head, as torchvision's.
"""

from __future__ import annotations

#: The models :func:`build` makes.
ARCHS = ("resnet50", "mobilenetv2", "efficientnetb0")


def build(arch: str, num_classes: int):
    """The model of ``arch`` (``"resnet50"``, ``"mobilenetv2"``, ``"efficientnetb0"``)."""
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, s=1, groups=1, act=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.body = nn.Sequential(
                conv_bn(cin, width, 1),
                conv_bn(width, width, 3, stride),
                conv_bn(width, 4 * width, 1, act=None),
            )
            self.down = (
                conv_bn(cin, 4 * width, 1, stride, act=None) if stride != 1 or cin != 4 * width else None
            )

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand, kernel=3, act=nn.ReLU6, se=False, drop=0.0):
            super().__init__()
            mid = cin * expand
            layers = [conv_bn(cin, mid, 1, act=act)] if expand != 1 else []
            layers.append(conv_bn(mid, mid, kernel, stride, groups=mid, act=act))
            if se:
                layers.append(SqueezeExcite(mid, max(1, cin // 4)))
            layers.append(conv_bn(mid, cout, 1, act=None))
            self.body, self.residual, self.drop = nn.Sequential(*layers), stride == 1 and cin == cout, drop

        def forward(self, x):
            y = self.body(x)
            if not self.residual:
                return y
            if self.training and self.drop > 0:  # stochastic depth, one draw per sample
                keep = torch.empty((y.shape[0], 1, 1, 1), device=y.device).bernoulli_(1 - self.drop)
                y = y * keep / (1 - self.drop)
            return x + y

    class SqueezeExcite(nn.Module):
        def __init__(self, channels, squeeze):
            super().__init__()
            self.reduce, self.expand = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

        def forward(self, x):
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.expand(torch.nn.functional.silu(self.reduce(s))))

    class Net(nn.Module):
        def __init__(self, features, channels, head):
            super().__init__()
            self.features, self.pool = features, nn.AdaptiveAvgPool2d(1)
            setattr(self, head, nn.Linear(channels, num_classes) if head == "fc" else
                    nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, num_classes)))  # fmt: skip
            self.head_name = head

        def forward(self, x):
            return getattr(self, self.head_name)(torch.flatten(self.pool(self.features(x)), 1))

    if arch == "resnet50":
        layers, cin = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for b in range(blocks):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = 4 * width
        return Net(nn.Sequential(*layers), 2048, "fc")
    if arch == "mobilenetv2":
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        return Net(nn.Sequential(*layers, conv_bn(cin, 1280, 1, act=nn.ReLU6)), 1280, "classifier")
    if arch == "efficientnetb0":
        stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                  (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip
        total, index = sum(s[-1] for s in stages), 0
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.SiLU)], 32
        for expand, k, s, c, n in stages:
            for i in range(n):
                drop = 0.2 * index / total
                layers.append(
                    InvertedResidual(cin, c, s if i == 0 else 1, expand, k, nn.SiLU, se=True, drop=drop)
                )
                cin, index = c, index + 1
        return Net(nn.Sequential(*layers, conv_bn(cin, 1280, 1, act=nn.SiLU)), 1280, "classifier")
    raise ValueError(f"no PyTorch model for {arch!r}")
