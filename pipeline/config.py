"""The typed config tree and its loading from YAML recipes plus ``key=value`` overrides.

This module owns the one place where untyped input (YAML, argv) becomes typed config. It imports no torch,
Ray or MLflow, so a bad recipe is rejected in milliseconds, before any cluster resource is taken.

Each component has a small frozen dataclass; every field carries a one-line docstring (the string literal
under it) and choices are ``Literal[...]``. ``load_config`` checks unknown keys (with a "did you mean"),
types and ranges, and raises :class:`ConfigError` naming the dotted field and how to fix it. Jobs turn that
into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range. The message names the field."""


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are built from them."""

    train_manifest: str = ""
    """URL of the training split's manifest.json: a local path or s3://bucket/prefix/manifest.json."""
    val_manifest: str = ""
    """URL of the validation split's manifest.json (same forms as train_manifest)."""
    resolution: int = 64
    """Side of the square random crop fed to the network in training, in pixels (torchvision's
    train_crop_size)."""
    eval_crop: int | None = None
    """Side of evaluation's centre crop; null = resolution. FixRes (Touvron et al.): evaluating at a larger
    crop than training's random crop (176 px train, 224 px eval in torchvision's ResNet-50 V2 recipe) makes
    apparent object sizes agree between train and test."""
    eval_resize: int | None = None
    """Evaluation resizes the short side to this before the centre crop; null = eval_crop / 0.875 (e.g. 256
    for 224). torchvision's ResNet-50 V2 recipe uses 232 for a 224 crop."""
    repeated_augment: int = 1
    """Repeated augmentation (Hoffer et al.; torchvision's --ra-reps 4): each training sample appears this
    many times per epoch, each copy with its own augmentation and spread over the ranks, while the epoch
    keeps its length (so it covers 1/k of the distinct samples, and k consecutive epochs sweep the data
    about once); 1 disables it."""
    batch_size_per_worker: int = 64
    """Samples per batch on each training worker (rank); the global batch is this times the world size."""
    loader_workers: int = 2
    """DataLoader worker processes per rank; 0 decodes in the training process."""
    shuffle_buffer: int = 2000
    """Samples held in the in-stream shuffle buffer of each loader worker."""
    augment: Literal["basic", "trivialaugment", "randaugment", "autoaugment", "augmix"] = "basic"
    """Training augmentation after RandomResizedCrop+flip: basic adds nothing; trivialaugment
    (TrivialAugmentWide, torchvision's ResNet-50 and ConvNeXt recipes), randaugment (2 ops at
    randaugment_magnitude), autoaugment (the ImageNet policy) or augmix (torchvision's v2 transforms)."""
    randaugment_magnitude: int = 9
    """augment=randaugment: magnitude of each op, 0-30 (9 in Cubuk et al.'s ImageNet setting)."""
    random_erasing: float = 0.0
    """Probability of erasing one random rectangle of each training image, after the other augmentations
    (Zhong et al.; 0.1 in torchvision's ResNet-50 recipe); 0 disables it."""
    min_crop_scale: float = 0.25
    """Lower bound of RandomResizedCrop's area fraction (0.08 in the ImageNet recipe; larger for tiny images)."""
    oversample: bool = False
    """Class-balanced sampling with replacement in the training stream (for imbalanced data)."""
    verify_shards: Literal["size", "checksum", "off"] = "size"
    """Checked against the manifests before any resource is taken: each shard's size (one stat per shard),
    also its sha256 (checksum: reads every byte once), or nothing (off)."""
    backend: Literal["webdataset", "ray_data"] = "webdataset"
    """How training batches reach the workers. webdataset: each worker's own loader reads, decodes and
    augments its shards (no spare CPUs needed, reproducible from data.seed). ray_data: Ray Data CPU tasks,
    on any node with CPUs, read, decode and augment, and Ray Train streams each worker its share: for GPU
    nodes short of decode cores. Evaluation reads its shards with the webdataset loader either way."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where JPEGs are decoded and augmented. cpu: in the loader workers (the default). gpu: the workers only
    read tar bytes; each training worker decodes its whole batch with nvJPEG
    (``torchvision.io.decode_jpeg(device="cuda")``) and runs the same crop, flip and augmentation on the GPU,
    for nodes with too few cores per GPU to decode at the GPU's pace. Needs scaling.use_gpu."""
    on_corrupt: Literal["fail", "skip"] = "fail"
    """A sample that cannot be read in a run (an undecodable image, a damaged tar member): fail ends the run at
    once with one line naming the shard (it is not retried as a worker fault: a rerun would meet it again);
    skip drops it, counts it in the epoch's ``data/skipped`` metric and warns about the first few, up to
    ``max_corrupt_fraction``. A damaged tar header loses the rest of its shard, counted from the manifest."""
    max_corrupt_fraction: float = 0.001
    """on_corrupt=skip: the most samples each loader slot (a rank's DataLoader worker) may skip per epoch, as a
    fraction of the samples it is to deliver; beyond it the run ends as under fail (a whole broken shard is a
    data problem to fix, not to train around)."""
    seed: int = 0
    """Base seed of shard order and sample shuffling; epoch e uses seed + e."""
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] = "fork"
    """Start method of DataLoader workers; spawn/forkserver are safe when the parent holds threads."""

    def __post_init__(self) -> None:
        _check(self.resolution >= 8, "data.resolution", f"must be >= 8 pixels, got {self.resolution}")
        _check(
            self.eval_crop is None or self.eval_crop >= 8,
            "data.eval_crop",
            f"must be >= 8 pixels or null (= resolution), got {self.eval_crop}",
        )
        _check(
            self.eval_resize is None or self.eval_resize >= (self.eval_crop or self.resolution),
            "data.eval_resize",
            f"must be >= the eval crop ({self.eval_crop or self.resolution}) or null, got {self.eval_resize}",
        )
        _check(
            self.repeated_augment >= 1,
            "data.repeated_augment",
            f"must be an integer >= 1 (1: off), got {self.repeated_augment}",
        )
        _check(
            self.batch_size_per_worker > 0,
            "data.batch_size_per_worker",
            f"must be a positive integer, got {self.batch_size_per_worker}",
        )
        _check(self.loader_workers >= 0, "data.loader_workers", f"must be >= 0, got {self.loader_workers}")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _check(
            0.0 < self.min_crop_scale <= 1.0,
            "data.min_crop_scale",
            f"must be in (0, 1], got {self.min_crop_scale}",
        )
        _check(
            0 <= self.randaugment_magnitude <= 30,
            "data.randaugment_magnitude",
            f"must be in [0, 30], got {self.randaugment_magnitude}",
        )
        _check(
            0.0 < self.max_corrupt_fraction < 1.0,
            "data.max_corrupt_fraction",
            f"must be in (0, 1), got {self.max_corrupt_fraction}",
        )
        _check(
            0.0 <= self.random_erasing < 1.0,
            "data.random_erasing",
            f"must be a probability in [0, 1), got {self.random_erasing}",
        )


@dataclass(frozen=True)
class ToyConfig:
    """The embedded dataset generated by ``pipeline.data.toy`` (no download)."""

    root: str = ".cache/toy"
    """Directory that receives pretrain/{train,val}/<class>/*.jpg and downstream/{train,val}/<class>/*.jpg."""
    difficulty: Literal["standard", "easy"] = "standard"
    """standard: clutter, distractor shapes, occluders, sensor noise and multi-colour textures (learnable,
    not solved in a few CPU epochs); easy: the same outlines larger, on a plain background, without clutter
    or occlusion and with little noise, so a small CNN fits it within a few hundred CPU steps (for
    experiments whose claim needs a network that converges on 2 cores)."""
    seed: int = 0
    """Generation seed: the same seed gives byte-identical JPEGs."""
    image_size: int = 64
    """Side of the generated square images, in pixels."""
    pretrain_train_per_class: int = 300
    """Training images per class of the pretrain task."""
    pretrain_val_per_class: int = 60
    """Validation images per class of the pretrain task."""
    downstream_classes: int = 4
    """Number of classes of the downstream task (2-5)."""
    downstream_train_max: int = 200
    """Training images of the largest downstream class."""
    downstream_imbalance: float = 10.0
    """Ratio between the largest and smallest downstream class in the training split."""
    downstream_val_per_class: int = 50
    """Validation images per downstream class (balanced, so per-class recall is measurable)."""

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "toy.image_size", f"must be >= 16 pixels, got {self.image_size}")
        _check(self.pretrain_train_per_class >= 1, "toy.pretrain_train_per_class", "must be >= 1")
        _check(self.pretrain_val_per_class >= 1, "toy.pretrain_val_per_class", "must be >= 1")
        _check(2 <= self.downstream_classes <= 5, "toy.downstream_classes", "must be between 2 and 5")
        _check(self.downstream_imbalance >= 1.0, "toy.downstream_imbalance", "must be >= 1 (max/min ratio)")
        _check(self.downstream_train_max >= 1, "toy.downstream_train_max", "must be >= 1")
        _check(self.downstream_val_per_class >= 1, "toy.downstream_val_per_class", "must be >= 1")


@dataclass(frozen=True)
class ShardConfig:
    """How the embedded demo converts its folder trees into shards."""

    dest: str = ".cache/shards"
    """Local directory or s3://bucket/prefix receiving <task>/<split>/shard-*.tar and manifest.json."""
    samples_per_shard: int = 500
    """Samples per tar shard (ImageNet: ~1000-2000 so shards are 100-200 MB)."""
    workers: int = 2
    """Parallel conversion processes."""


@dataclass(frozen=True)
class DataDemoConfig:
    """Recipe of the data demo: generate the embedded data, shard it, stream one epoch."""

    toy: ToyConfig = field(default_factory=ToyConfig)
    """The embedded dataset."""
    shards: ShardConfig = field(default_factory=ShardConfig)
    """Shard writing."""
    data: DataConfig = field(default_factory=DataConfig)
    """Streaming (the manifests are filled in by the demo from shards.dest)."""


# --------------------------------------------------------------------------------------------------------
# Loading

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a config dataclass's fields (the string literal under each field), for help and docs."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where no information is lost."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, name)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, name, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{name}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        _check(isinstance(value, list | tuple), name, f"expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        _key_tp, value_tp = typing.get_args(tp) or (str, Any)
        return {key: _coerce(item, value_tp, f"{name}.{key}") for key, item in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            name,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            name,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp!r} for {name}")


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_field_default(cls: type, key: str, value: Any) -> Any:
    """A partial mapping for a section whose default is not the section class's own defaults (e.g. a
    log-uniform weight_decay space) changes that default, instead of starting from the class defaults."""
    spec = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    if not isinstance(value, dict) or spec is None or spec.default_factory is dataclasses.MISSING:
        return value
    default = spec.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return deep_merge(dataclasses.asdict(default), value)


def _build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _coerce(_with_field_default(cls, key, value), hints[key], dotted)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    except ConfigError as err:
        # A section checks itself under its usual name ("early_stopping.patience"); when it sits deeper in
        # the tree, name the field by its full dotted path ("train.early_stopping.patience").
        name, _, message = str(err).partition(": ")
        if prefix and not name.startswith(prefix):
            raise ConfigError(f"{prefix}.{name.rsplit('.', 1)[-1]}: {message}") from None
        raise


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2's scalars where PyYAML's YAML 1.1 surprises: ``5e-4`` is a number (1.1: a string), and only
    true/false are booleans (1.1 also reads on/off/yes/no, so ``train.amp=off`` became False)."""


# Drop YAML 1.1's bool resolver (it claims y/n/yes/no/on/off too) and put YAML 1.2's back.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so 5e-4 is a float and true a bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.batch_size_per_worker=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: the key must be a dotted field name like optim.lr")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a plain dict tree (a copy); unknown keys are caught later by the types."""
    import copy

    merged = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass --config with a YAML recipe from configs/"
        )
    try:
        tree = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: invalid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
    return tree


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build the typed config ``cls`` from a YAML recipe and dotted ``key=value`` overrides."""
    tree = read_yaml(path) if path is not None else {}
    return _build(cls, merge_overrides(tree, overrides or []))


def from_dict(cls: type[T], tree: dict[str, Any]) -> T:
    """Rebuild (and re-validate) a typed config from :func:`to_dict` output, e.g. inside a Ray worker."""
    return _build(cls, tree)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, e.g. to log as params or write back as YAML."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def replace_fields(config: T, **changes: Any) -> T:
    """A copy of a frozen config with some fields changed, validated again by ``__post_init__``."""
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, regularization and learning-rate schedule of a training run."""

    name: Literal["sgd", "adamw", "adam"] = "sgd"
    """Optimizer: sgd (with momentum), adamw (decoupled weight decay) or adam (only with regularization=l2)."""
    lr: float = 0.1
    """Peak learning rate at reference_batch_size; the run uses lr * global_batch_size / reference_batch_size."""
    momentum: float = 0.9
    """SGD momentum (ignored by adam/adamw, which use their default betas 0.9/0.999)."""
    nesterov: bool = False
    """Nesterov momentum (sgd with momentum > 0 only)."""
    weight_decay: float = 5e-4
    """Decay strength delta in [0, 1); never applied to biases and normalization parameters."""
    regularization: Literal["weight_decay", "l2"] = "weight_decay"
    """weight_decay: the optimizer shrinks w (decoupled for adamw); l2: delta/2*||w||^2 is added to the loss."""
    schedule: Literal["cosine", "step", "multistep", "exponential", "constant"] = "cosine"
    """Learning-rate schedule after warm-up: cosine (to 0 at the end), step (x step_gamma every step_size
    epochs), multistep (x step_gamma at each of step_milestones), exponential (x exponential_gamma per
    epoch) or constant."""
    schedule_unit: Literal["step", "epoch"] = "step"
    """How often the lr changes: step = after every optimizer step (a smooth cosine, exponential and warm-up
    ramp), epoch = only at epoch boundaries, as torchvision's recipes step their schedulers."""
    warmup_epochs: int = 0
    """Epochs of warm-up before the schedule (Goyal et al. use 5 for large batches); 0: none."""
    warmup_method: Literal["linear", "constant"] = "linear"
    """linear: the lr ramps from warmup_factor x peak to the peak; constant: it stays at warmup_factor x
    peak for the whole warm-up (He et al.'s ResNet-110 warm-up at 0.1 x)."""
    warmup_factor: float = 0.01
    """Fraction of the peak lr where warm-up starts (linear) or stays (constant); torchvision's
    lr_warmup_decay."""
    step_size: int = 30
    """schedule=step: epochs between two multiplications by step_gamma (torchvision's lr_step_size)."""
    step_milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    """Epochs (counted from the start of training) at which schedule=multistep multiplies the lr by
    step_gamma."""
    step_gamma: float = 0.1
    """Factor applied to the learning rate by schedule=step and schedule=multistep."""
    exponential_gamma: float = 0.98
    """schedule=exponential: factor applied to the learning rate after every epoch (0.98 in MobileNetV2's
    recipe)."""
    reference_batch_size: int = 256
    """Global batch size at which lr is given (linear scaling rule)."""
    grad_clip_norm: float | None = None
    """Clip the global gradient L2 norm to this value before each step; null disables clipping."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing in [0, 1)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay for fine-tuning (Clark et al., BEiT): the lr of a block at depth d of L is
    lr x layer_decay^(L - d), so early, generic features move least and the head at full lr; 1: off."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(
            0.0 < self.layer_decay <= 1.0,
            "optim.layer_decay",
            f"must be in (0, 1] (1: off; 0.65-0.9 usual), got {self.layer_decay}",
        )
        _check(
            0.0 < self.warmup_factor <= 1.0,
            "optim.warmup_factor",
            f"must be in (0, 1], got {self.warmup_factor}",
        )
        _check(self.step_size >= 1, "optim.step_size", f"must be >= 1 epoch, got {self.step_size}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(
            not self.nesterov or (self.name == "sgd" and self.momentum > 0),
            "optim.nesterov",
            "needs name=sgd and momentum > 0",
        )
        _check(
            0.0 <= self.weight_decay < 1.0,
            "optim.weight_decay",
            f"must be in [0, 1) (usually 1e-4 to 1e-2), got {self.weight_decay}",
        )
        # Adam rescales every gradient coordinate by its running RMS, so an L2 gradient delta*w is normalized
        # away (the lecture's "undesirable behavior"); decoupled decay is AdamW. Keep the names honest.
        _check(
            not (self.name == "adam" and self.regularization == "weight_decay"),
            "optim.regularization",
            "name=adam has no decoupled weight decay; use name=adamw, or regularization=l2 for Adam+L2",
        )
        _check(
            not (self.name == "adamw" and self.regularization == "l2"),
            "optim.regularization",
            "adamw is decoupled weight decay by definition; use name=adam for Adam+L2",
        )
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(
            all(m > 0 for m in self.step_milestones)
            and all(a < b for a, b in zip(self.step_milestones, self.step_milestones[1:], strict=False)),
            "optim.step_milestones",
            f"must be increasing positive epochs, got {self.step_milestones}",
        )
        _check(
            self.schedule != "multistep" or all(m > self.warmup_epochs for m in self.step_milestones),
            "optim.step_milestones",
            f"must all lie after warm-up (warmup_epochs={self.warmup_epochs}), got {self.step_milestones}",
        )
        # schedule=step once meant milestones; a recipe from then would silently decay every step_size epochs.
        _check(
            self.schedule != "step" or self.step_milestones == [30, 60, 80],
            "optim.step_milestones",
            "belong to schedule=multistep; schedule=step multiplies the lr every step_size epochs",
        )
        _check(0.0 < self.step_gamma <= 1.0, "optim.step_gamma", f"must be in (0, 1], got {self.step_gamma}")
        _check(
            0.0 < self.exponential_gamma <= 1.0,
            "optim.exponential_gamma",
            f"must be in (0, 1], got {self.exponential_gamma}",
        )
        _check(
            self.reference_batch_size > 0,
            "optim.reference_batch_size",
            f"must be > 0, got {self.reference_batch_size}",
        )
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            "optim.grad_clip_norm",
            f"must be > 0 or null, got {self.grad_clip_norm}",
        )
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "optim.label_smoothing",
            f"must be in [0, 1), got {self.label_smoothing}",
        )


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop training when a validation metric has not improved for ``patience`` epochs."""

    metric: Literal["val/top1", "val/top5", "val/loss", "val/balanced_acc", "val/macro_f1"] = "val/top1"
    """Validation metric watched (the names the training loop logs)."""
    mode: Literal["max", "min"] = "max"
    """max: larger is better (accuracy); min: smaller is better (loss)."""
    patience: int = 5
    """Epochs without improvement after which training stops (the lecture's e; use e > 1)."""
    min_delta: float = 0.0
    """An epoch improves only if it beats the best value by more than this amount."""
    enabled: bool = True
    """false: the best value is still tracked but training never stops early."""

    def __post_init__(self) -> None:
        _check(
            isinstance(self.patience, int) and self.patience >= 1,
            "early_stopping.patience",
            f"must be an integer >= 1, got {self.patience}",
        )
        _check(self.min_delta >= 0, "early_stopping.min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average (EMA) of weights and buffers, as in torchvision's recipes."""

    enabled: bool = False
    """Keep an EMA copy of the model, evaluated every epoch beside the raw one (val_ema/... metrics)."""
    decay: float = 0.99998
    """Per-sample-normalized decay (torchvision's model_ema_decay); the per-update decay is
    1 - (1 - decay) x global_batch x every_steps / epochs, as torchvision adjusts it."""
    every_steps: int = 32
    """Update the average every this many optimizer steps (torchvision's model_ema_steps)."""
    select: Literal["raw", "ema"] = "raw"
    """Which model early stopping watches and whose best weights are exported and registered."""

    def __post_init__(self) -> None:
        _check(0.0 < self.decay < 1.0, "train.ema.decay", f"must be in (0, 1), got {self.decay}")
        _check(self.every_steps >= 1, "train.ema.every_steps", f"must be >= 1, got {self.every_steps}")
        _check(
            self.select == "raw" or self.enabled,
            "train.ema.select",
            "ema needs train.ema.enabled: true",
        )


@dataclass(frozen=True)
class TrainConfig:
    """The epoch loop: length, early stopping and the speed switches."""

    epochs: int = 90
    """Maximum number of epochs (early stopping may end sooner)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """When to stop and which metric picks the best epoch, whose weights are restored at the end."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision: bf16 autocast; fp16 autocast with a GradScaler (loss scaling, for GPUs without
    bf16); auto = bf16 on a CUDA GPU that supports it, fp16 on one that does not, off on CPU."""
    channels_last: bool = False
    """NHWC memory format: faster convolutions on tensor-core GPUs; usually slower on CPU."""
    compile: bool = False
    """torch.compile the model (minutes of compilation; pays off on long GPU runs). The DDP-wrapped model is
    compiled, as PyTorch documents for DDP: Dynamo's DDPOptimizer then splits the graph at DDP's gradient
    buckets, so all-reduces still overlap the backward pass (a model compiled inside DDP is one graph whose
    gradients are all ready at once)."""
    sanity_val_batches: int = 2
    """Validation batches run before the first epoch, so a broken evaluation fails in seconds."""
    progress_interval_s: float = 30.0
    """Seconds between in-epoch progress lines (step, loss, img/s) and step-loss points in MLflow; 0: none."""
    seed: int = 0
    """Seed of model initialization and of everything not seeded by the data config."""
    mixup_alpha: float = 0.0
    """MixUp (Zhang et al.): each training batch mixed with its own permutation, weight ~ Beta(alpha, alpha),
    labels mixed alike; 0 disables it (0.2 in torchvision's ResNet-50 recipe)."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al.): a Beta(alpha, alpha)-sized box pasted from the permuted batch, labels mixed by
    area; 0 disables it (1.0 in torchvision's recipe). With both set, each batch takes one at random."""
    ema: EmaConfig = field(default_factory=lambda: EmaConfig())
    """Exponential moving average of the weights, evaluated beside the raw model."""
    accumulate_steps: int = 1
    """Gradient accumulation: one optimizer step per this many batches, so the effective global batch (and
    the linearly scaled lr) is batch_size_per_worker x workers x accumulate_steps; 1: off."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm under DDP, so statistics are over the global batch (small
    per-GPU batches); no effect with one worker."""

    @property
    def watched_metric(self) -> str:
        """The metric that picks the best epoch: early_stopping.metric, of the EMA model when it is selected
        (val/top1 -> val_ema/top1)."""
        metric = self.early_stopping.metric
        return metric.replace("val/", "val_ema/", 1) if self.ema.select == "ema" else metric

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(
            self.accumulate_steps >= 1,
            "train.accumulate_steps",
            f"must be an integer >= 1 (1: off), got {self.accumulate_steps}",
        )
        _check(self.mixup_alpha >= 0, "train.mixup_alpha", f"must be >= 0 (0: off), got {self.mixup_alpha}")
        _check(
            self.cutmix_alpha >= 0, "train.cutmix_alpha", f"must be >= 0 (0: off), got {self.cutmix_alpha}"
        )
        _check(self.sanity_val_batches >= 0, "train.sanity_val_batches", "must be >= 0")
        _check(self.progress_interval_s >= 0, "train.progress_interval_s", "must be >= 0 seconds (0: off)")


@dataclass(frozen=True)
class ModelConfig:
    """Which registered architecture to build (``pipeline.models``) and its regularization knobs."""

    name: str = "cifar_resnet20"
    """Registered architecture, e.g. cifar_resnet20, resnet50, mobilenet_v2, efficientnet_b0, convnext_tiny."""
    num_classes: int | None = None
    """Output classes; null takes the training manifest's class count (a mismatch with it is an error)."""
    dropout: float | None = None
    """Dropout probability before the final linear layer in [0, 1); null keeps the family's default."""
    stochastic_depth: float | None = None
    """Final block's drop-path probability, residual nets only (docs/models.md); null: the family default."""
    scaling: dict[str, Any] = field(default_factory=dict)
    """Family scaling knobs, e.g. {width_mult: 0.5} (MobileNetV2), {phi: 1} (efficientnet_compound)."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must name a registered architecture (see docs/models.md)")
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "model.num_classes",
            f"must be >= 2 or null (from the manifest), got {self.num_classes}",
        )
        _check(
            self.dropout is None or 0.0 <= self.dropout < 1.0,
            "model.dropout",
            f"must be in [0, 1) or null, got {self.dropout}",
        )
        _check(
            self.stochastic_depth is None or 0.0 <= self.stochastic_depth < 1.0,
            "model.stochastic_depth",
            f"must be in [0, 1) or null, got {self.stochastic_depth}",
        )


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how the run is recorded in MLflow (rank 0 only)."""

    uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else the local sqlite store .cache/mlflow/mlflow.db;
    "none" turns tracking off."""
    experiment: str = "pretrain"
    """MLflow experiment name (created if missing)."""
    run_name: str | None = None
    """MLflow run name; null uses the checkpoint run name."""
    required: bool = True
    """true: an unreachable tracking server is an error; false: warn and train untracked."""
    register_as: str | None = None
    """Registered-model name the best weights are registered under; null skips registration."""
    alias: str = "champion"
    """Alias moved to the new version when it beats the current holder on the monitored metric."""
    system_metrics: bool = True
    """Log the training node's CPU, memory and GPU figures once per epoch, under MLflow's system-metric names
    (the UI's System metrics tab); sampled by rank 0 on its own node, not by the driver."""


@dataclass(frozen=True)
class ScalingConfig:
    """How many training workers (DDP ranks) Ray Train starts, and what each one gets."""

    num_workers: int = 2
    """DDP ranks (one per GPU with use_gpu=true); 0 trains in the job's own process (Ray Train's local
    mode: no Ray actors, no restarts, checkpoints kept only for the export): for debugging a recipe."""
    use_gpu: bool = False
    """One GPU per worker, nccl backend and bf16 autocast (train.amp=auto); false: CPU workers with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker; size it to data.loader_workers + 1 on GPU nodes."""
    shared_paths: list[str] = field(default_factory=list)
    """Local directories every node of the cluster mounts (NFS, EFS, FSx): checkpoint, search and manifest
    paths under them are accepted on a multi-node cluster, where other local paths are refused."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "scaling.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(
            not (self.num_workers == 0 and self.use_gpu),
            "scaling.use_gpu",
            "needs Ray workers (scaling.num_workers >= 1); num_workers=0 runs in the job's process on CPU",
        )
        _check(
            self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}"
        )

    @property
    def world_size(self) -> int:
        """Training processes: num_workers, or the job's own process in local mode (num_workers=0)."""
        return max(1, self.num_workers)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where Ray Train writes per-epoch checkpoints and how a failure is recovered."""

    storage_path: str | None = None
    """s3://bucket/prefix or a local directory (made absolute); null: $PIPELINE_STORAGE_ROOT/checkpoints,
    else .cache/ray_results. On a multi-node cluster a local path must lie under scaling.shared_paths."""
    name: str | None = None
    """Run directory under storage_path; null: pretrain-<model.name>. Deterministic, so --resume finds it."""
    num_to_keep: int = 2
    """Checkpoints kept, ranked by the early-stopping metric (the latest one is always kept too)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint after a worker dies (0: fail at once; -1: no limit)."""

    def __post_init__(self) -> None:
        _check(self.num_to_keep >= 1, "checkpoint.num_to_keep", f"must be >= 1, got {self.num_to_keep}")
        _check(self.max_failures >= -1, "checkpoint.max_failures", f"must be >= -1, got {self.max_failures}")
        _check(
            self.name is None or (self.name and "/" not in self.name),
            "checkpoint.name",
            f"must be a plain directory name without '/', got {self.name!r}",
        )


@dataclass(frozen=True)
class PretrainConfig:
    """A pre-training job: ``python jobs/pretrain.py --config configs/pretrain/<recipe>.yaml [key=value ...]``."""

    data: DataConfig = field(default_factory=DataConfig)
    """Shards and batches (train_manifest and val_manifest are required)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, regularization mode and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Epochs, early stopping, precision and speed switches."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Ray Train workers."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint storage and fault tolerance."""

    def __post_init__(self) -> None:
        _check(bool(self.data.train_manifest), "data.train_manifest", "is required (path or s3:// URL)")
        _check(bool(self.data.val_manifest), "data.val_manifest", "is required (path or s3:// URL)")
        _check(
            self.optim.warmup_epochs < self.train.epochs,
            "optim.warmup_epochs",
            f"must be smaller than train.epochs ({self.train.epochs}), got {self.optim.warmup_epochs}",
        )


# --------------------------------------------------------------------------------------------------------
# Hyperparameter and scaling search (jobs/tune.py)


@dataclass(frozen=True)
class ParamSpace:
    """One searched value: a distribution, or a list of choices."""

    type: Literal["loguniform", "uniform", "choice", "fixed"] = "uniform"
    """loguniform/uniform in [low, high]; choice among values; fixed = values[0] in every trial."""
    low: float = 0.0
    """Lower bound (loguniform/uniform)."""
    high: float = 1.0
    """Upper bound (loguniform/uniform)."""
    values: list[Any] = field(default_factory=list)
    """Candidates of type=choice (or the one value of type=fixed)."""

    def __post_init__(self) -> None:
        if self.type in ("loguniform", "uniform"):
            _check(self.low <= self.high, "high", f"must be >= low ({self.low}), got {self.high}")
            _check(
                self.type != "loguniform" or self.low > 0, "low", f"loguniform needs low > 0, got {self.low}"
            )
        else:
            _check(bool(self.values), "values", f"type={self.type} needs a non-empty list")


@dataclass(frozen=True)
class ScalingSpace:
    """How the architecture's scaling is searched (on top of delta and dropout)."""

    mode: Literal["none", "direct", "compound"] = "none"
    """none: the recipe's model as is; direct: width_mult, depth_mult, resolution; compound: EfficientNet
    (alpha, beta, gamma) with alpha*beta^2*gamma^2 = target at phi."""
    width_mult: ParamSpace = field(default_factory=lambda: ParamSpace(type="uniform", low=0.5, high=1.5))
    """direct mode: channel multiplier (model.scaling.width_mult)."""
    depth_mult: ParamSpace = field(default_factory=lambda: ParamSpace(type="uniform", low=0.5, high=1.5))
    """direct mode: layer multiplier (model.scaling.depth_mult; efficientnet_scaled only)."""
    resolution: ParamSpace = field(default_factory=lambda: ParamSpace(type="choice", values=[160, 192, 224]))
    """direct mode: input resolution (data.resolution)."""
    phi: float = 1.0
    """compound mode: the compound coefficient phi (resources grow ~ target^phi)."""
    target: float = 2.0
    """compound mode: the constraint's c in alpha * beta^2 * gamma^2 = c (Tan & Le: 2)."""
    tolerance: float = 0.01
    """compound mode: every sampled triple satisfies |alpha beta^2 gamma^2 - c| <= tolerance * c."""
    max_coefficient: float = 2.0
    """compound mode: upper bound of each of alpha, beta, gamma (each is >= 1)."""
    flops_budget_g: float | None = None
    """Reject candidates whose forward pass exceeds this many GFLOPs (2 x MACs counted by the profiler at the
    candidate's resolution) before they run; null: no budget."""

    def __post_init__(self) -> None:
        _check(self.phi >= 0, "space.scaling.phi", f"must be >= 0, got {self.phi}")
        _check(self.target >= 1, "space.scaling.target", f"must be >= 1, got {self.target}")
        _check(0 < self.tolerance < 1, "space.scaling.tolerance", f"must be in (0, 1), got {self.tolerance}")
        _check(
            self.max_coefficient > 1,
            "space.scaling.max_coefficient",
            f"must be > 1, got {self.max_coefficient}",
        )
        _check(
            self.flops_budget_g is None or self.flops_budget_g > 0,
            "space.scaling.flops_budget_g",
            f"must be > 0 or null, got {self.flops_budget_g}",
        )


@dataclass(frozen=True)
class SearchSpace:
    """What the search varies: delta, dropout, scaling and any other config field."""

    weight_decay: ParamSpace = field(
        default_factory=lambda: ParamSpace(type="loguniform", low=1e-4, high=1e-2)
    )
    """optim.weight_decay (delta); the lecture's range [1e-4, 1e-2], log-uniform."""
    dropout: ParamSpace = field(default_factory=lambda: ParamSpace(type="uniform", low=0.0, high=0.5))
    """model.dropout."""
    scaling: ScalingSpace = field(default_factory=ScalingSpace)
    """Architecture scaling (none, direct or compound) and the FLOPs budget."""
    extra: dict[str, ParamSpace] = field(default_factory=dict)
    """Any other recipe field by its dotted name, e.g. {optim.lr: {type: loguniform, low: 1e-3, high: 1e-1}}
    or, for a fine-tuning recipe, {finetune.backbone_lr_factor: ...}."""

    def pbt_mutations(self) -> dict[str, ParamSpace]:
        """What Population Based Training may change during a trial, by recipe field: the entries for
        optim.weight_decay and optim.lr that vary (a fixed or one-value entry has nothing to explore)."""
        named = {"optim.weight_decay": self.weight_decay, "optim.lr": self.extra.get("optim.lr")}
        return {
            key: param
            for key, param in named.items()
            if param is not None
            and (param.type in ("loguniform", "uniform") or len(param.values) > 1 and param.type == "choice")
        }

    def entries(self) -> dict[str, ParamSpace]:
        """Every searched entry by its name under ``space.`` (scaling's only in direct mode), in draw order."""
        named = {"weight_decay": self.weight_decay, "dropout": self.dropout}
        if self.scaling.mode == "direct":
            for key in ("width_mult", "depth_mult", "resolution"):
                named[f"scaling.{key}"] = getattr(self.scaling, key)
        named.update({f"extra.{k}": v for k, v in sorted(self.extra.items())})
        return named


@dataclass(frozen=True)
class SearchConfig:
    """How trials are scheduled."""

    metric: Literal["val/top1", "val/top5", "val/loss", "val/balanced_acc", "val/macro_f1"] = "val/top1"
    """Objective reported by every trial each epoch."""
    mode: Literal["max", "min"] = "max"
    """max for accuracies, min for the loss."""
    num_trials: int = 8
    """Trials to run (candidates are sampled up front with the seed, so a resumed search has the same ones)."""
    sampler: Literal["random", "tpe", "grid"] = "random"
    """How candidates are chosen: random draws every candidate up front from the space with the seed; tpe
    asks Optuna's TPE for each new trial given the results so far (continuous, log and choice entries;
    no compound scaling or FLOPs budget); grid runs every combination of the space's choice/fixed entries
    once (num_trials must equal their number)."""
    tpe_startup_trials: int = 10
    """tpe: trials drawn at random before TPE models the results (Optuna's n_startup_trials)."""
    scheduler: Literal["asha", "hyperband", "median", "pbt", "none"] = "asha"
    """Early-stopping scheduler (asha, hyperband, median), Population Based Training (pbt: every
    ``perturbation_interval`` epochs a trial in the bottom quantile continues from a top trial's weights with
    that trial's optim.lr and optim.weight_decay perturbed, so the search finds schedules of both), or none:
    every trial runs the full budget (the baseline)."""
    perturbation_interval: int = 2
    """pbt: epochs between two exploit/explore decisions (and between the states a trial keeps for them)."""
    quantile_fraction: float = 0.25
    """pbt: the share of trials that exploit (bottom) and are exploited (top) at each decision."""
    resample_probability: float = 0.25
    """pbt: chance that explore draws a value afresh from the space instead of multiplying it by 0.8 or 1.2
    (a choice entry moves to a neighbouring value)."""
    grace_period: int = 1
    """Epochs every trial runs before a scheduler may stop it."""
    reduction_factor: int = 3
    """ASHA/HyperBand: keep the top 1/reduction_factor at each rung."""
    max_concurrent_trials: int = 1
    """Trials running at once; each takes scaling.num_workers x scaling.cpus_per_worker CPUs (and GPUs)."""
    seed: int = 0
    """Seed of the candidate sampler."""
    name: str | None = None
    """Search directory under storage_path and MLflow parent run name; null: tune-<model.name>."""
    storage_path: str | None = None
    """s3:// URL or local directory holding the Tune experiment and every trial's Train checkpoints (trials
    use this, not the recipe's checkpoint.storage_path); null: $PIPELINE_STORAGE_ROOT/tune, else
    .cache/ray_results."""

    def __post_init__(self) -> None:
        _check(self.num_trials >= 1, "search.num_trials", f"must be >= 1, got {self.num_trials}")
        _check(self.grace_period >= 1, "search.grace_period", f"must be >= 1, got {self.grace_period}")
        _check(
            self.perturbation_interval >= 1,
            "search.perturbation_interval",
            f"must be >= 1, got {self.perturbation_interval}",
        )
        _check(
            0.0 < self.quantile_fraction <= 0.5,
            "search.quantile_fraction",
            f"must be in (0, 0.5], got {self.quantile_fraction}",
        )
        _check(
            0.0 <= self.resample_probability <= 1.0,
            "search.resample_probability",
            f"must be in [0, 1], got {self.resample_probability}",
        )
        _check(
            self.tpe_startup_trials >= 1,
            "search.tpe_startup_trials",
            f"must be >= 1, got {self.tpe_startup_trials}",
        )
        _check(
            self.reduction_factor >= 2,
            "search.reduction_factor",
            f"must be >= 2, got {self.reduction_factor}",
        )
        _check(
            self.max_concurrent_trials >= 1,
            "search.max_concurrent_trials",
            f"must be >= 1, got {self.max_concurrent_trials}",
        )
        _check(
            self.name is None or (bool(self.name) and "/" not in self.name),
            "search.name",
            f"must be a plain directory name without '/', got {self.name!r}",
        )


@dataclass(frozen=True)
class TuneConfig:
    """A search: ``python jobs/tune.py --config configs/tune/<search>.yaml [key=value ...]``."""

    recipe: str = "configs/pretrain/toy_resnet20.yaml"
    """The recipe every trial starts from (path relative to the working directory): a pre-training recipe, or
    a fine-tuning one (a recipe with a ``finetune:`` section), whose source the driver fetches once."""
    pretrain: dict[str, Any] = field(default_factory=dict)
    """Changes to that recipe shared by all trials, as a nested tree (e.g. {train: {epochs: 10}})."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Trials, scheduler, objective."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """What varies between trials."""

    def __post_init__(self) -> None:
        sampler, scaling = self.search.sampler, self.space.scaling
        if sampler == "tpe":
            _check(
                scaling.mode != "compound",
                "search.sampler",
                "tpe cannot draw on the compound-scaling constraint surface; use sampler=random",
            )
            _check(
                scaling.flops_budget_g is None,
                "search.sampler",
                "tpe cannot redraw candidates over space.scaling.flops_budget_g; use sampler=random",
            )
            for name, param in self.space.entries().items():
                _check(
                    param.type not in ("choice", "fixed")
                    or all(v is None or isinstance(v, bool | int | float | str) for v in param.values),
                    f"space.{name}.values",
                    "tpe chooses among plain values only (numbers, strings, booleans)",
                )
        if self.search.scheduler == "pbt":
            # Tune's PBT mutates the trials' configs itself: it runs beside a list of candidates, not a searcher.
            _check(sampler != "tpe", "search.sampler", "pbt needs random or grid candidates, got tpe")
            _check(
                bool(self.space.pbt_mutations()),
                "space",
                "pbt mutates optim.weight_decay and optim.lr: give space.weight_decay or "
                "space.extra['optim.lr'] a range or more than one value",
            )
            # Tune starts a trial only when a slot frees and PBT compares running trials only: trials beyond
            # the concurrency would run after the others ended, alone, never exploiting or exploited.
            _check(
                self.search.max_concurrent_trials >= self.search.num_trials,
                "search.max_concurrent_trials",
                f"pbt's population is the trials that train together: set it to search.num_trials "
                f"({self.search.num_trials}) or lower num_trials, got {self.search.max_concurrent_trials}",
            )
        if sampler == "grid":
            _check(scaling.mode != "compound", "search.sampler", "grid cannot enumerate compound scaling")
            size = 1
            for name, param in self.space.entries().items():
                _check(
                    param.type in ("choice", "fixed"),
                    f"space.{name}.type",
                    f"sampler=grid needs choice or fixed entries, got {param.type}",
                )
                size *= len(param.values) if param.type == "choice" else 1
            _check(
                self.search.num_trials == size,
                "search.num_trials",
                f"sampler=grid runs every combination of the space once: set it to {size}, got "
                f"{self.search.num_trials}",
            )


# --------------------------------------------------------------------------------------------------------
# Fine-tuning (jobs/finetune.py)


@dataclass(frozen=True)
class FinetuneSection:
    """Where the pre-trained weights come from and how they are adapted."""

    source: str = ""
    """models:/name@alias, models:/name/version, runs:/<run id>/model, or a path / s3:// URL of an exported
    model (model.pt or its directory, e.g. a pre-training run directory); ignored by strategy=scratch."""
    source_format: Literal["auto", "torchvision"] = "auto"
    """auto: this pipeline's export (state_dict + model config); torchvision: a plain torchvision state_dict
    file of model.name (e.g. resnet50-0676ba61.pth downloaded elsewhere), with its own 1000-class head."""
    strategy: Literal["linear", "full", "two_stage", "scratch"] = "two_stage"
    """linear: only the new head trains (frozen BatchNorm in eval mode); full: everything; two_stage: the
    head alone for head_epochs, then everything; scratch: random init, same architecture and budget."""
    head_epochs: int = 2
    """two_stage: epochs of stage 1 (head only)."""
    backbone_lr_factor: float = 0.1
    """full and two_stage: backbone lr = head lr x this factor (discriminative fine-tuning), in (0, 1]."""
    class_weights: Literal["none", "inverse", "effective_number"] = "none"
    """Loss weights from the manifest's class counts: inverse n/(C n_c), or Cui et al.'s effective number."""
    effective_beta: float = 0.999
    """beta of class_weights=effective_number, in [0, 1)."""

    def __post_init__(self) -> None:
        _check(self.head_epochs >= 1, "finetune.head_epochs", f"must be >= 1, got {self.head_epochs}")
        _check(
            0.0 < self.backbone_lr_factor <= 1.0,
            "finetune.backbone_lr_factor",
            f"must be in (0, 1], got {self.backbone_lr_factor}",
        )
        _check(
            0.0 <= self.effective_beta < 1.0,
            "finetune.effective_beta",
            f"must be in [0, 1), got {self.effective_beta}",
        )


def _finetune_train_default() -> TrainConfig:
    return TrainConfig(epochs=10, early_stopping=EarlyStoppingConfig(metric="val/balanced_acc", patience=3))


@dataclass(frozen=True)
class FinetuneConfig(PretrainConfig):
    """A fine-tuning job: the pre-training tree plus ``finetune``; early stopping and model selection watch
    ``val/balanced_acc`` by default. ``model.name: source`` takes the architecture from the source."""

    train: TrainConfig = field(default_factory=_finetune_train_default)
    """Epochs (both stages together), early stopping (default metric val/balanced_acc), speed switches."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    """Source of the weights, strategy, class imbalance."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.finetune.strategy == "scratch" or bool(self.finetune.source),
            "finetune.source",
            "is required (models:/name@alias, runs:/<id>/model, or a path) unless strategy=scratch",
        )
        _check(
            self.finetune.strategy != "two_stage" or self.finetune.head_epochs < self.train.epochs,
            "finetune.head_epochs",
            f"must be smaller than train.epochs ({self.train.epochs}) so that stage 2 runs, "
            f"got {self.finetune.head_epochs}",
        )
        _check(
            self.model.name != "source" or self.finetune.strategy != "scratch",
            "model.name",
            "strategy=scratch needs an explicit architecture",
        )


# --------------------------------------------------------------------------------------------------------
# The lecture's claims as experiments (jobs/experiment.py)


@dataclass(frozen=True)
class ExperimentDataConfig:
    """What the arms of an experiment train on: the embedded dataset, generated and sharded once per set of
    sizes under ``cache_dir``, or the user's own shards (the GPU ``presets``)."""

    source: Literal["embedded", "manifests"] = "embedded"
    """embedded: the toy sizes below; manifests: train_manifest and val_manifest (e.g. CIFAR-10 shards)."""
    task: Literal["pretrain", "downstream"] = "pretrain"
    """Embedded task of the arms: pretrain (10 balanced classes) or downstream (2-5 other shapes, imbalanced
    training split, balanced validation)."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """Sizes of the embedded dataset; toy.root is ignored (it lives under cache_dir, keyed by the sizes)."""
    train_manifest: str = ""
    """source=manifests: URL of the training split's manifest.json (local path or s3://)."""
    val_manifest: str = ""
    """source=manifests: URL of the validation split's manifest.json."""

    def __post_init__(self) -> None:
        for name in ("train_manifest", "val_manifest"):
            _check(
                self.source != "manifests" or bool(getattr(self, name)),
                f"data.{name}",
                "is required with data.source=manifests (the manifest of your own shards)",
            )


@dataclass(frozen=True)
class ExperimentSourceConfig:
    """The pre-trained model that fine-tuning arms start from."""

    uri: str = ""
    """A finetune.source (models:/name@alias, runs:/<id>/model, a path); empty: pre-train ``recipe`` in-process
    on the embedded pretrain task first, cached under cache_dir by its resolved config."""
    recipe: str = "configs/pretrain/toy_resnet20.yaml"
    """Pre-training recipe of the in-process source (uri empty)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted changes to that recipe, e.g. {train.epochs: 8, data.batch_size_per_worker: 50}."""


@dataclass(frozen=True)
class ScalingDirection:
    """How one scaling arm grows per unit of phi (Tan & Le's alpha, beta, gamma): depth_mult x depth^phi,
    width_mult x width^phi, resolution x resolution^phi from the baseline arm; 1.0 leaves a dimension alone."""

    depth: float = 1.0
    """alpha: factor of model.scaling.depth_mult per unit of phi."""
    width: float = 1.0
    """beta: factor of model.scaling.width_mult per unit of phi."""
    resolution: float = 1.0
    """gamma: factor of data.resolution per unit of phi."""

    def __post_init__(self) -> None:
        for name in ("depth", "width", "resolution"):
            _check(getattr(self, name) >= 1.0, name, f"must be >= 1, got {getattr(self, name)}")
        _check(
            max(self.depth, self.width, self.resolution) > 1.0,
            "depth",
            "at least one of depth, width, resolution must be > 1",
        )


@dataclass(frozen=True)
class FlopsMatchConfig:
    """Scaling arms at matched FLOPs: for each arm in ``directions`` the smallest grid of phi is searched for
    the knob values whose MACs (the profiler's count) lie within ``tolerance`` of target_factor x the
    baseline arm's; an arm that cannot be matched is a ConfigError before anything trains."""

    baseline_arm: str = ""
    """The arm the others are scaled from (its own knobs are the starting point); empty: no matching."""
    target_factor: float = 2.0
    """Target MACs = this x the baseline's (EfficientNet: 2 per unit of phi)."""
    tolerance: float = 0.10
    """Relative MACs tolerance of a match (0.10 = +-10%)."""
    directions: dict[str, ScalingDirection] = field(default_factory=dict)
    """Arm name -> its direction, e.g. {width: {width: 2.0}, compound: {depth: 1.2, width: 1.1, resolution: 1.15}}."""
    phi_step: float = 0.02
    """Grid step of phi."""
    phi_max: float = 8.0
    """Largest phi tried."""

    def __post_init__(self) -> None:
        _check(self.target_factor > 0, "flops_match.target_factor", f"must be > 0, got {self.target_factor}")
        _check(0 < self.tolerance < 1, "flops_match.tolerance", f"must be in (0, 1), got {self.tolerance}")
        _check(self.phi_step > 0, "flops_match.phi_step", f"must be > 0, got {self.phi_step}")
        _check(self.phi_max > 0, "flops_match.phi_max", f"must be > 0, got {self.phi_max}")
        _check(
            not self.directions or bool(self.baseline_arm),
            "flops_match.baseline_arm",
            "is required when flops_match.directions is set",
        )


@dataclass(frozen=True)
class ExperimentTrackingConfig:
    """Where an experiment is recorded: one MLflow parent run, one child run per (arm, seed)."""

    uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else the local sqlite store .cache/mlflow/mlflow.db;
    "none" turns tracking off."""
    experiment: str = "experiments"
    """MLflow experiment name (created if missing)."""
    required: bool = True
    """true: an unreachable tracking server is an error; false: warn and run untracked."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One claim of the lecture as a rerunnable experiment: ``python jobs/experiment.py <name> [scale=<preset>]
    [key=value ...]`` reads ``configs/experiments/<name>.yaml``. Every arm is the base recipe plus ``shared``
    plus the arm's own dotted overrides, trained once per seed in-process (build_run + fit, no Ray)."""

    name: str = ""
    """Experiment name: the YAML's file name, the MLflow parent run's name and docs/results/<name>.md."""
    claim: str = ""
    """The lecture's claim under test, in one sentence."""
    claim_source: str = "lecture *Modern Classification Networks*"
    """Where the claim comes from, shown beside it on the results page."""
    discussion: str = ""
    """What the measurements show and why, in a few sentences, printed under the verdict (Markdown)."""
    verdict: str = ""
    """Name of the verdict function in pipeline.experiments.verdicts; empty: the experiment's name."""
    kind: Literal["pretrain", "finetune"] = "pretrain"
    """Config type of the arms: PretrainConfig or FinetuneConfig (finetune.strategy, class weights)."""
    recipe: str = ""
    """Base recipe of every arm (a YAML under configs/pretrain or configs/finetune)."""
    data: ExperimentDataConfig = field(default_factory=ExperimentDataConfig)
    """The data every arm trains on (replaces the recipe's manifests)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of the recipe shared by all arms, e.g. {train.epochs: 6, data.batch_size_per_worker: 32}
    (nested mappings are flattened to dotted keys)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Arm name -> its dotted overrides on top of shared, in the order they run and are reported."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Every arm runs once per seed (train.seed and data.seed); the spread over seeds decides the verdict."""
    metrics: list[str] = field(default_factory=lambda: ["last/val/top1"])
    """Summary metrics in the table (last/<epoch metric>, best/<epoch metric>, epochs_run, model/mmacs ...)."""
    curves: list[str] = field(default_factory=lambda: ["val/top1"])
    """Per-epoch metrics plotted, one panel each (e.g. train/error, weights/l2_norm, gap/top1)."""
    eval_train_set: bool = False
    """Evaluate the training set in eval mode (no augmentation, no dropout) after every epoch: gap/top1."""
    flops_match: FlopsMatchConfig = field(default_factory=FlopsMatchConfig)
    """Scaling arms at matched FLOPs (the scaling experiment)."""
    source: ExperimentSourceConfig = field(default_factory=ExperimentSourceConfig)
    """The pre-trained model of fine-tuning arms (kind=finetune, strategy other than scratch)."""
    scale: str = "default"
    """Preset applied on top of this file (scale=<name> on the command line); default: the embedded data."""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Name -> changes to this config (a nested tree), e.g. the paper's protocol on GPU nodes and your shards."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the arms train: auto = cuda if available, else cpu."""
    tracking: ExperimentTrackingConfig = field(default_factory=ExperimentTrackingConfig)
    """MLflow."""
    output_dir: str = "docs/results"
    """Directory of <name>.md and <name>.png (<name>-<scale>.* for a preset)."""
    cache_dir: str = ".cache/experiments"
    """Embedded data and in-process sources, each keyed by its config (reused by later runs)."""

    def __post_init__(self) -> None:
        _check(
            bool(re.fullmatch(r"[a-z0-9_]+", self.name)),
            "name",
            f"must be like degradation, got {self.name!r}",
        )
        _check(bool(self.claim), "claim", "states the claim under test in one sentence")
        _check(bool(self.recipe), "recipe", "names the base recipe, e.g. configs/pretrain/toy_resnet20.yaml")
        _check(bool(self.arms), "arms", "needs at least one arm: {arm name: {dotted.key: value}}")
        for arm in self.arms:
            _check(
                isinstance(arm, str) and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", arm)),
                f"arms.{arm}",
                "arm names are strings of letters, digits, _ . - (quote YAML's off/on/yes/no)",
            )
        _check(bool(self.seeds), "seeds", "needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), "seeds", f"must be distinct, got {self.seeds}")
        _check(bool(self.metrics), "metrics", "names at least one summary metric for the table")
        _check(
            self.scale == "default" or self.scale in self.presets,
            "scale",
            f"unknown preset {self.scale!r}; known: {', '.join(['default', *self.presets])}",
        )
        if self.flops_match.directions:
            _check(
                self.flops_match.baseline_arm in self.arms,
                "flops_match.baseline_arm",
                f"{self.flops_match.baseline_arm!r} is not one of the arms ({', '.join(self.arms)})",
            )
            for arm in self.flops_match.directions:
                _check(arm in self.arms, f"flops_match.directions.{arm}", "is not one of the arms")


# --------------------------------------------------------------------------------------------------------
# Batch prediction and evaluation (jobs/predict.py)


@dataclass(frozen=True)
class PredictConfig:
    """Predictions of a registered model over a set of images, and its evaluation where they carry labels:
    ``python jobs/predict.py --model models:/NAME@ALIAS --input SRC --output DEST [key=value ...]``."""

    model: str = ""
    """models:/name@alias, models:/name/version, runs:/<run id>/model, or a path / s3:// URL of an exported
    model (a pre-training run directory, its model/ or model.pt)."""
    input: str = ""
    """The images: a folder (every file under it), an s3:// prefix (every object under it), or a shard
    manifest (manifest.json, local or s3://; its labels make the run an evaluation)."""
    output: str = ""
    """Directory or s3:// prefix for the predictions (part-NNNNN files), skipped.csv and summary.json."""
    format: Literal["parquet", "csv"] = "parquet"
    """File format of the predictions."""
    labels: Literal["auto", "folders", "none"] = "auto"
    """Where true labels come from. auto: a manifest's labels, or the folder names when every file of a
    folder input sits in a folder named after one of the model's classes; folders: require that; none:
    predictions only."""
    top_k: int = 5
    """Classes listed per image (top_k_labels, top_k_scores); top-5 accuracy needs no setting."""
    batch_size: int = 64
    """Images per model call."""
    replicas: int = 1
    """Model copies (Ray Data actors) predicting in parallel; 0 predicts in this process without Ray."""
    gpus_per_replica: float = 0.0
    """GPUs per model copy (e.g. 1, or 0.5 to pack two on a GPU); 0: the model runs on CPU."""
    cpus_per_replica: float = 1.0
    """CPUs reserved per model copy (decoding runs in separate CPU tasks)."""
    shared_paths: list[str] = field(default_factory=list)
    """Local directories every node mounts (NFS, EFS, FSx): a local input under one is readable on a
    multi-node cluster; elsewhere a local input is refused there (use s3://)."""
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="predict"))
    """MLflow run of the job (counts, throughput and, with labels, the evaluation), linked to the model
    version. tracking.register_as and tracking.system_metrics do not apply."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "model", "names the model, e.g. --model models:/toy-resnet20@champion")
        _check(bool(self.input), "input", "names the images: a folder, an s3:// prefix or a manifest.json")
        _check(bool(self.output), "output", "names a directory or s3:// prefix for the predictions")
        _check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.replicas >= 0, "replicas", f"must be >= 0, got {self.replicas}")
        _check(self.gpus_per_replica >= 0, "gpus_per_replica", f"must be >= 0, got {self.gpus_per_replica}")
        _check(self.cpus_per_replica > 0, "cpus_per_replica", f"must be > 0, got {self.cpus_per_replica}")
        _check(
            self.replicas > 0 or self.gpus_per_replica == 0,
            "gpus_per_replica",
            "needs replicas >= 1 (replicas=0 predicts in this process, on its own device)",
        )
