"""Tests of lightning_noisy.models: shapes, the features/classifier API, the registry, trainability."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_noisy.models import (
    MLP,
    MNIST1DCNN,
    Backbone,
    PreActResNet18,
    TorchvisionBackbone,
    available_backbones,
    build_backbone,
)


def _check_api(model: nn.Module, x: torch.Tensor, num_classes: int, feature_dim: int) -> None:
    """Shapes, and ``classifier(features(x)) == forward(x)`` in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert isinstance(model, Backbone)
    assert logits.shape == (x.shape[0], num_classes)
    assert feats.shape == (x.shape[0], feature_dim)
    assert model.feature_dim == feature_dim
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model.classifier(feats), logits)


def test_mnist1d_cnn_shapes_and_api() -> None:
    torch.manual_seed(0)
    model = MNIST1DCNN(num_classes=10)
    # 40 -> 20 -> 10 -> 5 with kernel 5, stride 2, padding 2: 32 channels x 5.
    _check_api(model, torch.randn(2, 1, 40), num_classes=10, feature_dim=160)
    x = torch.randn(2, 40)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))  # [B, L] accepted with one channel
    _check_api(MNIST1DCNN(num_classes=3, in_channels=2, channels=8, length=17), torch.randn(2, 2, 17), 3, 8 * 3)


def test_mlp_shapes_and_api() -> None:
    torch.manual_seed(0)
    _check_api(MLP(in_features=64, num_classes=10), torch.randn(2, 1, 8, 8), num_classes=10, feature_dim=256)
    _check_api(MLP(64, 4, hidden=[32]), torch.randn(2, 64), num_classes=4, feature_dim=32)
    linear = MLP(64, 3, hidden=())
    _check_api(linear, torch.randn(2, 64), num_classes=3, feature_dim=64)
    assert sum(p.numel() for p in linear.parameters()) == 64 * 3 + 3


def test_preact_resnet18_shapes_api_and_parameter_count() -> None:
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=10)
    _check_api(model, torch.randn(2, 3, 32, 32), num_classes=10, feature_dim=512)
    _check_api(PreActResNet18(num_classes=5, in_channels=1), torch.randn(2, 1, 20, 20), 5, 512)

    # Hand count: stem, 4 stages of 2 blocks (bn1, conv1, bn2, conv2, 1x1 shortcut when the
    # width changes), final BatchNorm, linear head. BatchNorm has 2 parameters per channel.
    expected = 3 * 64 * 9
    in_planes = 64
    for planes in (64, 128, 256, 512):
        for block in range(2):
            width = in_planes if block == 0 else planes
            expected += 2 * width + width * planes * 9 + 2 * planes + planes * planes * 9
            expected += width * planes if width != planes else 0
        in_planes = planes
    expected += 2 * 512 + 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected


def test_preact_resnet18_features_are_post_relu() -> None:
    torch.manual_seed(0)
    model = PreActResNet18(num_classes=10).eval()
    with torch.no_grad():
        assert (model.features(torch.randn(2, 3, 32, 32)) >= 0).all()


def test_registry_builds_own_backbones() -> None:
    cnn = build_backbone("cnn1d", num_classes=4, channels=8)
    assert isinstance(cnn, MNIST1DCNN) and cnn.classifier.out_features == 4 and cnn.feature_dim == 40
    mlp = build_backbone("mlp", num_classes=10, in_features=64, hidden=(16,))
    assert isinstance(mlp, MLP) and mlp.feature_dim == 16
    resnet = build_backbone("preact_resnet18", num_classes=100)
    assert isinstance(resnet, PreActResNet18) and resnet.classifier.out_features == 100


def test_registry_torchvision_resnet18() -> None:
    torch.manual_seed(0)
    model = build_backbone("torchvision:resnet18", num_classes=7)
    assert isinstance(model, TorchvisionBackbone)
    assert isinstance(model.model.fc, nn.Identity)
    _check_api(model, torch.randn(2, 3, 32, 32), num_classes=7, feature_dim=512)


def test_registry_torchvision_classifier_sequential_head() -> None:
    torch.manual_seed(0)
    model = build_backbone("torchvision:mobilenet_v3_small", num_classes=5)
    assert isinstance(model.model.classifier[-1], nn.Identity)
    _check_api(model, torch.randn(2, 3, 32, 32), num_classes=5, feature_dim=1024)


def test_registry_torchvision_aux_logits_model_returns_a_tensor_in_training() -> None:
    model = build_backbone("torchvision:googlenet", num_classes=3, init_weights=False).train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(
    ("make_model", "x", "feature_dim"),
    [
        (  # DenseNet: `classifier` is the Linear itself
            lambda: torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=5),
            torch.randn(2, 3, 32, 32),
            (8 + 4) // 2 + 4,  # stem 8, +4 per layer, transition halves
        ),
        (  # ViT: `heads.head`
            lambda: torchvision.models.VisionTransformer(
                image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5
            ),
            torch.randn(2, 3, 32, 32),
            8,
        ),
        (  # Swin: `head`
            lambda: torchvision.models.SwinTransformer(
                patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[1], window_size=[2, 2], num_classes=5
            ),
            torch.randn(2, 3, 16, 16),
            8,
        ),
    ],
)
def test_torchvision_wrapper_finds_other_heads(make_model, x: torch.Tensor, feature_dim: int) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():
        reference = model(x)
    wrapped = TorchvisionBackbone(model)
    _check_api(wrapped, x, num_classes=5, feature_dim=feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), reference)  # wrapping changes nothing


def test_torchvision_wrapper_replaces_head_for_new_class_count() -> None:
    model = torchvision.models.resnet18(weights=None)  # 1000 classes, as pretrained weights come
    body_weight = model.conv1.weight.clone()
    wrapped = TorchvisionBackbone(model, num_classes=7)
    assert wrapped.classifier.out_features == 7 and wrapped.classifier.in_features == 512
    assert torch.equal(wrapped.model.conv1.weight, body_weight)
    _check_api(wrapped, torch.randn(2, 3, 32, 32), num_classes=7, feature_dim=512)


def test_available_backbones() -> None:
    names = available_backbones()
    assert names[:3] == ["cnn1d", "mlp", "preact_resnet18"]
    assert "torchvision:resnet18" in names and "torchvision:vit_b_16" in names
    assert not any("fasterrcnn" in name for name in names)  # classification models only


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("resnet18", r"one of \['cnn1d', 'mlp', 'preact_resnet18'\].*got 'resnet18'"),
        ("torchvision:resnet81", "torchvision:resnet81.*Did you mean torchvision:resnet18"),
        ("torchvision:fasterrcnn_resnet50_fpn", "not a torchvision classification model"),
        ("torchvision:squeezenet1_1", "SqueezeNet.*no final nn.Linear"),
        (None, "name.*None"),
    ],
)
def test_registry_bad_names(name: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_backbone(name, num_classes=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True])
@pytest.mark.parametrize("name", ["cnn1d", "preact_resnet18", "torchvision:resnet18"])
def test_registry_bad_num_classes(name: str, num_classes: object) -> None:
    with pytest.raises(ValueError, match=f"num_classes.*got {num_classes!r}"):
        build_backbone(name, num_classes=num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MNIST1DCNN(num_classes=1), "num_classes.*got 1"),
        (lambda: MNIST1DCNN(channels=0), "channels.*got 0"),
        (lambda: MNIST1DCNN(length=0), "length.*got 0"),
        (lambda: MNIST1DCNN(in_channels=1.0), "in_channels.*got 1.0"),
        (lambda: MLP(in_features=0, num_classes=3), "in_features.*got 0"),
        (lambda: MLP(64, 3, hidden=(16, 0)), r"hidden.*\(16, 0\)"),
        (lambda: MLP(64, 3, hidden=16), "hidden.*got 16"),
        (lambda: PreActResNet18(num_classes=10, in_channels=0), "in_channels.*got 0"),
        (lambda: TorchvisionBackbone("resnet18"), "model.*torch.nn.Module.*str"),
        (lambda: TorchvisionBackbone(torchvision.models.resnet18(), num_classes=1), "num_classes.*got 1"),
    ],
)
def test_bad_constructor_arguments(build, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("make_model", "x", "match"),
    [
        (MNIST1DCNN, torch.randn(2, 1, 39), r"\[B, 1, 40\] or \[B, 40\].*\(2, 1, 39\)"),
        (lambda: MNIST1DCNN(in_channels=2), torch.randn(2, 40), r"\[B, 2, 40\], got shape \(2, 40\)"),
        (lambda: MLP(64, 3), torch.randn(2, 1, 9, 9), r"64 values.*\(2, 1, 9, 9\)"),
        (PreActResNet18, torch.randn(2, 1, 32, 32), r"\[B, 3, H, W\].*\(2, 1, 32, 32\)"),
    ],
)
def test_bad_input_shapes(make_model, x: torch.Tensor, match: str) -> None:  # noqa: ANN001
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_mnist1d_cnn_can_memorise_random_labels() -> None:
    """A working network fits 64 random inputs with fixed random labels exactly within 300 Adam steps."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    model = MNIST1DCNN(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only contend on a shared CPU
    try:
        accuracy = 0.0
        for step in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step % 25 == 24:
                with torch.no_grad():
                    accuracy = (model(x).argmax(1) == y).float().mean().item()
                if accuracy == 1.0:
                    break
    finally:
        torch.set_num_threads(threads)
    assert accuracy == 1.0
