"""DegradationRouter: order, gradients, empty and single classes, passthrough, fallback, -SS experts, bad input."""

import pytest
import torch
from torch import nn

from ssattn.routing import DegradationRouter, EmbeddedClassifier, PAPER_CLASSES

CLASSES = PAPER_CLASSES  # noise_blur_jpeg, reflection, motion_blur, none


class Scripted:
    """A classifier whose answer is written in the image: class index = pixel [0, 0, 0] * 10, confidence = [1, 0, 0]."""

    classes = CLASSES
    settings = {"classifier": "scripted"}

    def __call__(self, images):
        idx = (images[:, 0, 0, 0] * 10).round().long()
        conf = images[:, 1, 0, 0]
        rest = (1 - conf) / (len(self.classes) - 1)
        scores = rest[:, None].repeat(1, len(self.classes))
        scores[torch.arange(len(idx)), idx] = conf
        return scores


class Counting(nn.Module):
    """x * scale + shift (learnable), recording the batch size of every call."""

    def __init__(self, shift):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.shift = nn.Parameter(torch.tensor(float(shift)))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x * self.scale + self.shift


def _batch(classes, conf=None, size=8):
    x = torch.rand(len(classes), 3, size, size)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float32) / 10
    x[:, 1, 0, 0] = 0.9 if conf is None else torch.tensor(conf)
    return x


def _experts():
    return {"noise_blur_jpeg": Counting(1.0), "reflection": Counting(2.0), "motion_blur": Counting(3.0)}


def test_order_labels_and_one_call_per_expert():
    experts = _experts()
    router = DegradationRouter(Scripted(), experts=experts, passthrough=("none",))
    cls = [2, 0, 3, 2, 1, 0, 2, 3]
    x = _batch(cls)
    out = router(x)
    assert out.labels == [CLASSES[c] for c in cls] and out.routes == out.labels
    shift = torch.tensor([1.0, 2.0, 3.0, 0.0])[cls].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.images, x + shift)
    assert [e.calls for e in experts.values()] == [[2], [1], [3]]
    assert out.scores.shape == (8, 4) and torch.allclose(out.confidence, torch.full((8,), 0.9))


def test_gradients_reach_the_experts_and_the_input():
    experts = _experts()
    router = DegradationRouter(Scripted(), experts=experts)
    cls = [0, 1, 3, 0, 2]
    x = _batch(cls).requires_grad_()
    w = torch.randn(5, 3, 8, 8)
    (router(x).images * w).sum().backward()
    # d/dscale of sum(w * (x * scale + shift)) = sum over the expert's images of w * x
    for k, e in enumerate(experts.values()):
        rows = [i for i, c in enumerate(cls) if c == k]
        torch.testing.assert_close(e.scale.grad, (w[rows] * x.detach()[rows]).sum())
        torch.testing.assert_close(e.shift.grad, w[rows].sum())
    torch.testing.assert_close(x.grad, w)  # every expert has scale 1, passthrough is the identity


def test_empty_classes_cost_nothing_and_all_one_class():
    experts = _experts()
    router = DegradationRouter(Scripted(), experts=experts)
    x = _batch([1, 1, 1, 1])
    out = router(x)
    assert [e.calls for e in experts.values()] == [[], [4], []]
    torch.testing.assert_close(out.images, x + 2.0)


def test_passthrough_returns_the_input_unchanged():
    router = DegradationRouter(Scripted(), experts=_experts())
    x = _batch([3, 3, 3])
    out = router(x)
    assert torch.equal(out.images, x) and out.routes == ["none"] * 3
    mixed = _batch([3, 0, 3])
    assert torch.equal(router(mixed).images[[0, 2]], mixed[[0, 2]])


def test_confidence_threshold_sends_uncertain_images_to_the_fallback():
    experts = _experts()
    fallback = Counting(10.0)
    router = DegradationRouter(Scripted(), experts=experts, threshold=0.5, fallback=fallback)
    x = _batch([0, 1, 2, 3], conf=[0.9, 0.3, 0.6, 0.28])
    out = router(x)
    assert out.labels == list(CLASSES) and out.routes == ["noise_blur_jpeg", "fallback", "motion_blur", "fallback"]
    torch.testing.assert_close(out.images[[1, 3]], x[[1, 3]] + 10.0)
    assert fallback.calls == [2] and experts["reflection"].calls == []
    named = DegradationRouter(Scripted(), experts=_experts(), threshold=0.5, fallback="none")
    assert torch.equal(named(x).images[[1, 3]], x[[1, 3]])
    # a class without expert goes to the fallback
    partial = DegradationRouter(Scripted(), experts={"reflection": Counting(2.0)}, fallback=Counting(5.0))
    two = _batch([0, 1])
    torch.testing.assert_close(partial(two).images[0], two[0] + 5.0)


def test_scores_given_skip_the_classifier():
    class Never(Scripted):
        def __call__(self, images):
            raise AssertionError("classifier called")

    router = DegradationRouter(Never(), experts=_experts())
    x = torch.rand(2, 3, 8, 8)
    out = router(x, scores=torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    assert out.routes == ["motion_blur", "none"]


def test_ss_model_expert_gets_its_sliced_guidance():
    from ssattn.models import UNet, unet_ss

    torch.manual_seed(0)
    ss = unet_ss(3, 3, 8)
    plain = UNet(3, 3, 8)
    router = DegradationRouter(Scripted(), experts={"noise_blur_jpeg": ss, "reflection": plain,
                                                    "motion_blur": Counting(0.0)})
    cls = [1, 0, 3, 0]
    x = _batch(cls, size=16)
    g = torch.rand(4, 1, 16, 16)
    out = router(x, guidance=g)
    torch.testing.assert_close(out.images[[1, 3]], ss(x[[1, 3]], guidance=g[[1, 3]]))
    torch.testing.assert_close(out.images[[0]], plain(x[[0]]))  # UNet.forward takes no guidance: not passed
    out.images.sum().backward()
    assert all(p.grad is not None for p in ss.parameters() if p.requires_grad)


def test_embedded_classifier_in_a_router_moves_with_it():
    router = DegradationRouter(EmbeddedClassifier(), experts=_experts())
    assert isinstance(router.classifier, nn.Module)
    assert "classifier.w1" in dict(router.named_buffers())
    out = router(torch.rand(3, 3, 32, 32))
    assert len(out.labels) == 3 and out.images.shape == (3, 3, 32, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not have"):
        DegradationRouter(Scripted(), experts={"fog": Counting(0)})
    with pytest.raises(ValueError, match="have no expert"):
        DegradationRouter(Scripted(), experts={"reflection": Counting(0)})
    with pytest.raises(ValueError, match="both experts and passthrough"):
        DegradationRouter(Scripted(), experts={**_experts(), "none": Counting(0)})
    with pytest.raises(ValueError, match="threshold needs a fallback"):
        DegradationRouter(Scripted(), experts=_experts(), threshold=0.5)
    with pytest.raises(ValueError, match="threshold must be"):
        DegradationRouter(Scripted(), experts=_experts(), threshold=2.0, fallback="none")
    with pytest.raises(ValueError, match="fallback 'fog'"):
        DegradationRouter(Scripted(), experts=_experts(), fallback="fog")
    with pytest.raises(TypeError, match="experts must be a dict"):
        DegradationRouter(Scripted(), experts={"reflection": lambda x: x})
    router = DegradationRouter(Scripted(), experts={**_experts(), "reflection": nn.Conv2d(3, 1, 1)})
    with pytest.raises(ValueError, match="expert 'reflection' must return"):
        router(_batch([1]))
    with pytest.raises(ValueError, match="scores must have shape"):
        router(_batch([0]), scores=torch.ones(1, 3))
    with pytest.raises(ValueError, match="images must be a batch"):
        router(torch.rand(3, 8, 8))
