import pytest
import torch

from digitkit.errors import ConfigError
from digitkit.models import count_macs, count_params, create_model, list_models

REQUIRED = {"mlp", "cnn1", "cnn2", "cnn3", "lenet_like", "classic"}


def test_registry_has_the_required_models():
    assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes, size", [(10, 28), (26, 28), (3, 20)])
def test_forward_backward_every_model(name, num_classes, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, img_size=size)
    x = torch.rand(4, 1, size, size, requires_grad=True)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    assert logits.shape == (4, num_classes)
    model.eval()
    assert torch.allclose(model.forward_head(model.forward_features(x)), model(x))
    logits.logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"mlp"}))
def test_cnn_features_are_spatial_for_gradcam(name):
    f = create_model(name).forward_features(torch.rand(2, 1, 28, 28))
    assert f.ndim == 4 and f.shape[-1] > 1


def test_published_shapes():
    # cnn1/2/3 filters 32 / 32-64 / 32-64-128 and dropout 0 / 0.2 / 0.3.
    for name, chans, p in (("cnn1", [32], 0.0), ("cnn2", [32, 64], 0.2), ("cnn3", [32, 64, 128], 0.3)):
        m = create_model(name)
        convs = [mod.out_channels for mod in m.features if isinstance(mod, torch.nn.Conv2d)]
        bns = [mod for mod in m.features if isinstance(mod, torch.nn.BatchNorm2d)]
        drops = [mod.p for mod in m.head if isinstance(mod, torch.nn.Dropout)]
        assert convs == chans and len(bns) == len(chans) and (drops or [0.0]) == [p]
    classic = create_model("classic")
    convs = [mod.out_channels for mod in classic.features if isinstance(mod, torch.nn.Conv2d)]
    assert convs == [32, 32, 64, 64]
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in classic.features) == 4
    lenet = create_model("lenet_like")
    assert [mod.out_features for mod in lenet.head if isinstance(mod, torch.nn.Linear)] == [128, 10]


def test_counts():
    m = create_model("cnn1")
    # conv 1->32 3x3 no bias: 288 + BN 64 + linear 32*14*14*10 + 10
    assert count_params(m) == 288 + 64 + 6272 * 10 + 10
    assert count_macs(m) == 28 * 28 * 32 * 9 + 6272 * 10


def test_normalization_is_inside_the_model():
    m = create_model("cnn1", mean=0.5, std=0.25).eval()
    assert float(m.mean) == 0.5 and "mean" in m.state_dict()


def test_unknown_model_and_option():
    with pytest.raises(ConfigError, match="unknown model 'resnet9'; registered models: classic"):
        create_model("resnet9")
    with pytest.raises(ConfigError, match="model 'cnn3' has no option 'width'; its options are: channels="):
        create_model("cnn3", width=2)


def test_cnn_fast_reads_the_image_less_its_border():
    torch.manual_seed(0)
    m = create_model("cnn_fast").eval()
    x = torch.rand(3, 1, 28, 28)
    framed = x.clone()
    framed[..., :2, :] = framed[..., -2:, :] = framed[..., :, :2] = framed[..., :, -2:] = 1.0
    assert torch.equal(m(x), m(framed))  # the 2-px frame is dropped before anything else
    inner = x.clone()
    inner[..., 14, 14] += 1.0
    assert not torch.equal(m(x), m(inner))
    assert count_macs(m) == 24 * 24 * 16 * 9 + 12 * 12 * 32 * 16 * 9 + 6 * 6 * 64 * 32 * 9 + 64 * 9 * 10
    with pytest.raises(ConfigError, match="border"):
        create_model("cnn_fast", border=14)
