"""Exponential moving average (EMA) of the weights and buffers, as torchvision's reference recipes keep it.

Built on ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (foreach lerp over all
tensors at once). ``use_buffers=True``: BatchNorm's running statistics are averaged too, so the EMA model
evaluates with statistics that match its averaged weights (torchvision does the same).

torchvision's recipe (``--model-ema --model-ema-steps 32 --model-ema-decay 0.99998``):

* the decay is given for one sample; an update every ``k`` steps of a global batch ``B`` over ``E``
  epochs uses ``alpha = min(1, (1 - decay) * B * k / E)`` and ``decay' = 1 - alpha``. A larger batch or
  rarer updates average over fewer, larger moves, so each update must weigh more; fewer epochs likewise.
* during warm-up the average is reset after every update (``n_averaged = 0``), so it copies the weights:
  the first, random-init-dominated weights would otherwise linger in the average for thousands of steps.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import EmaConfig


def ema_decay(cfg: EmaConfig, *, global_batch_size: int, epochs: int) -> float:
    """The per-update decay from torchvision's per-sample ``decay`` (see the module docstring)."""
    alpha = min(1.0, (1.0 - cfg.decay) * global_batch_size * cfg.every_steps / epochs)
    return 1.0 - alpha


def build_ema(model: nn.Module, *, decay: float) -> AveragedModel:
    """An EMA copy of the plain (unwrapped) ``model`` on its device; ``.module`` is the averaged network."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def update_ema(ema: AveragedModel, model: nn.Module, *, in_warmup: bool) -> None:
    """Fold the current weights into the average; during warm-up the average only tracks them."""
    ema.update_parameters(model)
    if in_warmup:
        ema.n_averaged.fill_(0)


__all__ = ["build_ema", "ema_decay", "update_ema"]
