"""The losses and miners in tiles of rows (deepmetric.tiles): the same values and gradients as
brute force whatever the tile size, and memory bounded by the tile budget, not by B x B."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepmetric.tiles
from deepmetric import mining
from deepmetric.distances import METRICS, pairwise
from deepmetric.losses import (
    MINING,
    ContrastiveLoss,
    LiftedStructuredLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    TripletLoss,
)
from deepmetric.tiles import Entries, RowTiles, row_blocks

TRIPLET_REFERENCE = {
    "batch_all": reference.batch_all,
    "batch_hard": reference.batch_hard,
    "semi_hard": reference.semi_hard,
}
ROW_BYTES = st.sampled_from([1, 8 * 3, 8 * 9 * 2])  # float64 rows of <= 9: 1, 2 or 3+ per tile
#: tests/test_losses.py checks the losses against brute force at length; here the tiles vary
FEW = settings(max_examples=15)


def _batch(seed: int, b: int, classes: int, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (b,), generator=g)


def _value_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    value = fn(*inputs)
    if not value.requires_grad:  # a reference's constant when nothing is active
        return value.detach(), [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _assert_same(ours, ref, inputs):
    (a, grads_a), (b, grads_b) = _value_and_grads(ours, inputs), _value_and_grads(ref, inputs)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-7, atol=1e-9)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the tiles


def test_row_blocks_cover_the_rows_within_the_budget_and_2_to_the_31():
    assert list(row_blocks(10, 4, 16 * 3)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(row_blocks(5, 4, 1)) == [(i, i + 1) for i in range(5)]  # at least one row
    blocks = list(row_blocks(200_000, 100_000, 1 << 40))  # a budget above 2^31 elements
    assert blocks[0] == (0, 21474) and all((b - a) * 100_000 < 2**31 for a, b in blocks)
    assert blocks[-1][1] == 200_000


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("tile_bytes", [1, 8 * 7 * 3])
def test_tiles_are_the_rows_of_pairwise_and_backprop_is_its_backward(metric, same, tile_bytes):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x[3] = x[1]  # coinciding rows: a zero distance off the diagonal
    y = None if same else torch.randn(7, 5, generator=g, dtype=torch.float64)
    weights = torch.randn(8, 8 if same else 7, generator=g, dtype=torch.float64)
    inputs = [x] if same else [x, y]

    def whole(*t):
        return (pairwise(t[0], None if same else t[1], metric) * weights).sum()

    def tiled(*t):
        tiles = RowTiles(t[0], None if same else t[1], metric, tile_bytes=tile_bytes)
        total = tiles.x.new_zeros(())
        rows = []
        for tile in tiles:
            rows.append(tile.dist)
            total += (tile.dist * weights[tile.start : tile.stop]).sum()
            tiles.backprop(tile, weights[tile.start : tile.stop].clone())
        torch.testing.assert_close(torch.cat(rows), pairwise(t[0], None if same else t[1], metric))
        return tiles.loss(total)

    _assert_same(tiled, whole, inputs)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("cost", [0.0, 1e12])  # entry by entry always, dense always
def test_backprop_of_entries_is_the_backward_of_those_entries(metric, same, cost, monkeypatch):
    """A sparse gradient (Entries, some listed twice, one on the zero diagonal and one on a
    zero distance off it) gives what autograd gives through pairwise at those entries, entry by
    entry or scattered into a dense tile."""
    monkeypatch.setattr(deepmetric.tiles, "SPARSE_COST", cost)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x[3] = x[1]
    y = None if same else torch.randn(7, 5, generator=g, dtype=torch.float64)
    n_cols = 8 if same else 7
    rows = torch.tensor([0, 1, 1, 3, 5, 7, 7, 2, 3])
    cols = torch.tensor([2, 3, 3, 1, 0, 6, 6, 2, 3]) % n_cols
    weights = torch.randn(len(rows), generator=g, dtype=torch.float64)
    inputs = [x] if same else [x, y]

    def whole(*t):
        return (pairwise(t[0], None if same else t[1], metric)[rows, cols] * weights).sum()

    def tiled(*t):
        tiles = RowTiles(t[0], None if same else t[1], metric, tile_bytes=8 * n_cols * 3)
        total = tiles.x.new_zeros(())
        for tile in tiles:
            here = (rows >= tile.start) & (rows < tile.stop)
            r, c, w = rows[here] - tile.start, cols[here], weights[here]
            total += (tile.dist[r, c] * w).sum()
            tiles.backprop(tile, Entries(r, c, w))
        return tiles.loss(total)

    _assert_same(tiled, whole, inputs)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_cosine_tile_clamped_by_rounding_passes_no_gradient_there(sparse, monkeypatch):
    """Unit rows whose float32 self-similarity rounds above 1 give 1 - cos < 0 before the clamp:
    the tile holds 0 there and, as torch.clamp's backward, no gradient flows through it."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 7, generator=g), dim=1)
    tiles = RowTiles(x.clone().requires_grad_(True), x.clone(), "cosine")
    raw = 1.0 - tiles.x @ tiles.y.T
    assert (raw < 0).any(), "no rounding past 1 in this batch: the test needs another seed"
    (tile,) = list(tiles)
    assert tile.blocked is not None and torch.equal(tile.blocked, raw < 0)
    assert (tile.dist >= 0).all()

    # The gradient with respect to the unit rows, before it goes through the normalisation
    # (which would hide the diagonal: cos(x, x) does not move with x).
    weights = torch.randn(64, 64, generator=g)
    if sparse:
        monkeypatch.setattr(deepmetric.tiles, "SPARSE_COST", 0.0)  # entry by entry
        r, c = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
        tiles.backprop(tile, Entries(r.flatten(), c.flatten(), weights.flatten()))
    else:
        tiles.backprop(tile, weights.clone())
    xn, yn = tiles.x.clone().requires_grad_(True), tiles.y.clone().requires_grad_(True)
    ((1.0 - xn @ yn.T).clamp(0.0, 2.0) * weights).sum().backward()
    torch.testing.assert_close(tiles.grad_x, xn.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiles.grad_y, yn.grad, rtol=1e-5, atol=1e-5)


def test_no_gradient_is_computed_without_a_need():
    x = torch.randn(6, 3, requires_grad=True)
    with torch.no_grad():
        tiles = RowTiles(x)
        assert not tiles.needs_grad and tiles.grad_x is None
        assert not tiles.loss(torch.tensor(1.0)).requires_grad
    assert RowTiles(x).needs_grad and not RowTiles(x.detach()).needs_grad


def test_half_inputs_get_float32_distances_and_gradients_in_their_dtype():
    x = torch.randn(12, 4).to(torch.bfloat16).requires_grad_(True)
    labels = torch.arange(6).repeat(2)
    value = TripletLoss(tile_bytes=4 * 12 * 5)(x, labels)
    assert value.dtype == torch.float32
    value.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "1"])
def test_a_bad_tile_budget_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="tile_bytes must be an integer >= 1"):
        TripletLoss(tile_bytes=bad)


# ----------------------------------------------------------------------------- the losses


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 9),
    classes=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.2, 1.0]),
    mining_=st.sampled_from(MINING),
    metric=st.sampled_from(METRICS),
    soft=st.booleans(),
    method=st.sampled_from(["sort", "direct"]),
    tile_bytes=ROW_BYTES,
)
def test_triplet_loss_in_tiles_matches_brute_force(
    seed, b, classes, margin, mining_, metric, soft, method, tile_bytes
):
    x, labels = _batch(seed, b, classes)
    loss = TripletLoss(
        margin=margin,
        mining=mining_,
        metric=metric,
        soft=soft,
        method=method,
        tile_bytes=tile_bytes,
    )
    _assert_same(
        lambda e: loss(e, labels),
        lambda e: TRIPLET_REFERENCE[mining_](e, labels, margin, metric, soft),
        [x],
    )


@pytest.mark.parametrize("mining_", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("cost", [0.0, 1e12])  # entry by entry always, dense always
def test_listed_triplets_backprop_entry_by_entry_or_dense_alike(mining_, metric, cost, monkeypatch):
    """Both ways a listed-triplet loss hands its gradient to the tiles match brute force."""
    monkeypatch.setattr(deepmetric.tiles, "SPARSE_COST", cost)
    for seed in range(5):
        x, labels = _batch(seed, 14, 4)
        loss = TripletLoss(margin=0.3, mining=mining_, metric=metric, tile_bytes=8 * 14 * 4)
        _assert_same(
            lambda e, loss=loss, labels=labels: loss(e, labels),
            lambda e, labels=labels: TRIPLET_REFERENCE[mining_](e, labels, 0.3, metric, False),
            [x],
        )


@FEW
@given(
    seed=st.integers(0, 2**31),
    classes=st.integers(1, 4),
    mining_=st.sampled_from(MINING),
    soft=st.booleans(),
    tile_bytes=ROW_BYTES,
)
def test_triplet_loss_with_a_reference_set_in_tiles_matches_brute_force(
    seed, classes, mining_, soft, tile_bytes
):
    x, labels = _batch(seed, 5, classes)
    ref_x, ref_labels = _batch(seed + 1, 7, classes)
    loss = TripletLoss(margin=0.5, mining=mining_, soft=soft, tile_bytes=tile_bytes)
    _assert_same(
        lambda e, r: loss(e, labels, r, ref_labels),
        lambda e, r: TRIPLET_REFERENCE[mining_](e, labels, 0.5, "euclidean", soft, r, ref_labels),
        [x, ref_x],
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 9),
    classes=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.5, 2.0]),
    metric=st.sampled_from(METRICS),
    tile_bytes=ROW_BYTES,
)
def test_contrastive_and_lifted_in_tiles_match_brute_force(
    seed, b, classes, margin, metric, tile_bytes
):
    x, labels = _batch(seed, b, classes)
    contrastive = ContrastiveLoss(margin=margin, metric=metric, tile_bytes=tile_bytes)
    _assert_same(
        lambda e: contrastive(e, labels),
        lambda e: reference.contrastive_batch(e, labels, margin, metric),
        [x],
    )
    lifted = LiftedStructuredLoss(margin=margin, metric=metric, tile_bytes=tile_bytes)
    _assert_same(
        lambda e: lifted(e, labels), lambda e: reference.lifted(e, labels, margin, metric), [x]
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 8),
    classes=st.integers(1, 4),
    epsilon=st.sampled_from([0.0, 0.1, 0.5]),
    tile_bytes=ROW_BYTES,
)
def test_multi_similarity_in_tiles_matches_brute_force(seed, b, classes, epsilon, tile_bytes):
    x, labels = _batch(seed, b, classes)
    ref_x, ref_labels = _batch(seed + 1, 6, classes)
    loss = MultiSimilarityLoss(epsilon=epsilon, tile_bytes=tile_bytes)
    _assert_same(
        lambda e: loss(e, labels),
        lambda e: reference.multi_similarity(e, labels, 2.0, 50.0, 0.5, epsilon),
        [x],
    )
    _assert_same(
        lambda e, f: loss(e, labels, f, ref_labels),
        lambda e, f: reference.multi_similarity(e, labels, 2.0, 50.0, 0.5, epsilon, f, ref_labels),
        [x, ref_x],
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 5),
    classes=st.sampled_from([None, 1, 2, 3]),
    tile_bytes=ROW_BYTES,
)
def test_ntxent_in_tiles_matches_brute_force(seed, b, classes, tile_bytes):
    z1, labels = _batch(seed, b, classes or 1)
    z2 = _batch(seed + 1, b, 1)[0]
    labels = None if classes is None else labels
    loss = NTXentLoss(temperature=0.5, tile_bytes=tile_bytes)
    _assert_same(
        lambda u, v: loss(u, v, labels),
        lambda u, v: reference.ntxent(u, v, 0.5, labels),
        [z1, z2],
    )


# ----------------------------------------------------------------------------- the miners


@pytest.mark.parametrize("method", ["sort", "direct"])
def test_miners_in_blocks_of_rows_give_the_answers_of_one_block(monkeypatch, method):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 4, generator=g)
    labels = torch.randint(0, 5, (23,), generator=g)
    ref_x, ref_labels = torch.randn(17, 4, generator=g), torch.randint(0, 5, (17,), generator=g)
    cases = [(pairwise(x), labels, None), (pairwise(x, ref_x), labels, ref_labels)]

    def answers():
        out = []
        for dist, lab, ref in cases:
            counts = mining.batch_all_counts(dist, lab, ref, margin=0.5, method=method)
            out += [
                mining.batch_all(dist, lab, ref, margin=0.5),
                mining.batch_hard(dist, lab, ref),
                mining.semi_hard(dist, lab, ref, method=method),
                mining.triplet_categories(dist, lab, ref, margin=0.5, method=method),
                (counts.per_positive(), counts.per_negative.long(), counts.per_slot.sum()),
            ]
        return out

    one_block = answers()
    monkeypatch.setattr(deepmetric.tiles, "CPU_TILE_BYTES", 4 * 23 * 4)  # 4 rows a block
    assert len(list(row_blocks(23, 23, deepmetric.tiles.default_tile_bytes(x.device)))) == 6
    for a, b in zip(answers(), one_block):
        for u, v in zip(a, b):
            assert torch.equal(torch.as_tensor(u), torch.as_tensor(v))


# ----------------------------------------------------------------------------- the memory

PEAK_CHILD = """
import resource, sys, torch
from deepmetric import losses
torch.manual_seed(0)
b, tile = int(sys.argv[1]), int(sys.argv[2])
x = torch.nn.functional.normalize(torch.randn(b, 32)).requires_grad_(True)
labels = torch.arange(b // 4).repeat_interleave(4)
made = [
    losses.TripletLoss(mining="batch_all", tile_bytes=tile),
    losses.TripletLoss(mining="batch_hard", tile_bytes=tile),
    losses.TripletLoss(mining="semi_hard", tile_bytes=tile),
    losses.TripletLoss(mining="batch_all", soft=True, tile_bytes=tile),
    losses.ContrastiveLoss(tile_bytes=tile),
    losses.LiftedStructuredLoss(tile_bytes=tile),
    losses.MultiSimilarityLoss(tile_bytes=tile),
]
losses.NTXentLoss(tile_bytes=tile)(x[:64], x[64:128]).backward()  # warm every code path
for loss in made:
    loss(x[:64], labels[:64]).backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for loss in made:
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
half = b // 2
losses.NTXentLoss(tile_bytes=tile)(x[:half], x[half:]).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="ru_maxrss in KiB: Linux")
def test_every_batch_loss_holds_tiles_not_the_b_by_b_matrix():
    """B = 6,144: one float32 B x B matrix is 144 MiB, and the losses used to hold several. With
    4 MiB tiles every loss, forward and backward, must raise the peak resident memory by less
    than 96 MiB (in a fresh process, after a small warm-up batch; measured here: 52 MiB).
    glibc's malloc is told to map blocks of 1 MiB and more, so a freed tile leaves the process
    and the peak measures what is alive, not the heap's fragmentation."""
    b, tile = 6144, 4 << 20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, str(b), str(tile)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    growth_mib = int(out.stdout.split()[-1]) / 1024
    assert growth_mib < 96, f"the peak grew by {growth_mib:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_every_loss_in_tiles_on_cuda_matches_the_cpu_in_float64(device):
    """B = 2,000 in tiles of 64 rows on the GPU (float32, TF32 off) against one tile on the
    CPU in float64: values and gradients agree to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    labels = torch.arange(500).repeat_interleave(4)
    made = [
        lambda t: TripletLoss(mining="batch_all", tile_bytes=t),
        lambda t: TripletLoss(mining="batch_hard", tile_bytes=t),
        lambda t: TripletLoss(mining="semi_hard", tile_bytes=t),
        lambda t: TripletLoss(mining="batch_all", soft=True, tile_bytes=t),
        lambda t: ContrastiveLoss(tile_bytes=t),
        lambda t: LiftedStructuredLoss(tile_bytes=t),
        lambda t: MultiSimilarityLoss(tile_bytes=t),
    ]
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for make in made:
            cpu = x.double().requires_grad_(True)
            expected = make(None)(cpu, labels)
            expected.backward()
            gpu = x.to(device).requires_grad_(True)
            value = make(4 * 2000 * 64)(gpu, labels.to(device))
            value.backward()
            assert value.device.type == "cuda"
            torch.testing.assert_close(value.double().cpu(), expected, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(gpu.grad.double().cpu(), cpu.grad, rtol=1e-3, atol=1e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
