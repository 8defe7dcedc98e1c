"""LPIPS (ssattn.metrics.LPIPS) against the lpips package's own output, on randomly initialised backbones
(pnet_rand=True: nothing is downloaded), and its offline weight lookup."""

import os
import warnings

import pytest
import torch

lpips_pkg = pytest.importorskip("lpips")

from ssattn.metrics import LPIPS, MissingWeightsError, backbone_weights_path, lpips  # noqa: E402

FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}
# VGG-16: lpips builds torchvision's whole network (138 M parameters) each time; the comparison builds three: 7.5 s
# on one idle CPU thread, ~20 s on a loaded one.
NETS = ["alex", pytest.param("vgg", marks=pytest.mark.slow), "squeeze"]


def _package_model(net, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False).eval()


def _save_backbone(model, path):
    """The package model's backbone in torchvision's layout (features.<i>.*), as the ImageNet download is."""
    state = {f"features.{name.split('.', 1)[1]}": t for name, t in model.net.state_dict().items()}
    torch.save(state, path)
    return path


@pytest.mark.parametrize("net", NETS)
def test_matches_the_package_on_a_random_backbone(tmp_path, net):
    ref = _package_model(net, seed=0)
    weights = _save_backbone(ref, tmp_path / FILES[net])
    ours = LPIPS(net, weights)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 64, 48, generator=g), torch.rand(3, 3, 64, 48, generator=g)
    with torch.no_grad():
        want = ref(2 * x - 1, 2 * y - 1).flatten()      # the package takes [-1, 1]; ours takes [0, 1]
    got = ours(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lpips(x, y, net=net, weights=weights), want, rtol=1e-5, atol=1e-7)
    assert torch.all(ours(x, x) == 0)
    # The backbone is really read from the file: another one gives other distances.
    other = LPIPS(net, _save_backbone(_package_model(net, seed=5), tmp_path / "other.pth"))
    assert not torch.allclose(other(x, y), want)


@pytest.mark.parametrize("net", NETS)
def test_smallest_image_each_backbone_takes(tmp_path, net):
    from ssattn.metrics.perceptual import MIN_SIDE

    ours = LPIPS(net, _save_backbone(_package_model(net, 0), tmp_path / "w.pth"))
    side = MIN_SIDE[net]
    x = torch.rand(1, 3, side, side + 3)
    assert ours(x, x.flip(-1)).shape == (1,)
    with pytest.raises(ValueError, match=f"at least {side}x{side}"):
        ours(x[..., 1:, :], x[..., 1:, :])
    with pytest.raises(RuntimeError):   # the package itself fails one pixel below
        ours.model(x[..., 1:, :], x[..., 1:, :])


def test_linear_layers_are_the_packages_calibrated_ones(tmp_path):
    ours = LPIPS("alex", _save_backbone(_package_model("alex", 0), tmp_path / "a.pth"))
    shipped = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "alex.pth")
    state = torch.load(shipped, map_location="cpu", weights_only=True)
    for k in range(5):
        torch.testing.assert_close(getattr(ours.model, f"lin{k}").model[1].weight, state[f"lin{k}.model.1.weight"])


def test_weights_come_from_torch_hubs_cache_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        LPIPS("alex")
    text = str(info.value)
    assert FILES["alex"] in text and str(tmp_path / "hub" / "checkpoints") in text
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in text
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    cached = _save_backbone(_package_model("alex", 0), tmp_path / "hub" / "checkpoints" / FILES["alex"])
    assert backbone_weights_path("alex") == str(cached)
    assert LPIPS("alex").weights_path == str(cached)


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        LPIPS("alex", tmp_path / "nothere.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong.pth.*features.0.weight has shape"):
        LPIPS("alex", tmp_path / "wrong.pth")
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not torchvision's AlexNet state dict.*features.0.weight"):
        LPIPS("alex", tmp_path / "other.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth' is empty \(0 bytes\)$"):
        LPIPS("alex", tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read LPIPS backbone weights"):
        LPIPS("alex", tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("resnet", tmp_path / "junk.pth")
