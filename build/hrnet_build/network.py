"""HRNet-W*-C image classifiers in Paddle, parameter-for-parameter compatible with PaddleClas.

The layer attribute names reproduce those of PaddleClas's
``ppcls/arch/backbone/legendary_models/hrnet.py`` (paddleclas 2.6.0) so that its published
``.pdparams`` load with a strict key and shape match, e.g. ``conv_layer1_1.bn._mean``,
``st3.stage_func_list.0.fuse_func.residual_func_list.2.conv.weight`` or
``last_cls.func_list.3.se.fc_excitation.bias``. Unlike PaddleClas's module, every width
builds with or without squeeze-and-excitation (PaddleClas's ``SE_HRNet_W64_C()`` raises
``KeyError`` looking up a weights URL). ``with_softmax=True`` appends the softmax that
PaddleClas's exported inference models end in.

Topology (Sun et al., "High-Resolution Representations for Labeling Pixels and Regions",
arXiv:1904.04514, the classification head of its appendix): a stride-4 stem, four
bottlenecks, then stages of 1, 4 and 3 multi-resolution modules over 2, 3 and 4 branches of
widths ``W, 2W, 4W, 8W``, then a head that widens each branch with a bottleneck, merges them
from high to low resolution with strided convolutions, and ends in a 2048-d pooled feature and
a fully connected layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle
import paddle.nn.functional as F
from paddle import nn

BRANCH_MULTIPLIERS = (1, 2, 4, 8)
HEAD_BOTTLENECK_WIDTHS = (32, 64, 128, 256)  # bottleneck widths of the head, one per branch
HEAD_MERGE_WIDTHS = (256, 512, 1024)  # output widths of the strided merge convolutions
FEATURE_DIM = 2048
BLOCKS_PER_BRANCH = 4
SE_REDUCTION = 16


def _uniform_fc(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer initialised like PaddleClas's: weights ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    attr = paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))
    return nn.Linear(in_features, out_features, weight_attr=attr)


class ConvBN(nn.Layer):
    """Convolution (no bias, 'same' padding) then batch norm, optionally then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class SqueezeExcite(nn.Layer):
    """Channel attention: global pool, bottleneck MLP, sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = int(channels / SE_REDUCTION)
        self.fc_squeeze = _uniform_fc(channels, hidden)
        self.fc_excitation = _uniform_fc(hidden, channels)

    def forward(self, x):
        gate = paddle.flatten(F.adaptive_avg_pool2d(x, 1), start_axis=1)
        gate = F.sigmoid(self.fc_excitation(F.relu(self.fc_squeeze(gate))))
        return x * gate.unsqueeze([2, 3])


class BasicBlock(nn.Layer):
    """Two 3x3 ConvBNs with an identity shortcut (branch blocks of the HR modules)."""

    def __init__(self, channels: int, has_se: bool):
        super().__init__()
        self.conv1 = ConvBN(channels, channels, 3)
        self.conv2 = ConvBN(channels, channels, 3, relu=False)
        self.se = SqueezeExcite(channels) if has_se else None

    @property
    def branch_norm(self) -> nn.BatchNorm2D:
        """The last BatchNorm of the residual branch (its scale sets the branch's weight)."""
        return self.conv2.bn

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        if self.se is not None:
            y = self.se(y)
        return F.relu(x + y)


class Bottleneck(nn.Layer):
    """1x1 -> 3x3 -> 1x1 (x4 expansion) with an optional projected shortcut."""

    def __init__(self, cin: int, width: int, has_se: bool, project: bool):
        super().__init__()
        self.conv1 = ConvBN(cin, width, 1)
        self.conv2 = ConvBN(width, width, 3)
        self.conv3 = ConvBN(width, width * 4, 1, relu=False)
        self.conv_down = ConvBN(cin, width * 4, 1, relu=False) if project else None
        self.se = SqueezeExcite(width * 4) if has_se else None

    @property
    def branch_norm(self) -> nn.BatchNorm2D:
        """The last BatchNorm of the residual branch (its scale sets the branch's weight)."""
        return self.conv3.bn

    def forward(self, x):
        y = self.conv3(self.conv2(self.conv1(x)))
        if self.se is not None:
            y = self.se(y)
        shortcut = self.conv_down(x) if self.conv_down is not None else x
        return F.relu(shortcut + y)


class Fuse(nn.Layer):
    """Exchange information between branches: every output branch sums all input branches.

    A lower-resolution input j > i is projected by a 1x1 ConvBN then upsampled (nearest) by
    2**(j-i); a higher-resolution input j < i goes through i-j strided 3x3 ConvBNs (ReLU on
    all but the last). The modules sit in one flat list in PaddleClas's order.
    """

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.n = len(widths)
        self.residual_func_list = nn.LayerList()
        for i, wi in enumerate(widths):
            for j, wj in enumerate(widths):
                if j > i:
                    self.residual_func_list.append(ConvBN(wj, wi, 1, relu=False))
                for k in range(i - j):  # empty unless j < i
                    last = k == i - j - 1
                    cin = wj
                    self.residual_func_list.append(ConvBN(cin, wi if last else wj, 3, stride=2, relu=not last))

    def forward(self, xs):
        layers = iter(self.residual_func_list)
        outs = []
        for i in range(self.n):
            acc = xs[i]
            for j in range(self.n):
                if j > i:
                    y = F.interpolate(next(layers)(xs[j]), scale_factor=2 ** (j - i), mode="nearest")
                    acc = acc + y
                elif j < i:
                    y = xs[j]
                    for _ in range(i - j):
                        y = next(layers)(y)
                    acc = acc + y
            outs.append(F.relu(acc))
        return outs


class HRModule(nn.Layer):
    """Four BasicBlocks on every branch, then a Fuse."""

    def __init__(self, widths: Sequence[int], has_se: bool):
        super().__init__()
        self.basic_block_list = nn.LayerList(
            [nn.Sequential(*[BasicBlock(w, has_se) for _ in range(BLOCKS_PER_BRANCH)]) for w in widths]
        )
        self.fuse_func = Fuse(widths)

    def forward(self, xs):
        return self.fuse_func([blocks(x) for blocks, x in zip(self.basic_block_list, xs)])


class Stage(nn.Layer):
    def __init__(self, modules: int, widths: Sequence[int], has_se: bool):
        super().__init__()
        self.stage_func_list = nn.LayerList([HRModule(widths, has_se) for _ in range(modules)])

    def forward(self, xs):
        for module in self.stage_func_list:
            xs = module(xs)
        return xs


class Head(nn.Layer):
    """Widen every branch with one projected Bottleneck."""

    def __init__(self, widths: Sequence[int], has_se: bool):
        super().__init__()
        self.func_list = nn.LayerList(
            [Bottleneck(w, hw, has_se, project=True) for w, hw in zip(widths, HEAD_BOTTLENECK_WIDTHS)]
        )

    def forward(self, xs):
        return [f(x) for f, x in zip(self.func_list, xs)]


class HRNet(nn.Layer):
    """HRNet-W{width}-C classifier; ``has_se`` adds squeeze-and-excitation to every block."""

    def __init__(self, width: int = 18, has_se: bool = False, class_num: int = 1000, with_softmax: bool = False):
        super().__init__()
        w = [width * m for m in BRANCH_MULTIPLIERS]
        self.width, self.has_se, self.with_softmax = width, has_se, with_softmax

        self.conv_layer1_1 = ConvBN(3, 64, 3, stride=2)
        self.conv_layer1_2 = ConvBN(64, 64, 3, stride=2)
        self.layer1 = nn.Sequential(*[Bottleneck(64 if i == 0 else 256, 64, has_se, project=i == 0) for i in range(4)])

        self.conv_tr1_1 = ConvBN(256, w[0], 3)
        self.conv_tr1_2 = ConvBN(256, w[1], 3, stride=2)
        self.st2 = Stage(1, w[:2], has_se)
        self.conv_tr2 = ConvBN(w[1], w[2], 3, stride=2)
        self.st3 = Stage(4, w[:3], has_se)
        self.conv_tr3 = ConvBN(w[2], w[3], 3, stride=2)
        self.st4 = Stage(3, w, has_se)

        self.last_cls = Head(w, has_se)
        self.cls_head_conv_list = nn.LayerList(
            [ConvBN(hw * 4, mw, 3, stride=2) for hw, mw in zip(HEAD_BOTTLENECK_WIDTHS, HEAD_MERGE_WIDTHS)]
        )
        self.conv_last = ConvBN(HEAD_MERGE_WIDTHS[-1], FEATURE_DIM, 1)
        self.fc = _uniform_fc(FEATURE_DIM, class_num)

    def forward(self, x):
        x = self.layer1(self.conv_layer1_2(self.conv_layer1_1(x)))
        xs = self.st2([self.conv_tr1_1(x), self.conv_tr1_2(x)])
        xs = self.st3([*xs, self.conv_tr2(xs[-1])])
        xs = self.st4([*xs, self.conv_tr3(xs[-1])])
        xs = self.last_cls(xs)

        y = xs[0]
        for merge, x_low in zip(self.cls_head_conv_list, xs[1:]):
            y = x_low + merge(y)
        y = paddle.flatten(F.adaptive_avg_pool2d(self.conv_last(y), 1), start_axis=1)
        y = self.fc(y)
        return F.softmax(y, axis=-1) if self.with_softmax else y


def build(width: int, has_se: bool, *, class_num: int = 1000, with_softmax: bool = False) -> HRNet:
    return HRNet(width=width, has_se=has_se, class_num=class_num, with_softmax=with_softmax)


def residual_branch_norms(model: nn.Layer) -> list[nn.BatchNorm2D]:
    """The last BatchNorm of every residual block's branch."""
    return [m.branch_norm for m in model.sublayers() if isinstance(m, (BasicBlock, Bottleneck))]


def parameter_count(model: nn.Layer) -> int:
    """Trainable parameters, counted as PaddleClas's tables count them (BN statistics excluded)."""
    return sum(int(p.size) for p in model.parameters())
