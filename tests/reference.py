"""Brute-force references: plain Python loops over scalars, written independently of the
package (no masks, no sorting, no prefix sums). Slow, O(B^3); for small inputs only."""

from __future__ import annotations

import itertools
import math

import torch


def dist(u: torch.Tensor, v: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between two 1-D vectors, differentiable when u != v."""
    if metric == "cosine":
        nu, nv = torch.sqrt((u * u).sum()), torch.sqrt((v * v).sum())
        if nu == 0 or nv == 0:
            return torch.ones((), dtype=u.dtype)
        return 1 - (u * v).sum() / (nu * nv)
    sq = ((u - v) ** 2).sum()
    if metric == "squared_euclidean":
        return sq
    return torch.sqrt(sq) if sq > 0 else sq * 0


def matrix(x: torch.Tensor, y: torch.Tensor | None, metric: str) -> list[list[torch.Tensor]]:
    ref = x if y is None else y
    return [[dist(x[i], ref[j], metric) for j in range(len(ref))] for i in range(len(x))]


def valid_triplets(labels, ref_labels=None):
    """(a, p, n) with label a == label p, a != p (batch case), label n != label a."""
    same_batch = ref_labels is None
    ref = labels if same_batch else ref_labels
    out = []
    for a in range(len(labels)):
        for p in range(len(ref)):
            if (same_batch and p == a) or ref[p] != labels[a]:
                continue
            for n in range(len(ref)):
                if ref[n] != labels[a]:
                    out.append((a, p, n))
    return out


def hinge(x: torch.Tensor, margin: float, soft: bool) -> torch.Tensor:
    if soft:
        return torch.log1p(torch.exp(-x.abs())) + torch.clamp(x, min=0)
    return torch.clamp(x + margin, min=0)


def batch_all(x, labels, margin, metric="euclidean", soft=False, ref_x=None, ref_labels=None):
    d = matrix(x, ref_x, metric)
    total, count = x.sum() * 0, 0
    for a, p, n in valid_triplets(
        labels.tolist(), None if ref_labels is None else ref_labels.tolist()
    ):
        loss = hinge(d[a][p] - d[a][n], margin, soft)
        if soft or loss > 0:
            total = total + loss
            count += 1
    return total / count if count else total


def batch_hard(x, labels, margin, metric="euclidean", soft=False, ref_x=None, ref_labels=None):
    d = matrix(x, ref_x, metric)
    lab = labels.tolist()
    ref = lab if ref_labels is None else ref_labels.tolist()
    losses = []
    for a in range(len(lab)):
        pos = [
            d[a][p]
            for p in range(len(ref))
            if ref[p] == lab[a] and (ref_labels is not None or p != a)
        ]
        neg = [d[a][n] for n in range(len(ref)) if ref[n] != lab[a]]
        if pos and neg:
            hardest_p = max(pos, key=lambda t: t.item())
            hardest_n = min(neg, key=lambda t: t.item())
            losses.append(hinge(hardest_p - hardest_n, margin, soft))
    return sum(losses) / len(losses) if losses else x.sum() * 0


def semi_hard_negative(d_row, d_ap, negatives):
    """TF-Addons rule: the smallest d_an > d_ap, else the largest d_an."""
    farther = [n for n in negatives if d_row[n] > d_ap]
    if farther:
        return min(farther, key=lambda n: d_row[n].item())
    return max(negatives, key=lambda n: d_row[n].item())


def semi_hard(x, labels, margin, metric="euclidean", soft=False, ref_x=None, ref_labels=None):
    d = matrix(x, ref_x, metric)
    lab = labels.tolist()
    ref = lab if ref_labels is None else ref_labels.tolist()
    losses = []
    for a in range(len(lab)):
        negatives = [n for n in range(len(ref)) if ref[n] != lab[a]]
        if not negatives:
            continue
        for p in range(len(ref)):
            if ref[p] == lab[a] and (ref_labels is not None or p != a):
                n = semi_hard_negative(d[a], d[a][p], negatives)
                losses.append(hinge(d[a][p] - d[a][n], margin, soft))
    return sum(losses) / len(losses) if losses else x.sum() * 0


def categories(x, labels, margin, metric="euclidean"):
    d = matrix(x, None, metric)
    easy = semi = hard = 0
    for a, p, n in valid_triplets(labels.tolist()):
        if d[a][n] <= d[a][p]:
            hard += 1
        elif d[a][n] >= d[a][p] + margin:
            easy += 1
        else:
            semi += 1
    return easy, semi, hard


def contrastive_batch(x, labels, margin, metric="euclidean"):
    terms = []
    for i, j in itertools.combinations(range(len(x)), 2):
        d = dist(x[i], x[j], metric)
        if labels[i] == labels[j]:
            terms.append(0.5 * d**2)
        else:
            terms.append(0.5 * torch.clamp(margin - d, min=0) ** 2)
    return sum(terms) / len(terms) if terms else x.sum() * 0


def contrastive_pairs(x1, x2, same, margin, metric="euclidean"):
    terms = []
    for i in range(len(x1)):
        d = dist(x1[i], x2[i], metric)
        terms.append(0.5 * d**2 if same[i] else 0.5 * torch.clamp(margin - d, min=0) ** 2)
    return sum(terms) / len(terms)


def lifted(x, labels, margin, metric="euclidean"):
    d = matrix(x, None, metric)
    lab = labels.tolist()
    b = len(lab)
    terms = []
    for i, j in itertools.combinations(range(b), 2):
        if lab[i] != lab[j]:
            continue
        s = sum(torch.exp(margin - d[i][k]) for k in range(b) if lab[k] != lab[i])
        s = s + sum(torch.exp(margin - d[j][k]) for k in range(b) if lab[k] != lab[j])
        if isinstance(s, int):  # no negatives at all
            continue
        terms.append(torch.clamp(torch.log(s) + d[i][j], min=0) ** 2)
    n_pos = sum(1 for i, j in itertools.combinations(range(b), 2) if lab[i] == lab[j])
    return sum(terms) / (2 * n_pos) if terms else x.sum() * 0


def triplet_margin(a, p, n, margin, metric="euclidean", soft=False):
    losses = [
        hinge(dist(a[i], p[i], metric) - dist(a[i], n[i], metric), margin, soft)
        for i in range(len(a))
    ]
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------- open-set losses
# Cosine-similarity losses: one scalar similarity per pair, plain log / exp / sums (the values
# stay far from overflow in float64 for the small inputs the tests use).


def cos_sim(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two 1-D vectors; 0 when one of them is 0."""
    nu, nv = torch.sqrt((u * u).sum()), torch.sqrt((v * v).sum())
    if nu == 0 or nv == 0:
        return torch.zeros((), dtype=u.dtype)
    return (u * v).sum() / (nu * nv)


def log_one_plus(terms: list[torch.Tensor]) -> torch.Tensor | float:
    """log(1 + sum of exp(t)) for a list of scalars; 0.0 for an empty list."""
    if not terms:
        return 0.0
    total = 1.0
    for t in terms:
        total = total + torch.exp(t)
    return torch.log(total)


def multi_similarity(x, labels, alpha, beta, base, epsilon, ref_x=None, ref_labels=None):
    """Wang et al. 2019: mine each anchor's pairs against its unmined extremes, then
    1/alpha log(1 + sum_P exp(-alpha (S - base))) + 1/beta log(1 + sum_N exp(beta (S - base))),
    summed over anchors and divided by the number of anchors."""
    lab = labels.tolist()
    ref = x if ref_x is None else ref_x
    ref_lab = lab if ref_labels is None else ref_labels.tolist()
    total = x.sum() * 0 + (0 if ref_x is None else ref_x.sum() * 0)
    for i in range(len(lab)):
        pos, neg = [], []
        for j in range(len(ref_lab)):
            if ref_x is None and j == i:
                continue
            s = cos_sim(x[i], ref[j])
            (pos if ref_lab[j] == lab[i] else neg).append(s)
        kept_pos = [s for s in pos if neg and s.item() - epsilon < max(t.item() for t in neg)]
        kept_neg = [s for s in neg if pos and s.item() + epsilon > min(t.item() for t in pos)]
        total = total + log_one_plus([-alpha * (s - base) for s in kept_pos]) / alpha
        total = total + log_one_plus([beta * (s - base) for s in kept_neg]) / beta
    return total / len(lab)


def proxy_anchor(x, labels, proxies, classes, alpha, delta):
    """Kim et al. 2020; items whose label is not in ``classes`` are left out."""
    items = [(x[i], classes.index(y)) for i, y in enumerate(labels.tolist()) if y in classes]
    zero = x.sum() * 0 + proxies.sum() * 0
    if not items:
        return zero
    pos_total, neg_total, with_pos = zero, zero, 0
    for c in range(len(classes)):
        pos = [-alpha * (cos_sim(e, proxies[c]) - delta) for e, k in items if k == c]
        neg = [alpha * (cos_sim(e, proxies[c]) + delta) for e, k in items if k != c]
        if pos:
            with_pos += 1
            pos_total = pos_total + log_one_plus(pos)
        neg_total = neg_total + log_one_plus(neg)
    return pos_total / with_pos + neg_total / len(classes)


def margin_softmax(x, labels, weight, classes, kind, scale, margin):
    """ArcFace / CosFace cross-entropy, averaged over the items of a known class."""
    losses = []
    for i, y in enumerate(labels.tolist()):
        if y not in classes:
            continue
        target = classes.index(y)
        logits = []
        for c in range(len(classes)):
            cos = cos_sim(x[i], weight[c])
            if c == target and kind == "cosface":
                cos = cos - margin
            elif c == target:
                theta = torch.acos(torch.clamp(cos, -1 + 1e-7, 1 - 1e-7))
                if theta.item() + margin <= math.pi:
                    cos = torch.cos(theta + margin)
                else:
                    cos = cos - margin * math.sin(margin)
            logits.append(scale * cos)
        losses.append(-logits[target] + torch.log(sum(torch.exp(t) for t in logits)))
    if not losses:
        return x.sum() * 0 + weight.sum() * 0
    return sum(losses) / len(losses)


def ntxent(z1, z2, temperature, labels=None):
    """SimCLR eq. 1 over the 2B anchors; with labels, same-class items other than the anchor's
    other view are left out of the denominator."""
    z = [z1[i] for i in range(len(z1))] + [z2[i] for i in range(len(z2))]
    b, n = len(z1), 2 * len(z1)
    lab = None if labels is None else labels.tolist() * 2
    losses = []
    for i in range(n):
        partner = i + b if i < b else i - b
        denominator = 0.0
        for k in range(n):
            if k == i or (lab is not None and k != partner and lab[k] == lab[i]):
                continue
            denominator = denominator + torch.exp(cos_sim(z[i], z[k]) / temperature)
        losses.append(-cos_sim(z[i], z[partner]) / temperature + torch.log(denominator))
    return sum(losses) / n
