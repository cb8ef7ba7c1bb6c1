"""The published recipes' training techniques, each on its own: augmentation policies and random erasing in
the loader's transform, MixUp and CutMix on batches. In-process and small: each test fails without its
technique."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from pipeline.config import ConfigError, DataConfig, TrainConfig
from pipeline.data.transforms import batch_mixer, train_transform

POLICIES = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
    "autoaugment": v2.AutoAugment,
    "augmix": v2.AugMix,
}


def _images(count: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("augment", sorted(POLICIES))
def test_each_augmentation_policy_runs_after_crop_and_flip_and_changes_the_pixels(augment):
    policy = train_transform(32, augment=augment, min_crop_scale=0.5)
    basic = train_transform(32, augment="basic", min_crop_scale=0.5)
    assert any(isinstance(step, POLICIES[augment]) for step in policy.transforms)
    changed = 0
    for seed, image in enumerate(_images()):
        torch.manual_seed(seed)
        augmented = policy(image)
        torch.manual_seed(seed)  # the same crop and flip: only the policy differs
        plain = basic(image)
        assert augmented.dtype == torch.uint8 and augmented.shape == (3, 32, 32)
        changed += not torch.equal(augmented, plain)
    assert changed >= 4, f"{augment} changed {changed} of 8 images"


def test_random_erasing_blacks_out_one_rectangle_with_its_probability():
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    erasing = train_transform(32, min_crop_scale=1.0, random_erasing=0.5)
    torch.manual_seed(0)
    erased = [bool((erasing(white) == 0).all(dim=0).any()) for _ in range(200)]
    assert 0.35 < sum(erased) / len(erased) < 0.65, sum(erased)
    assert not any((train_transform(32, min_crop_scale=1.0)(white) == 0).any() for _ in range(20))


def test_mixup_mixes_images_and_labels_by_the_same_weight():
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    y = torch.arange(6)
    torch.manual_seed(0)
    mixed, soft = batch_mixer(TrainConfig(mixup_alpha=0.4), num_classes=6)(x, y)
    assert soft.shape == (6, 6) and torch.allclose(soft.sum(dim=1), torch.ones(6))
    # Image i is lam * x_i + (1 - lam) * x_j (each constant-valued here), and its label weights say the same.
    for i in range(6):
        weights = soft[i]
        assert torch.allclose(mixed[i], (weights * torch.arange(6.0)).sum().expand_as(mixed[i]), atol=1e-5)
    assert not torch.equal(mixed, x)


def test_cutmix_pastes_a_box_and_weights_labels_by_its_area():
    x = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])
    y = torch.arange(4)
    torch.manual_seed(1)
    mixed, soft = batch_mixer(TrainConfig(cutmix_alpha=1.0), num_classes=4)(x, y)
    for i in range(4):
        values, counts = mixed[i, 0].unique(return_counts=True)
        area = dict(zip(values.long().tolist(), (counts / 256).tolist(), strict=True))
        assert set(area) <= {0, 1, 2, 3} and len(area) <= 2, "pixels come from two images only"
        for label, fraction in area.items():
            assert soft[i, label] == pytest.approx(fraction, abs=1e-6), (i, area, soft[i])


def test_with_both_each_batch_takes_one_of_them_and_neither_is_off():
    both = batch_mixer(TrainConfig(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=4)
    assert isinstance(both, v2.RandomChoice)
    assert {type(t) for t in both.transforms} == {v2.MixUp, v2.CutMix}
    assert batch_mixer(TrainConfig(), num_classes=4) is None


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: DataConfig(random_erasing=1.0), "data.random_erasing: must be a probability in [0, 1)"),
        (lambda: DataConfig(randaugment_magnitude=31), "data.randaugment_magnitude: must be in [0, 30]"),
        (lambda: TrainConfig(mixup_alpha=-0.1), "train.mixup_alpha: must be >= 0"),
        (lambda: TrainConfig(cutmix_alpha=-1), "train.cutmix_alpha: must be >= 0"),
    ],
)
def test_bad_technique_settings_name_the_field(build, message):
    with pytest.raises(ConfigError) as error:
        build()
    assert message in str(error.value)


# FixRes (Touvron et al.): evaluation at its own resize and centre crop, training at data.resolution.
FIXRES = dict(resolution=16, eval_crop=24, eval_resize=28, batch_size_per_worker=4, loader_workers=0)


def _first_val_sample(manifest) -> tuple[bytes, torch.Tensor]:
    """The val split's first sample: its JPEG bytes, and its image as the validation loader gives it."""
    from pipeline.data.loader import build_loader, read_samples

    images, _ = next(iter(build_loader(manifest, DataConfig(**FIXRES), train=False)))
    assert images.shape == (4, 3, 24, 24), "validation batches have the eval crop"
    return next(read_samples(manifest.shard_urls()[:1]))["jpg"], images[0]


def test_fixres_validates_at_the_eval_resize_and_crop_and_trains_at_the_resolution(toy_pretrain_manifests):
    from pipeline.data.loader import build_loader
    from pipeline.data.manifest import load_manifest
    from pipeline.data.transforms import EvalSizes, decode, eval_sizes

    assert eval_sizes(DataConfig(**FIXRES)) == EvalSizes(resize=28, crop=24)
    assert eval_sizes(DataConfig(resolution=16, eval_crop=24)) == EvalSizes(resize=27, crop=24)  # 24 / 0.875
    assert eval_sizes(DataConfig(resolution=16)) == EvalSizes(resize=18, crop=16), "null: as before FixRes"
    jpeg, validated = _first_val_sample(load_manifest(toy_pretrain_manifests["val"]))
    by_hand = v2.CenterCrop(24)(v2.Resize(28, antialias=True)(decode(jpeg)))  # 32 px -> 28 -> 24
    assert torch.equal(validated, by_hand)
    train = build_loader(load_manifest(toy_pretrain_manifests["train"]), DataConfig(**FIXRES), train=True)
    images, _ = next(iter(train))
    assert images.shape == (4, 3, 16, 16), "training keeps data.resolution"


def test_the_exported_model_serves_with_the_eval_sizes_validation_used(toy_pretrain_manifests):
    from types import SimpleNamespace

    from pipeline.config import ModelConfig, PretrainConfig
    from pipeline.data.manifest import load_manifest
    from pipeline.predictor import Predictor
    from pipeline.publish import export_payload
    from pipeline.train.build import build_classifier

    manifest = load_manifest(toy_pretrain_manifests["val"])
    cfg = PretrainConfig(
        data=DataConfig(train_manifest="unused", val_manifest="unused", **FIXRES),
        model=ModelConfig(name="cifar_resnet20"),
    )
    model = build_classifier(cfg.model, num_classes=manifest.num_classes)
    validated = SimpleNamespace(num_classes=manifest.num_classes, train_manifest=manifest)
    payload = export_payload({"model": model.state_dict()}, cfg, validated)
    spec = payload["model_config"]["preprocessing"]
    assert (spec["resize_short_side"], spec["center_crop"]) == (28, 24)
    jpeg, validated_image = _first_val_sample(manifest)
    predictor = Predictor.from_payload(payload, device="cpu")
    assert torch.equal(predictor.preprocess(jpeg), validated_image), "served = validated preprocessing"
    [row] = predictor.predict_bytes([jpeg])
    assert row["error"] is None and row["label"] in manifest.classes, "the net takes the larger eval crop"
