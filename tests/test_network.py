"""The project's HRNet against PaddleClas's own module (from the paddleclas wheel)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from hrnet_build.network import build, parameter_count
from hrnet_core import variants

from paddleclas_reference import build_reference, load_hrnet_module

ARCHS = sorted({(v.width, v.has_se) for v in variants.VARIANTS})


@pytest.mark.parametrize("width,has_se", ARCHS)
def test_network_state_dict_matches_paddleclas_when_built_for_every_seed_arch(width, has_se):
    ours, ref = build(width, has_se).state_dict(), build_reference(width, has_se).state_dict()
    assert list(ours) == list(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("v", variants.VARIANTS, ids=lambda v: v.name)
def test_parameter_count_equals_paddleclas_and_is_within_half_a_percent_of_the_seed(v):
    ours = parameter_count(build(v.width, v.has_se))
    assert ours == parameter_count(build_reference(v.width, v.has_se))
    assert abs(ours / 1e6 - v.params_m) / v.params_m < 0.005, (ours, v.params_m)


@pytest.mark.parametrize("width,has_se", [(18, False), (18, True)])
def test_network_outputs_equal_paddleclas_when_given_the_same_weights(width, has_se):
    paddle.seed(7)
    ref = build_reference(width, has_se)
    ours = build(width, has_se)
    ours.set_state_dict(ref.state_dict())
    # Non-trivial BatchNorm statistics, so the comparison covers them too.
    rng = np.random.default_rng(0)
    for name, t in ref.state_dict().items():
        if name.endswith(("_mean", "_variance")):
            value = rng.uniform(0.5, 2.0, t.shape).astype("float32")
            t.set_value(value)
            ours.state_dict()[name].set_value(value)
    ref.eval(), ours.eval()
    x = paddle.to_tensor(rng.standard_normal((2, 3, 64, 64)).astype("float32"))
    with paddle.no_grad():
        np.testing.assert_array_equal(ours(x).numpy(), ref(x).numpy())


def test_softmax_head_turns_logits_into_the_reference_probabilities():
    paddle.seed(3)
    logits_net = build(18, False)
    prob_net = build(18, False, with_softmax=True)
    prob_net.set_state_dict(logits_net.state_dict())
    logits_net.eval(), prob_net.eval()
    x = paddle.rand([1, 3, 64, 64])
    with paddle.no_grad():
        np.testing.assert_allclose(prob_net(x).numpy(), paddle.nn.functional.softmax(logits_net(x)).numpy(), rtol=1e-6)


def test_paddleclas_cannot_build_se_hrnet_w64_but_this_project_can():
    module = load_hrnet_module()
    with pytest.raises(KeyError):
        module.SE_HRNet_W64_C(pretrained=False)
    assert parameter_count(build(64, True)) == parameter_count(build_reference(64, True))
