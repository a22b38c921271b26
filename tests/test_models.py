import copy

import pytest
import torch

from segserve.models import FCN, UNet, build_model, convolutionalize_vgg16, fcn_from_coarser
from segserve.models.fcn import bilinear_kernel
from segserve.models.vgg import (
    PretrainedWeightsUnavailable,
    load_vgg16_state_dict,
    torchvision_vgg16_state_dict,
)

# A 1x1 image and a batch of two of odd sizes (an FCN pass costs about a second whatever
# the input: its 100-px pad); the paper's 500x375 is in the slow test below.
SIZES = [(1, 3, 1, 1), (2, 3, 37, 53)]
# The checks that build and run full-size FCNs and VGG16 (134-138 M parameters of real
# tensors: seconds each, 20 s together) are in `make test-slow`; their structure (parameter
# counts on the meta device, upsampling initialisation, staging rules, clear failures
# without weights) is checked here.
FULL_SIZE = pytest.mark.slow


def n_params(name, num_classes, **opts):
    """Parameters counted on the meta device: the structure without allocating 134 M floats."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name, num_classes, **opts).parameters())


@pytest.mark.parametrize(
    "name", [*(pytest.param(n, marks=FULL_SIZE) for n in ("fcn32s", "fcn16s", "fcn8s")), "unet"]
)
def test_output_has_the_input_size_for_any_input(name, request):
    # The FCNs are the module's staged ones (building a 134 M-parameter net costs seconds).
    torch.manual_seed(0)
    if name == "unet":
        model = build_model("unet", 3, width=8).eval()
    else:
        staged = request.getfixturevalue("staged")
        model = dict(zip(("fcn32s", "fcn16s", "fcn8s"), staged, strict=True))[name]
    assert type(model) is (UNet if name == "unet" else FCN)
    with torch.inference_mode():
        for shape in SIZES:
            out = model(torch.randn(*shape))
            assert out.shape == (shape[0], 3, shape[2], shape[3])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcn8s", "unet"])
def test_paper_sized_inputs_keep_their_size(name):
    with torch.inference_mode():
        out = build_model(name, 3).eval()(torch.randn(1, 3, 375, 500))
    assert out.shape == (1, 3, 375, 500)


def test_fcn8s_has_the_papers_134m_parameters():
    count = n_params("fcn8s", 21)
    assert abs(count - 134e6) / 134e6 < 0.01, count


def test_unet_width_64_has_about_31m_parameters():
    count = n_params("unet", 2, width=64)
    assert 30e6 < count < 32e6, count
    assert n_params("unet", 2, width=16) < count / 10


def test_bilinear_kernel_interpolates():
    k = bilinear_kernel(1, 4)[0, 0]
    expected_1d = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(k, expected_1d[:, None] * expected_1d[None, :])
    # Upsampling a constant map gives that constant away from the borders.
    up = torch.nn.functional.conv_transpose2d(
        torch.ones(1, 1, 5, 5), bilinear_kernel(1, 16), stride=8
    )
    assert torch.allclose(up[0, 0, 8:-8, 8:-8], torch.ones(1))


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_upsampling_layers_start_bilinear_and_only_the_final_one_is_fixed(stride):
    model = FCN(4, stride)
    assert torch.equal(model.upscore.weight, bilinear_kernel(4, 2 * stride))
    assert not model.upscore.weight.requires_grad
    for name in ("upscore2", "upscore_pool4"):
        layer = getattr(model, name, None)
        if layer is not None:
            assert torch.equal(layer.weight, bilinear_kernel(4, 4))
            assert layer.weight.requires_grad


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def staged():
    """A randomised FCN-32s and the FCN-16s and FCN-8s staged from it (built once: 134 M
    parameters each)."""
    fcn32 = _randomize(FCN(3, 32)).eval()
    fcn16 = fcn_from_coarser(fcn32, 16).eval()
    return fcn32, fcn16, fcn_from_coarser(fcn16, 8).eval()


@FULL_SIZE
def test_staged_fcn_adds_nothing_through_its_new_skips(staged):
    _, fcn16, fcn8 = staged
    x = torch.randn(1, 3, 96, 120)
    with torch.inference_mode():
        # The same as running the new net with the skip branches cut off.
        _, _, pool5 = fcn16.features(x)
        score = fcn16.score_fr(fcn16.head(pool5))
        no_skip16 = fcn16.upscore(fcn16.upscore2(score))[:, :, 27 : 27 + 96, 27 : 27 + 120]
        assert torch.equal(fcn16(x), no_skip16)
        no_skip8 = fcn8.upscore(fcn8.upscore_pool4(fcn8.upscore2(score)))[
            :, :, 31 : 31 + 96, 31 : 31 + 120
        ]
        assert torch.allclose(fcn8(x), no_skip8, atol=1e-6)


@FULL_SIZE
def test_fresh_fcn16s_computes_what_its_fcn32s_computes(staged):
    """The paper: new skips start at zero, so the net "starts with unaltered predictions".

    Bilinear 2x then 16x is not exactly bilinear 32x (interpolating a tent sampled off its
    peak flattens the peak), so they match where the score map is smooth (here: constant per
    class) away from the outermost coarse cell, where both ramp down to the zero border.
    """
    fcn32 = copy.deepcopy(staged[0])  # the trunk's weights do not matter here
    with torch.no_grad():
        fcn32.score_fr.weight.zero_()
        fcn32.score_fr.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    fcn16 = fcn_from_coarser(fcn32, 16).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        a, b = fcn32(x), fcn16(x)
    assert torch.allclose(a[..., 32:-32, 32:-32], b[..., 32:-32, 32:-32], atol=1e-5)
    # And with random weights, the predicted labels still agree almost everywhere.
    fcn32, fcn16, _ = staged
    with torch.inference_mode():
        agree = (fcn32(x).argmax(1) == fcn16(x).argmax(1)).float().mean()
    assert agree > 0.9


def test_staging_only_goes_from_coarse_to_fine():
    with torch.device("meta"), pytest.raises(ValueError):  # refused before any weight is read
        fcn_from_coarser(FCN(3, 8), 16)


@pytest.fixture(scope="module")
def vgg():
    """torchvision's VGG16 with random weights (138 M parameters: built once)."""
    from torchvision.models import vgg16

    torch.manual_seed(0)
    return vgg16(weights=None).eval()


@FULL_SIZE
def test_vgg16_weights_are_convolutionalized(vgg):
    fcn = convolutionalize_vgg16(FCN(21, 8), vgg.state_dict())
    assert torch.equal(fcn.features.layers[0].weight, vgg.features[0].weight)
    assert torch.equal(fcn.features.layers[28].bias, vgg.features[28].bias)
    assert torch.equal(fcn.head.fc6.weight.flatten(1), vgg.classifier[0].weight)
    assert torch.equal(fcn.head.fc7.weight.flatten(1), vgg.classifier[3].weight)
    # fc6 as a 7x7 conv on pool5 of a 224x224 image computes VGG's fc6 (paper, section 3.1).
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        vgg_fc6 = torch.relu(vgg.classifier[0](torch.flatten(vgg.avgpool(vgg.features(x)), 1)))
        conv_fc6 = torch.relu(fcn.head.fc6(torch.nn.functional.max_pool2d(vgg.features[:-1](x), 2)))
    assert torch.allclose(conv_fc6.flatten(1), vgg_fc6, atol=1e-4)


@FULL_SIZE
def test_vgg16_from_a_local_state_dict_file(vgg, tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    model = build_model("fcn32s", 4, backbone_weights=str(path))
    assert torch.equal(model.head.fc7.weight.flatten(1), torch.load(path)["classifier.3.weight"])


def test_missing_local_weights_and_wrong_state_dicts_fail_clearly(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="not found"):
        load_vgg16_state_dict(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="not a VGG16 state dict"), torch.device("meta"):
        convolutionalize_vgg16(FCN(2, 32), {"weight": torch.zeros(1)})


def test_offline_torchvision_weights_name_the_local_file_option(monkeypatch, tmp_path):
    # A fresh, empty hub cache: torchvision must try the download, which fails offline
    # here (and is made to fail the same way on a machine that is online).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match="--backbone-weights"):
        torchvision_vgg16_state_dict()


def test_unet_batch_norm_and_registry_errors():
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in UNet(2, 8, batch_norm=True).modules())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("segformer", 2)
    with pytest.raises(TypeError):
        build_model("fcn8s", 2, width=8)
