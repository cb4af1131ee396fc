"""The few-shot protocol: N-way K-shot episodes on labelled embeddings.

One *episode* draws ``ways`` classes (N) uniformly without replacement among the *eligible*
classes, those with at least ``shots + 1`` items (K support items and one query at least), then
for each drawn class a uniformly random ordering of its items: the first K are the *support*
set, the rest the *queries* (all of them by default, or the first ``queries`` = Q of them per
class when Q is given: every class then weighs at most Q in the episode). Each query goes to the
nearest class *prototype*:

- K = 1: the prototype is the support item itself;
- K > 1: the mean of the K support embeddings (Snell et al. 2017, "Prototypical networks");
  with the ``"cosine"`` metric the support embeddings are L2-normalised first and the mean is
  re-normalised (cosine distance ignores the length anyway: the result is the same);

under the run's ``metric`` (:func:`deepmetric.distances.pairwise`: ``"cosine"``,
``"euclidean"`` or ``"squared_euclidean"``). **Ties**: a query whose smallest distance is
shared by t prototypes, its own among them, scores 1 / t (the expected score of a uniformly
random choice among them); without its own among them, 0. Exact ties matter on raw pixels,
where two classes can hold identical images.

The episode's accuracy is the mean score of its queries; the result (:class:`FewShot`) is the
mean over ``episodes`` episodes with the 95 % interval ``1.96 * std / sqrt(episodes)`` (std:
the sample standard deviation of the episode accuracies, ``ddof = 1``; NaN for one episode).
*All-way* (``ways="all"``) takes every eligible class in every episode, so an episode only
redraws the supports and is costly (every query against every class): run fewer of them.

Episodes are drawn from a ``numpy.random.Generator`` seeded with ``seed``: the same labels and
seed give the same episodes, whatever the embeddings (so a network and the raw pixels meet the
same episodes). Each episode is one distance matrix (queries x prototypes), in chunks of
:data:`CHUNK` entries, with no Python loop over queries.

Cost, measured on 751 classes x 31 items of 128-d random embeddings on the 2-core CPU while a
training ran beside it: 8.4 s for the defaults of ``deepmetric evaluate`` (1,000 episodes each
of 5-way and 20-way, 1- and 5-shot, 15 queries per class; 20 all-way 1-shot episodes, 5 queries
per class), and about as much again for the raw pixels (784-d).

Example::

    r = few_shot(embeddings, labels, ways=20, shots=1, metric="cosine")
    print(f"20-way 1-shot {r.accuracy:.3f} ± {r.ci95:.3f} ({r.episodes} episodes)")
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.checks import integer_at_least
from deepmetric.distances import check_embeddings, check_metric

__all__ = [
    "ALL_WAY_EPISODES",
    "DEFAULT_EPISODES",
    "DEFAULT_SHOTS",
    "DEFAULT_WAYS",
    "Episode",
    "FewShot",
    "FewShotPlan",
    "draw_episodes",
    "eligible_classes",
    "episode_scores",
    "few_shot",
    "few_shot_metrics",
    "raw_pixels",
    "shot_key",
]

Ways = int | Literal["all"]

#: Episodes of each numbered N-way (5-way, 20-way) by default.
DEFAULT_EPISODES = 1000
#: Queries per class of a numbered N-way by default (the usual 15 of the few-shot literature).
DEFAULT_QUERIES = 15
#: Episodes of all-way by default (each is every class against every query: costly).
ALL_WAY_EPISODES = 20
#: Queries per class of all-way by default (751 classes: 3,755 queries an episode).
ALL_WAY_QUERIES = 5
#: The ways and shots ``deepmetric evaluate`` runs by default; all-way runs 1-shot only.
DEFAULT_WAYS: tuple[Ways, ...] = (5, 20, "all")
DEFAULT_SHOTS: tuple[int, ...] = (1, 5)
#: Distance-matrix entries per chunk of queries (float32: 16 MiB).
CHUNK = 1 << 22
#: The 95 % normal quantile of the interval.
Z95 = 1.96


class FewShot(NamedTuple):
    """The result of :func:`few_shot`: ``accuracy`` (mean over episodes), ``ci95`` (half-width
    of its 95 % interval), ``episodes``, ``ways`` (N; all-way: the eligible classes), ``shots``
    (K) and ``queries`` (over all episodes)."""

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int


class Episode(NamedTuple):
    """One episode: ``support`` (N, K) item indices, row w the episode's class number w;
    ``queries`` (q,) item indices; ``answers`` (q,) the row of ``support`` of each query's
    class. Indices are into the labels the episode was drawn from (int64 arrays)."""

    support: np.ndarray
    queries: np.ndarray
    answers: np.ndarray


def _labels(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array (N,), got {arr.dtype} {arr.shape}")
    return arr


def _check_counts(shots: int, queries: int | None, episodes: int) -> None:
    integer_at_least("shots", shots)
    integer_at_least("episodes", episodes)
    if queries is not None:
        integer_at_least("queries", queries, also="or None (all)")


def eligible_classes(labels: Any, shots: int) -> np.ndarray:
    """The labels (ascending) of the classes with at least ``shots + 1`` items."""
    values, counts = np.unique(_labels(labels), return_counts=True)
    return values[counts >= shots + 1]


def _ways(ways: Ways, available: int, shots: int) -> int:
    """The number of classes per episode; a one-line ``ValueError`` when impossible."""
    need = f"classes with at least {shots + 1} items ({shots}-shot and one query)"
    if ways == "all":
        if available < 2:
            raise ValueError(f"all-way {shots}-shot needs 2 {need}; there are {available}")
        return available
    integer_at_least("ways", ways, 2, also="or 'all'")
    if ways > available:
        raise ValueError(f"{ways}-way {shots}-shot needs {ways} {need}; there are {available}")
    return ways


def draw_episodes(
    labels: Any,
    *,
    ways: Ways,
    shots: int = 1,
    episodes: int = DEFAULT_EPISODES,
    queries: int | None = None,
    seed: int = 0,
) -> Iterator[Episode]:
    """The ``episodes`` episodes of the protocol (see the module docstring), drawn lazily from
    ``numpy.random.default_rng(seed)``: the classes, then one uniform key per item of those
    classes (their order within the class). Raises a one-line ``ValueError`` (before drawing)
    when fewer than ``ways`` classes have ``shots + 1`` items, or for a bad count."""
    lab = _labels(labels)
    _check_counts(shots, queries, episodes)
    order = np.argsort(lab, kind="stable")
    _, start, count = np.unique(lab[order], return_index=True, return_counts=True)
    eligible = np.flatnonzero(count >= shots + 1)  # class numbers
    n_ways = _ways(ways, len(eligible), shots)
    return _episodes(order, start, count, eligible, n_ways, shots, episodes, queries, seed)


def _episodes(
    order: np.ndarray,
    start: np.ndarray,
    count: np.ndarray,
    eligible: np.ndarray,
    ways: int,
    shots: int,
    episodes: int,
    queries: int | None,
    seed: int,
) -> Iterator[Episode]:
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        chosen = rng.choice(eligible, ways, replace=False)
        n = count[chosen]
        row = np.repeat(np.arange(ways), n)  # the episode's class number of each item
        rank = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # place within class
        items = order[np.repeat(start[chosen], n) + rank]
        items = items[np.lexsort((rng.random(len(items)), row))]  # shuffled within each class
        is_query = rank >= shots
        if queries is not None:
            is_query &= rank < shots + queries
        yield Episode(
            items[rank < shots].reshape(ways, shots).astype(np.int64),
            items[is_query].astype(np.int64),
            row[is_query].astype(np.int64),
        )


def _prototypes(support: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., N, K, D) support embeddings -> (..., N, D) prototypes (see the module docstring)."""
    if support.shape[-2] == 1:
        return support[..., 0, :]
    if metric == "cosine":
        return F.normalize(F.normalize(support, dim=-1).mean(dim=-2), dim=-1)
    return support.mean(dim=-2)


def _distances(x: torch.Tensor, protos: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, q, N) distances of (B, q, D) queries to (B, N, D) prototypes: the formulas of
    :func:`~deepmetric.distances.pairwise` (cosine ``1 - x.p / (|x| |p|)`` clamped to [0, 2];
    euclidean ``sqrt(max(0, |x|^2 + |p|^2 - 2 x.p))``), batched over episodes."""
    if metric == "cosine":
        prod = F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
        return (1.0 - prod).clamp(0.0, 2.0)
    x2 = (x * x).sum(dim=-1, keepdim=True)
    p2 = (protos * protos).sum(dim=-1)[:, None, :]
    sq = torch.baddbmm(p2, x, protos.transpose(1, 2), alpha=-2.0).add_(x2).clamp_min_(0.0)
    return sq if metric == "squared_euclidean" else sq.sqrt_()


def _scores(
    emb: torch.Tensor, batch: list[Episode], metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score sum, query count)`` (B,) float64 of a batch of episodes of one N-way K-shot:
    queries padded to the longest episode, one batched matrix product per chunk of queries."""
    device = emb.device
    support = torch.from_numpy(np.stack([e.support for e in batch])).to(device)  # (B, N, K)
    protos = _prototypes(emb[support], metric)  # (B, N, D)
    lengths = [len(e.queries) for e in batch]
    longest = max(lengths)
    index = torch.zeros(len(batch), longest, dtype=torch.int64)
    answer = torch.zeros(len(batch), longest, dtype=torch.int64)
    for b, e in enumerate(batch):
        index[b, : lengths[b]] = torch.from_numpy(e.queries)
        answer[b, : lengths[b]] = torch.from_numpy(e.answers)
    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    index, answer, valid = index.to(device), answer.to(device), valid.to(device)
    width = max(protos.shape[1], emb.shape[1])
    step = max(1, CHUNK // (len(batch) * width))
    total = torch.zeros(len(batch), dtype=torch.float64, device=device)
    for s in range(0, longest, step):
        dist = _distances(emb[index[:, s : s + step]], protos, metric)
        tied = dist == dist.min(dim=-1, keepdim=True).values
        own = tied.gather(2, answer[:, s : s + step, None])[..., 0]
        score = own.double() / tied.sum(dim=-1).double()
        total += (score * valid[:, s : s + step]).sum(dim=1)
    return total.cpu(), torch.tensor(lengths, dtype=torch.float64)


def episode_scores(embeddings: torch.Tensor, episode: Episode, *, metric: str) -> float:
    """The accuracy of one episode: the mean over its queries of 1 when the query's own
    prototype is strictly the nearest, 1 / t when t prototypes share the smallest distance with
    its own among them, else 0."""
    check_metric(metric)
    with torch.no_grad():
        total, count = _scores(embeddings.detach(), [episode], metric)
    return float(total[0] / count[0])


def few_shot(
    embeddings: torch.Tensor,
    labels: Any,
    *,
    ways: Ways,
    shots: int = 1,
    episodes: int = DEFAULT_EPISODES,
    queries: int | None = None,
    metric: str = "cosine",
    seed: int = 0,
) -> FewShot:
    """N-way K-shot accuracy of ``embeddings`` (N_items, D) with ``labels`` (N_items,): the mean
    over ``episodes`` episodes (:func:`draw_episodes`) of the share of queries assigned to their
    own class's prototype (:func:`episode_scores`), with its 95 % interval.

    Episodes are scored in batches (one padded batched matrix product, queries x prototypes,
    per chunk of :data:`CHUNK` entries); an episode larger than a chunk alone, in chunks of
    queries. Raises a one-line ``ValueError`` for bad shapes, non-finite embeddings, an unknown
    metric, or fewer than ``ways`` classes with ``shots + 1`` items.
    """
    check_metric(metric)
    check_embeddings(embeddings)
    lab = _labels(labels)
    if len(lab) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(lab)} labels")
    drawn = draw_episodes(
        lab, ways=ways, shots=shots, episodes=episodes, queries=queries, seed=seed
    )
    emb = embeddings.detach().float() if embeddings.dtype != torch.float64 else embeddings
    accuracies: list[torch.Tensor] = []
    total = n_ways = 0
    batch: list[Episode] = []
    with torch.no_grad():
        for episode in drawn:
            batch.append(episode)
            n_ways = episode.support.shape[0]
            size = len(batch) * len(episode.queries) * max(n_ways, emb.shape[1])
            if size >= CHUNK:
                score, count = _scores(emb, batch, metric)
                accuracies.append(score / count)
                total += int(count.sum())
                batch = []
        if batch:
            score, count = _scores(emb, batch, metric)
            accuracies.append(score / count)
            total += int(count.sum())
    acc = torch.cat(accuracies).numpy()
    std = float(acc.std(ddof=1)) if episodes > 1 else math.nan
    return FewShot(
        float(acc.mean()), Z95 * std / math.sqrt(episodes), episodes, n_ways, shots, total
    )


# ----------------------------------------------------------------------------- evaluate's blocks


def raw_pixels(inputs: torch.Tensor) -> torch.Tensor:
    """The raw-input baseline's vectors: each item flattened and L2-normalised (as
    :func:`~deepmetric.evaluate.metrics.raw_input_baseline`; compared in euclidean distance)."""
    return F.normalize(inputs.flatten(1).float(), dim=1)


_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def shot_key(shots: int) -> str:
    """``"one_shot"``, ``"five_shot"``, ... (``"12_shot"`` past ten): the metrics.json key."""
    return f"{_WORDS[shots - 1]}_shot" if 1 <= shots <= len(_WORDS) else f"{shots}_shot"


def way_key(ways: Ways) -> str:
    return f"{ways}-way"


class FewShotPlan(NamedTuple):
    """What ``deepmetric evaluate`` runs: every ``ways`` x ``shots`` (all-way at 1 shot only),
    ``episodes`` episodes of a numbered way with at most ``queries`` queries per class (None:
    all), ``all_way_episodes`` of all-way with at most ``all_way_queries``. ``explicit``: the
    ways were asked for, so one that the test classes cannot give is an error
    (:meth:`check`) instead of a skip note."""

    ways: tuple[Ways, ...] = DEFAULT_WAYS
    shots: tuple[int, ...] = DEFAULT_SHOTS
    episodes: int = DEFAULT_EPISODES
    all_way_episodes: int = ALL_WAY_EPISODES
    queries: int | None = DEFAULT_QUERIES
    all_way_queries: int | None = ALL_WAY_QUERIES
    explicit: bool = False

    def runs(self) -> Iterator[tuple[Ways, int]]:
        for shots in self.shots:
            for ways in self.ways:
                if ways != "all" or shots == 1:
                    yield ways, shots

    def check(self, labels: Any, what: str = "the test set") -> None:
        """A one-line ``ValueError`` for a bad count, and, when :attr:`explicit`, for a way
        that ``labels`` cannot give (not enough classes with ``shots + 1`` items)."""
        _check_counts(1, self.queries, self.episodes)
        _check_counts(1, self.all_way_queries, self.all_way_episodes)
        for shots in self.shots:
            _check_counts(shots, None, 1)
        for ways in self.ways:
            if ways != "all" and (isinstance(ways, bool) or not isinstance(ways, int) or ways < 2):
                raise ValueError(f"ways must be integers >= 2 or 'all', got {ways!r}")
        if self.explicit:
            for ways, shots in self.runs():
                try:
                    _ways(ways, len(eligible_classes(labels, shots)), shots)
                except ValueError as error:
                    raise ValueError(f"{error} in {what}") from None


def parse_ways(text: str) -> tuple[Ways, ...]:
    """``"5,20,all"`` -> ``(5, 20, "all")``; a one-line ``ValueError`` otherwise."""
    out: list[Ways] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append("all")
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--ways takes integers >= 2 or 'all', got {part!r}") from None
        if value < 2:
            raise ValueError(f"--ways takes integers >= 2 or 'all', got {value}")
        out.append(value)
    return tuple(dict.fromkeys(out))


def parse_counts(text: str, option: str) -> tuple[int, ...]:
    """``"1,5"`` -> ``(1, 5)`` (integers >= 1); a one-line ``ValueError`` otherwise."""
    out = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise ValueError(f"{option} takes integers >= 1, got {part.strip()!r}") from None
        if value < 1:
            raise ValueError(f"{option} takes integers >= 1, got {value}")
        out.append(value)
    return tuple(dict.fromkeys(out))


def few_shot_metrics(
    embeddings: torch.Tensor,
    labels: Any,
    *,
    metric: str,
    plan: FewShotPlan | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``{"one_shot": {"5-way": {"accuracy", "ci95", "episodes"}, ..., "skipped": {...}},
    "five_shot": {...}}``: every run of ``plan`` on these embeddings; a way the classes cannot
    give is left out and named under ``"skipped"`` with the reason (raise first with
    :meth:`FewShotPlan.check` when that must be an error); ``plan`` None: the defaults."""
    plan = FewShotPlan() if plan is None else plan
    out: dict[str, dict[str, Any]] = {}
    for ways, shots in plan.runs():
        block = out.setdefault(shot_key(shots), {})
        available = len(eligible_classes(labels, shots))
        if (ways == "all" and available < 2) or (ways != "all" and ways > available):
            block.setdefault("skipped", {})[way_key(ways)] = (
                f"only {available} classes with at least {shots + 1} items"
            )
            continue
        every = ways == "all"
        r = few_shot(
            embeddings,
            labels,
            ways=ways,
            shots=shots,
            episodes=plan.all_way_episodes if every else plan.episodes,
            queries=plan.all_way_queries if every else plan.queries,
            metric=metric,
            seed=seed,
        )
        block[way_key(ways)] = {
            "accuracy": r.accuracy,
            "ci95": r.ci95,
            "episodes": r.episodes,
            **({"ways": r.ways} if every else {}),
            "queries": r.queries,
        }
    return out


def largest_way(block: dict[str, Any]) -> str | None:
    """The key of the largest numbered way present in a shot block (``"20-way"``), or None."""
    numbered = [k for k in block if k.endswith("-way") and k[:-4].isdigit()]
    return max(numbered, key=lambda k: int(k[:-4]), default=None)
