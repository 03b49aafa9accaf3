"""FCViT (fcvit.py): published sizes, shapes, and what its token mixer mixes."""
import pytest
import torch

import fcvit
from fcvit import FCVIT_CONFIGS, PUBLISHED_PARAMS, GlobalContextMixer, build_fcvit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores two waiting OpenMP threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(FCVIT_CONFIGS))
def test_parameter_count_matches_paper(arch):
    with torch.device("meta"):  # same constructor, shapes only: no time spent initialising weights
        model = build_fcvit(arch, num_classes=1000)  # the paper's classifier: GAP + LayerNorm + linear
    measured, published = num_params(model), PUBLISHED_PARAMS[arch]
    assert abs(measured / published - 1) < 0.02, f"{arch}: {measured / 1e6:.2f}M vs published {published / 1e6}M"


def test_sizes_differ_only_in_depth_for_base_models():
    configs = [FCVIT_CONFIGS[a] for a in ("fcvit_b12", "fcvit_b24", "fcvit_b48")]
    assert [sum(c["depths"]) for c in configs] == [12, 24, 48]
    assert len({c["dims"] for c in configs}) == 1


def test_classifier_and_stride_32_feature_map():
    torch.manual_seed(0)
    model = fcvit.fcvit_tiny().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        trunk = fcvit.fcvit_tiny(num_classes=0, global_pool="")
        assert trunk.forward_features(torch.randn(2, 3, 64, 96)).shape == (2, 320, 2, 3)
    assert not any("cls" in name for name, _ in model.named_parameters())  # no [CLS] token


def test_every_builder_is_registered_by_name():
    for arch in FCVIT_CONFIGS:
        assert callable(getattr(fcvit, arch))
    with pytest.raises(ValueError, match="fcvit_tiny"):
        build_fcvit("fcvit_huge")


def test_mixer_shapes_and_similarity_weights():
    torch.manual_seed(0)
    mixer = GlobalContextMixer(64, groups=8)
    x = torch.randn(2, 64, 9, 7)
    assert mixer(x).shape == x.shape
    weight, context = mixer.similarity(x)
    assert weight.shape == (2, 8, 9, 7) and context.shape == (2, 8, 8, 1, 1)
    assert ((weight > 0) & (weight < 1)).all()
    # a token equal to the (per-group) mean has cosine 1: the largest weight at init
    n = x.shape[2] * x.shape[3]
    x[:, :, 0, 0] = (x.sum(dim=(2, 3)) - x[:, :, 0, 0]) / (n - 1)  # the mean of the others = the new mean
    weight, _ = mixer.similarity(x)
    assert torch.allclose(weight[:, :, 0, 0], torch.sigmoid(torch.tensor(1.0)).expand(2, 8), atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        GlobalContextMixer(60, groups=8)


def test_mixer_reaches_beyond_its_convolution():
    """The global context links every token to every other one, unlike the 11x11
    depth-wise convolution alone."""
    torch.manual_seed(0)
    mixer = GlobalContextMixer(32, kernel_size=11)
    x = torch.randn(1, 32, 24, 24)
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    with torch.no_grad():
        far = (mixer(x) - mixer(y))[:, :, 23, 23]
        local_only = (mixer.dwconv(x) - mixer.dwconv(y))[:, :, 23, 23]
    assert far.abs().max() > 1e-4
    assert local_only.abs().max() == 0


def test_maxout_bottleneck_takes_the_larger_of_two_groups():
    mixer = GlobalContextMixer(16, reduction=2)
    assert mixer.reduce.out_channels == 16 and mixer.expand.in_channels == 8
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        mixer.dwconv.weight.zero_()
        mixer.dwconv.bias.zero_()
        weight, context = mixer.similarity(x)
        reduced = mixer.reduce(x + (weight.unsqueeze(2) * context).reshape(1, 16, 4, 4))
        expected = mixer.expand(torch.maximum(reduced[:, :8], reduced[:, 8:]))
        assert torch.allclose(mixer(x), expected, atol=1e-6)
