"""Offline weights: seeded random HRNet weights whose outputs are O(1) on real photographs.

A randomly initialised HRNet with unit BatchNorm statistics produces logits around 1e9, so its
softmax is one-hot and a parity check on it proves nothing. Calibration makes the network
behave like a trained one numerically (not semantically):

1. BatchNorm statistics: a forward pass in training mode over a batch of random crops of
   real photographs, with every BatchNorm's momentum at 0, so each layer's running mean and
   variance become the statistics of its own input on that data (data-dependent
   initialisation, as in LSUV, Mishkin & Matas 2015).
2. Classifier: the final layer is centred on the mean pooled feature and scaled so the logits
   have a standard deviation of ``LOGIT_STD`` over the calibration batch. Top-1 probabilities
   on the sample photographs then land between about 0.02 and 0.5: not saturated, far from
   uniform (0.001), and different photographs rank classes differently. A larger scale makes
   the probabilities more sensitive to float32 rounding (|Δp| ~ p(1-p)|Δlogit|): at 3, one
   seed (HRNet_W32_C) exceeded the 1e-5 gate by rounding alone (docs/export.md).

Before both steps, the scale (gamma) of the last BatchNorm of every residual branch is set to
the small ``RESIDUAL_GAMMA``, for the reason "zero-gamma" initialisation (Goyal et al. 2017)
starts it at zero: with unit scales the residual sums grow through HRNet's ~40
blocks and float32 loses precision: Paddle's float32 probabilities differ from a float64 run of
the same HRNet_W18_C by up to 2.3e-5 with unit scales, 4.2e-6 with 0.1. Unit scales would make
a 1e-5 parity gate measure the weights' conditioning rather than the conversion (docs/export.md).

The seed is derived from the variant's name, so the same variant always gets the same weights.
Their predictions are meaningless as ImageNet labels.
"""

from __future__ import annotations

import hashlib
import logging
import warnings

import cv2
import numpy as np

from hrnet_core.contract import DEFAULT_PREPROCESS, PreprocessConfig
from hrnet_core.preprocess import normalize_chw, read_image
from hrnet_core.samples import sample_images
from hrnet_core.variants import Variant

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
LOGIT_STD = 2.0
CROP_AREA = (0.25, 1.0)
RESIDUAL_GAMMA = 0.1


def offline_seed(variant: Variant) -> int:
    return int.from_bytes(hashlib.sha256(variant.name.encode()).digest()[:4], "little")


def calibration_batch(n: int, seed: int, cfg: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """``n`` random resized crops (with flips) of the sample photographs, normalised, NCHW float32."""
    rng = np.random.default_rng(seed)
    photos = [read_image(p) for p in sample_images()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * np.sqrt(rng.uniform(*CROP_AREA)))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = cv2.resize(
            img[top : top + side, left : left + side], (cfg.crop_size,) * 2, interpolation=cv2.INTER_LINEAR
        )
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(normalize_chw(crop, cfg))
    return np.stack(out)


def calibrate(model, batch: np.ndarray) -> None:
    """Set BatchNorm statistics from ``batch`` and scale the classifier (in place; leaves eval mode)."""
    import paddle
    from paddle import nn

    norms = [m for m in model.sublayers() if isinstance(m, nn.layer.norm._BatchNormBase)]
    saved = [bn._momentum for bn in norms]
    captured: dict[str, np.ndarray] = {}

    def keep_features(layer, inputs):  # returns None: the layer's input is left unchanged
        captured["f"] = inputs[0].numpy()

    # One pass does both steps: with momentum 0 the running statistics become this batch's,
    # so the features the classifier sees here are those it will see in eval mode.
    hook = model.fc.register_forward_pre_hook(keep_features)
    for bn in norms:
        bn._momentum = 0.0
    model.train()
    try:
        with paddle.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="When training, we now always track global mean")
            model(paddle.to_tensor(batch))
    finally:
        hook.remove()
        for bn, momentum in zip(norms, saved):
            bn._momentum = momentum
        model.eval()
    feats = captured["f"].astype(np.float64)
    weight = model.fc.weight.numpy().astype(np.float64)  # (in, out)
    mean = feats.mean(axis=0)
    logits = (feats - mean) @ weight
    scale = LOGIT_STD / max(float(logits.std()), 1e-12)
    model.fc.weight.set_value((weight * scale).astype("float32"))
    model.fc.bias.set_value((-scale * mean @ weight).astype("float32"))
    log.debug("calibrated %d BatchNorm layers; classifier scaled by %.3g", len(norms), scale)


def offline_model(variant: Variant, *, with_softmax: bool = True):
    """Build ``variant`` with seeded, calibrated weights."""
    import paddle

    from .network import build, residual_branch_norms

    seed = offline_seed(variant)
    paddle.seed(seed)
    model = build(variant.width, variant.has_se, with_softmax=with_softmax)
    for bn in residual_branch_norms(model):
        bn.weight.set_value(paddle.full(bn.weight.shape, RESIDUAL_GAMMA, dtype=bn.weight.dtype))
    calibrate(model, calibration_batch(CALIBRATION_BATCH, seed))
    return model
