"""Tests for the paper's Network-In-Network backbones (rotnet_cli.nin) through timm's public API."""

import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import rotnet_cli.nin  # importing registers the rotnet_nin* models with timm

NIN_MODELS = ["rotnet_nin3", "rotnet_nin4", "rotnet_nin5"]
NUM_BLOCKS = {"rotnet_nin3": 3, "rotnet_nin4": 4, "rotnet_nin5": 5}


def nin_conv_specs(num_blocks, in_chans=3):
    """(kernel, in_chs, out_chs) of every conv, written out from the paper's NIN description."""
    specs = [
        (5, in_chans, 192),
        (1, 192, 160),
        (1, 160, 96),  # block 1 (then max-pool)
        (5, 96, 192),
        (1, 192, 192),
        (1, 192, 192),  # block 2 (then avg-pool)
    ]
    for _ in range(num_blocks - 2):  # blocks 3+
        specs += [(3, 192, 192), (1, 192, 192), (1, 192, 192)]
    return specs


def expected_headless_param_count(num_blocks, in_chans=3):
    # conv (no bias): k*k*in*out weights; BatchNorm: weight + bias = 2*out. Pools have no parameters.
    return sum(k * k * cin * cout + 2 * cout for k, cin, cout in nin_conv_specs(num_blocks, in_chans))


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def test_models_are_registered_and_listed():
    assert timm.list_models("rotnet_nin*") == NIN_MODELS
    for name in NIN_MODELS:
        model = timm.create_model(name)
        assert isinstance(model, rotnet_cli.nin.NetworkInNetwork)
        assert len(model.blocks) == NUM_BLOCKS[name]
        assert model.num_classes == 10  # pretrained_cfg default: CIFAR-10
        assert isinstance(model.get_classifier(), nn.Linear)


@pytest.mark.parametrize("name", NIN_MODELS)
def test_headless_parameter_count_matches_architecture(name):
    model = timm.create_model(name, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == expected_headless_param_count(NUM_BLOCKS[name])
    assert isinstance(model.get_classifier(), nn.Identity)


def test_parameter_count_helper_on_known_value():
    # hand-summed for nin4: block 1 61,376 + block 2 535,680 + blocks 3 and 4 406,656 each,
    # so a slip in the helper cannot hide a matching slip in the model
    assert expected_headless_param_count(4) == 1_410_368


def test_in_chans_changes_only_first_conv():
    model = timm.create_model("rotnet_nin3", num_classes=0, in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == expected_headless_param_count(3, in_chans=1)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 192)


@pytest.mark.parametrize("name", NIN_MODELS)
def test_intermediate_feature_shapes_and_feature_info(name, images):
    model = timm.create_model(name, num_classes=0).eval()
    num_blocks = NUM_BLOCKS[name]
    with torch.no_grad():
        feats = model.forward_intermediates(images, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 96, 16, 16)] + [(2, 192, 8, 8)] * (num_blocks - 1)

    assert [info["num_chs"] for info in model.feature_info] == [f.shape[1] for f in feats]
    assert [info["reduction"] for info in model.feature_info] == [32 // f.shape[-1] for f in feats]
    assert [info["module"] for info in model.feature_info] == [f"blocks.{i}" for i in range(num_blocks)]
    for info in model.feature_info:
        model.get_submodule(info["module"])  # the named module exists


def test_forward_intermediates_indices_and_final_features(images):
    model = timm.create_model("rotnet_nin4", num_classes=0).eval()
    with torch.no_grad():
        all_feats = model.forward_intermediates(images, intermediates_only=True)
        final, picked = model.forward_intermediates(images, indices=[0, 2])
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
        # timm returns intermediates in block order whatever the order of the requested indices
        negative = model.forward_intermediates(images, indices=[-1, -3], intermediates_only=True)
        early = model.forward_intermediates(images, indices=[1], stop_early=True, intermediates_only=True)
        reference = model.forward_features(images)

    assert torch.equal(final, reference)
    assert final.shape == (2, 192, 8, 8)
    assert len(picked) == 2
    assert torch.equal(picked[0], all_feats[0]) and torch.equal(picked[1], all_feats[2])
    assert len(last_two) == 2
    assert torch.equal(last_two[0], all_feats[2]) and torch.equal(last_two[1], all_feats[3])
    assert len(negative) == 2
    assert torch.equal(negative[0], all_feats[1]) and torch.equal(negative[1], all_feats[3])
    assert len(early) == 1 and torch.equal(early[0], all_feats[1])
    with pytest.raises(AssertionError):
        model.forward_intermediates(images, indices=[4])


def test_forward_head_pre_logits_is_global_average(images):
    model = timm.create_model("rotnet_nin4", num_classes=10).eval()
    with torch.no_grad():
        features = model.forward_features(images)  # (2, 192, 8, 8)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(images)
    assert pooled.shape == (2, 192)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.get_classifier()(pooled))
    assert logits.shape == (2, 10)


def test_forward_backward_gives_finite_grads_everywhere(images):
    model = timm.create_model("rotnet_nin4", num_classes=4, drop_rate=0.1).train()
    logits = model(images)
    assert logits.shape == (2, 4)
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_grad_checkpointing_matches_plain_forward(images):
    model = timm.create_model("rotnet_nin3", num_classes=4).eval()
    plain = model(images)
    model.set_grad_checkpointing(True)
    checkpointed = model(images)
    torch.testing.assert_close(checkpointed, plain)


def test_pretrained_cfg_first_conv_and_classifier_resolve():
    model = timm.create_model("rotnet_nin4")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["pool_size"] == (8, 8)
    assert cfg["num_classes"] == 10
    assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    assert cfg["std"] == pytest.approx((0.2470, 0.2435, 0.2616))

    first_conv = model.get_submodule(cfg["first_conv"])
    first_module_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv is first_module_conv
    assert first_conv.kernel_size == (5, 5)
    assert (first_conv.in_channels, first_conv.out_channels) == (3, 192)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


def test_pretrained_weights_do_not_exist():
    with pytest.raises(RuntimeError):
        timm.create_model("rotnet_nin4", pretrained=True)


def test_default_init_is_what_the_official_code_runs():
    # the official NetworkInNetwork.weight_initialization is never called: layers keep PyTorch 0.2's defaults,
    # convs U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and BatchNorm weights U(0, 1) (today's default would be 1)
    torch.manual_seed(0)
    model = timm.create_model("rotnet_nin4")
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    bound = 1 / math.sqrt(3 * 5 * 5)
    assert first_conv.weight.abs().max().item() <= bound
    assert first_conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # std of U(-b, b)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert 0 <= module.weight.min() and module.weight.max() <= 1 and module.weight.std() > 0.2
            assert torch.all(module.bias == 0)


def test_he_init_is_the_official_files_unused_weight_initialization():
    torch.manual_seed(0)
    model = timm.create_model("rotnet_nin4", weight_init="he")
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    expected_std = math.sqrt(2.0 / (5 * 5 * 192))  # N(0, sqrt(2 / (k*k*out)))
    assert first_conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    assert torch.all(model.get_classifier().bias == 0)
    with pytest.raises(ValueError, match="weight_init"):
        timm.create_model("rotnet_nin4", weight_init="xavier")


def test_safetensors_checkpoint_round_trip(tmp_path, images):
    torch.manual_seed(0)
    source = timm.create_model("rotnet_nin4", num_classes=0)
    # a few training steps' worth of BN statistics, so the running buffers are not their defaults
    with torch.no_grad():
        source.train()(images)
    source.eval()
    checkpoint = tmp_path / "nin4.safetensors"
    save_file(source.state_dict(), str(checkpoint))

    torch.manual_seed(1)  # a different random init, so equality below comes from the checkpoint
    loaded = timm.create_model("rotnet_nin4", num_classes=0, checkpoint_path=str(checkpoint)).eval()
    with torch.no_grad():
        expected = source(images)
        actual = loaded(images)
    assert actual.shape == (2, 192)
    assert torch.equal(actual, expected)


def test_reset_classifier_changes_output_classes(images):
    model = timm.create_model("rotnet_nin4", num_classes=0)
    model.reset_classifier(7)
    assert model.num_classes == 7
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model(images).shape == (2, 7)
    model.reset_classifier(0)
    assert model(images).shape == (2, 192)


def test_prune_intermediate_layers_keeps_requested_blocks(images):
    model = timm.create_model("rotnet_nin5").eval()
    with torch.no_grad():
        before = model.forward_intermediates(images, intermediates_only=True)
    kept = model.prune_intermediate_layers(indices=[0, 1])
    assert kept == [0, 1]
    assert len(model.blocks) == 2
    assert model.num_classes == 0
    with torch.no_grad():
        after = model.forward_intermediates(images, intermediates_only=True)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_features_only_returns_every_block(images):
    model = timm.create_model("rotnet_nin3", features_only=True).eval()
    with torch.no_grad():
        feats = model(images)
    assert [tuple(f.shape) for f in feats] == [(2, 96, 16, 16), (2, 192, 8, 8), (2, 192, 8, 8)]
    assert model.feature_info.channels() == [96, 192, 192]
    assert model.feature_info.reduction() == [2, 4, 4]
