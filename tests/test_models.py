"""The model registry: every model's shapes and dropout, published parameter and MAC counts, compound scaling,
fine-tuning utilities and feature extraction.

Shape, count and placement checks run on the meta device (shapes only, no arithmetic), so all 27 models cost
seconds; real arithmetic runs at 32-64 px on one model per family. Never pass weights= (no downloads here).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, StochasticDepth

from pipeline.models import (
    UnknownModelError,
    build_feature_extractor,
    build_model,
    classifier_name,
    compound_multipliers,
    feature_stages,
    freeze_backbone,
    get_classifier,
    list_models,
    model_info,
    param_groups,
    replace_classifier,
    set_train_mode,
    unfreeze_backbone,
)
from pipeline.models.profile import count_macs, count_parameters

REQUIRED = (
    ["cifar_baseline10", "cifar_plain20", "cifar_plain32", "cifar_plain44", "cifar_plain56"]
    + [f"cifar_resnet{depth}" for depth in (20, 32, 44, 56, 110, 1202)]
    + ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_compound"]
    + [f"efficientnet_b{i}" for i in range(8)]
    + ["convnext_tiny", "convnext_small", "convnext_base"]
)
# One model per family for the checks that need real arithmetic.
FAMILY_SAMPLES = [
    "cifar_baseline10",
    "cifar_plain20",
    "cifar_resnet20",
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On 2 cores shared with other jobs, 2 OpenMP threads spin against each other: measured 0.9 s vs 0.015 s
    # for one ResNet-20 batch. One thread keeps this file fast and its timing stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **{"num_classes": 7, **kwargs})


def leaf_call_order(model: nn.Module, images: torch.Tensor) -> list[nn.Module]:
    calls: list[nn.Module] = []
    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [leaf.register_forward_hook(lambda module, args, out: calls.append(module)) for leaf in leaves]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return calls


# --------------------------------------------------------------------------------------------------------
# Registry: every model


def test_registry_has_the_required_models():
    assert set(REQUIRED) <= set(list_models())
    assert list_models("cifar_plain") == ["cifar_plain20", "cifar_plain32", "cifar_plain44", "cifar_plain56"]


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_metadata_and_dropout_placement(name):
    model = meta_model(name, dropout=0.3)
    info = model_info(name)
    assert (model.arch_name, model.family, model.default_resolution) == (
        info.name,
        info.family,
        info.resolution,
    )

    resolutions = {model.default_resolution, 64} | ({32} if model.default_resolution > 64 else set())
    model.eval()
    for resolution in sorted(resolutions):
        out = model(torch.empty(1, 3, resolution, resolution, device="meta"))
        assert out.shape == (1, 7), resolution

    # Train mode at 64 px, batch 2: BatchNorm needs > 1 value per channel even where the last map is 1x1.
    model.train()
    calls = leaf_call_order(model, torch.empty(2, 3, 64, 64, device="meta"))
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.3
    assert calls[-1] is get_classifier(model) and calls[-2] is dropouts[0], (
        "dropout must feed the final linear"
    )
    assert get_classifier(model).out_features == 7


@pytest.mark.parametrize("name", list_models())
def test_dropout_zero_leaves_no_dropout_layer(name):
    model = meta_model(name, dropout=0.0)
    assert not any(isinstance(module, nn.Dropout) for module in model.modules())


@pytest.mark.parametrize("name", FAMILY_SAMPLES)
def test_real_forward_and_backward_at_small_resolution(name):
    scaling = {"width_mult": 0.5} if name == "mobilenet_v2" else {}
    model = build_model(name, num_classes=5, **scaling).train()
    for resolution in (32, 64):
        out = model(torch.randn(2, 3, resolution, resolution))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert get_classifier(model).weight.grad is not None


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_state_dict_keys_stay_torchvision_s_so_imagenet_weights_load(name, dropout):
    with torch.device("meta"):
        reference = torchvision.models.get_model(name)  # the architecture only: no weights= here
    ours = meta_model(name, num_classes=1000, dropout=dropout).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_family_defaults_for_dropout_and_stochastic_depth():
    def dropout_p(model):
        return [module.p for module in model.modules() if isinstance(module, nn.Dropout)]

    assert dropout_p(meta_model("resnet50")) == []  # torchvision's ResNet has none
    assert dropout_p(meta_model("efficientnet_b7")) == [0.5]  # torchvision's per-variant default
    assert dropout_p(meta_model("mobilenet_v2")) == [0.2]

    def depth_probs(model):
        return [module.p for module in model.modules() if isinstance(module, StochasticDepth)]

    convnext = depth_probs(meta_model("convnext_tiny", stochastic_depth=0.3))
    assert convnext[0] == 0.0 and math.isclose(convnext[-1], 0.3)  # linear in depth, the last block gets it
    assert set(depth_probs(meta_model("efficientnet_b0", stochastic_depth=0.0))) == {0.0}
    assert max(depth_probs(meta_model("efficientnet_b0"))) > 0.15  # torchvision's default 0.2
    assert depth_probs(meta_model("resnet50")) == depth_probs(meta_model("cifar_resnet56")) == []


# --------------------------------------------------------------------------------------------------------
# Stochastic depth in the residual families torchvision builds without it (Huang et al. 2016)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block in depth order (MobileNetV2: all 17 inverted residuals, with and without a shortcut)."""
    if model.family == "mobilenet_v2":
        return list(model.features[1:-1])
    stages = (
        ("layer1", "layer2", "layer3", "layer4")
        if model.family == "resnet"
        else ("layer1", "layer2", "layer3")
    )
    return [block for stage in stages for block in getattr(model, stage)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20", "mobilenet_v2"])
def test_stochastic_depth_grows_linearly_with_depth_and_keeps_the_state_dict(name):
    model = meta_model(name, stochastic_depth=0.4)
    blocks = residual_blocks(model)
    expected = [
        0.4 * depth / len(blocks) if getattr(block, "use_res_connect", True) else None
        for depth, block in enumerate(blocks, start=1)
    ]
    assert [
        getattr(block, "stochastic_depth", None) and block.stochastic_depth.p for block in blocks
    ] == expected
    modules = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(modules) == sum(p is not None for p in expected) and {m.mode for m in modules} == {"row"}
    assert math.isclose(max(m.p for m in modules), 0.4 * (16 / 17 if name == "mobilenet_v2" else 1))

    # null: the family default, no StochasticDepth module anywhere, and the same state_dict either way.
    default = meta_model(name)
    assert not any(isinstance(m, StochasticDepth) for m in default.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()
    }
    if not name.startswith("cifar"):  # torchvision's own builder: same module tree, so its weights load
        with torch.device("meta"):
            reference = torchvision.models.get_model(name, num_classes=7)
        assert repr(default) == repr(reference)
        assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "mobilenet_v2"])
def test_stochastic_depth_drops_whole_residual_branches_per_sample_in_training_only(name):
    torch.manual_seed(0)
    scaling = {"width_mult": 0.25} if name == "mobilenet_v2" else {}
    model = build_model(name, num_classes=3, stochastic_depth=0.5, **scaling)
    images = torch.randn(16, 3, 32, 32)
    last = [block for block in residual_blocks(model) if hasattr(block, "stochastic_depth")][-1]
    p = last.stochastic_depth.p
    seen = {}
    handles = [
        last.register_forward_hook(lambda module, args, out: seen.update(block_in=args[0], block_out=out)),
        last.stochastic_depth.register_forward_hook(
            lambda module, args, out: seen.update(branch=args[0], dropped=out)
        ),
    ]
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(images)
        for handle in handles:
            handle.remove()
        torch.manual_seed(2)
        assert not torch.allclose(model(images), first)  # BatchNorm alone is deterministic: the drops differ

        # Row mode: each sample's branch is either zeroed or kept and scaled by 1 / (1 - p).
        kept = seen["dropped"].flatten(1).ne(0).any(dim=1)
        assert 0 < int(kept.sum()) < len(images)
        assert torch.allclose(seen["dropped"][kept], seen["branch"][kept] / (1 - p))
        assert not seen["dropped"][~kept].any()
        # ... and the block adds the shortcut (the identity here) to what is left.
        activation = nn.Identity() if name == "mobilenet_v2" else nn.ReLU()
        assert torch.allclose(seen["block_out"], activation(seen["block_in"] + seen["dropped"]))

        # Eval: deterministic and exactly the model without stochastic depth, with the same weights.
        model.eval()
        out = model(images)
        assert torch.equal(model(images), out)
        plain = build_model(name, num_classes=3, **scaling)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain.eval()(images), out)


def test_nets_without_residual_branches_refuse_stochastic_depth():
    from pipeline.config import ConfigError, DataConfig, ModelConfig, PretrainConfig
    from pipeline.pretrain import validate_model

    meta_model("cifar_resnet20", stochastic_depth=0.1)  # its residual twin takes it
    for name in ("cifar_plain20", "cifar_baseline10"):
        with pytest.raises(ValueError, match="stochastic_depth must be None.*no residual branches"):
            meta_model(name, stochastic_depth=0.1)
        cfg = PretrainConfig(
            data=DataConfig(train_manifest="unused", val_manifest="unused"),
            model=ModelConfig(name=name, stochastic_depth=0.0),
        )
        with pytest.raises(ConfigError, match="^model.stochastic_depth: .* no residual branches"):
            validate_model(cfg)


def test_bad_requests_fail_with_clear_messages():
    with pytest.raises(UnknownModelError, match="did you mean resnet50"):
        build_model("resnet5O", num_classes=10)
    with pytest.raises(ValueError, match="unknown scaling keyword.*width_multiplier.*accepted: width_mult"):
        build_model("mobilenet_v2", num_classes=10, width_multiplier=0.5)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_model("resnet18", num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match="shortcut must be"):
        build_model("cifar_resnet20", num_classes=10, shortcut="C")


def test_scaled_models_report_their_name_and_resolution():
    model = meta_model("mobilenet_v2", width_mult=0.5)
    assert model.arch_name == "mobilenet_v2_width_mult0.5" and model.default_resolution == 224
    info = model_info("efficientnet_compound", phi=1)
    assert info.name == "efficientnet_compound_phi1_alpha1.2_beta1.1_gamma1.15"
    assert info.resolution == round(224 * 1.15) == 258
    assert model_info("efficientnet_b2").resolution == 288  # torchvision's crop (the paper: 260)


# --------------------------------------------------------------------------------------------------------
# Published counts

# He et al. 2015, Table 6, as printed (millions, to the printed precision).
CIFAR_RESNET_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
# torchvision's weights metadata ("num_params", "_ops" = GMACs at 224 px), 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
}
TORCHVISION_GMACS = {
    "resnet18": 1.814,
    "resnet34": 3.664,
    "resnet50": 4.089,
    "mobilenet_v2": 0.301,
    "efficientnet_b0": 0.386,
    "efficientnet_b7": 37.746,  # at 600 px
    "convnext_tiny": 4.456,
    "convnext_base": 15.355,
}


@pytest.mark.parametrize("depth", sorted(CIFAR_RESNET_PARAMS_M))
def test_cifar_resnet_parameter_counts_equal_the_paper(depth):
    params = count_parameters(build_model(f"cifar_resnet{depth}", num_classes=10))
    published = CIFAR_RESNET_PARAMS_M[depth]
    decimals = 2 if published < 1 else 1
    assert round(params / 1e6, decimals) == published, params
    if depth <= 56:  # the plain twin has the same layers: option-A shortcuts have no parameters
        assert count_parameters(build_model(f"cifar_plain{depth}", num_classes=10)) == params


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_parameter_counts_equal_torchvision(name):
    assert count_parameters(meta_model(name, num_classes=1000)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_macs_match_torchvision_within_2_percent(name):
    model = meta_model(name, num_classes=1000)
    macs = count_macs(model, resolution=model.default_resolution)
    assert macs / 1e9 == pytest.approx(TORCHVISION_GMACS[name], rel=0.02)


def test_option_b_projects_only_where_the_shape_changes():
    model = build_model("cifar_resnet20", num_classes=10, shortcut="B")
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    extra = sum(p.numel() for m in projections for p in m.parameters()) + 2 * (32 + 64)  # + BatchNorm
    assert count_parameters(model) == count_parameters(build_model("cifar_resnet20", num_classes=10)) + extra
    assert model.arch_name == "cifar_resnet20_shortcutB"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plain_blocks_have_no_shortcut():
    # With the second BatchNorm of every block zeroed, a residual block passes its input on (ReLU of x >= 0)
    # and a plain block outputs zeros.
    images = torch.rand(2, 16, 8, 8)
    for name, passes_input in (("cifar_resnet20", True), ("cifar_plain20", False)):
        block = build_model(name, num_classes=10).layer1[0].eval()
        nn.init.zeros_(block.bn2.weight)
        with torch.no_grad():
            out = block(images)
        assert torch.equal(out, images) if passes_input else not out.any()


# --------------------------------------------------------------------------------------------------------
# Compound scaling


def test_compound_scaling_doubles_flops_per_unit_of_phi():
    alpha, beta = 1.2, 1.1
    gamma = math.sqrt(2 / (alpha * beta**2))  # alpha beta^2 gamma^2 = 2 exactly
    scaling = {"alpha": alpha, "beta": beta, "gamma": gamma}

    def macs(phi):
        model = meta_model("efficientnet_compound", num_classes=1000, phi=phi, **scaling)
        return count_macs(model, resolution=model.default_resolution)

    base = macs(0)
    assert base == count_macs(meta_model("efficientnet_b0", num_classes=1000), resolution=224)
    for phi in (1, 2):
        # Tolerance: torchvision rounds each stage's layer count up and channels to multiples of 8, so the
        # two 1-layer stages of B0 become 2 layers at phi=1. Measured: 2.59x at phi=1, 5.00x at phi=2.
        assert 2**phi <= macs(phi) / base <= 1.35 * 2**phi
    assert compound_multipliers(phi=2, **scaling) == (alpha**2, beta**2, round(224 * gamma**2))


# --------------------------------------------------------------------------------------------------------
# Fine-tuning utilities


def batchnorm_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        b.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for b in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "mobilenet_v2"])
def test_frozen_backbone_gets_no_gradient_and_keeps_its_batchnorm_statistics(name):
    model = build_model(name, num_classes=10, dropout=0.1)
    head = replace_classifier(model, 3)
    assert get_classifier(model) is head and head.out_features == 3
    freeze_backbone(model)
    set_train_mode(model)  # what the loop calls instead of model.train()
    before = batchnorm_state(model)

    model(torch.randn(4, 3, 32, 32)).logsumexp(dim=1).mean().backward()

    head_names = {f"{classifier_name(model)}.weight", f"{classifier_name(model)}.bias"}
    for param_name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (param_name in head_names), param_name
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_state(model), strict=True))
    assert model.training and isinstance(model.get_submodule(classifier_name(model)), nn.Linear)

    model.train()  # the pitfall set_train_mode exists for: plain train() lets frozen statistics move again
    model(torch.randn(4, 3, 32, 32))
    assert not all(torch.equal(a, b) for a, b in zip(before, batchnorm_state(model), strict=True))

    unfreeze_backbone(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "efficientnet_b0"])
def test_param_groups_split_head_backbone_and_decay(name):
    model = meta_model(name, dropout=0.2)
    groups = {g["name"]: g for g in param_groups(model, lr_head=1e-2, lr_backbone=1e-4, weight_decay=0.05)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter exactly once

    head = get_classifier(model)
    assert groups["head"]["params"] == [head.weight] and groups["head_no_decay"]["params"] == [head.bias]
    assert groups["head"]["lr"] == 1e-2 and groups["backbone"]["lr"] == 1e-4
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    norms = (nn.BatchNorm2d, nn.LayerNorm)
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    expected = {
        id(p)
        for m in model.modules()
        for n, p in m.named_parameters(recurse=False)
        if n == "bias" or isinstance(m, norms)
    }
    assert no_decay == expected - {id(head.bias)}

    freeze_backbone(model)
    frozen_groups = param_groups(model, lr_head=1e-2, lr_backbone=1e-4, weight_decay=0.05)
    assert [g["name"] for g in frozen_groups] == ["head", "head_no_decay"]


# --------------------------------------------------------------------------------------------------------
# Feature extraction (transfer learning beyond classification)

EXPECTED_STAGES = {
    "cifar_baseline10": [(32, 1), (64, 2), (128, 4)],
    "cifar_resnet20": [(16, 1), (32, 2), (64, 4)],
    "resnet50": [(256, 4), (512, 8), (1024, 16), (2048, 32)],
    "mobilenet_v2": [(24, 4), (32, 8), (96, 16), (1280, 32)],
    "efficientnet_b0": [(24, 4), (40, 8), (112, 16), (1280, 32)],
    "convnext_tiny": [(96, 4), (192, 8), (384, 16), (768, 32)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_STAGES))
def test_feature_stages_channels_and_strides(name):
    stages = feature_stages(meta_model(name, dropout=0.2))
    assert [(s.channels, s.stride) for s in stages] == EXPECTED_STAGES[name]
    assert [s.name for s in stages] == [f"stage{i}" for i in range(1, len(stages) + 1)]


def test_trained_classifier_as_detection_backbone():
    model = build_model("resnet18", num_classes=10).eval()
    backbone = build_feature_extractor(model, stages=[2, 3, 4])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = backbone(images)
        assert list(features) == ["stage2", "stage3", "stage4"]
        assert torch.equal(features["stage4"], model.layer4(model.layer3(features["stage2"])))
        channels = [s.channels for s in feature_stages(model)[1:]]
        pyramid = FeaturePyramidNetwork(channels, out_channels=64)(features)
    assert [tuple(t.shape) for t in pyramid.values()] == [(1, 64, 8, 8), (1, 64, 4, 4), (1, 64, 2, 2)]
    with pytest.raises(ValueError, match="stages 1..4"):
        build_feature_extractor(model, stages=[5])


# --------------------------------------------------------------------------------------------------------
# The DDP replica digest in every memory format the recipes use


@pytest.mark.parametrize("name", list_models())
def test_replica_digest_works_in_channels_last_and_keeps_bit_exactness(name):
    from pipeline.train.build import parameter_digest

    # Built on meta and materialized uninitialized: the digest only needs real storage, and 27 models'
    # random initializations (convnext_base: 88M parameters) would cost tens of seconds.
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for index, parameter in enumerate(model.parameters()):
            parameter.copy_(torch.linspace(-1, 1, parameter.numel()).view_as(parameter) + index)
    plain = parameter_digest(model)
    nhwc = model.to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in nhwc.parameters() if p.dim() == 4) or name.startswith("cifar")
    # The same values in another layout hash the same: a channels_last rank equals a contiguous one.
    assert parameter_digest(nhwc) == plain
    # One ulp anywhere changes it: the check stays bit-exact.
    last = list(nhwc.parameters())[-1]
    with torch.no_grad():
        last.view(-1)[0] = torch.nextafter(last.view(-1)[0], torch.tensor(float("inf")))
    assert parameter_digest(nhwc) != plain


def test_replica_digest_hashes_half_precision_weights_by_their_bits():
    from pipeline.train.build import parameter_digest

    model = build_model("resnet18", num_classes=3).to(memory_format=torch.channels_last)
    for dtype in (torch.bfloat16, torch.float16):
        low = model.to(dtype)
        digest = parameter_digest(low)
        with torch.no_grad():
            weight = low.conv1.weight
            weight[0, 0, 0, 0] = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(float("inf"), dtype=dtype))
        assert parameter_digest(low) != digest, dtype
