"""deepmetric.evaluate.pairs: deterministic verification pairs."""

import pytest
import torch

from deepmetric.evaluate.pairs import verification_pairs

# ----------------------------------------------------------------------------- pairs


def _check_valid_pairs(labels, i, j, same):
    assert i.dtype == j.dtype == torch.int64 and same.dtype == torch.bool
    assert int(same.sum()) * 2 == len(same)  # balanced
    assert same[: len(same) // 2].all()  # positives first
    li, lj = labels[i], labels[j]
    assert torch.equal(li == lj, same)
    assert (i < j).all()


def test_verification_pairs_lists_all_positive_pairs():
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 7, 3, 0])
    i, j, same = verification_pairs(labels, seed=5)
    _check_valid_pairs(labels, i, j, same)
    want = {(a, b) for a in range(9) for b in range(a + 1, 9) if labels[a] == labels[b]}
    got = list(zip(i[same].tolist(), j[same].tolist()))
    assert len(got) == len(want) and set(got) == want
    again = verification_pairs(labels, seed=5)
    assert all(torch.equal(x, y) for x, y in zip((i, j, same), again))
    other = verification_pairs(labels, seed=6)
    assert not torch.equal(i, other[0])  # the negatives depend on the seed


@pytest.mark.parametrize("sizes", [[30, 40, 5], [2000, 2000]])  # randperm / rejection sampling
def test_verification_pairs_samples_distinct_positives(sizes):
    labels = torch.cat([torch.full((m,), c) for c, m in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    i, j, same = verification_pairs(labels, max_positive=500, seed=2)
    _check_valid_pairs(labels, i, j, same)
    assert int(same.sum()) == 500
    positives = set(zip(i[same].tolist(), j[same].tolist()))
    assert len(positives) == 500  # without replacement
    again = verification_pairs(labels, max_positive=500, seed=2)
    assert all(torch.equal(x, y) for x, y in zip((i, j, same), again))


def test_verification_pairs_negatives_are_uniform():
    labels = torch.tensor([0, 1, 1, 1, 1, 1, 1, 2, 2])  # 20 negative, 16 positive pairs
    counts: dict[tuple[int, int], int] = {}
    for seed in range(300):
        i, j, same = verification_pairs(labels, seed=seed)
        for pair in zip(i[~same].tolist(), j[~same].tolist()):
            counts[pair] = counts.get(pair, 0) + 1
    want = {(a, b) for a in range(9) for b in range(a + 1, 9) if labels[a] != labels[b]}
    assert set(counts) == want
    expected = 300 * 16 / 20
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 45  # 19 degrees of freedom: P(chi2 > 45) < 0.001 when uniform


def test_verification_pairs_errors():
    with pytest.raises(ValueError, match="two classes"):
        verification_pairs(torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no positive"):
        verification_pairs(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        verification_pairs(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):  # the shared label check of deepmetric.neighbors
        verification_pairs(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        verification_pairs([0, 0, 1, 1])
