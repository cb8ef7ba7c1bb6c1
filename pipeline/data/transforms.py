"""Image transforms: JPEG bytes -> uint8 CHW tensors in loader workers, float normalization on the device.

Decoding with ``torchvision.io.decode_jpeg`` and augmenting uint8 tensors with transforms v2 is ~1.9x
faster per core than PIL (facts.md: ~850 vs ~450 img/s at 224 px). Batches leave the loader as uint8, which
is 4x less inter-process and host-to-device traffic than float32; ``normalize`` converts them on the device.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

if TYPE_CHECKING:
    from pipeline.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to crop / 0.875 before the center crop (224 <- 256) unless data.eval_resize
# says otherwise, as in the ImageNet reference recipes.
EVAL_CROP_FRACTION = 0.875

# torchvision 0.29 announces the move of image decoding to TorchCodec on every call; the API still works.
warnings.filterwarnings("ignore", message=".*[Dd]ecod.*TorchCodec.*")
warnings.filterwarnings("ignore", message=".*torchvision.io.*deprecated.*")


def decode(jpeg: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 tensor (3, H, W). Grayscale JPEGs become 3 channels."""
    data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB)


def decode_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG byte tensors -> uint8 tensors (3, H, W) on ``device``, in one call: nvJPEG's batched decode on
    CUDA (data.decode=gpu), libjpeg on the CPU. RuntimeError if any of them does not decode."""
    return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


class ImageDecodeError(ValueError):
    """Bytes that are no readable image (empty, truncated, another kind of file)."""


def decoder_message(error: Exception) -> str:
    """A decoder error's first sentence, without the C++ source location torchvision puts before it
    ("decode_jpeg, .../decode_jpeg.cpp:171, Not a JPEG file: ...")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^.*\.cpp:\d+,?\s*", "", text).split(". ")[0]


def decode_any(data: bytes) -> torch.Tensor:
    """Encoded image bytes of any common format -> uint8 RGB tensor (3, H, W).

    JPEG (grayscale and CMYK too), PNG (grayscale, palette, alpha), WebP and GIF go through torchvision's
    decoders, so a JPEG gives exactly the pixels the training loader's :func:`decode` gives; anything else
    Pillow opens (BMP, TIFF, ...) is converted by Pillow. Alpha is dropped, as training images have none.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        first = decoder_message(error)
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageDecodeError(f"not a readable image ({first[:120]})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


Augment = Literal["basic", "trivialaugment", "randaugment", "autoaugment", "augmix"]


def train_transform(
    resolution: int,
    *,
    augment: Augment = "basic",
    min_crop_scale: float = 0.08,
    randaugment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> v2.Transform:
    """RandomResizedCrop + flip, then the ``augment`` policy, then random erasing; all on uint8 tensors."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(resolution, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    policies: dict[str, v2.Transform] = {
        "trivialaugment": v2.TrivialAugmentWide(),
        "randaugment": v2.RandAugment(num_ops=2, magnitude=randaugment_magnitude),
        "autoaugment": v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
        "augmix": v2.AugMix(),
    }
    if augment != "basic":
        steps.append(policies[augment])
    if random_erasing > 0:
        # Erased pixels are 0 in uint8, i.e. black before normalization (torchvision's recipe erases after
        # normalization with 0, i.e. the mean colour; on this uint8 path that would need a per-channel fill).
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def batch_mixer(train_cfg, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a whole (images, labels) batch, one of them at random per batch; the labels
    come back as class probabilities. None when both are off. ``train_cfg``: a TrainConfig."""
    mixers: list[v2.Transform] = []
    if train_cfg.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=train_cfg.mixup_alpha, num_classes=num_classes))
    if train_cfg.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=train_cfg.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


@dataclass(frozen=True)
class EvalSizes:
    """Evaluation's preprocessing: the short side resized to ``resize`` pixels, then a centre crop of
    ``crop`` pixels."""

    resize: int
    crop: int


def eval_sizes(data: DataConfig) -> EvalSizes:
    """The one place that resolves a DataConfig's evaluation sizes (FixRes): crop = data.eval_crop or the
    training resolution, resize = data.eval_resize or crop / 0.875. Validation, the exported model's
    recorded preprocessing and so serving all take their sizes from here."""
    crop = data.eval_crop or data.resolution
    return EvalSizes(resize=data.eval_resize or round(crop / EVAL_CROP_FRACTION), crop=crop)


def eval_transform(sizes: EvalSizes) -> v2.Transform:
    """Evaluation's resize of the short side, then centre crop, on uint8 tensors."""
    return v2.Compose([v2.Resize(sizes.resize, antialias=True), v2.CenterCrop(sizes.crop)])


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in 0-255 units, built once per device: a fresh ``torch.tensor(..., device=cuda)`` every
    step is a synchronizing host-to-device copy."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(
    images: torch.Tensor, *, device: torch.device | str | None = None, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalized with ImageNet statistics, on ``device``."""
    images = images.to(device, non_blocking=True) if device is not None else images
    mean, std = _statistics(images.device)
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
