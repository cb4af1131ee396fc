"""Typed run configuration: dataclasses, YAML in and out, ``key=value`` overrides.

A config is a tree of dataclasses (:class:`Config` at the root). Files in ``configs/`` and
command-line overrides such as ``epochs=3``, ``data=idx:/data/mnist`` or
``train.classes=[0,1,2,3,4,5]`` are merged into the defaults; an unknown key or a value of the
wrong type raises :class:`ConfigError` listing the valid keys or the expected type.

Components are chosen by name from their tables (``loss.name`` from
:data:`deepmetric.losses.LOSSES`, ``loss.mining`` from :data:`deepmetric.mining.MINING_RULES`,
``model.backbone`` from :data:`deepmetric.models.BACKBONES`). This module sits below those
layers and checks types and values only; the names and what each entry allows are checked by
:mod:`deepmetric.components` (:func:`~deepmetric.components.load_checked_config` for what a
user writes), where a config becomes components.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

#: The ``data`` a run of ``fit()`` on Python objects records: no data set spec.
FIT_DATA = "(python objects)"

#: The data specs of fixed tuples without classes (``pairs:FILE``, ``triplets:FILE``; read by
#: :mod:`deepmetric.data.tuples`) -> the mode and the loss that train on exactly those tuples.
TUPLE_SPECS: dict[str, tuple[str, str]] = {
    "pairs": ("siamese", "contrastive"),
    "triplets": ("triplet", "triplet"),
}


def tuple_kind(spec: str) -> str | None:
    """``"pairs"`` / ``"triplets"`` for a ``pairs:FILE`` / ``triplets:FILE`` data spec, else
    ``None`` (a spec of classes)."""
    kind, sep, arg = spec.partition(":")
    return kind if sep and arg and kind in TUPLE_SPECS else None


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a value of the wrong type."""


@dataclass
class ModelConfig:
    """The embedding network: ``backbone -> Linear(dim) -> optional L2 normalisation``."""

    #: a name of :data:`deepmetric.models.BACKBONES`: small_cnn, vgg_small, resnet_small, mlp
    backbone: str = "vgg_small"
    dim: int = 128
    normalize: bool = True
    #: small_cnn: BatchNorm after each convolution (vgg_small and resnet_small always have it)
    batch_norm: bool = False
    padding: int = 1  # small_cnn: 1 keeps the border (28 -> 14 -> 7), 0 the classic net (-> 5)
    #: images: embed each image and its mirror image and average the two (eval mode: the
    #: trained network, evaluation, inference); null: as train.augment (a network trained on
    #: flipped images averages, one trained without flips does not)
    mirror: bool | None = None
    #: the Linear(dim) is a head for training only (as in SimCLR): the loss trains on its
    #: outputs, the embedding is the backbone's features before it (256-d), L2-normalised
    projection_head: bool = False
    #: with projection_head (small_cnn, vgg_small): the embedding also holds the last
    #: convolutional map, L2-normalised, concatenated (256 + 3,136 = 3,392-d for small_cnn)
    conv_readout: bool = False
    #: a model registered with ``deepmetric.models.register_model`` (``fit(..., builder=)``);
    #: when set, ``backbone`` is ignored and the run's model is ``builder(**builder_args)``
    builder: str | None = None
    builder_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The metric loss (see :mod:`deepmetric.losses`). Each loss takes some of these options,
    and each option may mean something else for each loss (loss.margin: a distance for
    triplet, contrastive and lifted, an angle for arcface, a cosine for cosface):
    :data:`deepmetric.losses.LOSSES` says which and what. ``softmax_weight``, ``metric``,
    ``memory``, ``memory_start``, ``ntxent_weight`` and ``temperature`` go with any loss
    (:data:`deepmetric.losses.SHARED_OPTIONS`); setting another option the loss does not take
    is an error."""

    #: a name of :data:`deepmetric.losses.LOSSES`: triplet, contrastive, lifted (structured),
    #: multi_similarity, proxy_anchor, arcface, cosface, or one registered with
    #: :func:`deepmetric.losses.register_loss`
    name: str = "triplet"
    margin: float = 0.2
    #: a name of :data:`deepmetric.mining.MINING_RULES`: batch_all, batch_hard, semi_hard
    mining: str = "batch_all"
    metric: Literal["euclidean", "squared_euclidean", "cosine"] = "euclidean"
    soft: bool = False
    #: weight of the cross-entropy term in ``mode: joint`` (loss = metric + weight * CE)
    softmax_weight: float = 1.0
    #: cross-batch memory: also compare each batch with the last N samples (0: off; batch and
    #: joint modes, triplet loss; see :class:`deepmetric.losses.CrossBatchMemory`)
    memory: int = 0
    #: training steps before the memory is first used (let the embeddings settle first)
    memory_start: int = 0
    #: learning rate of the loss's own parameters (proxy_anchor's proxies, arcface / cosface's
    #: class vectors) as a multiple of train.lr (the proxy-anchor paper uses 100)
    proxy_lr_factor: float = 1.0
    #: scale s of the arcface / cosface logits s * cos(theta)
    scale: float = 16.0
    #: weight of a self-supervised NT-Xent term (SimCLR) between two augmented views of every
    #: training image (0: off; batch and joint modes, needs train.augment)
    ntxent_weight: float = 0.0
    #: temperature of the NT-Xent term
    temperature: float = 0.1


@dataclass
class TrainConfig:
    """Optimisation and batching."""

    p: int = 10  # classes per P x K batch (fewer when the data has fewer classes)
    k: int = 16  # samples per class in a P x K batch
    batch_size: int = 64  # pairs or triplets per batch (siamese / triplet / offline modes)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = 1  # epochs per decay, schedule: step
    gamma: float = 0.1
    warmup_epochs: float = 1.0  # linear learning-rate warm-up at the start
    label_smoothing: float = 0.0  # joint mode: label smoothing of the cross-entropy term
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    #: mixed precision: float16 on CUDA, bfloat16 on a CPU with hardware bfloat16 (others:
    #: float32, with a warning)
    amp: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_fraction: float = 0.05
    classes: list[int] | None = None  # train on these classes only (open-set protocol)
    #: class-disjoint validation (Musgrave et al. 2020): these classes (of ``classes``, or of
    #: all when unset) are held out of training and ARE the validation split; replaces
    #: val_fraction, so validation measures classes the network never trained on. A list of
    #: ids, or a count (an int: 300) or a fraction in (0, 1) (0.1) of the training classes,
    #: drawn with ``seed`` (deepmetric.data.datasets.draw_val_classes)
    val_classes: list[int] | int | float | None = None
    offline_every: int = 100  # offline mode: re-mine triplets every N steps
    offline_p: int = 32
    offline_k: int = 16
    #: images: random horizontal flips and shifts of up to 2 pixels (false for data whose
    #: mirror image is another thing: digits, text)
    augment: bool = True
    #: images: each class becomes 8 classes, its images under the 8 symmetries of the square
    #: (rotations by 90 degrees, with and without a vertical flip): class augmentation for
    #: classes never trained on (configs/openset.yaml)
    dihedral_classes: bool = False
    log_every: int = 10


@dataclass
class Config:
    """A whole run. ``data`` is a data set spec: ``fashion-mnist``, ``mnist``, ``kmnist``,
    ``omniglot``, ``idx:DIR``, ``folder:DIR`` or ``npz:FILE``."""

    name: str = "run"
    data: str = "fashion-mnist"
    mode: Literal["batch", "siamese", "triplet", "offline", "joint"] = "joint"
    epochs: int = 20
    seed: int = 0
    out: str | None = None  # run folder; default runs/NAME
    image_size: int = 64  # folder data: images are resized to this square size
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    @property
    def from_fit(self) -> bool:
        """Whether ``fit()`` trained the run on Python objects (``data`` is
        :data:`FIT_DATA`): its data and, without a registered builder, its network are not in
        the run folder."""
        return self.data == FIT_DATA


# ----------------------------------------------------------------------------- typing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted keys of a config class, e.g. ``train.lr``."""
    keys = []
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 6, 6
_SHORT.maxstring, _SHORT.maxother = 60, 60


def show(value: Any) -> str:
    """A short repr for messages: long or deeply nested values (a YAML alias bomb) are cut."""
    return _SHORT.repr(value)


#: builder_args and other mapping values: at most this many values, this deep
_MAX_VALUES, _MAX_DEPTH = 10_000, 32


def _check_plain(value: Any, key: str, budget: list[int], depth: int = 0) -> None:
    """``value`` is a tree of YAML scalars, lists and string-keyed mappings, of bounded size
    (an alias bomb or a self-referencing tree is refused, not walked for ever)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise ConfigError(
            f"{key}: too large or too deeply nested (more than {_MAX_VALUES} values or "
            f"{_MAX_DEPTH} levels; a self-referencing YAML alias?)"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {show(k)}")
            _check_plain(v, f"{key}.{k}", budget, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]", budget, depth + 1)
    elif value is not None and not isinstance(value, bool | int | float | str):
        raise ConfigError(f"{key}: {type(value).__name__} values are not allowed here")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    if isinstance(error, yaml.MarkedYAMLError):
        what = "; ".join(filter(None, (error.context, error.problem))) or "cannot parse"
        mark = error.problem_mark or error.context_mark
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what
    return " ".join(str(error).split())


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses a key given twice in one mapping,
    where PyYAML keeps the last one silently (``<<`` merge keys may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate keys; a ConfigError naming ``what`` for
    anything it cannot read (Python tags, bad syntax, nesting too deep, huge numbers)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python tags
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise ConfigError(f"{what} is not valid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as error:  # 5000-digit ints, escapes such as \UFFFFFFFF
        raise ConfigError(f"{what} is not valid YAML: {error}") from None


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint``; ints are accepted where floats are expected."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        expected = " or ".join(map(_type_name, options))
        raise ConfigError(f"{key}: expected {expected}, got {show(value)}")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key}: expected one of {_type_name(hint)}, got {show(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {show(value)}")
        _check_plain(value, key, [_MAX_VALUES])
        return value
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {show(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {show(value)} is too large for a float") from None
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {show(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {show(value)}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {show(value)}")
    return value


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(values, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {show(values)}")
    hints = _hints(type(obj))
    for name, value in values.items():
        key = prefix + str(name)
        if not isinstance(name, str) or name not in hints:
            raise ConfigError(
                f"unknown key {show(key)}; valid keys: {', '.join(valid_keys(type(obj), prefix))}"
            )
        if dataclasses.is_dataclass(hints[name]):
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


# ----------------------------------------------------------------------------- public


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=0.01"`` -> ``{"train": {"lr": 0.01}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {show(text)} is not of the form key=value")
    value = _read_yaml(raw, f"the value of override {show(text)}") if raw else None
    if key in ("data", "name", "out") and value is not None:
        value = raw  # specs such as idx:DIR or 1e3 stay the strings typed
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def read_yaml_file(path: str | Path, what: str = "config") -> Any:
    """The YAML in file ``path``, read by the hardened loader: safe (no ``!!python`` tags),
    duplicate keys refused, deep nesting and huge numbers refused. ``ConfigError`` of one line
    naming ``what`` and the file otherwise. Every config file and a run's ``config.yaml`` are
    read with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {error.reason}") from None
    return _read_yaml(text, f"{what} {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then each ``key=value`` override in order."""
    config = Config()
    if path is not None:
        path = Path(path)
        values = read_yaml_file(path) or {}
        try:
            _merge(config, values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        if "name" not in values:
            config.name = path.stem
    for text in overrides or []:
        _merge(config, parse_override(text))
    validate(config)
    return config


def _value(config: Config, key: str) -> Any:
    """The value of dotted ``key`` (``train.lr``) in ``config``."""
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


#: train.device: auto, or a device type with an optional index (cpu, cuda, cuda:1, mps)
_DEVICE = re.compile(r"auto|(cpu|cuda|mps|xpu)(:\d+)?")


#: keys whose values must be >= 1, >= 0, > 0 (train.gamma: the factor of schedule: step)
_AT_LEAST_ONE = (
    "epochs",
    "image_size",
    "model.dim",
    "train.p",
    "train.k",
    "train.batch_size",
    "train.step_size",
    "train.offline_every",
    "train.offline_p",
    "train.offline_k",
    "train.log_every",
)
_NON_NEGATIVE = (
    "seed",
    "model.padding",
    "loss.softmax_weight",
    "loss.margin",
    "loss.memory",
    "loss.memory_start",
    "loss.ntxent_weight",
    "train.weight_decay",
    "train.momentum",
    "train.grad_clip",
    "train.warmup_epochs",
)
_POSITIVE = (
    "train.lr",
    "train.gamma",
    "loss.proxy_lr_factor",
    "loss.scale",
    "loss.temperature",
)
_BOUNDS: tuple[tuple[str, Callable[[Any], bool], tuple[str, ...]], ...] = (
    (">= 1", lambda v: v >= 1, _AT_LEAST_ONE),
    (">= 0", lambda v: v >= 0, _NON_NEGATIVE),
    ("> 0", lambda v: v > 0, _POSITIVE),
)


#: the largest model input side (image_size, preprocess.json's height and width): a
#: 1024 x 1024 x 3 input is 12 MiB of float32 before the network's activations
MAX_IMAGE_SIDE = 1024
#: seeds are 64-bit signed integers (torch, numpy and the derived per-epoch seeds)
SEED_LIMIT = 2**63


def validate(config: Config) -> None:
    """Value checks that types cannot express; each error names the key and the problem."""
    for key in valid_keys(Config):
        value = _value(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for bound, holds, keys in _BOUNDS:
        for key in keys:
            value = _value(config, key)
            if not holds(value):
                raise ConfigError(f"{key} must be {bound}, got {value}")
    if config.seed >= SEED_LIMIT:
        raise ConfigError(f"seed must be < 2**63 (a 64-bit integer), got {config.seed}")
    if config.image_size > MAX_IMAGE_SIDE:
        raise ConfigError(f"image_size must be <= {MAX_IMAGE_SIDE}, got {config.image_size}")
    if not 0 <= config.train.label_smoothing < 1:
        raise ConfigError(
            f"train.label_smoothing must be in [0, 1), got {config.train.label_smoothing}"
        )
    c = config.loss
    batch_modes = config.mode in ("batch", "joint")
    if c.ntxent_weight and not (batch_modes and config.train.augment):
        raise ConfigError(
            "loss.ntxent_weight (two augmented views of each image) needs mode=batch or joint "
            "and train.augment=true"
        )
    if config.model.projection_head and config.mode != "batch":
        raise ConfigError(
            "model.projection_head=true embeds with the features before the Linear(dim) and "
            "trains the loss on the Linear's outputs: it needs mode=batch"
        )
    m = config.model
    if m.builder and (m.projection_head or m.conv_readout):
        raise ConfigError(
            "model.projection_head and model.conv_readout shape deepmetric's EmbeddingNet; "
            f"model.builder={m.builder} builds a network of its own"
        )
    if not 0 <= config.train.val_fraction < 1:
        raise ConfigError(f"train.val_fraction must be in [0, 1), got {config.train.val_fraction}")
    if isinstance(config.train.device, str) and not _DEVICE.fullmatch(config.train.device):
        raise ConfigError(
            f"train.device must be auto, cpu, cuda, cuda:N or mps, got {config.train.device!r}"
        )
    t = config.train
    val_ids = t.val_classes if isinstance(t.val_classes, list) else None
    for key, ids in (("train.classes", t.classes), ("train.val_classes", val_ids)):
        if ids is not None and any(i < 0 for i in ids):
            raise ConfigError(f"{key} must hold class ids >= 0, got {show(ids)}")
    if t.classes is not None and len(set(t.classes)) < 2:
        raise ConfigError(
            f"train.classes needs at least 2 classes (metric learning compares classes), "
            f"got {show(t.classes)}"
        )
    if t.val_classes is not None and not isinstance(t.val_classes, list):
        _check_val_class_number(t.val_classes, t.classes)
    elif t.val_classes is not None:
        if len(set(t.val_classes)) < 2:
            raise ConfigError("train.val_classes needs at least 2 classes (to compare them)")
        if t.classes is not None and not set(t.val_classes) <= set(t.classes):
            raise ConfigError(
                f"train.val_classes {t.val_classes} must be among train.classes {t.classes}"
            )
        if t.classes is not None and len(set(t.classes) - set(t.val_classes)) < 2:
            raise ConfigError("train.classes minus train.val_classes leaves fewer than 2 classes")
    _check_tuples(config)
    if config.mode in ("batch", "joint", "offline") and config.train.k < 2:
        raise ConfigError("train.k must be >= 2: a P x K batch needs positive pairs")
    if config.mode in ("batch", "joint") and config.train.p < 2:
        raise ConfigError("train.p must be >= 2: a P x K batch needs negatives (another class)")
    if config.mode == "offline" and min(t.offline_p, t.offline_k) < 2:
        raise ConfigError(
            f"train.offline_p and train.offline_k must be >= 2 (mining needs positive pairs and "
            f"negatives), got {t.offline_p} and {t.offline_k}"
        )


def _check_tuples(config: Config) -> None:
    """A ``pairs:`` / ``triplets:`` spec trains its own tuples: only with the mode and loss of
    :data:`TUPLE_SPECS`, and without the options that choose classes (it has none)."""
    kind = tuple_kind(config.data)
    if kind is None:
        return
    mode, loss = TUPLE_SPECS[kind]
    if config.mode != mode:
        raise ConfigError(
            f"data={config.data} holds fixed {kind} and no classes: it trains with mode={mode} "
            f"loss.name={loss} (on exactly those {kind}), not mode={config.mode}"
        )
    if config.loss.name != loss:
        raise ConfigError(
            f"data={config.data} trains mode={mode} on its {kind} with loss.name={loss}, not "
            f"loss.name={config.loss.name}"
        )
    t = config.train
    for key, value in (
        ("train.classes", t.classes),
        ("train.val_classes", t.val_classes),
        ("train.dihedral_classes", t.dihedral_classes or None),
    ):
        if value is not None:
            raise ConfigError(
                f"{key} chooses classes, and data={config.data} has none (its {kind} are the "
                f"training data; train.val_fraction holds some of them out): leave it unset"
            )


def _check_val_class_number(spec: int | float, classes: list[int] | None) -> None:
    """``train.val_classes`` as a count (an int) or a fraction (a float): the checks that need
    no data (the count against the training classes is checked where they are known, and
    here too when ``train.classes`` lists them)."""
    if isinstance(spec, float) and not 0.0 < spec < 1.0:
        raise ConfigError(
            f"train.val_classes={spec}: a fraction of the training classes must be in (0, 1) "
            "(a count is an integer, a list of ids is [..])"
        )
    if isinstance(spec, int) and spec < 2:
        raise ConfigError(
            f"train.val_classes={spec}: a count of validation classes must be >= 2 (to compare "
            "them); a list of class ids is written [..]"
        )
    if isinstance(spec, int) and classes is not None and len(set(classes)) - spec < 2:
        raise ConfigError(
            f"train.val_classes={spec}: of the {len(set(classes))} classes of train.classes, "
            f"{len(set(classes)) - spec} would be left to train on; at least 2 are needed"
        )


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML text, keys in definition order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def dump_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(config))
    tmp.replace(path)


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    _merge(config, values)
    validate(config)
    return config
