"""Losses by name: the table behind ``loss.name`` in a config, ``build_loss`` and the
``config.yaml`` that ``fit(..., out=...)`` writes.

Each entry (:class:`LossEntry`) says what a loss is called, which ``loss.*`` options it takes
and what each means for it, how to build it from them, and how to read them back from a loss
object. ``loss.margin`` is the option whose meaning changes most: a distance margin for
triplet, contrastive and lifted, an angle for arcface, a cosine for cosface, and nothing for
multi_similarity and proxy_anchor. :data:`SHARED_OPTIONS` are taken with any loss (where the
config's checks allow them: ``loss.memory`` needs a loss with ``takes_memory``, and so on).

Add a loss of your own with :func:`register_loss`; a config then names it (``--import MODULE``
on the command line imports the module that registers it) and ``fit`` records it::

    class MyLoss(nn.Module):
        def __init__(self, *, margin: float = 0.2): ...

    register_loss("my_loss", MyLoss, options={"margin": "the hinge's margin, a distance"})
    # deepmetric train --import mymodule loss.name=my_loss loss.margin=0.3
    # fit(net, data, loss=MyLoss(margin=0.3), epochs=5, out="runs/mine")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.pairs import ContrastiveLoss, LiftedStructuredLoss
from deepmetric.losses.proxies import MarginSoftmaxLoss, ProxyAnchorLoss
from deepmetric.losses.triplet import TripletLoss, triplet_margin_loss
from deepmetric.mining import MINING_RULES

#: ``build(options, classes, dim) -> loss``: ``options`` holds the entry's options (``loss.*``
#: values by name), ``classes`` the training label values and ``dim`` the embedding width
#: (what a loss with a learnable vector per class needs)
Build = Callable[[dict[str, Any], list[int], int], Callable[..., Any]]
#: ``read(loss) -> options``: the entry's options a loss object holds (those it cannot tell
#: are left out: they keep their defaults), or None when the object is not this entry's loss
Read = Callable[[object], dict[str, Any] | None]

#: options taken with any loss, and what each means
SHARED_OPTIONS: dict[str, str] = {
    "metric": "the distance between embeddings of validation, evaluation and the verification "
    "threshold (triplet, contrastive and lifted also train with it)",
    "softmax_weight": "mode=joint: the weight of the cross-entropy term (metric + weight * CE)",
    "memory": "a cross-batch memory of the last N samples (0: off; a loss with takes_memory)",
    "memory_start": "training steps before the cross-batch memory is first used",
    "ntxent_weight": "the weight of an NT-Xent term between two augmented views (0: off)",
    "temperature": "the temperature of the NT-Xent term",
}


@dataclass(frozen=True)
class LossEntry:
    """One loss by name.

    ``loss``: the loss class; ``options``: the ``loss.*`` options it takes (besides
    :data:`SHARED_OPTIONS`), each with what it means for this loss; ``build`` / ``read``: see
    :data:`Build` and :data:`Read`. ``pk_only``: it trains on P x K batches only (mode=batch or
    joint), where triplet, contrastive and lifted also have modes of their own;
    ``takes_memory``: it compares a batch with reference samples, so ``loss.memory`` may wrap
    it in a :class:`~deepmetric.losses.CrossBatchMemory`; ``distance_margin``: its
    ``loss.margin`` is a distance (the training log warns when embeddings collapse inside it).
    """

    name: str
    loss: Callable[..., Any]
    options: Mapping[str, str]
    build: Build
    read: Read
    pk_only: bool = True
    takes_memory: bool = False
    distance_margin: bool = False


#: The losses by name, in the order the config lists them (``loss.name``).
LOSSES: dict[str, LossEntry] = {}


def _build_with_options(cls: Callable[..., Any]) -> Build:
    """``cls(**options)``: a loss whose options are its keyword arguments."""

    def build(options: dict[str, Any], classes: list[int], dim: int) -> Callable[..., Any]:
        return cls(**options)

    return build


def _read_attributes(cls: type, options: Sequence[str]) -> Read:
    """An object of exactly ``cls``: its attributes named as the options it has."""

    def read(loss: object) -> dict[str, Any] | None:
        if type(loss) is not cls:
            return None
        return {key: getattr(loss, key) for key in options if hasattr(loss, key)}

    return read


def register_loss(
    name: str,
    loss: Callable[..., Any],
    *,
    options: Mapping[str, str] | None = None,
    build: Build | None = None,
    read: Read | None = None,
    pk_only: bool = True,
    takes_memory: bool = False,
    distance_margin: bool = False,
    replace: bool = False,
) -> LossEntry:
    """Register ``loss`` (a class) under ``name``, so that ``loss.name=NAME`` builds it and
    ``fit(..., loss=obj, out=...)`` records an ``obj`` of it in config.yaml.

    ``options``: the ``loss.*`` config keys it takes (``margin``, ``metric``, ...) and what
    each means for it. By default ``build`` is ``loss(**options)`` and ``read`` takes an
    object of exactly this class and its attributes named as the options. ``replace=True``
    replaces an entry of that name (else a ``ValueError``). Returns the entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a loss name is a word such as my_loss, got {name!r}")
    if name in LOSSES and not replace:
        raise ValueError(f"loss {name!r} is registered already: pass replace=True to replace it")
    if not callable(loss):
        raise ValueError(f"loss must be a loss class, got {loss!r}")
    options = dict(options or {})
    for key, doc in options.items():
        if not isinstance(key, str) or not isinstance(doc, str):
            raise ValueError(f"options maps loss.* names to what each means, got {key!r}: {doc!r}")
    if read is None and not isinstance(loss, type):
        raise ValueError(f"{name}: pass read= to tell a {loss!r} loss object apart")
    entry = LossEntry(
        name=name,
        loss=loss,
        options=options,
        build=build or _build_with_options(loss),
        read=read or _read_attributes(loss, list(options)),  # type: ignore[arg-type]
        pk_only=pk_only,
        takes_memory=takes_memory,
        distance_margin=distance_margin,
    )
    LOSSES[name] = entry
    return entry


def name_loss(loss: object) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` of the first entry that reads ``loss``, or None when no registered
    entry can name it."""
    for entry in LOSSES.values():
        options = entry.read(loss)
        if options is not None:
            return entry.name, options
    return None


# ----------------------------------------------------------------------------- the built-ins

_METRIC = "the distance d it trains with: euclidean, squared_euclidean or cosine"
_PROXY_LR = "the learning rate of its {} as a multiple of train.lr"


def _read_triplet(loss: object) -> dict[str, Any] | None:
    """A ``TripletLoss``, or ``triplet_margin_loss`` (the triplet and offline modes' loss), bare
    or in a ``functools.partial`` with its keywords."""
    if type(loss) is TripletLoss:
        return {key: getattr(loss, key) for key in ("margin", "mining", "metric", "soft")}
    if loss is triplet_margin_loss:
        return {}
    if isinstance(loss, functools.partial) and loss.func is triplet_margin_loss and not loss.args:
        return {k: v for k, v in loss.keywords.items() if k in ("margin", "metric", "soft")}
    return None


def _register_margin_softmax(kind: str, margin: str) -> None:
    """arcface or cosface: a ``MarginSoftmaxLoss`` of that ``kind``."""

    def build(options: dict[str, Any], classes: list[int], dim: int) -> MarginSoftmaxLoss:
        return MarginSoftmaxLoss(
            classes=classes,
            dim=dim,
            kind=kind,  # type: ignore[arg-type]
            scale=options["scale"],
            margin=options["margin"],
            ignore_unknown=True,
        )

    def read(loss: object) -> dict[str, Any] | None:
        if type(loss) is not MarginSoftmaxLoss or loss.kind != kind:
            return None
        return {"margin": loss.margin, "scale": loss.scale}

    register_loss(
        kind,
        MarginSoftmaxLoss,
        options={
            "margin": margin,
            "scale": "the scale s of the logits s * cos(theta)",
            "proxy_lr_factor": _PROXY_LR.format("class vectors"),
        },
        build=build,
        read=read,
    )


def _proxy_anchor(options: dict[str, Any], classes: list[int], dim: int) -> ProxyAnchorLoss:
    return ProxyAnchorLoss(classes=classes, dim=dim, ignore_unknown=True)


register_loss(
    "triplet",
    TripletLoss,
    options={
        "margin": "the hinge's margin: a triplet counts until d_an exceeds d_ap by this "
        "distance (unused with soft)",
        "mining": "which triplets of the batch count: "
        + "; ".join(f"{rule}: {MINING_RULES[rule].doc}" for rule in MINING_RULES),
        "metric": _METRIC,
        "soft": "softplus(d_ap - d_an) instead of the margin's hinge (Hermans et al. 2017)",
    },
    read=_read_triplet,
    pk_only=False,
    takes_memory=True,
    distance_margin=True,
)
register_loss(
    "contrastive",
    ContrastiveLoss,
    options={
        "margin": "the distance dissimilar pairs are pushed apart to",
        "metric": _METRIC,
    },
    pk_only=False,
    distance_margin=True,
)
register_loss(
    "lifted",
    LiftedStructuredLoss,
    options={
        "margin": "the margin m of each negative's exp(m - d): a distance",
        "metric": _METRIC,
    },
    pk_only=False,
    distance_margin=True,
)
register_loss("multi_similarity", MultiSimilarityLoss, takes_memory=True)
register_loss(
    "proxy_anchor",
    ProxyAnchorLoss,
    options={"proxy_lr_factor": _PROXY_LR.format("proxies (the paper uses 100)")},
    build=_proxy_anchor,
)
_register_margin_softmax(
    "arcface", "the angular margin added to the angle to the item's class vector (radians)"
)
_register_margin_softmax("cosface", "the cosine margin taken from the cosine to its class vector")

__all__ = [
    "LOSSES",
    "SHARED_OPTIONS",
    "Build",
    "LossEntry",
    "Read",
    "name_loss",
    "register_loss",
]
