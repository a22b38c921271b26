"""Training as the paper did it: per-architecture, per-stage defaults, their equivalence to the
authors' summed-loss rates, at-once skip scaling, zero score layers, and the refusal to
train an FCN without a backbone unless asked."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from segserve.models import FCN
from segserve.models.vgg import load_vgg16_state_dict, looks_like_caffe_vgg16
from segserve.training.checkpoint import model_from_checkpoint
from segserve.training.evaluate import TrainingSetupError
from segserve.training.recipes import VOC_PIXELS, defaults_for
from segserve.training.train import TrainConfig, build_network, make_optimizer, train


def config(model: str, **changes) -> TrainConfig:
    return TrainConfig(data="d", out="o", model=model, **changes)


def test_fcn_defaults_are_the_authors_solvers_per_stage():
    n = VOC_PIXELS
    fcn32 = config("fcn32s")
    assert (fcn32.optimizer, fcn32.momentum, fcn32.weight_decay, fcn32.batch_size) == (
        "sgd",
        0.99,
        5e-4,
        1,
    )
    assert (fcn32.bias_lr_mult, fcn32.bias_decay, fcn32.poly_power) == (2.0, False, 0.0)
    assert fcn32.lr == pytest.approx(1e-10 * n)  # 1.875e-5 on the mean loss
    assert config("fcn16s", init_from="c.pt").lr == pytest.approx(1e-12 * n)
    assert config("fcn8s", init_from="c.pt").lr == pytest.approx(1e-14 * n)
    assert config("fcn8s").lr == pytest.approx(1e-10 * n)  # at once (voc-fcn8s-atonce)
    unet = config("unet")
    assert (unet.momentum, unet.batch_size, unet.poly_power) == (0.9, 8, 0.9)
    # What the user says wins; AdamW without a rate gets AdamW's usual one.
    assert config("fcn16s", init_from="c.pt", lr=0.5, momentum=0.9).momentum == 0.9
    assert config("fcn32s", optimizer="adamw").lr == 1e-3
    assert defaults_for("fcn8s", staged=True)["lr"] == config("fcn8s", init_from="c").lr


def test_a_mean_loss_at_the_scaled_rate_takes_the_summed_loss_step():
    """lr_mean = lr_sum * N: one SGD step on an image of N labelled pixels moves the
    weights the same under both losses (the derivation in training/recipes.py)."""
    torch.manual_seed(0)
    image = torch.randn(1, 3, 25, 30)
    target = torch.randint(0, 4, (1, 25, 30))
    target[0, :3] = 255  # ignored pixels count in neither
    n = int((target != 255).sum())
    lr_sum = 1e-4
    moved = []
    for loss, lr in (("sum", lr_sum), ("mean", lr_sum * n)):
        torch.manual_seed(1)
        net = nn.Conv2d(3, 4, 1)
        before = net.weight.detach().clone()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        nn.CrossEntropyLoss(ignore_index=255, reduction=loss)(net(image), target).backward()
        opt.step()
        moved.append(net.weight.detach() - before)
    assert torch.allclose(moved[0], moved[1], rtol=1e-4, atol=1e-9)


def test_biases_learn_twice_as_fast_without_decay_for_fcn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    weights, biases = make_optimizer(config("fcn32s"), net).param_groups
    assert all(p.dim() == 4 for p in weights["params"]) and len(biases["params"]) == 2
    assert biases["lr"] == pytest.approx(2 * weights["lr"])
    assert (weights["weight_decay"], biases["weight_decay"]) == (5e-4, 0.0)
    assert weights["momentum"] == 0.99
    unet_groups = make_optimizer(config("unet"), net).param_groups
    assert unet_groups[1]["lr"] == unet_groups[0]["lr"] and unet_groups[1]["weight_decay"] == 5e-4


def test_every_score_layer_starts_at_zero():
    fcn = FCN(3, 8)
    for layer in (fcn.score_fr, fcn.score_pool4, fcn.score_pool3):
        assert not layer.weight.any() and not layer.bias.any()
    with torch.inference_mode():
        assert not fcn.eval()(torch.randn(1, 3, 40, 40)).any()


def test_at_once_fcn8s_scales_its_skips_and_staged_ones_do_not():
    torch.manual_seed(0)
    at_once = FCN(3, 8, at_once=True).eval()
    with torch.no_grad():
        nn.init.normal_(at_once.score_pool3.weight)
        nn.init.normal_(at_once.score_fr.weight)
    with torch.device("meta"):  # structure only: the weights are at_once's own tensors
        staged = FCN(3, 8).eval()
    staged.load_state_dict(at_once.state_dict(), assign=True)  # only the scales differ
    assert (at_once.pool4_scale, at_once.pool3_scale) == (0.01, 0.0001)
    assert (staged.pool4_scale, staged.pool3_scale) == (1.0, 1.0)
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        pool3, _, _ = at_once.features(x)
        # pool3's contribution is linear in its scale: 1e-4 of the staged net's.
        a, b = at_once.score_pool3(pool3 * 1e-4), staged.score_pool3(pool3)
        bias = at_once.score_pool3.bias[None, :, None, None]
        assert torch.allclose(a - bias, (b - bias) * 1e-4, atol=1e-6)
        assert not torch.allclose(at_once(x), staged(x))


def test_at_once_is_recorded_and_rebuilt_from_the_checkpoint():
    with torch.device("meta"):  # the structure and options, not 134 M initialised weights
        model, options = build_network(config("fcn8s", backbone_weights="none"), 3)
        _, options32 = build_network(config("fcn32s", backbone_weights="none"), 3)
    assert options == {"at_once": True} and model.at_once
    ckpt = {
        "architecture": "fcn8s",
        "num_classes": 3,
        "model_options": options,
        "state_dict": model.state_dict(),
    }
    with torch.device("meta"):
        assert model_from_checkpoint(ckpt).at_once
    assert options32 == {}


def test_an_fcn_without_backbone_weights_is_refused_unless_asked(synth_root, tmp_path):
    with pytest.raises(TrainingSetupError, match="vgg16-397923af.pth") as refusal:
        train(TrainConfig(data=synth_root, out=tmp_path / "run", model="fcn32s", workers=0))
    assert "--backbone-weights none" in str(refusal.value)
    assert not (tmp_path / "run" / "last.pt").exists()
    with torch.device("meta"):
        model, _ = build_network(config("fcn32s", backbone_weights="none"), 3)
    assert isinstance(model, FCN)


def test_a_caffe_converted_backbone_is_warned_about(tmp_path):
    torch.manual_seed(0)  # the heuristic reads only the first conv's weights
    torchvision_like = {"features.0.weight": torch.randn(64, 3, 3, 3) * 0.25}
    caffe_like = {"features.0.weight": torch.randn(64, 3, 3, 3) * 0.25 / 58}
    assert not looks_like_caffe_vgg16(torchvision_like, "vgg16-397923af.pth")
    assert looks_like_caffe_vgg16(caffe_like, "vgg16.pth")
    assert looks_like_caffe_vgg16(torchvision_like, "vgg16_from_caffe.pth")
    path = tmp_path / "vgg16_from_caffe.pth"
    torch.save(caffe_like, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_vgg16_state_dict(str(path))
    assert any("BGR" in str(w.message) for w in caught)


def test_median_frequency_balancing_weighs_rare_classes_up():
    from segserve.training.train import median_frequency_weights

    pixels = np.array([900, 50, 100, 0])  # background, a rare class, a commoner one, unseen
    present_in = np.array([1000, 500, 500, 0])
    w = median_frequency_weights(pixels, present_in)
    freq = np.array([0.9, 0.1, 0.2])
    assert w[:3] == pytest.approx(np.median(freq) / freq)
    assert w[1] > w[2] > w[0] and w[3] == 0.0


def test_class_pixels_counts_each_class_and_the_images_it_is_in(synth_root):
    from segserve.training.datasets import VOCSegmentation

    ds = VOCSegmentation(synth_root, "val")
    pixels, present_in = ds.class_pixels()
    labels = [np.asarray(t) for _, t in ds]
    assert pixels.sum() == sum(int((lab != 255).sum()) for lab in labels)
    assert present_in[0] == sum(int((lab != 255).sum()) for lab in labels if (lab == 0).any())
