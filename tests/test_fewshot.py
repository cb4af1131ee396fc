"""The few-shot protocol (deepmetric.evaluate.fewshot) against a brute-force reference, and in
``deepmetric evaluate`` end to end."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from reference import dist as ref_dist

from deepmetric.evaluate.fewshot import (
    FewShotPlan,
    draw_episodes,
    eligible_classes,
    episode_scores,
    few_shot,
    few_shot_metrics,
    parse_counts,
    parse_ways,
    shot_key,
)


def brute_episode(emb: torch.Tensor, episode, metric: str) -> float:
    """Plain loops: each query against each prototype (the support item, or the mean of the
    support items, normalised first and after for cosine), credit 1 / ties."""
    e = emb.double()
    protos = []
    for row in episode.support:
        vectors = [e[int(i)] for i in row]
        if len(vectors) == 1:
            protos.append(vectors[0])
            continue
        if metric == "cosine":
            vectors = [v / math.sqrt(float((v * v).sum())) for v in vectors]
        mean = sum(vectors) / len(vectors)
        protos.append(mean)
    total = 0.0
    for q, answer in zip(episode.queries, episode.answers):
        d = [float(ref_dist(e[int(q)], p, metric)) for p in protos]
        best = min(d)
        tied = [w for w in range(len(d)) if d[w] == best]
        total += (1.0 / len(tied)) if int(answer) in tied else 0.0
    return total / len(episode.queries)


def data(n_classes: int, per_class: list[int] | int, dim: int, seed: int, integers: bool = False):
    g = torch.Generator().manual_seed(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    if integers:  # few distinct points: many exact ties, all arithmetic exact in float32
        emb = torch.randint(0, 3, (len(labels), dim), generator=g).float()
    else:
        centers = torch.randn(n_classes, dim, generator=g)
        emb = centers[labels] + 0.9 * torch.randn(len(labels), dim, generator=g)
    return emb, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("shots", [1, 3])
def test_few_shot_matches_brute_force(metric, shots):
    emb, labels = data(7, [4, 5, 6, 3, 8, 2, 5], 5, seed=shots)
    for ways, queries in ((3, None), (5, 2), ("all", None)):
        r = few_shot(
            emb, labels, ways=ways, shots=shots, episodes=9, queries=queries, metric=metric, seed=4
        )
        episodes = list(
            draw_episodes(labels, ways=ways, shots=shots, episodes=9, queries=queries, seed=4)
        )
        accs = [brute_episode(emb, e, metric) for e in episodes]
        assert r.accuracy == pytest.approx(statistics.mean(accs), abs=1e-9)
        assert r.ci95 == pytest.approx(1.96 * statistics.stdev(accs) / math.sqrt(9), abs=1e-9)
        assert r.episodes == 9 and r.shots == shots
        assert r.queries == sum(len(e.queries) for e in episodes)
        for e, a in zip(episodes, accs):
            assert episode_scores(emb, e, metric=metric) == pytest.approx(a, abs=1e-9)


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_ties_get_a_share_of_the_credit_as_in_the_brute_force(shots):
    """Integer points in 2-D take few values: queries equidistant from several prototypes are
    common, and the float32 computation is exact, so ties are exact in both."""
    emb, labels = data(6, 9, 2, seed=11, integers=True)
    episodes = list(draw_episodes(labels, ways=4, shots=shots, episodes=20, seed=1))
    accs = [brute_episode(emb, e, "euclidean") for e in episodes]
    fractions = [a * len(e.queries) % 1 for a, e in zip(accs, episodes)]
    assert any(f > 1e-9 for f in fractions)  # some query did share its credit
    r = few_shot(emb, labels, ways=4, shots=shots, episodes=20, metric="euclidean", seed=1)
    assert r.accuracy == pytest.approx(statistics.mean(accs), abs=1e-12)


def test_a_query_tied_between_its_class_and_another_scores_a_half():
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [-2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 0, 1])
    for episode in draw_episodes(labels, ways=2, shots=1, episodes=30, seed=0):
        got = episode_scores(emb, episode, metric="euclidean")
        assert got == pytest.approx(brute_episode(emb, episode, "euclidean"), abs=1e-12)
    # support 0 (class 0) and 1 (class 1): the query at 1.0 is halfway
    from deepmetric.evaluate.fewshot import Episode

    e = Episode(np.array([[0], [1]]), np.array([2, 3, 4]), np.array([0, 0, 1]))
    assert episode_scores(emb, e, metric="euclidean") == pytest.approx((0.5 + 1 + 1) / 3)


def test_episodes_are_well_formed_and_deterministic():
    _, labels = data(9, [2, 3, 4, 5, 6, 7, 8, 1, 3], 2, seed=0)
    lab = labels.numpy()
    eligible = set(eligible_classes(labels, 3).tolist())
    assert eligible == {2, 3, 4, 5, 6}  # at least 4 items
    first = list(draw_episodes(labels, ways=3, shots=3, episodes=25, queries=2, seed=5))
    again = list(draw_episodes(labels, ways=3, shots=3, episodes=25, queries=2, seed=5))
    other = list(draw_episodes(labels, ways=3, shots=3, episodes=25, queries=2, seed=6))
    assert all(
        np.array_equal(a.support, b.support) and np.array_equal(a.queries, b.queries)
        for a, b in zip(first, again)
    )
    assert any(not np.array_equal(a.support, b.support) for a, b in zip(first, other))
    seen = set()
    for e in first:
        classes = [int(lab[row[0]]) for row in e.support]
        assert len(set(classes)) == 3 and set(classes) <= eligible
        for w, row in enumerate(e.support):
            assert all(lab[i] == classes[w] for i in row) and len(set(row.tolist())) == 3
        assert not set(e.queries.tolist()) & set(e.support.ravel().tolist())
        for q, a in zip(e.queries, e.answers):
            assert lab[q] == classes[a]
        per_class = np.bincount(e.answers, minlength=3)
        want = [min(2, int((lab == c).sum()) - 3) for c in classes]
        assert per_class.tolist() == want
        seen |= set(classes)
    assert seen == eligible  # every eligible class comes up
    every = list(draw_episodes(labels, ways="all", shots=1, episodes=3, seed=0))
    assert all(e.support.shape == (8, 1) and len(e.queries) == len(lab) - 1 - 8 for e in every)


def test_few_shot_results_are_reproducible_and_the_same_for_any_embedding_device():
    emb, labels = data(10, 6, 8, seed=3)
    a = few_shot(emb, labels, ways=5, shots=2, episodes=50, seed=9)
    b = few_shot(emb.double(), labels, ways=5, shots=2, episodes=50, seed=9)
    assert a == few_shot(emb, labels, ways=5, shots=2, episodes=50, seed=9)
    assert a.accuracy == pytest.approx(b.accuracy, abs=1e-9)
    assert math.isnan(few_shot(emb, labels, ways=5, shots=1, episodes=1, seed=9).ci95)


def test_bad_requests_are_one_line_value_errors():
    emb, labels = data(4, 3, 2, seed=0)
    cases = [
        (dict(ways=5, shots=1), "5-way 1-shot needs 5 classes with at least 2 items"),
        (dict(ways=2, shots=3), "2-way 3-shot needs 2 classes with at least 4 items"),
        (dict(ways=1), "ways must be an integer >= 2"),
        (dict(ways=2, shots=0), "shots must be an integer >= 1"),
        (dict(ways=2, episodes=0), "episodes must be an integer >= 1"),
        (dict(ways=2, queries=0), "queries must be"),
        (dict(ways=2, metric="manhattan"), "manhattan"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            few_shot(emb, labels, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="3 embeddings but 12 labels"):
        few_shot(emb[:3], labels, ways=2)
    for text, message in (("5,x", "--ways takes"), ("1", "--ways takes")):
        with pytest.raises(ValueError, match=message):
            parse_ways(text)
    assert parse_ways("5, 20,all,5") == (5, 20, "all")
    assert parse_counts("1,5", "--shots") == (1, 5)
    with pytest.raises(ValueError, match="--shots takes integers >= 1, got 0"):
        parse_counts("1,0", "--shots")


def test_metrics_blocks_skip_ways_the_classes_cannot_give_unless_asked():
    emb, labels = data(4, 7, 3, seed=1)
    plan = FewShotPlan(episodes=20, all_way_episodes=3)
    m = few_shot_metrics(emb, labels, metric="cosine", plan=plan)
    assert set(m) == {"one_shot", "five_shot"} and shot_key(12) == "12_shot"
    assert set(m["one_shot"]) == {"all-way", "skipped"}
    assert m["one_shot"]["skipped"] == {
        "5-way": "only 4 classes with at least 2 items",
        "20-way": "only 4 classes with at least 2 items",
    }
    assert m["one_shot"]["all-way"]["ways"] == 4 and m["one_shot"]["all-way"]["episodes"] == 3
    assert set(m["five_shot"]) == {"skipped"}  # all-way runs 1-shot only
    plan.check(labels)  # not explicit: skips, no error
    with pytest.raises(ValueError, match=r"5-way 1-shot needs 5 classes .* in the test set"):
        plan._replace(explicit=True).check(labels)
    plan._replace(ways=(3, "all"), explicit=True).check(labels)
