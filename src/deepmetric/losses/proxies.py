"""Losses with one learnable vector per class: Proxy Anchor (Kim et al., CVPR 2020) and the
additive-margin softmax losses of face recognition, ArcFace and CosFace.

Both hold a (C, D) ``nn.Parameter``, so put them in the optimiser next to the model. ``classes``
lists the integer label values the C rows stand for, in row order (``[0, 1, 3, 5]``: labels need
not be 0..C-1). A label that is not in ``classes`` raises ``ValueError`` naming it, unless
``ignore_unknown=True``: then those items are left out, and a batch with nothing left gives 0
with a zero gradient.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.checks import integer_at_least, nonnegative_number, positive_number
from deepmetric.losses._common import (
    check_batch,
    check_margin,
    cosine_similarity,
    log1p_sum_exp,
    zero,
)

MarginKind = Literal["arcface", "cosface"]
MARGIN_KINDS: tuple[str, ...] = get_args(MarginKind)

#: ``margin=None`` means the paper's value: 0.5 rad (ArcFace), 0.35 (CosFace).
DEFAULT_MARGIN: dict[str, float] = {"arcface": 0.5, "cosface": 0.35}

#: acos is evaluated on the cosine clamped to [-1 + eps, 1 - eps]: its derivative is finite
#: there (about 2e3 at the ends) and 0 where the clamp acts.
_ACOS_EPS = 1e-7


def _check_classes(classes: Sequence[int]) -> tuple[int, ...]:
    items = None
    if not isinstance(classes, (str, bytes)) and isinstance(classes, Iterable):
        with contextlib.suppress(TypeError):  # a 0-d tensor is "iterable" but raises
            items = list(classes)
    if items is None:
        raise ValueError(f"classes must be a sequence of integers, got {type(classes).__name__}")
    values = []
    for c in items:
        if isinstance(c, bool) or (isinstance(c, torch.Tensor) and c.dtype == torch.bool):
            raise ValueError(f"classes must hold integers, got {c!r}")
        try:
            values.append(operator.index(c))
        except TypeError:
            raise ValueError(f"classes must hold integers, got {c!r}") from None
    if not values:
        raise ValueError("classes is empty: give at least one label value")
    if len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"classes has repeated values: {repeated}")
    return tuple(values)


def _check_dim(dim: int) -> int:
    return integer_at_least("dim", dim)


class _ClassVectors(nn.Module):
    """What the proxy losses share: ``classes`` checked and mapped to rows, ``dim``,
    ``ignore_unknown``. The subclass owns its (C, ``dim``) parameter."""

    def __init__(self, *, classes: Sequence[int], dim: int, ignore_unknown: bool) -> None:
        super().__init__()
        self.classes = _check_classes(classes)
        self.dim = _check_dim(dim)
        self.ignore_unknown = bool(ignore_unknown)
        values = torch.tensor(self.classes, dtype=torch.long)
        order = torch.argsort(values)
        # Not in the state dict: the rows are the parameter, the classes come from the config.
        self.register_buffer("_sorted_classes", values[order], persistent=False)
        self.register_buffer("_sorted_rows", order, persistent=False)

    def _rows(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the batch; return the (B,) mask of the items whose label is in ``classes`` and
        the (K,) row of each of them. Unknown labels raise unless ``ignore_unknown``."""
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            raise ValueError(
                f"{type(self).__name__} takes one class per item, labels (B,): its proxies stand "
                "for classes, so multi-hot labels or a positive mask have none to pull to"
            )
        check_batch(embeddings, labels)
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]}, the loss was built with "
                f"dim={self.dim}"
            )
        sorted_classes = self._sorted_classes
        labels = labels.to(device=sorted_classes.device, dtype=torch.long)
        at = torch.searchsorted(sorted_classes, labels).clamp_max_(len(sorted_classes) - 1)
        known = sorted_classes[at] == labels
        if not self.ignore_unknown and not bool(known.all()):
            unknown = sorted(set(labels[~known].tolist()))
            shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
            raise ValueError(
                f"labels not in classes: {shown}; pass ignore_unknown=True to leave such items "
                "out of the loss"
            )
        return known.to(embeddings.device), self._sorted_rows[at[known]].to(embeddings.device)

    def _extra(self) -> str:
        return f"classes={list(self.classes)}, dim={self.dim}, ignore_unknown={self.ignore_unknown}"


class ProxyAnchorLoss(_ClassVectors):
    """Proxy Anchor loss (Kim, Kim, Cho and Kwak, "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020).

    One learnable proxy per class, ``proxies`` (C, D), initialised as in the paper (Kaiming
    normal, ``mode="fan_out"``, from torch's global RNG: seed with ``torch.manual_seed``). With
    ``s(x, p)`` the cosine similarity (embeddings and proxies are L2-normalised inside), ``X_p+``
    the batch items of proxy p's class and ``X_p-`` the others::

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    where ``P`` is all C proxies and ``P+`` those with at least one item in the batch. Each sum is
    a logsumexp, so nothing overflows; O(B C).

    Call ``loss(embeddings (B, D), labels (B,))``; returns a scalar. A single item (B = 1) or a
    single class still gives a loss (the item is pulled to its proxy, pushed from the others);
    with ``ignore_unknown=True`` and no known label left: 0 with zero gradients.

    Keyword-only: ``classes`` (the C label values, in row order), ``dim`` (D), ``alpha=32``
    (scale) and ``delta=0.1`` (margin) as in the paper, ``ignore_unknown=False``.

    Example::

        loss_fn = ProxyAnchorLoss(classes=range(10), dim=64)
        optimiser = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()])
        loss_fn(model(images), labels).backward()
    """

    def __init__(
        self,
        *,
        classes: Sequence[int],
        dim: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        ignore_unknown: bool = False,
    ) -> None:
        super().__init__(classes=classes, dim=dim, ignore_unknown=ignore_unknown)
        self.alpha = positive_number("alpha", alpha)
        self.delta = nonnegative_number("delta", delta)
        self.proxies = nn.Parameter(torch.empty(len(self.classes), self.dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def extra_repr(self) -> str:
        return f"{self._extra()}, alpha={self.alpha}, delta={self.delta}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        known, rows = self._rows(embeddings, labels)
        if len(rows) == 0:
            return zero(embeddings) + zero(self.proxies)
        x = embeddings if bool(known.all()) else embeddings[known]
        sim = cosine_similarity(x, self.proxies)  # (K, C)
        own = F.one_hot(rows, len(self.classes)).bool()  # own[i, c]: item i belongs to proxy c
        pos = log1p_sum_exp(-self.alpha * (sim - self.delta), own, dim=0)  # (C,), 0 if unused
        neg = log1p_sum_exp(self.alpha * (sim + self.delta), ~own, dim=0)
        with_positive = int(own.any(dim=0).sum())
        return pos.sum() / with_positive + neg.mean()


class MarginSoftmaxLoss(_ClassVectors):
    """Additive-margin softmax over learnable class weights: ArcFace (Deng, Guo, Xue and
    Zafeiriou, CVPR 2019) or CosFace (Wang et al., CVPR 2018).

    ``weight`` (C, D) holds one vector per class, initialised uniformly on the unit sphere (a
    standard normal draw from torch's global RNG, normalised); embeddings and weights are
    L2-normalised inside, so ``cos(theta_ic)`` is their cosine similarity. The logits are
    ``scale * cos(theta_ic)``, except the target class ``y = y_i``:

    - ``"arcface"``: ``scale * cos(theta_iy + margin)`` (additive angular margin). Where
      ``theta_iy + margin > pi`` ``cos(theta + margin)`` would rise again, so there the target
      logit is ``scale * (cos(theta_iy) - margin * sin(margin))`` instead, the usual fallback of
      the reference (InsightFace) implementation: the logit keeps falling as theta grows. The
      cosine is clamped to [-1 + 1e-7, 1 - 1e-7] before ``acos``, so gradients stay finite;
    - ``"cosface"``: ``scale * (cos(theta_iy) - margin)`` (additive cosine margin).

    The loss is the cross-entropy of these logits, averaged over the batch items (those with a
    known label). O(B C).

    Defaults for small embedding tasks (tens to hundreds of classes, D of a few to a few hundred):
    ``scale=16`` (the papers use 64 for 10^4 to 10^5 face identities; a smaller scale keeps the
    softmax from saturating with few classes, and stays above AdaCos' ``sqrt(2) log(C - 1)`` for
    C up to about 80 000); ``margin=None`` means the paper's value for ``kind``: 0.5 rad for
    ArcFace, 0.35 for CosFace. ``margin=0`` gives the plain normalised softmax (both kinds).

    Call ``loss(embeddings (B, D), labels (B,))``; returns a scalar. ``classes`` and
    ``ignore_unknown`` as in :class:`ProxyAnchorLoss`: with no known label left, 0 with zero
    gradients.

    Example::

        loss_fn = MarginSoftmaxLoss(classes=range(10), dim=64, kind="cosface")
        loss_fn(model(images), labels).backward()
    """

    def __init__(
        self,
        *,
        classes: Sequence[int],
        dim: int,
        kind: MarginKind = "arcface",
        scale: float = 16.0,
        margin: float | None = None,
        ignore_unknown: bool = False,
    ) -> None:
        super().__init__(classes=classes, dim=dim, ignore_unknown=ignore_unknown)
        if kind not in MARGIN_KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(MARGIN_KINDS)}")
        self.kind = kind
        self.scale = positive_number("scale", scale)
        self.margin = check_margin(DEFAULT_MARGIN[kind] if margin is None else margin)
        if kind == "arcface" and self.margin >= math.pi:
            raise ValueError(f"an ArcFace margin is an angle in [0, pi), got {self.margin}")
        self.weight = nn.Parameter(F.normalize(torch.randn(len(self.classes), self.dim), dim=1))

    def extra_repr(self) -> str:
        return f"{self._extra()}, kind={self.kind!r}, scale={self.scale}, margin={self.margin}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        known, rows = self._rows(embeddings, labels)
        if len(rows) == 0:
            return zero(embeddings) + zero(self.weight)
        x = embeddings if bool(known.all()) else embeddings[known]
        cos = cosine_similarity(x, self.weight)  # (K, C)
        target = cos.gather(1, rows[:, None])  # (K, 1)
        m = self.margin
        if self.kind == "cosface":
            shifted = target - m
        else:
            theta = torch.acos(target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
            # theta + m <= pi  <=>  cos(theta) >= cos(pi - m) = -cos(m)
            shifted = torch.where(
                target >= -math.cos(m), torch.cos(theta + m), target - m * math.sin(m)
            )
        logits = cos.scatter(1, rows[:, None], shifted) * self.scale
        return F.cross_entropy(logits, rows)
