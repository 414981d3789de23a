"""Losses of the three training stages (SimCLR, SCAN/NNM, self-labelling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric SimCLR loss for two batches of L2-normalised projections (b, d).

    Each of the 2b views has one positive (the other view of its image) and 2b - 2 negatives.
    """
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0).float()
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of a probability vector (or the mean row entropy of a matrix)."""
    p = p.clamp_min(EPS)
    h = -(p * p.log()).sum(dim=-1)
    return h.mean() if h.dim() else h


def consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-mean log <a_i, b_i> for two probability matrices (n, C)."""
    return -torch.log((a * b).sum(dim=1).clamp_min(EPS)).mean()


def cluster_contrast(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """NNM's cluster-level contrast: cluster k of `a` should match cluster k of `b`.

    Columns are L2-normalised, S = a^T b (C x C), and S / temperature is scored by cross-entropy
    against the identity.
    """
    an = F.normalize(a, dim=0)
    bn = F.normalize(b, dim=0)
    s = an.t() @ bn / temperature
    return F.cross_entropy(s, torch.arange(s.shape[0], device=s.device))


def scan_loss(
    anchor_logits: torch.Tensor, neighbor_logits: torch.Tensor, entropy_weight: float
) -> dict[str, torch.Tensor]:
    """SCAN: consistency between an image and a mined neighbour, minus weighted entropy."""
    pa = F.softmax(anchor_logits.float(), dim=1)
    pn = F.softmax(neighbor_logits.float(), dim=1)
    cons = consistency(pa, pn)
    ent = entropy(pa.mean(dim=0))
    return {"total": cons - entropy_weight * ent, "consistency": cons, "entropy": ent}


def nnm_loss(
    anchor_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    augmented_logits: torch.Tensor,
    batch_neighbor: torch.Tensor | None,
    memory_probs: torch.Tensor | None,
    entropy_weight: float,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """NNM for one head.

    Pairs [anchor; second view of anchor] with [mined neighbour; the anchor's nearest other anchor
    in the batch] (local matching; `batch_neighbor` indexes the batch), adds the cluster-level
    contrast between the two, and, when `memory_probs` (the stored probabilities of each anchor's
    nearest sample in the whole set, keyed by dataset index) is given, the same two terms against
    those rows (global matching).
    """
    pa = F.softmax(anchor_logits.float(), dim=1)
    pn = F.softmax(neighbor_logits.float(), dim=1)
    paug = F.softmax(augmented_logits.float(), dim=1)
    partner = pa[batch_neighbor] if batch_neighbor is not None else pn
    a = torch.cat([pa, paug], dim=0)
    b = torch.cat([pn, partner], dim=0)
    cons = consistency(a, b)
    contrast = cluster_contrast(a, b, temperature)
    glob = torch.zeros((), device=a.device)
    if memory_probs is not None:
        rows = torch.cat([a, b], dim=0)
        mem = memory_probs.float().repeat(4, 1)
        glob = consistency(rows, mem) + cluster_contrast(rows, mem, temperature)
    ent = entropy(a.mean(dim=0))
    total = cons + contrast + glob - entropy_weight * ent
    return {"total": total, "consistency": cons, "contrast": contrast, "global": glob, "entropy": ent}


def selflabel_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float, class_balance: bool = True
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the strong view against the weak view's confident argmax.

    Returns (loss, number of confident samples). With no confident sample the loss is a zero that
    still belongs to the graph, so the training step runs instead of crashing.
    """
    probs = F.softmax(weak_logits.detach().float(), dim=1)
    conf, target = probs.max(dim=1)
    mask = conf > threshold
    n = int(mask.sum())
    if n == 0:
        return strong_logits.sum() * 0.0, 0
    target = target[mask]
    weight = None
    if class_balance:
        counts = torch.bincount(target, minlength=strong_logits.shape[1]).float()
        weight = torch.where(counts > 0, n / counts.clamp_min(1), torch.ones_like(counts))
    return F.cross_entropy(strong_logits[mask].float(), target, weight=weight), n
