"""rotnet's paper recipe against the official code (github.com/gidariss/FeatureLearningRotNet).

The official networks are re-written below in today's PyTorch, line for line from
architectures/NetworkInNetwork.py and architectures/NonLinearClassifier.py; their weights are
copied into rotnet's models, which must then compute the same outputs. The official configs'
optimiser, schedule and epochs are copied below as they stand in config/CIFAR10_*.py, and
rotnet's recipes must be the same.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import rotnet_cli.nin  # noqa: F401  (registers rotnet_nin3/4/5)
from rotnet_cli.config import PRETRAIN_SCHEDULES, ProbeConfig, ReproduceConfig, SupervisedConfig
from rotnet_cli.head_training import HeadTrainer, head_lr, make_head_optimizer, official_head_init, spatial_head
from rotnet_cli.pretraining import make_optimizer
from rotnet_cli.reproduction import pretrain_config, probe_config, supervised_config

# ----------------------------------------------------------------------------- the official definitions


class OfficialBasicBlock(nn.Module):
    """NetworkInNetwork.py l. 6-17 (and NonLinearClassifier.py l. 7-18): conv (no bias), BN, ReLU.
    Python 2's ``(kernel_size-1)/2`` is an integer division."""

    def __init__(self, in_planes, out_planes, kernel_size):
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.layers = nn.Sequential()
        self.layers.add_module(
            "Conv", nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=1, padding=padding, bias=False)
        )
        self.layers.add_module("BatchNorm", nn.BatchNorm2d(out_planes))
        self.layers.add_module("ReLU", nn.ReLU(inplace=True))

    def forward(self, x):
        return self.layers(x)


class OfficialGlobalAveragePooling(nn.Module):
    def forward(self, feat):  # NetworkInNetwork.py l. 21-27
        return F.avg_pool2d(feat, (feat.size(2), feat.size(3))).view(-1, feat.size(1))


class OfficialNIN(nn.Module):
    """NetworkInNetwork.py l. 29-122."""

    def __init__(self, opt):
        super().__init__()
        num_classes = opt["num_classes"]
        num_inchannels = opt.get("num_inchannels", 3)
        num_stages = opt.get("num_stages", 3)
        use_avg_on_conv3 = opt.get("use_avg_on_conv3", True)
        assert num_stages >= 3
        nChannels, nChannels2, nChannels3 = 192, 160, 96
        blocks = [nn.Sequential() for _ in range(num_stages)]
        blocks[0].add_module("Block1_ConvB1", OfficialBasicBlock(num_inchannels, nChannels, 5))
        blocks[0].add_module("Block1_ConvB2", OfficialBasicBlock(nChannels, nChannels2, 1))
        blocks[0].add_module("Block1_ConvB3", OfficialBasicBlock(nChannels2, nChannels3, 1))
        blocks[0].add_module("Block1_MaxPool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks[1].add_module("Block2_ConvB1", OfficialBasicBlock(nChannels3, nChannels, 5))
        blocks[1].add_module("Block2_ConvB2", OfficialBasicBlock(nChannels, nChannels, 1))
        blocks[1].add_module("Block2_ConvB3", OfficialBasicBlock(nChannels, nChannels, 1))
        blocks[1].add_module("Block2_AvgPool", nn.AvgPool2d(kernel_size=3, stride=2, padding=1))
        blocks[2].add_module("Block3_ConvB1", OfficialBasicBlock(nChannels, nChannels, 3))
        blocks[2].add_module("Block3_ConvB2", OfficialBasicBlock(nChannels, nChannels, 1))
        blocks[2].add_module("Block3_ConvB3", OfficialBasicBlock(nChannels, nChannels, 1))
        if num_stages > 3 and use_avg_on_conv3:
            blocks[2].add_module("Block3_AvgPool", nn.AvgPool2d(kernel_size=3, stride=2, padding=1))
        for s in range(3, num_stages):
            blocks[s].add_module("Block" + str(s + 1) + "_ConvB1", OfficialBasicBlock(nChannels, nChannels, 3))
            blocks[s].add_module("Block" + str(s + 1) + "_ConvB2", OfficialBasicBlock(nChannels, nChannels, 1))
            blocks[s].add_module("Block" + str(s + 1) + "_ConvB3", OfficialBasicBlock(nChannels, nChannels, 1))
        blocks.append(nn.Sequential())
        blocks[-1].add_module("GlobalAveragePooling", OfficialGlobalAveragePooling())
        blocks[-1].add_module("Classifier", nn.Linear(nChannels, num_classes))
        self._feature_blocks = nn.ModuleList(blocks)
        self.all_feat_names = ["conv" + str(s + 1) for s in range(num_stages)] + ["classifier"]

    def forward(self, x, out_feat_keys=None):
        out_feat_keys = [self.all_feat_names[-1]] if out_feat_keys is None else out_feat_keys
        max_out_feat = max(self.all_feat_names.index(key) for key in out_feat_keys)
        out_feats = [None] * len(out_feat_keys)
        feat = x
        for f in range(max_out_feat + 1):
            feat = self._feature_blocks[f](feat)
            key = self.all_feat_names[f]
            if key in out_feat_keys:
                out_feats[out_feat_keys.index(key)] = feat
        return out_feats[0] if len(out_feats) == 1 else out_feats


class OfficialClassifier(nn.Module):
    """NonLinearClassifier.py l. 36-100, the 'MultLayer' and 'NIN_ConvBlock3' types.

    The official MultLayer puts ``nn.BatchNorm2d`` on the (N, nFeats) output of a Linear: PyTorch
    0.2 normalised dimension 1 of any input, today's BatchNorm2d refuses 2-D inputs, so it is
    BatchNorm1d here, the same computation."""

    def __init__(self, opt):
        super().__init__()
        nChannels, num_classes, cls_type = opt["nChannels"], opt["num_classes"], opt["cls_type"]
        self.classifier = nn.Sequential()
        if cls_type == "MultLayer":
            nFeats = min(num_classes * 20, 2048)
            self.classifier.add_module("Flatten", nn.Flatten())
            self.classifier.add_module("Liniear_1", nn.Linear(nChannels, nFeats, bias=False))
            self.classifier.add_module("BatchNorm_1", nn.BatchNorm1d(nFeats))
            self.classifier.add_module("ReLU_1", nn.ReLU(inplace=True))
            self.classifier.add_module("Liniear_2", nn.Linear(nFeats, nFeats, bias=False))
            self.classifier.add_module("BatchNorm2d", nn.BatchNorm1d(nFeats))
            self.classifier.add_module("ReLU_2", nn.ReLU(inplace=True))
            self.classifier.add_module("Liniear_F", nn.Linear(nFeats, num_classes))
        elif cls_type == "NIN_ConvBlock3":
            self.classifier.add_module("Block3_ConvB1", OfficialBasicBlock(nChannels, 192, 3))
            self.classifier.add_module("Block3_ConvB2", OfficialBasicBlock(192, 192, 1))
            self.classifier.add_module("Block3_ConvB3", OfficialBasicBlock(192, 192, 1))
            self.classifier.add_module("GlobalAvgPool", OfficialGlobalAveragePooling())
            self.classifier.add_module("Liniear_F", nn.Linear(192, num_classes))
        self.initilize()

    def forward(self, feat):
        return self.classifier(feat)

    def initilize(self):  # l. 86-100
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0.0, math.sqrt(2.0 / m.out_features))
                if m.bias is not None:
                    m.bias.data.fill_(0.0)


# The official configs, copied as they stand (config/*.py, the optim_params line and max_num_epochs)
OFFICIAL_ROTNET = {
    "optim_type": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": True,
    "LUT_lr": [(60, 0.1), (120, 0.02), (160, 0.004), (200, 0.0008)],
    "max_num_epochs": 200,
    "batch_size": 128,
}
OFFICIAL_MULTLAYER = {
    "optim_type": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": True,
    "LUT_lr": [(20, 0.1), (40, 0.02), (45, 0.004), (50, 0.0008)],
    "max_num_epochs": 50,
    "batch_size": 128,
}
OFFICIAL_CONV = {
    "optim_type": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": True,
    "LUT_lr": [(35, 0.1), (70, 0.02), (85, 0.004), (100, 0.0008)],
    "max_num_epochs": 100,
    "batch_size": 128,
}
OFFICIAL_SUPERVISED = {
    "optim_type": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": True,
    "LUT_lr": [(60, 0.1), (120, 0.02), (160, 0.004), (200, 0.0008)],
    "max_num_epochs": 200,
    "batch_size": 128,
}


def official_lr(optim_params: dict, epoch: int) -> float:
    """Algorithm.adjust_learning_rates (l. 295-296): the lr of the first LUT entry past ``epoch``."""
    lut = optim_params["LUT_lr"]
    return next((lr for (max_epoch, lr) in lut if max_epoch > epoch), lut[-1][1])


# ----------------------------------------------------------------------------- helpers


def copy_in_order(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter and buffer of ``source`` into ``target``, matched by their order."""
    pairs = list(zip(source.state_dict().items(), target.state_dict().items(), strict=True))
    with torch.no_grad():
        for (name, value), (target_name, target_value) in pairs:
            assert value.shape == target_value.shape, (name, target_name)
            target_value.copy_(value)


def randomise_batchnorm(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine values, so that equal outputs mean something."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("num_stages, name", [(3, "rotnet_nin3"), (4, "rotnet_nin4")])
def test_nin_computes_what_the_official_network_computes(num_stages, name):
    # the RotNet configs build the 4-block NIN without a pool after block 3 (use_avg_on_conv3 False,
    # config/CIFAR10_RotNet_NIN4blocks.py l. 28); the supervised config the 3-block one (l. 27)
    official = OfficialNIN({"num_classes": 4, "num_stages": num_stages, "use_avg_on_conv3": False}).eval()
    randomise_batchnorm(official)
    ours = timm.create_model(name, num_classes=4).eval()
    copy_in_order(official, ours)
    x = torch.randn(3, 3, 32, 32)
    keys = official.all_feat_names[:-1]
    with torch.no_grad():
        theirs = official(x, out_feat_keys=keys)
        mine = ours.forward_intermediates(x, intermediates_only=True)
        assert len(theirs) == len(mine) == num_stages
        for key, a, b in zip(keys, theirs, mine, strict=True):  # conv1 ... convN: every probed block
            assert a.shape == b.shape, key
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)  # through the rotation classifier


@pytest.mark.parametrize(
    "cls_type, head, shape",
    [
        ("MultLayer", "mlp", (192, 8, 8)),  # the non-linear classifier on block 2 (nChannels 192*8*8)
        ("MultLayer", "mlp", (96, 16, 16)),  # ... and on block 1 (Table 1)
        ("NIN_ConvBlock3", "conv", (192, 8, 8)),  # "RotNet + conv"
    ],
)
def test_probe_heads_compute_what_the_official_classifiers_compute(cls_type, head, shape):
    official = OfficialClassifier(
        {
            "nChannels": math.prod(shape) if cls_type == "MultLayer" else shape[0],
            "num_classes": 10,
            "cls_type": cls_type,
        }
    ).eval()
    randomise_batchnorm(official)
    ours = spatial_head(head, shape, 10).eval()
    copy_in_order(official, ours)
    feats = torch.randn(4, *shape)
    with torch.no_grad():
        torch.testing.assert_close(ours(feats), official(feats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls_type, head", [("MultLayer", "mlp"), ("NIN_ConvBlock3", "conv")])
def test_paper_recipe_initialises_heads_as_the_official_classifiers(cls_type, head):
    shape = (192, 8, 8)
    official = OfficialClassifier(
        {
            "nChannels": math.prod(shape) if cls_type == "MultLayer" else shape[0],
            "num_classes": 10,
            "cls_type": cls_type,
        }
    )
    ours = spatial_head(head, shape, 10)
    torch.manual_seed(3)
    official.initilize()
    torch.manual_seed(3)
    ours.apply(official_head_init)  # what HeadTrainer does for the paper recipe
    for (name, a), (_, b) in zip(official.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # the same draws in the same order: bitwise the same weights
    trainer = HeadTrainer(
        head, [shape], 10, "flatten", ProbeConfig(weights="x", recipe="paper").head_recipe(head), 0, torch.device("cpu")
    )
    biases = [m.bias for m in trainer.heads.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert biases and all(torch.all(b == 0) for b in biases)


# ----------------------------------------------------------------------------- optimisers, schedules, epochs


def assert_schedule_is_official(lr_of_epoch, official: dict, epochs: int) -> None:
    assert epochs == official["max_num_epochs"]
    assert [lr_of_epoch(e) for e in range(epochs)] == pytest.approx([official_lr(official, e) for e in range(epochs)])


@pytest.mark.parametrize("head, official", [("mlp", OFFICIAL_MULTLAYER), ("conv", OFFICIAL_CONV)])
def test_paper_probe_recipe_is_the_official_classifier_training(head, official):
    cfg = ProbeConfig(weights="x", recipe="paper")
    recipe = cfg.head_recipe(head)
    assert_schedule_is_official(lambda e: head_lr(recipe, e, 0, 391), official, recipe.epochs)
    assert cfg.resolved_batch_size == official["batch_size"] and cfg.resolved_features == "augmented"
    assert cfg.resolved_precision() == "fp32" and recipe.init == "official"
    heads = spatial_head(head, (192, 8, 8), 10)
    optimizer = make_head_optimizer(heads.parameters(), recipe, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (
        official["momentum"],
        official["nesterov"],
        official["weight_decay"],
    )
    # every parameter decays (the official optimiser takes net.parameters(), Algorithm.py l. 118)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in heads.parameters())


def test_epochs_option_keeps_the_steps_at_the_same_share_of_the_run():
    recipe = ProbeConfig(weights="x", recipe="paper", epochs=10).head_recipe("mlp")
    assert recipe.epochs == 10 and recipe.milestones == (4, 8, 9)  # 20, 40, 45 of 50


def test_rotnet_pretraining_is_the_official_one(tmp_path):
    cfg = pretrain_config(ReproduceConfig(schedule="official"), (0.0, 90.0, 180.0, 270.0), tmp_path / "run")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.batch_size, cfg.augment) == (
        "rotnet_nin4",
        "sgd",
        0.1,
        0.9,
        128,
        "crop+flip",
    )
    assert cfg.precision == "fp32" and cfg.copies == "all"
    step = lambda e: cfg.lr * cfg.gamma ** sum(e >= m for m in cfg.milestones)  # noqa: E731
    assert_schedule_is_official(step, OFFICIAL_ROTNET, cfg.epochs)
    # weight decay on every parameter, norms and biases included, SGD with Nesterov momentum
    model = timm.create_model("rotnet_nin4", num_classes=4)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert all(g["weight_decay"] == OFFICIAL_ROTNET["weight_decay"] and g["nesterov"] for g in optimizer.param_groups)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    # the paper's text: 100 epochs, lr / 5 after 30, 60 and 80
    paper = pretrain_config(ReproduceConfig(schedule="paper"), (0.0, 90.0), tmp_path / "run")
    assert (paper.epochs, paper.milestones, paper.gamma) == (100, (30, 60, 80), 0.2)
    assert PRETRAIN_SCHEDULES == {"paper": (100, (30, 60, 80)), "official": (200, (60, 120, 160))}


def test_supervised_baseline_is_the_official_one(tmp_path):
    cfg = supervised_config(ReproduceConfig(), tmp_path)
    assert (
        cfg.model == "rotnet_nin3" and cfg.batch_size == OFFICIAL_SUPERVISED["batch_size"] and cfg.precision == "fp32"
    )
    assert (cfg.lr, cfg.weight_decay) == (OFFICIAL_SUPERVISED["lr"], OFFICIAL_SUPERVISED["weight_decay"])
    step = lambda e: cfg.lr * cfg.gamma ** sum(e >= m for m in cfg.milestones)  # noqa: E731
    assert_schedule_is_official(step, OFFICIAL_SUPERVISED, cfg.epochs)
    assert SupervisedConfig().epochs == 200


def test_reproduce_probes_with_the_paper_recipe(tmp_path):
    cfg = probe_config(ReproduceConfig(), tmp_path, (1, 2, 3, 4), ("mlp",))
    assert cfg.recipe == "paper" and cfg.pool == "flatten" and cfg.data == "cifar10" and cfg.epochs is None
    assert cfg.resolved_precision() == "fp32"
