"""Triplet mining: which (anchor, positive, negative) triplets a loss looks at.

Pure functions over a distance matrix ``dist`` (B, R) between B anchors and R reference items,
the anchors' ``labels`` (B,) and the references' ``ref_labels`` (R,). With ``ref_labels=None`` the
reference set is the batch itself (R = B) and an item is never its own positive. A reference set
of other items (a memory bank, a gallery) is passed as ``ref_labels``; then every reference item
with the anchor's label is a positive, so do not include the anchors themselves there.

A triplet (a, p, n) is *valid* when ``label[a] == ref_label[p]`` (a != p in the batch case) and
``label[a] != ref_label[n]``. Nothing here builds a B x B x R tensor:

- counts over all valid triplets come from sorting each anchor's negative distances once and a
  ``searchsorted`` per positive pair, O(B R log R) time and O(B R) memory (``method="sort"``);
- or, when anchors have few positives (P x K batches with small K), from comparing each anchor's
  positive distances with its row of negative distances directly, chunked over anchors so that the
  temporary stays under ``CHUNK_ELEMENTS``: O(K B R) time, O(B R) memory (``method="direct"``).

Both are exact; ``method="auto"`` picks direct when the largest number of positives of an anchor
is at most ``DIRECT_MAX_POSITIVES``. Miners return indices or counts, never a loss, and carry no
gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple, get_args

import torch

Method = Literal["auto", "sort", "direct"]
METHODS: tuple[str, ...] = get_args(Method)

#: "auto" compares directly when no anchor has more positives than this (measured in
#: benchmarks/losses.py: direct wins clearly at K <= 16 on CPU).
DIRECT_MAX_POSITIVES = 16
#: Upper bound on the elements of the (chunk, positives, R) temporary of the direct method.
CHUNK_ELEMENTS = 1 << 24


class Triplets(NamedTuple):
    """Index triplets: ``anchor`` (T,) into the batch, ``positive`` and ``negative`` (T,) into the
    reference set (the batch itself when there is no separate reference)."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class PairMasks(NamedTuple):
    """Boolean (B, R) masks of the positive and the negative (anchor, reference) pairs."""

    positive: torch.Tensor
    negative: torch.Tensor


class TripletCategories(NamedTuple):
    """Counts of valid triplets by difficulty for a margin m > 0:
    hard ``d_an <= d_ap``, semi-hard ``d_ap < d_an < d_ap + m``, easy ``d_an >= d_ap + m``."""

    easy: int
    semi_hard: int
    hard: int

    @property
    def total(self) -> int:
        return self.easy + self.semi_hard + self.hard


# ----------------------------------------------------------------------------- validation


def check_labels(labels: torch.Tensor, n: int, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer (n,) tensor."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if len(labels) != n:
        raise ValueError(f"{name} has length {len(labels)} but there are {n} embeddings")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _check_dist(dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None) -> None:
    if not isinstance(dist, torch.Tensor) or dist.dim() != 2:
        raise ValueError("dist must be a 2-D (B, R) tensor")
    check_labels(labels, dist.shape[0])
    if ref_labels is None:
        if dist.shape[0] != dist.shape[1]:
            raise ValueError(
                f"dist is {tuple(dist.shape)}: without ref_labels it must be square (B, B)"
            )
    else:
        check_labels(ref_labels, dist.shape[1], "ref_labels")


# ----------------------------------------------------------------------------- masks


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> PairMasks:
    """Positive and negative (B, R) masks; without ``ref_labels`` the diagonal is excluded."""
    same_batch = ref_labels is None
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    positive = same
    if same_batch:
        positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return PairMasks(positive=positive, negative=~same)


def positive_columns(positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's positive column indices, left-packed into (B, Pmax), and a validity mask.

    Padding repeats the row's first positive, so a computation over the padded entries gives
    the first positive's result again and a scatter of it back writes the same value twice.
    """
    counts = positive.sum(dim=1)
    pmax = int(counts.max()) if positive.numel() else 0
    rows, cols = positive.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=positive.device) - starts[rows]
    index = torch.zeros(positive.shape[0], pmax, dtype=torch.long, device=positive.device)
    index[rows, rank] = cols
    valid = torch.arange(pmax, device=positive.device)[None, :] < counts[:, None]
    return torch.where(valid, index, index[:, :1]), valid


def row_chunks(n_rows: int, row_elements: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _resolve_method(method: str, masks: PairMasks) -> str:
    check_method(method)
    if method != "auto":
        return method
    pmax = int(masks.positive.sum(dim=1).max()) if masks.positive.numel() else 0
    return "direct" if pmax <= DIRECT_MAX_POSITIVES else "sort"


# ----------------------------------------------------------------------------- counting


@torch.no_grad()
def count_negatives_below(
    dist: torch.Tensor,
    masks: PairMasks,
    thresholds: torch.Tensor,
    *,
    inclusive: bool = False,
    with_negative_counts: bool = False,
    method: Method = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Count, for every positive pair (a, p), the negatives of a below a threshold.

    Args:
        dist: (B, R) distances.
        masks: positive and negative (B, R) masks.
        thresholds: (B, R) ``t[a, p]``, read at the positive pairs only.
        inclusive: count ``d_an <= t_ap`` instead of ``d_an < t_ap``.
        with_negative_counts: also count, for every negative pair (a, n), the positives p of a
            with ``d_an < t_ap`` (resp. ``<=``): the same set of triplets seen from n.
        method: ``"sort"``, ``"direct"`` or ``"auto"`` (see the module docstring).

    Returns:
        ``(per_positive, per_negative)``: int64 (B, R) counts, zero off their masks;
        ``per_negative`` is ``None`` unless asked for.
    """
    if _resolve_method(method, masks) == "sort":
        return _count_sort(dist, masks, thresholds, inclusive, with_negative_counts)
    return _count_direct(dist, masks, thresholds, inclusive, with_negative_counts)


def _count_sort(
    dist: torch.Tensor, masks: PairMasks, t: torch.Tensor, inclusive: bool, with_neg: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    neg_sorted = torch.where(masks.negative, dist, inf).sort(dim=1).values
    # Negatives are a prefix of each sorted row (non-negatives are +inf at the end).
    below = torch.searchsorted(neg_sorted, t.contiguous(), right=inclusive)
    per_pos = below.masked_fill_(~masks.positive, 0)
    per_neg = None
    if with_neg:
        # Positive thresholds sorted with -inf padding in front: #{p: t_ap > d} = R - #{<= d}.
        pos_sorted = torch.where(masks.positive, t, -inf).sort(dim=1).values
        not_above = torch.searchsorted(pos_sorted, dist.contiguous(), right=not inclusive)
        per_neg = (dist.shape[1] - not_above).masked_fill_(~masks.negative, 0)
    return per_pos, per_neg


def _count_direct(
    dist: torch.Tensor, masks: PairMasks, t: torch.Tensor, inclusive: bool, with_neg: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    pos_index, pos_valid = positive_columns(masks.positive)
    per_pos = torch.zeros(dist.shape, dtype=torch.long, device=dist.device)
    per_neg = torch.zeros_like(per_pos) if with_neg else None
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    for rows in row_chunks(dist.shape[0], pos_index.shape[1] * dist.shape[1]):
        index = pos_index[rows]
        t_pos = torch.where(pos_valid[rows], t[rows].gather(1, index), -inf)  # (c, P)
        d_neg = torch.where(masks.negative[rows], dist[rows], inf)  # (c, R)
        if inclusive:
            hit = d_neg[:, None, :] <= t_pos[:, :, None]  # (c, P, R)
        else:
            hit = d_neg[:, None, :] < t_pos[:, :, None]
        per_pos[rows].scatter_add_(1, index, hit.sum(dim=2))
        if per_neg is not None:
            per_neg[rows] = hit.sum(dim=1)
    return per_pos, per_neg


# ----------------------------------------------------------------------------- miners


@torch.no_grad()
def batch_all_counts(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float,
    method: Method = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-all active set ``{(a, p, n) valid : d_an < d_ap + margin}``, as counts.

    Returns ``(per_positive, per_negative)``, int64 (B, R): ``per_positive[a, p]`` is the number
    of active triplets through the positive pair (a, p) and ``per_negative[a, n]`` through the
    negative pair (a, n). The hinge sum over active triplets is then linear in ``dist``:
    ``sum(per_positive * (dist + margin)) - sum(per_negative * dist)``.
    """
    _check_dist(dist, labels, ref_labels)
    masks = pair_masks(labels, ref_labels)
    per_pos, per_neg = count_negatives_below(
        dist, masks, dist + margin, with_negative_counts=True, method=method
    )
    assert per_neg is not None
    return per_pos, per_neg


@torch.no_grad()
def batch_all(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float,
) -> Triplets:
    """Every valid triplet with a positive hinge, ``d_an < d_ap + margin``, as explicit indices.

    The output has one entry per active triplet (up to B * R^2 of them in the worst case), so use
    this to inspect a batch; the loss uses :func:`batch_all_counts`, which never lists them.
    """
    _check_dist(dist, labels, ref_labels)
    masks = pair_masks(labels, ref_labels)
    pos_index, pos_valid = positive_columns(masks.positive)
    found: list[torch.Tensor] = []
    for rows in row_chunks(dist.shape[0], pos_index.shape[1] * dist.shape[1]):
        index = pos_index[rows]
        d_pos = dist[rows].gather(1, index)
        hit = (dist[rows][:, None, :] < d_pos[:, :, None] + margin) & pos_valid[rows][:, :, None]
        hit &= masks.negative[rows][:, None, :]
        a, j, n = hit.nonzero(as_tuple=True)
        found.append(torch.stack([a + rows.start, index[a, j], n]))
    triplets = torch.cat(found, dim=1) if found else torch.zeros(3, 0, dtype=torch.long)
    return Triplets(triplets[0], triplets[1], triplets[2])


@torch.no_grad()
def batch_hard(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None = None
) -> Triplets:
    """For each anchor with a positive and a negative: its farthest positive and its nearest
    negative (Hermans et al. 2017). O(B R)."""
    _check_dist(dist, labels, ref_labels)
    masks = pair_masks(labels, ref_labels)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    positive = torch.where(masks.positive, dist, -inf).argmax(dim=1)
    negative = torch.where(masks.negative, dist, inf).argmin(dim=1)
    anchor = (masks.positive.any(dim=1) & masks.negative.any(dim=1)).nonzero().flatten()
    return Triplets(anchor, positive[anchor], negative[anchor])


@torch.no_grad()
def semi_hard(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    method: Method = "auto",
) -> Triplets:
    """For every positive pair (a, p) whose anchor has a negative: the negative with the smallest
    ``d_an`` strictly greater than ``d_ap``, or, when there is none, the negative with the largest
    ``d_an`` (FaceNet, Schroff et al. 2015; TensorFlow Addons' ``triplet_semihard_loss``).

    Ties between equal negative distances go to the lowest index. O(B R log R) (sort) or
    O(K B R) (direct).
    """
    _check_dist(dist, labels, ref_labels)
    masks = pair_masks(labels, ref_labels)
    has_negative = masks.negative.any(dim=1)
    pairs = masks.positive & has_negative[:, None]
    if _resolve_method(method, masks) == "sort":
        chosen = _semi_hard_sort(dist, masks)
    else:
        chosen = _semi_hard_direct(dist, masks)
    anchor, positive = pairs.nonzero(as_tuple=True)
    return Triplets(anchor, positive, chosen[anchor, positive])


def _semi_hard_sort(dist: torch.Tensor, masks: PairMasks) -> torch.Tensor:
    """(B, R): for each (a, p), the column of the chosen negative (garbage off the positives)."""
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    neg_sorted, order = torch.where(masks.negative, dist, inf).sort(dim=1, stable=True)
    n_neg = masks.negative.sum(dim=1, keepdim=True)
    first_above = torch.searchsorted(neg_sorted, dist.contiguous(), right=True)
    # Among equal largest distances the stable sort puts the lowest index first.
    largest = torch.searchsorted(neg_sorted, neg_sorted.gather(1, (n_neg - 1).clamp_min(0)))
    position = torch.where(first_above < n_neg, first_above, largest)
    return order.gather(1, position.clamp_max(dist.shape[1] - 1))


def _semi_hard_direct(dist: torch.Tensor, masks: PairMasks) -> torch.Tensor:
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    pos_index, _ = positive_columns(masks.positive)
    largest = torch.where(masks.negative, dist, -inf).argmax(dim=1)  # (B,)
    chosen = torch.zeros(dist.shape, dtype=torch.long, device=dist.device)
    for rows in row_chunks(dist.shape[0], pos_index.shape[1] * dist.shape[1]):
        index = pos_index[rows]
        d_pos = dist[rows].gather(1, index)  # (c, P)
        d_neg = torch.where(masks.negative[rows], dist[rows], inf)  # (c, R)
        above = torch.where(d_neg[:, None, :] > d_pos[:, :, None], d_neg[:, None, :], inf)
        value, column = above.min(dim=2)  # (c, P)
        column = torch.where(torch.isinf(value), largest[rows, None], column)
        chosen[rows] = chosen[rows].scatter(1, index, column)
    return chosen


@torch.no_grad()
def triplet_categories(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float,
    method: Method = "auto",
) -> TripletCategories:
    """Count the valid triplets of a batch by difficulty (see :class:`TripletCategories`).

    Each triplet is counted once: hard first (``d_an <= d_ap``), then easy
    (``d_an >= d_ap + margin``), the rest semi-hard. O(B R log R) or O(K B R), no triplet list.
    """
    _check_dist(dist, labels, ref_labels)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    masks = pair_masks(labels, ref_labels)
    method = _resolve_method(method, masks)
    hard, _ = count_negatives_below(dist, masks, dist, inclusive=True, method=method)
    below_margin, _ = count_negatives_below(dist, masks, dist + margin, method=method)
    not_easy = torch.maximum(hard, below_margin)
    total = int((masks.positive.sum(dim=1) * masks.negative.sum(dim=1)).sum())
    n_hard = int(hard.sum())
    n_not_easy = int(not_easy.sum())
    return TripletCategories(easy=total - n_not_easy, semi_hard=n_not_easy - n_hard, hard=n_hard)
