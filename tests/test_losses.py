import math

import torch
import torch.nn.functional as F
from nnm.engine.losses import cluster_contrast, entropy, nnm_loss, nt_xent, scan_loss, selflabel_loss


def test_nt_xent_matches_hand_computation():
    # Two images, 2-d unit vectors: views of image 0 are identical, views of image 1 orthogonal to them.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # For anchor 0 (z1[0]): candidates are z1[1], z2[0], z2[1] with cosines 0, 1, 0.
    per_anchor = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * math.exp(0)))
    assert math.isclose(nt_xent(z1, z2, t).item(), per_anchor, rel_tol=1e-6)


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's NT-Xent written out: each of the 2b views is an anchor whose positive is the other view of
    its image and whose 2b - 2 negatives are all other views; cosine similarity / t; mean over the 2b anchors."""
    views = [v.double() for v in torch.cat([z1, z2])]
    b = z1.shape[0]
    total = 0.0
    for a in range(2 * b):
        positive = (a + b) % (2 * b)

        def s(j, a=a):
            return float(torch.dot(views[a], views[j]) / (views[a].norm() * views[j].norm())) / t

        denominator = sum(math.exp(s(j)) for j in range(2 * b) if j != a)  # the positive and 2b - 2 negatives
        total += -math.log(math.exp(s(positive)) / denominator)
    return total / (2 * b)


def test_nt_xent_matches_an_independent_implementation():
    g = torch.Generator().manual_seed(0)
    for b, d, t in [(1, 3, 0.5), (3, 5, 0.1), (6, 16, 0.5), (9, 4, 1.0)]:
        z1 = F.normalize(torch.randn(b, d, generator=g), dim=1)
        z2 = F.normalize(z1 + 0.5 * torch.randn(b, d, generator=g), dim=1)  # correlated views
        assert math.isclose(nt_xent(z1, z2, t).item(), nt_xent_by_hand(z1, z2, t), rel_tol=1e-5)
        # Symmetric in the two views.
        assert math.isclose(nt_xent(z2, z1, t).item(), nt_xent_by_hand(z1, z2, t), rel_tol=1e-5)


def test_entropy_of_uniform_and_one_hot():
    assert math.isclose(entropy(torch.full((4,), 0.25)).item(), math.log(4), rel_tol=1e-6)
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() < 1e-6


def test_scan_loss_values():
    # Logits chosen so both softmaxes are exactly [0.5, 0.5] -> <p, q> = 0.5, entropy = log 2.
    a = torch.zeros(3, 2)
    out = scan_loss(a, a, entropy_weight=5.0)
    assert math.isclose(out["consistency"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(out["entropy"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(out["total"].item(), math.log(2) - 5 * math.log(2), rel_tol=1e-6)


def test_cluster_contrast_identity_is_lowest():
    a = torch.eye(3).repeat(2, 1)  # every cluster used, one-hot rows
    b_same = a.clone()
    b_swapped = a[:, [1, 0, 2]]
    # With identical assignments S = I (after column normalisation): CE = -log(e / (e + 2)).
    expected = -math.log(math.e / (math.e + 2))
    assert math.isclose(cluster_contrast(a, b_same).item(), expected, rel_tol=1e-6)
    assert cluster_contrast(a, b_swapped) > cluster_contrast(a, b_same)


def test_nnm_loss_terms_and_global_memory():
    g = torch.Generator().manual_seed(1)
    la, ln, lg = (torch.randn(6, 4, generator=g) for _ in range(3))
    batch_nb = torch.tensor([1, 0, 3, 2, 5, 4])
    no_mem = nnm_loss(la, ln, lg, batch_nb, None, 5.0)
    assert no_mem["global"].item() == 0.0
    pa, paug, pn = F.softmax(la, 1), F.softmax(lg, 1), F.softmax(ln, 1)
    a = torch.cat([pa, paug])
    b = torch.cat([pn, pa[batch_nb]])
    expected_cons = -torch.log((a * b).sum(1)).mean()
    assert torch.isclose(no_mem["consistency"], expected_cons)
    mem = F.softmax(torch.randn(6, 4, generator=g), 1)
    with_mem = nnm_loss(la, ln, lg, batch_nb, mem, 5.0)
    rows = torch.cat([a, b])
    expected_glob = -torch.log((rows * mem.repeat(4, 1)).sum(1)).mean() + cluster_contrast(rows, mem.repeat(4, 1))
    assert torch.isclose(with_mem["global"], expected_glob)
    assert torch.isclose(with_mem["total"], no_mem["total"] + expected_glob)


def test_selflabel_loss_without_confident_samples_is_zero_with_grad():
    weak = torch.zeros(4, 3)  # uniform -> never confident
    strong = torch.randn(4, 3, requires_grad=True)
    loss, n = selflabel_loss(weak, strong, threshold=0.99)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # must not crash
    assert strong.grad is not None and torch.all(strong.grad == 0)


def test_selflabel_loss_class_balanced_weights():
    weak = torch.tensor([[10.0, 0, 0], [10.0, 0, 0], [10.0, 0, 0], [0, 10.0, 0]])
    strong = torch.zeros(4, 3)
    loss, n = selflabel_loss(weak, strong, threshold=0.99, class_balance=True)
    assert n == 4
    # Uniform strong logits: every sample's CE is log 3 whatever the weights.
    assert math.isclose(loss.item(), math.log(3), rel_tol=1e-6)
    strong2 = torch.tensor([[5.0, 0, 0]] * 3 + [[5.0, 0, 0]])
    balanced, _ = selflabel_loss(weak, strong2, 0.99, class_balance=True)
    plain, _ = selflabel_loss(weak, strong2, 0.99, class_balance=False)
    # The single class-1 sample is wrong; balancing gives it weight 4/1 vs 4/3 for the others.
    ce_right = F.cross_entropy(strong2[:1], torch.tensor([0])).item()
    ce_wrong = F.cross_entropy(strong2[3:], torch.tensor([1])).item()
    assert math.isclose(plain.item(), (3 * ce_right + ce_wrong) / 4, rel_tol=1e-5)
    w0, w1 = 4 / 3, 4.0
    assert math.isclose(balanced.item(), (3 * w0 * ce_right + w1 * ce_wrong) / (3 * w0 + w1), rel_tol=1e-5)
