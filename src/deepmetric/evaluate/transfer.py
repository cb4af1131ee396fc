"""Thresholds that transfer, and open-set identification (DIR@FAR).

A threshold ``t`` is a distance: a pair is declared the same when ``d <= t``. The honest way to
set one for classes never seen is on other unseen classes, the run's *validation classes*, at
a false accept rate (FAR) the user can live with; what matters is the FAR it then reaches on the
test classes. Two protocols:

**Threshold transfer** (:func:`threshold_transfer`). For each FAR ``f``, ``t`` is
:func:`~deepmetric.evaluate.roc.threshold_at_far` on the validation pairs (the largest
threshold whose FAR there is ``<= f``); on the test pairs, ``far_reached`` = #{negative,
d <= t} / #negative and ``tar_reached`` = #{positive, d <= t} / #positive. ``far_ratio`` =
``far_reached / f`` (1: the threshold transferred exactly). ``resolution`` = 1 / #negative, the
smallest non-zero FAR the test pairs can show.

**Open-set identification** (:func:`open_set`), as face identification benchmarks define it
(IJB-C's DIR@FAR): the classes in a seeded random order, the first half (``n // 2``) enrolled
with one seeded random item each, the others *strangers*. Genuine probes: the other items of
the enrolled classes; impostor probes: every item of the strangers. Each probe's nearest
enrolled item (ties: the lower gallery index) at distance ``d``. At ``t``: DIR(t) = the share
of genuine probes whose nearest enrolled item is of their own class and ``d <= t``; FAR(t) =
the share of impostor probes with ``d <= t``. ``rank1`` = DIR(inf), the closed-set accuracy.
The *oracle* threshold is set on these impostors (the largest ``t`` with FAR(t) <= f: the
benchmarks' DIR@FAR); the *validation* threshold is set the same way on the validation classes
(same protocol, same seed) and then measured here. An open-set FAR grows with the number
enrolled (a stranger has more chances to land near someone), so a validation gallery smaller
than the test one tends to give a larger FAR here, besides any difference between the classes.

**A threshold sized for the gallery** (``validation_sized``). A stranger is accepted when any of
``E`` enrolled items lies within ``t``; if its distances to them were independent draws with a
per-pair false accept rate ``q``, its FAR would be ``1 - (1 - q)^E``. So for an open-set FAR
``f`` with ``E`` enrolled (the test gallery's size), :func:`pair_threshold` sets ``t`` at the
per-pair rate ``q = 1 - (1 - f)^(1/E)`` on every pair of items of different validation classes
(all ``i < j``: 43 million pairs for 300 classes x 31 items, so rates near 1e-6 still count).
The independence is an assumption, which the FAR then reached on the test strangers checks.

Cost: one (probes x enrolled) distance matrix in chunks of rows. 751 classes x 31 items of
128-d float32 (375 enrolled; 11,250 genuine and 11,656 impostor probes), with a validation side
of 300 classes x 31 items: 0.08 to 0.12 s (cosine or euclidean, best of 3) on an idle 2-core
CPU; 1.1 s on that CPU while a training ran beside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from deepmetric.distances import check_embeddings, check_metric, pairwise
from deepmetric.evaluate.roc import _check_pairs, _far_key, threshold_at_far

__all__ = [
    "DEFAULT_FARS",
    "OpenSetProbes",
    "open_set",
    "open_set_probes",
    "pair_threshold",
    "smallest_negative_distances",
    "threshold_transfer",
]

#: The false accept rates reported by default.
DEFAULT_FARS: tuple[float, ...] = (1e-2, 1e-3)
#: Distance-matrix entries per chunk of probes.
CHUNK = 1 << 22

PROTOCOL = (
    "half the classes (seeded) enrolled with one item each, the other half strangers; genuine "
    "probes: the other items of the enrolled classes; impostors: every item of the strangers; "
    "DIR: genuine probes whose nearest enrolled item is their own class within the threshold; "
    "FAR: impostors within the threshold of any enrolled item"
)


def _check_far(far: float) -> float:
    far = float(far)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"FAR must be in [0, 1], got {far:g}")
    return far


def _counts(same: torch.Tensor, what: str) -> tuple[int, int]:
    positive = int(same.sum())
    negative = int(same.numel()) - positive
    if positive == 0 or negative == 0:
        raise ValueError(
            f"the {what} pairs need positives and negatives; got {positive} and {negative}"
        )
    return positive, negative


def threshold_transfer(
    val_dist: torch.Tensor,
    val_same: torch.Tensor,
    test_dist: torch.Tensor,
    test_same: torch.Tensor,
    *,
    fars: tuple[float, ...] = DEFAULT_FARS,
) -> dict[str, dict[str, Any]]:
    """For each FAR ``f`` (keyed ``"1e-02"``...): the threshold at ``f`` on the validation pairs
    (distances (P,), same (P,) bool) and the FAR and TAR it reaches on the test pairs (Q,), with
    ``far_ratio``, ``resolution`` and the pair counts (see the module docstring). One-line
    ``ValueError`` for bad pairs (see :mod:`~deepmetric.evaluate.roc`), a side without a
    positive or a negative pair, or a FAR outside [0, 1]."""
    vd, vs = _check_pairs(val_dist, val_same)
    d, s = _check_pairs(test_dist, test_same)
    val_pos, val_neg = _counts(vs, "validation")
    test_pos, test_neg = _counts(s, "test")
    vd, d = vd.double(), d.double()
    out: dict[str, dict[str, Any]] = {}
    for far in [_check_far(f) for f in fars]:
        t = threshold_at_far(val_dist, val_same, far)
        reached = float((d[~s] <= t).double().mean())
        out[_far_key(far)] = {
            "far_asked": far,
            "threshold": t,
            "far_validation": float((vd[~vs] <= t).double().mean()),
            "far_reached": reached,
            "tar_reached": float((d[s] <= t).double().mean()),
            "far_ratio": reached / far if far > 0 else None,
            "resolution": 1.0 / test_neg,
            "validation_pairs": {"positive": val_pos, "negative": val_neg},
            "test_pairs": {"positive": test_pos, "negative": test_neg},
        }
    return out


class OpenSetProbes(NamedTuple):
    """The probes of the open-set protocol: ``enrolled`` (E,) gallery item indices (one per
    enrolled class), ``strangers`` (S,) stranger class labels; ``genuine_nearest`` (G,) and
    ``genuine_right`` (G,) bool: each genuine probe's distance to its nearest enrolled item and
    whether that item is of its class; ``impostor_nearest`` (I,)."""

    enrolled: np.ndarray
    strangers: np.ndarray
    genuine_nearest: torch.Tensor
    genuine_right: torch.Tensor
    impostor_nearest: torch.Tensor


def _nearest(
    probes: torch.Tensor, gallery: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, gallery index) of each probe's nearest gallery row, in chunks of probes."""
    step = max(1, CHUNK // max(1, len(gallery)))
    dists, where = [], []
    for s in range(0, len(probes), step):
        d = pairwise(probes[s : s + step], gallery, metric)
        value, index = d.min(dim=1)  # the first minimum: ties go to the lower index
        dists.append(value)
        where.append(index)
    if not dists:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(dists).double(), torch.cat(where)


def open_set_probes(
    embeddings: torch.Tensor, labels: Any, *, metric: str, seed: int = 0
) -> OpenSetProbes:
    """Draw the protocol of the module docstring on ``embeddings`` (N, D), ``labels`` (N,) and
    measure each probe's nearest enrolled item. One-line ``ValueError`` for fewer than 2
    classes, no genuine probe, mismatched lengths or an unknown metric."""
    check_metric(metric)
    check_embeddings(embeddings)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if lab.ndim != 1 or len(lab) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but labels of shape {lab.shape}")
    classes = np.unique(lab)
    if len(classes) < 2:
        raise ValueError(f"open-set identification needs 2 classes or more; got {len(classes)}")
    rng = np.random.default_rng(seed)
    order = classes[rng.permutation(len(classes))]
    enrolled_classes, strangers = order[: len(classes) // 2], order[len(classes) // 2 :]
    enrolled = np.array(
        [rng.choice(np.flatnonzero(lab == c)) for c in enrolled_classes], dtype=np.int64
    )
    is_genuine = np.isin(lab, enrolled_classes)
    is_genuine[enrolled] = False
    genuine = np.flatnonzero(is_genuine)
    impostor = np.flatnonzero(np.isin(lab, strangers))
    if len(genuine) == 0:
        raise ValueError("no genuine probe: every enrolled class has a single item")
    emb = embeddings.detach().cpu()  # pairwise computes in float32 (float64 for float64 input)
    gallery = emb[torch.from_numpy(enrolled)]
    g_dist, g_index = _nearest(emb[torch.from_numpy(genuine)], gallery, metric)
    i_dist, _ = _nearest(emb[torch.from_numpy(impostor)], gallery, metric)
    right = torch.from_numpy(lab[enrolled][g_index.numpy()] == lab[genuine])
    return OpenSetProbes(enrolled, strangers, g_dist, right, i_dist)


def _threshold(p: OpenSetProbes, far: float) -> float:
    """The largest threshold whose FAR on ``p``'s impostors is ``<= far``."""
    distances = torch.cat([p.genuine_nearest, p.impostor_nearest])
    same = torch.cat(
        [torch.ones(len(p.genuine_nearest)), torch.zeros(len(p.impostor_nearest))]
    ).bool()
    return threshold_at_far(distances, same, far)


def _negative_pairs(embeddings: torch.Tensor, labels: Any) -> tuple[torch.Tensor, int]:
    """Class ids (N,) of ``labels`` and the number of pairs ``i < j`` of different classes."""
    check_embeddings(embeddings)
    raw = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    n = embeddings.shape[0]
    if raw.ndim != 1 or len(raw) != n:
        raise ValueError(f"{n} embeddings but labels of shape {raw.shape}")
    _, ids, counts = np.unique(raw, return_inverse=True, return_counts=True)
    pairs = (n * n - int((counts.astype(np.int64) ** 2).sum())) // 2
    if pairs == 0:
        raise ValueError("a pair threshold needs items of 2 classes or more")
    return torch.from_numpy(ids.reshape(-1).astype(np.int64)), pairs


def smallest_negative_distances(
    embeddings: torch.Tensor, labels: Any, count: int, *, metric: str
) -> tuple[torch.Tensor, int]:
    """The ``count`` smallest distances (ascending, float64, with their repeats) over every pair
    ``i < j`` of items of different classes of ``embeddings`` (N, D), ``labels`` (N,), and the
    number of such pairs ``P`` (all of them when ``count >= P``). Exact: the (rows x N) distance
    matrix is walked in chunks of rows, keeping the ``count`` smallest so far."""
    check_metric(metric)
    lab, pairs = _negative_pairs(embeddings, labels)
    n = len(lab)
    emb = embeddings.detach().cpu()
    kept = torch.zeros(0, dtype=torch.float64)
    step = max(1, CHUNK // max(1, n))
    column = torch.arange(n)
    for s in range(0, n, step):
        d = pairwise(emb[s : s + step], emb, metric).double()
        rows = torch.arange(s, min(n, s + step))
        negative = (column[None, :] > rows[:, None]) & (lab[rows][:, None] != lab[None, :])
        values = torch.cat([kept, d[negative]])
        kept = torch.topk(values, min(count, len(values)), largest=False).values
    return torch.sort(kept).values, pairs


def _pair_threshold_from(smallest: torch.Tensor, pairs: int, rate: float) -> float:
    """:func:`pair_threshold` from the ``k + 1`` smallest negative distances (or all ``P``)."""
    k = min(pairs, int(np.floor(rate * pairs + 1e-9)))
    if k == pairs:
        top = float(smallest[-1])
        return top + max(1.0, abs(top)) * 1e-6
    b = smallest[k]
    below = smallest[smallest < b]
    if len(below) == 0:
        return float(b) - max(1.0, abs(float(b))) * 1e-6
    a = below[-1]
    t = a + (b - a) / 2
    return float(t if t < b else a)


def _needed(rate: float, pairs: int) -> int:
    return min(pairs, int(np.floor(rate * pairs + 1e-9)) + 1)


def pair_threshold(
    embeddings: torch.Tensor, labels: Any, rate: float, *, metric: str
) -> tuple[float, int]:
    """The largest threshold whose false accept rate over every pair ``i < j`` of items of
    different classes of ``embeddings`` (N, D), ``labels`` (N,) is ``<= rate``, and the number
    of such pairs ``P``. With ``k = floor(rate * P)`` and the negative distances sorted
    ``d_(1) <= d_(2) <= ...``: the midpoint of ``d_(k+1)`` and the largest distance below it (just
    under ``d_(1)`` when there is none), so at most ``k`` pairs lie within it; above the largest
    when ``k = P``. One-line ``ValueError`` for fewer than 2 classes or a bad rate."""
    rate = _check_far(rate)
    _, pairs = _negative_pairs(embeddings, labels)
    smallest, _ = smallest_negative_distances(
        embeddings, labels, _needed(rate, pairs), metric=metric
    )
    return _pair_threshold_from(smallest, pairs, rate), pairs


def _rates(p: OpenSetProbes, t: float) -> tuple[float, float]:
    """(DIR, FAR) at threshold ``t``."""
    dir_ = float((p.genuine_right & (p.genuine_nearest <= t)).double().mean())
    far = float((p.impostor_nearest <= t).double().mean()) if len(p.impostor_nearest) else 0.0
    return dir_, far


def open_set(
    embeddings: torch.Tensor,
    labels: Any,
    *,
    metric: str,
    fars: tuple[float, ...] = DEFAULT_FARS,
    seed: int = 0,
    val_embeddings: torch.Tensor | None = None,
    val_labels: Any = None,
) -> dict[str, Any]:
    """Open-set identification of ``embeddings`` (N, D) with ``labels`` (N,) (see the module
    docstring): the counts, ``rank1`` and, per FAR, DIR and the FAR reached at the oracle
    threshold and (when validation embeddings and labels are given) at the validation one and
    at the validation pair threshold sized for this gallery (``validation_sized``).
    One-line ``ValueError`` as :func:`open_set_probes`, for a FAR outside [0, 1], or for only
    one of ``val_embeddings`` and ``val_labels``."""
    if (val_embeddings is None) != (val_labels is None):
        raise ValueError("val_embeddings and val_labels go together: pass both or neither")
    fars = tuple(_check_far(f) for f in fars)
    test = open_set_probes(embeddings, labels, metric=metric, seed=seed)
    val = None
    if val_embeddings is not None:
        val = open_set_probes(val_embeddings, val_labels, metric=metric, seed=seed)
    size = len(test.enrolled)
    rates = {far: 1.0 - (1.0 - far) ** (1.0 / size) for far in fars}
    smallest, pairs = torch.zeros(0), 0
    if val is not None:  # one walk over the validation pairs serves every FAR
        _, pairs = _negative_pairs(val_embeddings, val_labels)  # type: ignore[arg-type]
        need = max(_needed(r, pairs) for r in rates.values()) if rates else 1
        smallest, _ = smallest_negative_distances(
            val_embeddings,  # type: ignore[arg-type]
            val_labels,
            need,
            metric=metric,
        )
    at_far: dict[str, dict[str, Any]] = {}
    for far in fars:
        t = _threshold(test, far)
        dir_, reached = _rates(test, t)
        block: dict[str, Any] = {
            "far_asked": far,
            "oracle": {"threshold": t, "dir": dir_, "far_reached": reached},
        }
        if val is not None:
            tv = _threshold(val, far)
            vdir, vreached = _rates(test, tv)
            block["validation"] = {
                "threshold": tv,
                "dir": vdir,
                "far_reached": vreached,
                "far_validation": _rates(val, tv)[1],
                "enrolled": len(val.enrolled),
            }
            rate = rates[far]
            ts = _pair_threshold_from(smallest, pairs, rate)
            sdir, sreached = _rates(test, ts)
            block["validation_sized"] = {
                "threshold": ts,
                "dir": sdir,
                "far_reached": sreached,
                "pair_rate": rate,
                "validation_pairs": pairs,
                "enrolled": size,
            }
        at_far[_far_key(far)] = block
    return {
        "enrolled": len(test.enrolled),
        "strangers": len(test.strangers),
        "genuine_probes": len(test.genuine_nearest),
        "impostor_probes": len(test.impostor_nearest),
        "rank1": float(test.genuine_right.double().mean()),
        "at_far": at_far,
        "protocol": PROTOCOL,
    }
