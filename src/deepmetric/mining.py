"""Triplet mining: which (anchor, positive, negative) triplets a loss looks at.

Pure functions over a distance matrix ``dist`` (B, R) between B anchors and R reference items,
the anchors' ``labels`` (B,) and the references' ``ref_labels`` (R,). With ``ref_labels=None`` the
reference set is the batch itself (R = B) and an item is never its own positive. A reference set
of other items (a memory bank, a gallery) is passed as ``ref_labels``; then every reference item
with the anchor's label is a positive, so do not include the anchors themselves there.

**Multi-label data.** ``labels`` may also be multi-hot (B, L) 0/1 integers (``ref_labels``
(R, L)): a positive shares at least one label with the anchor, a negative shares none, and an
item with no label has no positive and is a negative of everyone; or a boolean positive mask
(B, R), with no ``ref_labels``: a square mask is the batch against itself (its diagonal is
ignored), any other shape a reference set. :func:`tile_masks` is the one place any form
becomes pairs; :func:`check_pair_labels` checks them.

A triplet (a, p, n) is *valid* when a and p are positives (``label[a] == ref_label[p]``, a != p
in the batch case) and a and n negatives (``label[a] != ref_label[n]``). Nothing here builds a
B x R x R tensor. Each anchor's positives are packed into P "slots" (P = the largest number of
positives of an anchor: K - 1 in a P x K batch), and the triplets are counted or chosen in one
of two exact ways:

- ``method="sort"``: sort each anchor's negative distances once, then a ``searchsorted`` per
  positive pair and per negative pair: O(B R log R) time, O(B R) memory;
- ``method="direct"``: for each positive slot, compare the positive distances with the whole row
  of negative distances: O(P B R) time, O(B R) memory. Faster when P is small.

``method="auto"`` picks direct when P is at most ``DIRECT_MAX_POSITIVES``. Miners return indices
or counts, never a loss, and carry no gradient.

The index types :class:`Triplets` and :class:`Pairs` (and the masks :class:`PairMasks`) are also
what a loss takes as given tuples (``indices=``) or from a miner of one's own (``miner=``);
:func:`check_triplets` and :func:`check_pairs` check them, :func:`pairs_from_masks` and
:func:`pairs_from_same` build :class:`Pairs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple, get_args

import torch

from deepmetric.tiles import default_tile_bytes, row_blocks

Method = Literal["auto", "sort", "direct"]
METHODS: tuple[str, ...] = get_args(Method)

#: "auto" compares directly when no anchor has more positives than this (K <= 48). Measured
#: with benchmarks/crossover.py at B = 4096 on 2 CPU cores (docs/benchmarks.md, 2026-12-05,
#: after the direct methods lost their comparison masks): direct is faster up to K = 48 for
#: batch-all (584 vs 601 ms) and up to K = 56 for semi-hard; at K = 4 it is 3.5-5.6x faster.
#: (Before, 2026-11-22: K <= 13, when direct semi-hard lost from K = 12.)
DIRECT_MAX_POSITIVES = 47


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


class Pairs(NamedTuple):
    """Index pairs: the positive pairs ``(pos_anchor[i], positive[i])``, (P,) each, and the
    negative pairs ``(neg_anchor[j], negative[j])``, (N,) each; anchors index the batch, the
    others the reference set (the batch itself when there is no separate reference). The order
    of pytorch-metric-learning's ``(a1, p, a2, n)``, so ``Pairs(*a1_p_a2_n)`` converts one."""

    pos_anchor: torch.Tensor
    positive: torch.Tensor
    neg_anchor: torch.Tensor
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


LabelForm = Literal["classes", "multi_hot", "mask"]


def check_pair_labels(
    labels: object,
    ref_labels: object,
    n: int,
    n_refs: int,
    *,
    same_set: bool,
    name: str = "labels",
) -> LabelForm:
    """Check labels in one of three forms and return which, or raise a one-line ``ValueError``:

    - ``"classes"``: integer (n,), one class per item; ``ref_labels`` integer (n_refs,);
    - ``"multi_hot"``: a 2-D integer or floating-point (n, L) tensor of 0 and 1, item i has
      label l when ``labels[i, l] == 1``; ``ref_labels`` (n_refs, L) likewise;
    - ``"mask"``: a 2-D **boolean** (n, n_refs) tensor, ``labels[i, j]`` True when reference j
      is a positive of item i (the batch itself: (n, n); its diagonal is ignored); no
      ``ref_labels`` (the mask already says everything).

    A 2-D boolean tensor is always read as a mask, so pass multi-hot labels as 0/1 integers;
    a (B, 1) one is refused (a column of classes, the usual slip, not one label column).
    ``same_set``: the references are the batch, ``ref_labels`` is then None.
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 1:
        check_labels(labels, n, name)
        if ref_labels is not None:
            check_labels(ref_labels, n_refs, "ref_labels")
        return "classes"
    if labels.dim() != 2:
        raise ValueError(
            f"{name} must be (B,) classes, (B, L) multi-hot or a (B, R) boolean mask, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.dtype == torch.bool:
        if ref_labels is not None:
            raise ValueError(f"{name} is a boolean positive mask: pass no ref_labels with it")
        if labels.shape != (n, n_refs):
            raise ValueError(
                f"{name} is a boolean positive mask of shape {tuple(labels.shape)}, expected "
                f"({n}, {n_refs}) (multi-hot labels must be 0/1 integers, not booleans)"
            )
        return "mask"
    if labels.shape[1] == 1:  # the usual slip is a column of classes, labels[:, None]
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}: pass classes 1-D (B,); multi-hot labels "
            "need at least 2 columns"
        )
    _check_multi_hot(labels, n, name)
    if same_set:
        if ref_labels is not None:
            raise ValueError("ref_labels must be None when the references are the batch")
        return "multi_hot"
    if not isinstance(ref_labels, torch.Tensor) or ref_labels.dim() != 2:
        raise ValueError(f"{name} are multi-hot (B, L): ref_labels must be multi-hot (R, L) too")
    _check_multi_hot(ref_labels, n_refs, "ref_labels")
    if ref_labels.shape[1] != labels.shape[1]:
        raise ValueError(
            f"{name} have {labels.shape[1]} label columns, ref_labels {ref_labels.shape[1]}"
        )
    return "multi_hot"


def _check_multi_hot(labels: torch.Tensor, n: int, name: str) -> None:
    if labels.dtype.is_complex:
        raise ValueError(f"{name} must be a real 0/1 multi-hot tensor, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} has {labels.shape[0]} rows but there are {n} items (classes are 1-D (n,), "
            "multi-hot (n, L))"
        )
    if labels.numel() and not ((labels == 0) | (labels == 1)).all():
        raise ValueError(f"{name} is multi-hot (B, L) and must hold only 0 and 1")


def _check_index(t: object, name: str, n: int) -> torch.Tensor:
    """``t`` as an int64 tensor after checking it is a 1-D integer tensor of values in [0, n)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of indices, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= n):
        bad = t[(t < 0) | (t >= n)][0]
        raise ValueError(f"{name} has index {int(bad)} out of range: it must be in [0, {n})")
    return t.long()


def _check_distinct(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    same = (x == y).nonzero()
    if len(same):
        i = int(same[0])
        raise ValueError(f"{what} at entry {i} (both {int(x[i])}): such a tuple means nothing")


def check_triplets(
    indices: object, n_anchors: int, n_refs: int, *, same_set: bool, name: str = "indices"
) -> Triplets:
    """``indices`` as :class:`Triplets` of int64 tensors, or a one-line ``ValueError``.

    A :class:`Triplets` (or any 3-tuple) of 1-D integer tensors of one length T, ``anchor`` in
    [0, ``n_anchors``), ``positive`` and ``negative`` in [0, ``n_refs``), and no triplet whose
    positive is its negative. With ``same_set`` (the references are the anchors' batch) an anchor
    may be neither its own positive nor its own negative. T = 0 is allowed.
    """
    if not isinstance(indices, tuple) or len(indices) != 3:
        raise ValueError(
            f"{name} must be Triplets(anchor, positive, negative), got {type(indices).__name__}"
        )
    a = _check_index(indices[0], f"{name}.anchor", n_anchors)
    p = _check_index(indices[1], f"{name}.positive", n_refs)
    n = _check_index(indices[2], f"{name}.negative", n_refs)
    if not len(a) == len(p) == len(n):
        raise ValueError(
            f"{name}: anchor, positive and negative have different lengths "
            f"{len(a)}, {len(p)}, {len(n)}"
        )
    _check_distinct(p, n, f"{name}: positive equals negative")
    if same_set:
        _check_distinct(a, p, f"{name}: anchor equals positive")
        _check_distinct(a, n, f"{name}: anchor equals negative")
    return Triplets(a, p, n)


def check_pairs(
    indices: object, n_anchors: int, n_refs: int, *, same_set: bool, name: str = "indices"
) -> Pairs:
    """``indices`` as :class:`Pairs` of int64 tensors, or a one-line ``ValueError``.

    Either :class:`Pairs` (or any 4-tuple) of 1-D integer tensors, ``pos_anchor`` and
    ``positive`` of one length, ``neg_anchor`` and ``negative`` of one length, anchors in
    [0, ``n_anchors``), the others in [0, ``n_refs``); or :class:`PairMasks` of boolean
    (``n_anchors``, ``n_refs``) masks, read with :func:`pairs_from_masks`. With ``same_set`` no
    item is paired with itself.
    """
    if isinstance(indices, PairMasks):
        for field, mask in zip(PairMasks._fields, indices):
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"{name}.{field} must be a boolean mask tensor")
            if mask.shape != (n_anchors, n_refs):
                raise ValueError(
                    f"{name}.{field} has shape {tuple(mask.shape)}, expected "
                    f"({n_anchors}, {n_refs})"
                )
        indices = pairs_from_masks(indices)
    if not isinstance(indices, tuple) or len(indices) != 4:
        raise ValueError(
            f"{name} must be Pairs(pos_anchor, positive, neg_anchor, negative) or PairMasks, "
            f"got {type(indices).__name__}"
        )
    pairs = Pairs(
        _check_index(indices[0], f"{name}.pos_anchor", n_anchors),
        _check_index(indices[1], f"{name}.positive", n_refs),
        _check_index(indices[2], f"{name}.neg_anchor", n_anchors),
        _check_index(indices[3], f"{name}.negative", n_refs),
    )
    for kind, first, second in (("positive", *pairs[:2]), ("negative", *pairs[2:])):
        if len(first) != len(second):
            raise ValueError(
                f"{name}: the {kind} pairs' anchor and {kind} indices have different lengths "
                f"{len(first)}, {len(second)}"
            )
        if same_set:
            _check_distinct(first, second, f"{name}: a {kind} pair of an item with itself")
    return pairs


def pairs_from_masks(masks: PairMasks) -> Pairs:
    """The True entries of (B, R) :class:`PairMasks` as :class:`Pairs`, in row-major order.
    ``pairs_from_masks(pair_masks(labels))`` lists every ordered pair of the batch (i, j), i != j,
    so each unordered pair appears twice."""
    a1, p = masks.positive.nonzero(as_tuple=True)
    a2, n = masks.negative.nonzero(as_tuple=True)
    return Pairs(a1, p, a2, n)


def pairs_from_same(first: torch.Tensor, second: torch.Tensor, same: torch.Tensor) -> Pairs:
    """Siamese pair data, ``(first[i], second[i])`` similar where ``same[i]`` (1/True) and
    dissimilar where not (0/False), as :class:`Pairs`: the similar ones first, each group in
    its input order."""
    same = torch.as_tensor(same)
    if same.shape != first.shape or same.shape != second.shape or same.dim() != 1:
        raise ValueError(
            "first, second and same must be (N,) tensors of one shape, got "
            f"{tuple(first.shape)}, {tuple(second.shape)}, {tuple(same.shape)}"
        )
    if not ((same == 0) | (same == 1)).all():
        raise ValueError("same must hold only 0 and 1 (or False and True)")
    same = same.bool().to(first.device)
    return Pairs(first[same], second[same], first[~same], second[~same])


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _check_dist(dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None) -> None:
    if not isinstance(dist, torch.Tensor) or dist.dim() != 2:
        raise ValueError("dist must be a 2-D (B, R) tensor")
    b, r = dist.shape
    form = check_pair_labels(labels, ref_labels, b, r, same_set=ref_labels is None and b == r)
    if ref_labels is None and b != r and form != "mask":
        raise ValueError(f"dist is {(b, r)}: without ref_labels it must be square (B, B)")


# ----------------------------------------------------------------------------- masks


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> PairMasks:
    """Positive and negative (B, R) masks of labels in any form (see :func:`tile_masks`);
    without ``ref_labels`` the references are the batch and the diagonal is excluded."""
    if ref_labels is None:
        return tile_masks(labels, labels, self_offset=0)
    return tile_masks(labels, ref_labels, self_offset=None)


def tile_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor, *, self_offset: int | None
) -> PairMasks:
    """Positive and negative (T, R) masks of a tile of T anchors against R references: the one
    place labels become pairs, for each of the three label forms (see :func:`check_pair_labels`)
    of the tile's rows ``labels`` and the references' ``ref_labels``:

    - classes, (T,) and (R,) integers: positive ``labels[a] == ref_labels[r]``;
    - multi-hot, (T, L) and (R, L) 0/1: positive when the two share a label,
      ``labels[a] . ref_labels[r] > 0``; an item with no label (an all-zero row) shares none, so
      it has no positive and is a negative of everyone;
    - a boolean positive mask, its rows (T, R) as ``labels`` (``ref_labels`` is then unused):
      positive ``labels[a, r]``.

    Negative is "not positive". With ``self_offset`` the references are the batch and anchor a
    is its item ``self_offset + a``: that pair is neither positive nor negative (a mask's
    diagonal is ignored). Slicing rows of the batch's labels (``labels[start:stop]``) gives a
    tile's labels in every form, so tiled code never holds more than (T, R).
    """
    if labels.dim() == 1:
        same = labels[:, None] == ref_labels[None, :]
    elif labels.dtype == torch.bool:
        same = labels
    else:
        same = (labels.to(torch.float32) @ ref_labels.to(torch.float32).T) > 0
    positive, negative = same, ~same
    if self_offset is not None:
        positive = same.clone()
        positive.diagonal(offset=self_offset).fill_(False)
        if labels.dim() != 1:  # a class label always equals itself: no work there
            negative.diagonal(offset=self_offset).fill_(False)
    return PairMasks(positive=positive, negative=negative)


def _tiles(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None
) -> Iterator[tuple[int, int, torch.Tensor, PairMasks]]:
    """``(start, stop, dist[start:stop], masks)`` over blocks of rows of a checked ``dist``,
    each within the device's tile budget (:func:`deepmetric.tiles.row_blocks`), so a miner's
    (rows, R) temporaries stay bounded whatever B."""
    labels = labels.to(dist.device)
    ref = labels if ref_labels is None else ref_labels.to(dist.device)
    same_set = ref_labels is None and dist.shape[0] == dist.shape[1]  # a (B, R) mask: refs
    budget = default_tile_bytes(dist.device)
    for start, stop in row_blocks(dist.shape[0], dist.shape[1], budget):
        offset = start if same_set else None
        yield start, stop, dist[start:stop], tile_masks(labels[start:stop], ref, self_offset=offset)


class Slots(NamedTuple):
    """Each anchor's positive columns, left-packed: ``index`` (B, P) int64 and ``valid`` (B, P).

    Padding repeats the row's first positive, so a computation over a padded slot gives that
    positive's result again and scattering it back writes the same value twice.
    """

    index: torch.Tensor
    valid: torch.Tensor


def true_entries(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` of a (B, R) boolean mask, in row-major order. A sparse
    contiguous mask whose rows are whole 8-byte words is scanned as int64 words first (8x fewer
    elements), then only the words that hold a True are looked into."""
    b, r = mask.shape
    if r == 0 or r % 8 or not mask.is_contiguous() or mask.storage_offset() % 8:
        return mask.nonzero(as_tuple=True)
    word_row, word = mask.view(torch.int64).nonzero(as_tuple=True)  # (N,) words with a True
    byte_of, byte = mask.view(b, r // 8, 8)[word_row, word].nonzero(as_tuple=True)
    return word_row[byte_of], word[byte_of] * 8 + byte


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """``mask.sum(dim=1)`` of a (B, R) boolean mask, int64; summed as bytes into int32 (a
    boolean sum is several times slower on the CPU)."""
    return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32).long()


def any_per_row(mask: torch.Tensor) -> torch.Tensor:
    """``mask.any(dim=1)`` of a (B, R) boolean mask, as the bytes' maximum (faster on the CPU)."""
    if mask.shape[1] == 0:
        return mask.new_zeros(mask.shape[0])
    return mask.view(torch.uint8).amax(dim=1).bool()


def positive_slots(positive: torch.Tensor) -> Slots:
    """Pack the True columns of each row of a (B, R) mask into (B, P) slots."""
    counts = row_counts(positive)
    pmax = int(counts.max()) if positive.numel() else 0
    rows, cols = true_entries(positive)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=positive.device) - starts[rows]
    index = torch.zeros(positive.shape[0], pmax, dtype=torch.long, device=positive.device)
    index[rows, rank] = cols
    valid = torch.arange(pmax, device=positive.device)[None, :] < counts[:, None]
    return Slots(torch.where(valid, index, index[:, :1]), valid)


def _resolve_method(method: str, slots: Slots) -> str:
    check_method(method)
    if method != "auto":
        return method
    return "direct" if slots.index.shape[1] <= DIRECT_MAX_POSITIVES else "sort"


def _inf(dist: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)


# ----------------------------------------------------------------------------- counting


def _count_below(
    dist: torch.Tensor,
    masks: PairMasks,
    slots: Slots,
    t_slots: torch.Tensor,
    *,
    inclusive: bool,
    with_negative_counts: bool,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every positive slot (a, j) with threshold ``t_slots[a, j]``: the number of negatives
    n of a with ``d_an < t`` (``<=`` when inclusive), int64 (B, P), 0 on padding. Optionally,
    for every negative pair (a, n), the number of positive slots of a with ``d_an < t``,
    (B, R) uint8 or int32, 0 off the negatives: the same triplets seen from the negative."""
    inf = _inf(dist)
    t_slots = torch.where(slots.valid, t_slots, -inf)  # padding counts nothing
    if method == "sort":
        neg_sorted = torch.where(masks.negative, dist, inf).sort(dim=1).values
        per_slot = torch.searchsorted(neg_sorted, t_slots, right=inclusive)
        if not with_negative_counts:
            return per_slot, None
        # #{j : t_aj > d} (strict) or #{j : t_aj >= d} = P - #{j : t_aj <= d} (resp. < d).
        t_sorted = t_slots.sort(dim=1).values.contiguous()
        not_above = torch.searchsorted(t_sorted, dist, right=not inclusive, out_int32=True)
        per_neg = (t_slots.shape[1] - not_above).masked_fill_(~masks.negative, 0)
        return per_slot, per_neg
    d_neg = torch.where(masks.negative, dist, inf)
    per_slot = torch.empty(slots.index.shape, dtype=torch.long, device=dist.device)
    per_neg = None
    if with_negative_counts:  # uint8 is 8x cheaper to accumulate into than int64
        small = t_slots.shape[1] <= torch.iinfo(torch.uint8).max
        dtype = torch.uint8 if small else torch.int32
        per_neg = torch.zeros(dist.shape, dtype=dtype, device=dist.device)
    compare = torch.le if inclusive else torch.lt
    hit = torch.empty(dist.shape, dtype=torch.bool, device=dist.device)
    for j in range(t_slots.shape[1]):
        compare(d_neg, t_slots[:, j : j + 1], out=hit)  # (B, R)
        per_slot[:, j] = row_counts(hit)
        if per_neg is not None:
            per_neg += hit
    return per_slot, per_neg


# ----------------------------------------------------------------------------- miners


class ActiveCounts(NamedTuple):
    """The batch-all active set ``{(a, p, n) valid : d_an < d_ap + margin}``, as counts.

    ``per_slot[a, j]`` (B, P) int64: active triplets through the positive pair
    (a, ``slots.index[a, j]``), 0 on padding; ``per_negative[a, n]`` (B, R) integer: active
    triplets through the negative pair (a, n). Their sums are equal: the number of active
    triplets. The hinge sum over the active triplets is linear in ``dist``:
    ``sum(per_slot * (d_pos + margin)) - sum(per_negative * dist)``.
    """

    slots: Slots
    per_slot: torch.Tensor
    per_negative: torch.Tensor

    def per_positive(self) -> torch.Tensor:
        """``per_slot`` scattered back to a (B, R) int64 matrix, 0 off the positive pairs."""
        out = torch.zeros(self.per_negative.shape, dtype=torch.long, device=self.per_slot.device)
        return out.scatter_add_(1, self.slots.index, self.per_slot)


def active_counts_tile(
    dist: torch.Tensor, masks: PairMasks, *, margin: float, method: Method = "auto"
) -> ActiveCounts:
    """:class:`ActiveCounts` of rows of a distance matrix (T, R) with their masks."""
    slots = positive_slots(masks.positive)
    per_slot, per_neg = _count_below(
        dist,
        masks,
        slots,
        dist.gather(1, slots.index) + margin,
        inclusive=False,
        with_negative_counts=True,
        method=_resolve_method(method, slots),
    )
    assert per_neg is not None
    return ActiveCounts(slots, per_slot, per_neg)


@torch.no_grad()
def batch_all_counts(
    dist: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    *,
    margin: float,
    method: Method = "auto",
) -> ActiveCounts:
    """Count the batch-all active triplets through each positive and each negative pair,
    without listing them (see :class:`ActiveCounts`). Computed in blocks of rows."""
    _check_dist(dist, labels, ref_labels)
    check_method(method)
    parts = [
        active_counts_tile(d, masks, margin=margin, method=method)
        for _, _, d, masks in _tiles(dist, labels, ref_labels)
    ]
    if len(parts) == 1:
        return parts[0]
    width = max(p.slots.index.shape[1] for p in parts)
    parts = [_widen(p, width) for p in parts]
    dtype = max((p.per_negative.dtype for p in parts), key=lambda d: torch.iinfo(d).bits)
    return ActiveCounts(
        Slots(torch.cat([p.slots.index for p in parts]), torch.cat([p.slots.valid for p in parts])),
        torch.cat([p.per_slot for p in parts]),
        torch.cat([p.per_negative.to(dtype) for p in parts]),
    )


def _widen(part: ActiveCounts, width: int) -> ActiveCounts:
    """``part`` with its slots padded to ``width`` (padding repeats a row's first positive)."""
    index, valid = part.slots
    extra = width - index.shape[1]
    if extra == 0:
        return part
    first = index[:, :1] if index.shape[1] else index.new_zeros(len(index), 1)
    return ActiveCounts(
        Slots(
            torch.cat([index, first.expand(-1, extra)], dim=1),
            torch.cat([valid, valid.new_zeros(len(valid), extra)], dim=1),
        ),
        torch.cat([part.per_slot, part.per_slot.new_zeros(len(index), extra)], dim=1),
        part.per_negative,
    )


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
    found = []
    for start, _, d, masks in _tiles(dist, labels, ref_labels):
        slots = positive_slots(masks.positive)
        for j in range(slots.index.shape[1]):
            positive = slots.index[:, j]
            t = d.gather(1, positive[:, None])[:, 0] + margin
            t = torch.where(slots.valid[:, j], t, -torch.inf)
            a, n = ((d < t[:, None]) & masks.negative).nonzero(as_tuple=True)
            found.append(torch.stack([a + start, positive[a], n]))
    triplets = (
        torch.cat(found, dim=1)
        if found
        else torch.zeros(3, 0, dtype=torch.long, device=dist.device)
    )
    triplets = triplets[:, torch.argsort(triplets[0] * dist.shape[1] + triplets[1], stable=True)]
    return Triplets(triplets[0], triplets[1], triplets[2])


def batch_hard_tile(dist: torch.Tensor, masks: PairMasks) -> Triplets:
    """:func:`batch_hard` on rows of a distance matrix (T, R) with their masks; ``anchor``
    indexes the rows."""
    inf = _inf(dist)
    farthest, positive = torch.where(masks.positive, dist, -inf).max(dim=1)
    nearest, negative = torch.where(masks.negative, dist, inf).min(dim=1)
    # A row with a positive has a finite farthest one (distances are finite), and so on.
    anchor = ((farthest > -inf) & (nearest < inf)).nonzero().flatten()
    return Triplets(anchor, positive[anchor], negative[anchor])


@torch.no_grad()
def batch_hard(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None = None
) -> Triplets:
    """For each anchor with a positive and a negative: its farthest positive and its nearest
    negative (Hermans et al. 2017). O(B R)."""
    _check_dist(dist, labels, ref_labels)
    parts = [
        (start, batch_hard_tile(d, masks))
        for start, _, d, masks in _tiles(dist, labels, ref_labels)
    ]
    return _concat([p._replace(anchor=p.anchor + s) for s, p in parts], dist)


def semi_hard_tile(dist: torch.Tensor, masks: PairMasks, *, method: Method = "auto") -> Triplets:
    """:func:`semi_hard` on rows of a distance matrix (T, R) with their masks; ``anchor``
    indexes the rows."""
    slots = positive_slots(masks.positive)
    d_pos = dist.gather(1, slots.index)  # (T, P)
    if _resolve_method(method, slots) == "sort":
        chosen = _semi_hard_sort(dist, masks, d_pos)
    else:
        chosen = _semi_hard_direct(dist, masks, d_pos)
    has_negative = any_per_row(masks.negative)
    anchor, slot = (slots.valid & has_negative[:, None]).nonzero(as_tuple=True)
    return Triplets(anchor, slots.index[anchor, slot], chosen[anchor, slot])


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

    Triplets come ordered by anchor, then positive. Ties between equal negative distances go to
    the lowest index. O(B R log R) (sort) or O(P B R) (direct), in blocks of rows.
    """
    _check_dist(dist, labels, ref_labels)
    check_method(method)
    parts = [
        (start, semi_hard_tile(d, masks, method=method))
        for start, _, d, masks in _tiles(dist, labels, ref_labels)
    ]
    return _concat([p._replace(anchor=p.anchor + s) for s, p in parts], dist)


def _concat(parts: list[Triplets], dist: torch.Tensor) -> Triplets:
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=dist.device)
        return Triplets(empty, empty, empty)
    return Triplets(*(torch.cat([getattr(p, f) for p in parts]) for f in Triplets._fields))


def _semi_hard_sort(dist: torch.Tensor, masks: PairMasks, d_pos: torch.Tensor) -> torch.Tensor:
    """(B, P): the column of each positive slot's chosen negative (garbage without negatives)."""
    inf = _inf(dist)
    neg_sorted, order = torch.where(masks.negative, dist, inf).sort(dim=1, stable=True)
    n_neg = masks.negative.sum(dim=1, keepdim=True)
    first_above = torch.searchsorted(neg_sorted, d_pos, right=True)
    # Among equal largest distances the stable sort puts the lowest index first.
    largest = torch.searchsorted(neg_sorted, neg_sorted.gather(1, (n_neg - 1).clamp_min(0)))
    position = torch.where(first_above < n_neg, first_above, largest)
    return order.gather(1, position.clamp_max(dist.shape[1] - 1))


def _semi_hard_direct(dist: torch.Tensor, masks: PairMasks, d_pos: torch.Tensor) -> torch.Tensor:
    """(B, P): per positive slot, the nearest negative strictly beyond it, else the farthest
    negative; two integer passes and a ``min`` per slot, no comparison mask.

    Non-negative floats order as their bit patterns read as integers. With
    ``k = bits(d_an) - bits(d_ap) - 1`` over the negatives (+inf elsewhere), ``d_an > d_ap``
    exactly when ``k >= 0``, and the nearest such negative has the smallest k; flipping k's
    sign bit puts every ``k < 0`` above every ``k >= 0``, so one integer ``min`` finds it, ties
    going to the lowest index. The sign bits are cleared first (a clamped -0.0 is 0)."""
    inf = _inf(dist)
    largest = torch.where(masks.negative, dist, -inf).max(dim=1).indices  # (B,)
    itype = torch.int32 if dist.dtype == torch.float32 else torch.int64
    sign = torch.iinfo(itype).min
    d_neg = torch.where(masks.negative, dist, inf)
    bits = d_neg.view(itype).bitwise_and_(~sign)  # in place: d_neg loses its -0.0 only
    t = d_pos.contiguous().view(itype).bitwise_and(~sign).add_(1)  # (B, P)
    chosen = torch.empty(d_pos.shape, dtype=torch.long, device=dist.device)
    k = torch.empty_like(bits)
    for j in range(d_pos.shape[1]):
        key, column = torch.sub(bits, t[:, j : j + 1], out=k).bitwise_xor_(sign).min(dim=1)
        found = (key < 0) & ~torch.isinf(d_neg.gather(1, column[:, None])[:, 0])
        chosen[:, j] = torch.where(found, column, largest)
    return chosen


def _hardest(dist: torch.Tensor, masks: PairMasks, *, method: Method = "auto") -> Triplets:
    return batch_hard_tile(dist, masks)  # O(T R) whatever the method


class MiningRule(NamedTuple):
    """A built-in mining rule of :class:`~deepmetric.losses.TripletLoss` (``loss.mining``):
    what it means (``doc``) and how it picks triplets from rows of a distance matrix
    (``tile(dist (T, R), masks, method=...) -> Triplets``, ``anchor`` indexing the rows; the loss
    averages its hinge over them). ``tile`` is None for batch-all: every valid triplet counts,
    and the loss counts the active ones (:func:`active_counts_tile`) instead of listing them."""

    doc: str
    tile: Callable[..., Triplets] | None


#: The mining rules by name, the table behind ``loss.mining`` and ``TripletLoss(mining=)``.
MINING_RULES: dict[str, MiningRule] = {
    "batch_all": MiningRule(
        "every valid triplet; the mean over those with a loss > 0 (all of them with soft)", None
    ),
    "batch_hard": MiningRule(
        "per anchor, its farthest positive and nearest negative (Hermans et al. 2017)", _hardest
    ),
    "semi_hard": MiningRule(
        "per positive pair, the nearest negative farther than the positive, else the farthest "
        "(FaceNet)",
        semi_hard_tile,
    ),
}


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
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    _check_dist(dist, labels, ref_labels)
    check_method(method)
    total = n_hard = n_not_easy = 0
    for _, _, d, masks in _tiles(dist, labels, ref_labels):
        slots = positive_slots(masks.positive)
        tile_method = _resolve_method(method, slots)
        d_pos = d.gather(1, slots.index)
        hard, _ = _count_below(
            d, masks, slots, d_pos, inclusive=True, with_negative_counts=False, method=tile_method
        )
        below_margin, _ = _count_below(
            d,
            masks,
            slots,
            d_pos + margin,
            inclusive=False,
            with_negative_counts=False,
            method=tile_method,
        )
        total += int((masks.positive.sum(dim=1) * masks.negative.sum(dim=1)).sum())
        n_hard += int(hard.sum())
        n_not_easy += int(torch.maximum(hard, below_margin).sum())
    return TripletCategories(easy=total - n_not_easy, semi_hard=n_not_easy - n_hard, hard=n_hard)
