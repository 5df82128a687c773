"""Backbones: offline ImageNet weights are real, other timm models work with random or user weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pni_ray.config import FeatureConfig
from pni_ray.data.transforms import resize_rgb, to_tensor
from pni_ray.models.backbones import OFFLINE_BACKBONES, create_classifier, get_spec, load_weights_file
from pni_ray.models.features import build_extractor

ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
TABBY_TIGER_EGYPTIAN_CATS = {281, 282, 285}


@pytest.mark.parametrize("name", OFFLINE_BACKBONES)
def test_offline_weights_are_imagenet(name):
    """Real photos shipped in scikit-image land on fitting ImageNet classes."""
    data = pytest.importorskip("skimage.data")
    model = create_classifier(name)
    spec = get_spec(name)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    batch = to_tensor([resize_rgb(data.coffee(), 224), resize_rgb(data.chelsea(), 224)])
    with torch.no_grad():
        top = model((batch - mean) / std).softmax(1).topk(3)
    assert top.indices[0, 0].item() in {ESPRESSO, CUP, COFFEE_MUG}
    assert top.values[0, 0] > 0.5
    assert top.indices[1, 0].item() in TABBY_TIGER_EGYPTIAN_CATS


def test_random_weights_give_a_different_answer():
    data = pytest.importorskip("skimage.data")
    model = create_classifier("efficientnet_lite0", pretrained=False)
    with torch.no_grad():
        p = model(to_tensor([resize_rgb(data.coffee(), 224)]) * 2 - 1).softmax(1)
    assert p.max() < 0.5  # an untrained net is not confident: the test above can fail


@pytest.mark.parametrize("name,dims", [("resnet18", 128 + 256), ("wide_resnet50_2", 512 + 1024), ("densenet121", 512 + 1024)])
def test_stride8_stride16_features_for_timm_backbones(name, dims):
    extractor = build_extractor(FeatureConfig(backbone=name, pretrained=False, image_size=64))
    with torch.no_grad():
        feats = extractor(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, dims, 8, 8)
    assert extractor.dim == dims


def test_feature_aggregation_and_projection():
    cfg = FeatureConfig(backbone="efficientnet_lite0", image_size=96, projection_dim=64)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        proj = build_extractor(cfg)(x)
        p1 = build_extractor(FeatureConfig(backbone="efficientnet_lite0", patch_size=1))(x)
        p3 = build_extractor(FeatureConfig(backbone="efficientnet_lite0", patch_size=3))(x)
    assert proj.shape == (1, 64, 12, 12)
    assert p1.shape == p3.shape == (1, 40 + 112, 12, 12)
    # 3x3 averaging smooths: neighbouring positions differ less than without it
    assert (p3[..., 1:] - p3[..., :-1]).abs().mean() < (p1[..., 1:] - p1[..., :-1]).abs().mean()


def test_border_patches_average_zeros_outside_the_grid_as_patchcore_does():
    """pool_padding "zeros" (the default, PatchCore's and anomalib's p x p mean) counts the cells outside the
    grid as zeros; "inside" averages only the cells inside. So on the stride-8 stage, whose cells are not
    resampled, the two agree inside and differ at the border by the share of the window inside the grid:
    4/9 at a corner, 6/9 along an edge (p = 3)."""
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        zeros = build_extractor(FeatureConfig(backbone="efficientnet_lite0", pretrained=False))(x)
        inside = build_extractor(FeatureConfig(backbone="efficientnet_lite0", pretrained=False, pool_padding="inside"))(x)
    assert FeatureConfig().pool_padding == "zeros"
    z, i = zeros[0, :40], inside[0, :40]  # efficientnet_lite0's stride-8 stage: 40 channels
    torch.testing.assert_close(z[:, 1:-1, 1:-1], i[:, 1:-1, 1:-1])
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(z[:, corner[0], corner[1]], i[:, corner[0], corner[1]] * 4 / 9)
    torch.testing.assert_close(z[:, 0, 1:-1], i[:, 0, 1:-1] * 6 / 9)
    torch.testing.assert_close(z[:, 1:-1, -1], i[:, 1:-1, -1] * 6 / 9)
    assert not torch.allclose(z[:, 0], i[:, 0])  # the test can fail: the border differs
    with pytest.raises(ValueError, match="features.pool_padding must be one of zeros, inside"):
        FeatureConfig(pool_padding="reflect")


def test_user_weights_file_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    ref = create_classifier("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        loaded = create_classifier("resnet18", weights=path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref.state_dict().values()))


def test_bad_weights_files_are_named(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        create_classifier("resnet18", weights=tmp_path / "junk.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises((ValueError, RuntimeError), match="partial.pth|size mismatch"):
        create_classifier("resnet18", weights=tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError):
        load_weights_file(Path(tmp_path / "missing.safetensors"))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("no_such_net")
