"""Tests for simpool/losses.py: DINO and iBOT patch losses against naive float64 definitions."""

import math

import pytest
import torch

from simpool.losses import DINOLoss, PatchLoss

# The losses compute in float32 (logits are cast with .float()), hence float32-level tolerances.
TOL = dict(rtol=1e-5, atol=1e-5)


def _softmax(x):
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _log_softmax(x):
    m = x.max(-1, keepdim=True).values
    return x - m - torch.log(torch.exp(x - m).sum(-1, keepdim=True))


def naive_dino(student, teacher, center, ncrops, teacher_temp, student_temp=0.1, global_crops=2):
    """DINO's definition written as a double loop over (teacher view, student view) pairs."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    B = teacher.shape[0] // global_crops
    total, n_pairs = 0.0, 0
    for iq in range(global_crops):
        q = _softmax((teacher[iq * B : (iq + 1) * B] - center) / teacher_temp)
        for v in range(ncrops):
            if v == iq:
                continue
            logp = _log_softmax(student[v * B : (v + 1) * B] / student_temp)
            per_sample = torch.stack([-(q[b] * logp[b]).sum() for b in range(B)])
            total = total + per_sample.mean()
            n_pairs += 1
    return total / n_pairs


@pytest.mark.parametrize("ncrops", [2, 6])
def test_dino_loss_matches_double_loop(ncrops):
    torch.manual_seed(0)
    K, B = 7, 3
    loss_fn = DINOLoss(K, ncrops)
    s = torch.randn(ncrops * B, K, dtype=torch.float64)
    t = torch.randn(2 * B, K, dtype=torch.float64)
    expected = naive_dino(s, t, torch.zeros(1, K), ncrops, 0.3)
    loss = loss_fn(s, t, teacher_temp=0.3)
    assert loss.ndim == 0
    torch.testing.assert_close(loss.double(), expected, **TOL)


@pytest.mark.parametrize("global_crops,ncrops", [(1, 3), (3, 3), (3, 7), (4, 4)])
def test_dino_loss_with_other_global_crop_counts(global_crops, ncrops):
    # iBOT's --global_crops_number: each of the teacher's global views against every other student view
    torch.manual_seed(3)
    K, B = 6, 2
    s = torch.randn(ncrops * B, K, dtype=torch.float64)
    t = torch.randn(global_crops * B, K, dtype=torch.float64)
    loss = DINOLoss(K, ncrops, global_crops=global_crops)(s, t, teacher_temp=0.2)
    torch.testing.assert_close(
        loss.double(), naive_dino(s, t, torch.zeros(1, K), ncrops, 0.2, global_crops=global_crops), **TOL
    )
    for bad in ((ncrops + 1, ncrops), (0, ncrops), (1, 1)):
        with pytest.raises(ValueError, match="make no pair of different views"):
            DINOLoss(K, bad[1], global_crops=bad[0])


def test_dino_loss_respects_student_temp():
    torch.manual_seed(1)
    K, B, ncrops = 5, 2, 4
    s = torch.randn(ncrops * B, K)
    t = torch.randn(2 * B, K)
    loss = DINOLoss(K, ncrops, student_temp=0.5)(s, t, teacher_temp=0.07)
    torch.testing.assert_close(loss.double(), naive_dino(s, t, torch.zeros(1, K), ncrops, 0.07, 0.5), **TOL)


def test_dino_center_update_and_second_call_uses_it():
    torch.manual_seed(2)
    K, B, ncrops = 6, 4, 4
    loss_fn = DINOLoss(K, ncrops, center_momentum=0.9)
    s1, t1 = torch.randn(ncrops * B, K), torch.randn(2 * B, K) + 2.0
    s2, t2 = torch.randn(ncrops * B, K), torch.randn(2 * B, K) - 1.0
    loss_fn(s1, t1, teacher_temp=0.1)
    c1 = 0.1 * t1.double().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.double(), c1, **TOL)
    loss2 = loss_fn(s2, t2, teacher_temp=0.1)
    torch.testing.assert_close(loss2.double(), naive_dino(s2, t2, c1, ncrops, 0.1), **TOL)
    # ... and differs from what the un-centred teacher would give
    assert abs(loss2.item() - naive_dino(s2, t2, torch.zeros(1, K), ncrops, 0.1).item()) > 1e-3
    c2 = 0.9 * c1 + 0.1 * t2.double().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.double(), c2, **TOL)


def test_dino_center_is_a_buffer_in_state_dict():
    loss_fn = DINOLoss(3, 2)
    assert list(loss_fn.state_dict()) == ["center"]
    assert loss_fn.center.shape == (1, 3)


def test_dino_hand_computed():
    # K=2, B=1, ncrops=2, student_temp=0.1, teacher_temp=0.5, centre 0.
    #   student view 0: [0, 0]            -> softmax(s/0.1) = [1/2, 1/2]
    #   student view 1: [0.1*ln3, 0]      -> softmax(s/0.1) = [3/4, 1/4]
    #   teacher view 0: [0, 0]            -> q0 = [1/2, 1/2]
    #   teacher view 1: [0.5*ln3, 0]      -> q1 = [3/4, 1/4]
    # pairs: (q0, p1): -(1/2 ln 3/4 + 1/2 ln 1/4) = 1/2 ln(16/3)
    #        (q1, p0): -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2
    # loss = (1/2 ln(16/3) + ln 2) / 2 = 0.7650677...
    ln3 = math.log(3.0)
    s = torch.tensor([[0.0, 0.0], [0.1 * ln3, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.5 * ln3, 0.0]])
    loss_fn = DINOLoss(2, 2)
    loss = loss_fn(s, t, teacher_temp=0.5)
    expected = (0.5 * math.log(16 / 3) + math.log(2)) / 2
    assert abs(expected - 0.7650677) < 1e-6
    assert abs(loss.item() - expected) < 1e-6
    # centre: 0.9 * 0 + 0.1 * mean(t) = [0.1 * 0.25 * ln3, 0]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.025 * ln3, 0.0]]))


# ---------------------------------------------------------------- PatchLoss
def naive_ibot(student, teacher, mask, center, teacher_temp, student_temp=0.1):
    """iBOT's full-tensor definition on dense (V, B, N, K) logits and a (V, B, N) mask:
    per (view, sample) the mean over masked tokens of -q.logp (0 without masked tokens),
    then the mean over all V*B samples."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    V, B, N, K = student.shape
    total = 0.0
    for v in range(V):
        for b in range(B):
            m = mask[v, b]
            if m.sum() == 0:
                continue
            q = _softmax((teacher[v, b, m] - center) / teacher_temp)
            logp = _log_softmax(student[v, b, m] / student_temp)
            total = total + (-(q * logp).sum(-1)).mean()
    return total / (V * B)


def _gather(student, teacher, mask):
    V, B, N, K = student.shape
    flat_mask = mask.reshape(V * B, N)
    s = student.reshape(V * B, N, K)[flat_mask]
    t = teacher.reshape(V * B, N, K)[flat_mask]
    return s, t, flat_mask.nonzero()[:, 0], flat_mask.shape[0]


def _patch_case(seed, V=2, B=3, N=10, K=5):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(V, B, N, K, generator=g, dtype=torch.float64)
    teacher = torch.randn(V, B, N, K, generator=g, dtype=torch.float64)
    mask = torch.rand(V, B, N, generator=g) < 0.4
    mask[0, 1] = False  # a sample with no masked token counts as 0
    mask[1, 0] = False
    mask[1, 0, 3] = True  # a sample with exactly one masked token
    mask[1, 2] = True  # a fully masked sample
    return student, teacher, mask


def test_patch_loss_matches_full_tensor_definition():
    student, teacher, mask = _patch_case(0)
    K = student.shape[-1]
    loss_fn = PatchLoss(K)
    s, t, idx, num = _gather(student, teacher, mask)
    loss = loss_fn(s, t, idx, num, teacher_temp=0.2)
    torch.testing.assert_close(loss.double(), naive_ibot(student, teacher, mask, torch.zeros(1, K), 0.2), **TOL)
    # centre: EMA of the teacher's masked tokens
    torch.testing.assert_close(loss_fn.center.double(), 0.1 * teacher[mask].mean(0, keepdim=True), **TOL)


def test_patch_loss_second_call_uses_updated_center():
    st1, te1, m1 = _patch_case(1)
    st2, te2, m2 = _patch_case(2)
    te1 = te1 + 3.0
    K = st1.shape[-1]
    loss_fn = PatchLoss(K)
    loss_fn(*_gather(st1, te1, m1), teacher_temp=0.1)
    c1 = 0.1 * te1[m1].mean(0, keepdim=True)
    loss2 = loss_fn(*_gather(st2, te2, m2), teacher_temp=0.1)
    torch.testing.assert_close(loss2.double(), naive_ibot(st2, te2, m2, c1, 0.1), **TOL)
    torch.testing.assert_close(loss_fn.center.double(), 0.9 * c1 + 0.1 * te2[m2].mean(0, keepdim=True), **TOL)


def test_patch_loss_no_masked_tokens():
    K = 4
    loss_fn = PatchLoss(K)
    with torch.no_grad():
        loss_fn.center.fill_(0.5)
    empty = torch.empty(0, K)
    loss = loss_fn(empty, empty, torch.empty(0, dtype=torch.long), 6, teacher_temp=0.1)
    assert loss.item() == 0.0
    # an empty batch leaves the centre where it was
    torch.testing.assert_close(loss_fn.center, torch.full((1, K), 0.5))


def test_patch_loss_is_not_a_mean_over_tokens():
    # Weighting matters: two samples with 1 and 9 masked tokens count equally.
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 2, 9, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[0, 1, :] = True
    K = 3
    loss = PatchLoss(K)(*_gather(student, teacher, mask), teacher_temp=0.1)
    q = _softmax(teacher[mask] / 0.1)
    logp = _log_softmax(student[mask] / 0.1)
    token_mean = (-(q * logp).sum(-1)).mean()
    expected = naive_ibot(student, teacher, mask, torch.zeros(1, K), 0.1)
    torch.testing.assert_close(loss.double(), expected, **TOL)
    assert abs(expected.item() - token_mean.item()) > 1e-3


def test_dino_loss_backprops_and_center_keeps_no_graph():
    torch.manual_seed(4)
    s = torch.randn(4 * 2, 5, requires_grad=True)
    t = torch.randn(2 * 2, 5, requires_grad=True)
    DINOLoss(5, 4)(s, t, 0.04).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # the centre update is done without grad, and it does not keep a graph
    loss_fn = DINOLoss(5, 4)
    loss_fn(s, t, 0.04)
    assert not loss_fn.center.requires_grad


def _patch_center_on_rank(rank, store, tokens, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        loss_fn = PatchLoss(2, center_momentum=0.9)
        loss_fn.update_center(tokens[rank])
        torch.save(loss_fn.center, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_patch_center_weighs_every_masked_token_of_every_rank_alike(tmp_path):
    # Rank 0 masked one token, rank 1 three: the batch centre is the mean of all four, as one
    # process with the whole batch computes it (a mean of the ranks' means weighs rank 0's 3x).
    tokens = [torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 8.0]] * 3)]
    torch.multiprocessing.spawn(
        _patch_center_on_rank, args=(str(tmp_path / "store"), tokens, str(tmp_path / "c")), nprocs=2
    )
    expected = 0.1 * torch.tensor([[1.0, 6.0]])
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"c.{rank}", weights_only=True), expected)


# ---------------------------------------------------------------- DINOv2's Sinkhorn-Knopp centring and KoLeo
def sinkhorn_reference(logits, temp, iterations=3):
    """Float64 transcription of DINOv2's routine: Q is K x B, rows are prototypes."""
    q = torch.exp(logits.double() / temp).T
    B, K = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= K
        q /= q.sum(dim=0, keepdim=True)
        q /= B
    return (q * B).T


def test_sinkhorn_knopp_matches_the_float64_routine_and_balances_the_prototypes():
    from simpool.losses import sinkhorn_knopp

    logits = torch.randn(24, 10) * 3
    q = sinkhorn_knopp(logits, 0.1)
    torch.testing.assert_close(q.double(), sinkhorn_reference(logits, 0.1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(-1), torch.ones(24))
    # at a mild temperature 3 rounds nearly balance it: every prototype close to B / K of the mass
    assert (sinkhorn_knopp(logits, 3.0).sum(0) - 24 / 10).abs().max() < 0.1
    # a one-prototype batch (collapse) is spread out, where a softmax would keep it
    collapsed = torch.zeros(24, 10)
    collapsed[:, 0] = 5.0
    assert sinkhorn_knopp(collapsed, 0.1)[:, 0].mean() < 0.2


def test_dino_loss_with_sinkhorn_targets_is_the_cross_entropy_against_them():
    from simpool.losses import sinkhorn_knopp

    torch.manual_seed(0)
    B, K, ncrops = 5, 12, 4
    s, t = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    loss = DINOLoss(K, ncrops, centering="sinkhorn_knopp")(s, t, 0.05)
    q = sinkhorn_knopp(t, 0.05).view(2, B, K)
    log_p = torch.log_softmax(s / 0.1, -1).view(ncrops, B, K)
    pairs = [-(q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    torch.testing.assert_close(loss, sum(pairs) / len(pairs))


def test_koleo_loss_is_minus_the_mean_log_nearest_neighbour_distance():
    from simpool.losses import koleo_loss

    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64)
    u = x / x.norm(dim=1, keepdim=True)
    nearest = [min((u[i] - u[j]).norm() for j in range(9) if j != i) for i in range(9)]
    expected = -torch.stack([torch.log(d + 1e-8) for d in nearest]).mean()
    torch.testing.assert_close(koleo_loss(x), expected)
    # the gradient pushes the closest pair apart
    y = torch.tensor([[1.0, 0.0], [0.99, 0.141], [-1.0, 0.0]], requires_grad=True)
    koleo_loss(y).backward()
    step = y - 0.01 * y.grad
    assert (step[0] / step[0].norm() - step[1] / step[1].norm()).norm() > (y[0] - y[1] / y[1].norm()).norm()
    assert koleo_loss(torch.randn(1, 4)).item() == 0.0
