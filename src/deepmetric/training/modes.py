"""Training modes as small strategies: which index batches an epoch runs, and the loss of one.

Every mode has the same parts, the :class:`Mode` protocol (all the training loop uses):

- ``steps_per_epoch``: batches in one epoch;
- ``batches(epoch)``: the index batches of that epoch, a pure function of (seed, epoch) (the
  offline mode also depends on the current weights);
- ``loss(model, x, y, gather) -> Step``: the training loss of one batch, ``loss_of(model(x),
  y, gather)``: a function of the model's outputs, from ONE forward pass
  over the whole batch (Siamese and triplet inputs are concatenated, so BatchNorm sees one
  batch); in a distributed run ``x`` is this rank's slice of the global batch and ``gather``
  (:func:`deepmetric.distributed.gather`) joins the embeddings of all slices, so the loss and
  its mining see the global batch (the default, :func:`~deepmetric.distributed.local`, is the
  one-process identity);
- ``val_batches(labels)``: fixed validation batches on which the same loss is reported (their
  mean, weighted by batch size), so the validation loss is comparable with the training loss:
  the P x K modes cut a class-stratified sample into batches of the training batch's shape (a
  batch loss such as batch-all depends on the batch size), the pair and triplet modes take
  one batch of pairs or triplets (their loss is a mean over them);
- ``loss_fn``: the loss (its parameters go to the optimiser, its state into checkpoints);
- ``n_views``: how many augmented views of each item the loop passes (``x`` holds
  ``n_views`` x B items: 2 with an NT-Xent term);
- ``resumable_mid_epoch``: whether an epoch interrupted halfway can go on from that batch
  (False where the batches depend on the weights: the epoch is redone).

The modes: :class:`PKMode` (P x K batches, any loss over ``(embeddings, labels)``),
:class:`JointMode` (the same plus cross-entropy on a classifier head: the model returns
``(embeddings, logits)``), :class:`SiameseMode` (balanced pairs, a pair loss
``loss(e1, e2, same)``), :class:`TripletMode` (random explicit triplets, a triplet loss
``loss(ea, ep, en)``), :class:`OfflineMode` (FaceNet-style: every N steps, embed P x K samples
with the current network and train on their semi-hard triplets); :class:`PairTuplesMode` and
:class:`TripletTuplesMode`: the siamese and triplet modes on the fixed tuples of a ``pairs:`` /
``triplets:`` file (:mod:`deepmetric.data.tuples`), no classes sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining
from deepmetric.data import PairSampler, PKSampler, random_triplets
from deepmetric.distances import Metric, pairwise
from deepmetric.distributed import local
from deepmetric.models import embed

Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: validation batch size of the P x K modes (a stratified sample of the validation split)
VAL_ITEMS = 4096


class Step(NamedTuple):
    """One batch's loss, the embeddings it used and their labels (``None`` for pairs and
    explicit triplets, whose labels are not a batch of classes)."""

    loss: torch.Tensor
    embeddings: torch.Tensor
    labels: torch.Tensor | None


def check_finite(emb: torch.Tensor) -> torch.Tensor:
    """Stop with a clear message when the network's output is no longer finite (divergence)."""
    if not torch.isfinite(emb).all():
        raise FloatingPointError(
            "the network produced NaN or inf embeddings (training diverged): try a lower "
            "train.lr or train.grad_clip; the last checkpoint is kept"
        )
    return emb


def stratified_indices(labels: torch.Tensor, total: int, seed: int) -> torch.Tensor:
    """Up to ``total`` indices with (nearly) the same number from every class, grouped by
    class, deterministic for ``seed``: a validation batch that covers every class even when the
    data is sorted by class."""
    y = labels.cpu().numpy()
    classes = np.unique(y)
    if len(classes) == 0:
        return torch.zeros(0, dtype=torch.long)
    per_class = max(2, total // len(classes))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes]
    return torch.from_numpy(np.concatenate(picked)[:total])


def pk_chunks(labels: torch.Tensor, idx: torch.Tensor, p: int, k: int) -> list[torch.Tensor]:
    """The items ``idx`` as P x K batches: round r takes items ``r k .. (r + 1) k - 1`` of each
    class (in ``idx``'s order) that has that many, and cuts the classes of the round into
    groups of ``p`` (a last group of fewer than 2 classes joins the one before). Items of
    incomplete rounds are left out; ``[idx]`` when no round is complete (a small split)."""
    y = labels[idx]
    per_class = [idx[y == c] for c in torch.unique(y)]
    chunks: list[torch.Tensor] = []
    for r in range(max((len(v) for v in per_class), default=0) // k):
        full = [v[r * k : (r + 1) * k] for v in per_class if len(v) >= (r + 1) * k]
        groups = [full[g : g + p] for g in range(0, len(full), p)]
        if len(groups) > 1 and len(groups[-1]) < 2:
            last = groups.pop()
            groups[-1] = groups[-1] + last
        chunks += [torch.cat(g) for g in groups if len(g) >= 2]
    return chunks or [idx]


class Mode(Protocol):
    """What the training loop uses of a training mode (see the module's docstring): the
    batches of an epoch and the loss of one, on the training and the validation data."""

    name: str
    loss_fn: Callable[..., torch.Tensor]
    steps_per_epoch: int
    resumable_mid_epoch: bool

    @property
    def n_views(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[torch.Tensor]: ...

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gather: Gather = local
    ) -> Step: ...

    def loss_of(self, out: Any, y: torch.Tensor, gather: Gather = local) -> Step: ...

    def val_batches(self, labels: torch.Tensor) -> list[torch.Tensor]: ...


def _pk_batches(sampler: PKSampler, epoch: int) -> Iterator[torch.Tensor]:
    sampler.set_epoch(epoch)
    for idx in sampler:
        yield torch.as_tensor(idx)


class PKMode:
    """P x K batches and a loss over the batch: ``loss_fn(embeddings (B, D), labels (B,))``."""

    name = "batch"
    resumable_mid_epoch = True

    def __init__(
        self,
        labels: torch.Tensor,
        loss_fn: nn.Module,
        *,
        p: int,
        k: int,
        seed: int,
        views: tuple[nn.Module, float] | None = None,
    ):
        self.sampler = PKSampler(labels, p, k, seed=seed)
        self.p, self.k = p, k
        self.loss_fn = loss_fn
        self.seed = seed
        self.steps_per_epoch = len(self.sampler)
        self.views = views

    @property
    def n_views(self) -> int:
        """2 when the loop must pass two augmented views of the batch (``x`` of 2B items)."""
        return 1 if self.views is None else 2

    def _batch_loss(
        self, emb: torch.Tensor, y: torch.Tensor, gather: Gather
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, global embeddings, global labels)``: the metric loss over the global batch;
        when ``emb`` holds two views (2B rows, ``views`` set), the metric loss of the first view
        plus ``weight`` x NT-Xent between the views."""
        if self.views is not None and len(emb) == 2 * len(y):
            first, second = emb.chunk(2)
            first, all_y = gather(first, y)
            second, _ = gather(second, y)
            first, second = check_finite(first), check_finite(second)
            ntxent, weight = self.views
            return self.loss_fn(first, all_y) + weight * ntxent(first, second), first, all_y
        emb, y = gather(emb, y)
        emb = check_finite(emb)
        return self.loss_fn(emb, y), emb, y

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        return _pk_batches(self.sampler, epoch)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gather: Gather = local
    ) -> Step:
        return self.loss_of(model(x), y, gather)

    def loss_of(self, out: torch.Tensor, y: torch.Tensor, gather: Gather = local) -> Step:
        return Step(*self._batch_loss(out.float(), y, gather))

    def val_batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        sample = stratified_indices(labels, VAL_ITEMS, self.seed)
        return pk_chunks(labels, sample, self.p, self.k)


class JointMode(PKMode):
    """P x K batches; ``model(x) -> (embeddings, logits)``; loss = metric loss + ``weight`` x
    cross-entropy (``label_smoothing`` as in ``F.cross_entropy``). ``classes`` lists the label
    values the head's outputs stand for, in order."""

    name = "joint"

    def __init__(
        self,
        labels: torch.Tensor,
        loss_fn: nn.Module,
        *,
        p: int,
        k: int,
        seed: int,
        classes: torch.Tensor,
        weight: float = 1.0,
        label_smoothing: float = 0.0,
        views: tuple[nn.Module, float] | None = None,
    ):
        super().__init__(labels, loss_fn, p=p, k=k, seed=seed, views=views)
        # The head's rows in label order, found by binary search: labels are values, never sizes.
        self.sorted_classes, self.class_rows = torch.sort(classes.to(torch.long))
        self.weight = weight
        self.label_smoothing = label_smoothing

    def loss_of(
        self, out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, gather: Gather = local
    ) -> Step:
        """Metric loss (over the global batch) + weight x cross-entropy over the items of
        classes the head knows (this rank's slice: DDP averages that term's gradient over
        ranks); items of other classes (a class-disjoint validation batch) add no
        cross-entropy, so on such a batch the loss is the metric term alone."""
        emb, logits = out
        metric, all_emb, all_y = self._batch_loss(emb.float(), y, gather)
        logits = logits[: len(y)]  # the first view's
        values = self.sorted_classes.to(y.device)
        at = torch.searchsorted(values, y).clamp_max_(len(values) - 1)
        known = values[at] == y  # False: a class the head has no output for
        target = self.class_rows.to(y.device)[at]
        ce = emb.new_zeros(())
        if bool(known.any()):
            ce = F.cross_entropy(
                logits[known].float(), target[known], label_smoothing=self.label_smoothing
            )
        return Step(metric + self.weight * ce, all_emb, all_y)


class SiameseMode:
    """Balanced pairs: batches of ``2B`` indices ``[i_1..i_B, j_1..j_B]``, one forward pass,
    ``loss_fn(e[:B], e[B:], same)``."""

    name = "siamese"
    resumable_mid_epoch = True
    n_views = 1

    def __init__(
        self,
        labels: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int,
    ):
        self.sampler = PairSampler(labels, batch_size, seed=seed)
        self.loss_fn = loss_fn
        self.seed = seed
        self.steps_per_epoch = len(self.sampler)

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        self.sampler.set_epoch(epoch)
        for idx in self.sampler:
            yield torch.as_tensor(idx)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gather: Gather = local
    ) -> Step:
        return self.loss_of(model(x), y, gather)

    def loss_of(self, out: torch.Tensor, y: torch.Tensor, gather: Gather = local) -> Step:
        emb, y = gather(out.float(), y)
        emb = check_finite(emb)
        b = len(emb) // 2
        return Step(self.loss_fn(emb[:b], emb[b:], y[:b] == y[b:]), emb, None)

    def val_batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        n = min(len(labels), VAL_ITEMS // 2)
        sampler = PairSampler(labels, n, n_pairs=n, seed=self.seed)
        return [torch.as_tensor(next(iter(sampler)))]


def _triplet_batches(
    a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, batch_size: int
) -> Iterator[torch.Tensor]:
    for start in range(0, len(a), batch_size):
        sl = slice(start, start + batch_size)
        yield torch.cat([a[sl], p[sl], n[sl]])


class TripletMode:
    """Random explicit triplets: batches of ``3B`` indices (anchors, positives, negatives), one
    forward pass, ``loss_fn(ea, ep, en)``; ``len(labels)`` triplets per epoch."""

    name = "triplet"
    resumable_mid_epoch = True
    n_views = 1

    def __init__(
        self,
        labels: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int,
    ):
        self.labels = labels
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = max(1, math.ceil(len(labels) / batch_size))

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        a, p, n = random_triplets(self.labels, len(self.labels), seed=epoch_seed(self.seed, epoch))
        return _triplet_batches(a, p, n, self.batch_size)

    def loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gather: Gather = local
    ) -> Step:
        return self.loss_of(model(x), y, gather)

    def loss_of(self, out: torch.Tensor, y: torch.Tensor, gather: Gather = local) -> Step:
        emb, _ = gather(out.float(), y)
        emb = check_finite(emb)
        ea, ep, en = emb.chunk(3)
        return Step(self.loss_fn(ea, ep, en), emb, None)

    def val_batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        a, p, n = random_triplets(labels, min(len(labels), VAL_ITEMS // 3), seed=self.seed)
        return [torch.cat([a, p, n])]


class _FixedTuples:
    """The batches of fixed tuples (``pairs:FILE`` / ``triplets:FILE``) of ``arity`` images:
    item ``r * arity + s`` of the training source is image ``s`` of tuple ``r``
    (:class:`~deepmetric.training.tuples.TupleSource`). Every epoch runs all ``n`` tuples in an
    order drawn from (seed, epoch), ``batch_size`` a batch, laid out as the class-sampling mode
    lays its own (first images, then second, then third), so its ``loss_of`` applies."""

    arity: int
    resumable_mid_epoch = True
    n_views = 1

    def __init__(
        self, n: int, loss_fn: Callable[..., torch.Tensor], *, batch_size: int, seed: int
    ) -> None:
        self.n, self.loss_fn, self.batch_size, self.seed = n, loss_fn, batch_size, seed
        self.steps_per_epoch = max(1, math.ceil(n / batch_size))

    def _items(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows * self.arity + s for s in range(self.arity)])

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        order = np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(self.n)
        rows = torch.from_numpy(order)
        for start in range(0, self.n, self.batch_size):
            yield self._items(rows[start : start + self.batch_size])

    def val_batches(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Every validation tuple, in batches of at most ``VAL_ITEMS`` images."""
        rows = torch.arange(len(labels) // self.arity)
        size = max(1, VAL_ITEMS // self.arity)
        return [self._items(rows[i : i + size]) for i in range(0, len(rows), size)]


class PairTuplesMode(_FixedTuples, SiameseMode):
    """``mode=siamese`` on ``pairs:FILE``: exactly the file's pairs (``same`` read from the
    source's labels: equal for a pair declared the same)."""

    arity = 2


class TripletTuplesMode(_FixedTuples, TripletMode):
    """``mode=triplet`` on ``triplets:FILE``: exactly the file's triplets."""

    arity = 3


class OfflineMode(TripletMode):
    """FaceNet-style offline mining: every ``every`` steps, embed ``mine_p`` classes x
    ``mine_k`` samples (``fetch(idx)`` gives their inputs) with the current network
    (``embed_net``), take the semi-hard triplet of every positive pair
    (:func:`deepmetric.mining.semi_hard`) and train on those, ``batch_size`` triplets a step.
    The batches depend on the weights, so an interrupted epoch is redone."""

    name = "offline"
    resumable_mid_epoch = False

    def __init__(
        self,
        labels: torch.Tensor,
        loss_fn: Callable[..., torch.Tensor],
        *,
        batch_size: int,
        seed: int,
        fetch: Callable[[torch.Tensor], torch.Tensor],
        embed_net: nn.Module,
        device: torch.device,
        metric: Metric,
        every: int,
        mine_p: int,
        mine_k: int,
    ):
        super().__init__(labels, loss_fn, batch_size=batch_size, seed=seed)
        self.fetch, self.embed_net, self.device, self.metric = fetch, embed_net, device, metric
        self.every, self.mine_p, self.mine_k = every, mine_p, mine_k

    def mine(self, rng: np.random.Generator) -> torch.Tensor:
        """(T, 3) semi-hard triplets (indices into the training set), shuffled."""
        labels = self.labels.numpy()
        classes = np.unique(labels)
        chosen = rng.choice(classes, size=min(self.mine_p, len(classes)), replace=False)
        idx = np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c))[: self.mine_k] for c in chosen]
        )
        emb = embed(self.embed_net, self.fetch(torch.as_tensor(idx)), self.device)
        triplets = mining.semi_hard(pairwise(emb, metric=self.metric), self.labels[idx])
        found = torch.as_tensor(idx)[torch.stack(list(triplets), dim=1)]
        return found[torch.as_tensor(rng.permutation(len(found)))]

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        done = 0
        while done < self.steps_per_epoch:
            triplets = self.mine(rng)
            if len(triplets) == 0:
                raise ValueError("offline mining found no triplet: need 2+ classes with 2+ samples")
            for batch in _triplet_batches(*triplets.T, self.batch_size):
                yield batch
                done += 1
                if done >= self.steps_per_epoch or done % self.every == 0:
                    break


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch`` that is not drawn from torch's RNG."""
    return seed * 1_000_003 + epoch
