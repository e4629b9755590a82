"""The ELBO estimator and the objectives: BGPO vs naive vs two-pass, checked
against each other and against exact enumeration (the micrograd way)."""
import itertools
import math
import os
import sys
import types

import pytest
import torch

import bgpo
import real_dllm
from conftest import random_batch, tiny_model

MASK = 13  # the toy tokenizer's [MASK]


def grads_of(model, method, batch, masks, weights, old_terms, clip=None, mask_id=MASK):
    """(loss value, flat gradient) of one policy_loss_backward call from zero grads."""
    prompts, responses, advantages = batch
    model.zero_grad(set_to_none=True)
    value = bgpo.policy_loss_backward(model, prompts, responses, advantages, masks, weights,
                                      old_terms, mask_id, method=method, clip=clip)
    grad = bgpo.flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    return value, grad


def make_batch(seed=0):
    """12 responses in 4 groups of 3: mixed rewards, all right, all wrong."""
    prompts, responses = random_batch(12, 6, 4, seed=seed)
    rewards = torch.tensor([1., 0., 0., 1., 1., 1., 0., 0., 0., 0., 1., 1.])
    advantages = bgpo.group_advantages(rewards, 3).double()
    return prompts, responses, advantages


def masks_and_old_terms(model, batch, n, seed=0, scheme="stratified"):
    prompts, responses, _ = batch
    masks, weights = bgpo.sample_masks(responses, n, torch.Generator().manual_seed(seed), scheme)
    with torch.no_grad():
        old = bgpo.elbo_terms(model, prompts, responses, masks, weights, MASK)
    return masks, weights, old


def perturb(model, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def model64(tokenizer):
    return tiny_model(tokenizer, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_every_method_equals_naive_on_policy(model64, n):
    batch = make_batch()
    assert (batch[2] > 0).any() and (batch[2] < 0).any() and (batch[2] == 0).any()
    masks, weights, old = masks_and_old_terms(model64, batch, n)
    v_naive, g_naive = grads_of(model64, "naive", batch, masks, weights, old)
    assert g_naive.abs().max() > 0
    for method in ("bgpo", "two_pass", "tangent", "jensen"):
        v, g = grads_of(model64, method, batch, masks, weights, old)
        assert v == pytest.approx(v_naive, rel=1e-9, abs=1e-12)
        assert torch.allclose(g, g_naive, rtol=1e-9, atol=1e-12 * g_naive.abs().max())


@pytest.mark.parametrize("method", bgpo.METHODS)
def test_on_policy_old_terms_from_the_same_forward_are_the_passed_ones(model64, method):
    """old_terms=None (one update per rollout: the loss's own forward gives
    them) is bit for bit the call with the old terms computed beforehand;
    several samples per forward (mc_batch) the same up to rounding, also
    off-policy."""
    batch = make_batch()
    masks, weights, old = masks_and_old_terms(model64, batch, 4)
    value, grad = grads_of(model64, method, batch, masks, weights, old)
    assert grad.abs().max() > 0
    same_forward = grads_of(model64, method, batch, masks, weights, None)
    assert same_forward[0] == value and torch.equal(same_forward[1], grad)
    perturb(model64, 0.05)
    off = grads_of(model64, method, batch, masks, weights, old)
    for k in (2, 3, 4):  # 3: the last forward takes the one sample left
        prompts, responses, advantages = batch
        model64.zero_grad(set_to_none=True)
        v = bgpo.policy_loss_backward(model64, prompts, responses, advantages, masks, weights,
                                      old, MASK, method=method, mc_batch=k)
        assert v == pytest.approx(off[0], rel=1e-9, abs=1e-12)
        assert torch.allclose(bgpo.flat_grad(model64), off[1], rtol=1e-9,
                              atol=1e-12 * off[1].abs().max())


class RowCounter(torch.nn.Module):
    """Wraps a masked LM and counts the rows of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows, self.calls = model, 0, 0

    def forward(self, input_ids, **kwargs):
        self.rows += input_ids.shape[0]
        self.calls += 1
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("method", ["bgpo", "two_pass", "tangent", "jensen"])
def test_repeated_masks_are_computed_once_with_the_same_gradient(model64, method):
    """3-token responses have 7 non-empty masks: 16 samples repeat some. Each
    distinct one is computed once, and the gradient is the one computed the
    obvious way, over all 16 (off-policy, where the counts enter non-linearly)."""
    prompts, responses = random_batch(12, 6, 3, seed=3)
    batch = (prompts, responses, make_batch()[2])
    masks, weights, old = masks_and_old_terms(model64, batch, 16)
    perturb(model64, 0.05)
    model64.zero_grad(set_to_none=True)
    terms = bgpo.elbo_terms(model64, prompts, responses, masks, weights, MASK)  # all 16
    if method != "two_pass":
        obvious = -bgpo.bgpo_sample_objective(terms, old, batch[2], 16, method=method).sum(0).mean()
    else:
        obvious = -bgpo.naive_objective(terms, old, batch[2]).mean()
    obvious.backward()
    expected = bgpo.flat_grad(model64).clone()
    counter = RowCounter(model64)
    _, g = grads_of(counter, method, batch, masks, weights, old)
    assert torch.allclose(g, expected, rtol=1e-9, atol=1e-12 * expected.abs().max())
    distinct = [len({tuple(masks[j, i].tolist()) for j in range(16)}) for i in range(12)]
    assert sum(distinct) <= 7 * 12
    passes = 2 if method == "two_pass" else 1  # two_pass: a no-grad pass first, off-policy
    assert counter.rows == passes * sum(distinct)             # each distinct mask once a pass
    assert counter.calls == passes * max(distinct)            # one forward per sample slot


def test_loss_value_on_policy_is_minus_mean_advantage_and_off_policy_the_objective(model64):
    """The value a loss call returns. On-policy it is -mean(A) whatever the
    model (R = R_lb = A): a value and sign check, with advantages whose mean
    is not 0. Off-policy it depends on the model: -(1/B) sum_i R_i, or R_lb,i
    for bgpo, rebuilt from the ELBO terms the obvious way."""
    prompts, responses, _ = make_batch()
    adv = torch.linspace(-1.5, 1, 12, dtype=torch.float64)            # mean -0.25
    batch = (prompts, responses, adv)
    masks, weights, old = masks_and_old_terms(model64, batch, 4)
    for method in bgpo.METHODS:
        assert grads_of(model64, method, batch, masks, weights, old)[0] == pytest.approx(0.25)
    perturb(model64, 0.05)
    with torch.no_grad():
        d = bgpo.elbo_terms(model64, prompts, responses, masks, weights, MASK) - old  # (n_t, B)
    R = adv * d.mean(0).exp()
    R_lb = torch.where(adv >= 0, adv * (1 + d), adv * d.exp()).mean(0)
    assert (R - R_lb).abs().max() > 1e-6                               # the model moved them apart
    for method, objective in (("naive", R), ("two_pass", R), ("bgpo", R_lb)):
        value, _ = grads_of(model64, method, batch, masks, weights, old)
        assert value == pytest.approx(-objective.mean().item(), rel=1e-9)


def test_all_zero_advantages_give_zero_gradient(model64):
    prompts, responses, _ = make_batch()
    batch = (prompts, responses, torch.zeros(12, dtype=torch.float64))
    masks, weights, old = masks_and_old_terms(model64, batch, 4)
    for method in bgpo.METHODS:
        value, grad = grads_of(model64, method, batch, masks, weights, old)
        assert value == 0 and not grad.any()


def test_gradient_is_advantage_weighted_sum_of_elbo_gradients(model64):
    """On-policy, grad L = -(1/B) sum_i (A_i / n_t) sum_j grad l_ij: built by hand."""
    batch = make_batch()
    prompts, responses, adv = batch
    masks, weights, old = masks_and_old_terms(model64, batch, 3)
    _, g = grads_of(model64, "bgpo", batch, masks, weights, old)
    model64.zero_grad()
    for j in range(3):
        terms = bgpo.elbo_term(model64, prompts, responses, masks[j], weights[j], MASK)
        (-(adv * terms).sum() / (12 * 3)).backward()
    assert torch.allclose(g, bgpo.flat_grad(model64), rtol=1e-9, atol=1e-15)


def test_gradients_accumulate_across_calls(model64):
    batch = make_batch()
    masks, weights, old = masks_and_old_terms(model64, batch, 2)
    _, g = grads_of(model64, "bgpo", batch, masks, weights, old)
    model64.zero_grad()
    for _ in range(2):
        bgpo.policy_loss_backward(model64, *batch, masks, weights, old, MASK)
    assert torch.allclose(bgpo.flat_grad(model64), 2 * g, rtol=1e-12)


def per_response_objectives(model, batch, masks, weights, old, mask_id=MASK, method="bgpo"):
    prompts, responses, adv = batch
    with torch.no_grad():
        terms = bgpo.elbo_terms(model, prompts, responses, masks, weights, mask_id)
    naive = bgpo.naive_objective(terms, old, adv)
    bound = sum(bgpo.bgpo_sample_objective(terms[j], old[j], adv, len(masks), method=method)
                for j in range(len(masks)))
    return naive, bound


def test_one_lemma_objectives_are_not_bounds(model64):
    """Off-policy the tangent (1 + d) stays below R where A >= 0 and Jensen
    (e^d) where A < 0, the sides their lemmas cover; each exceeds R for some
    response of the other sign: only both together bound R from below."""
    prompts, responses, _ = make_batch()
    batch = (prompts, responses, torch.linspace(-2, 2, 12, dtype=torch.float64))
    masks, weights, old = masks_and_old_terms(model64, batch, 8)
    perturb(model64, 0.05)
    R, tangent = per_response_objectives(model64, batch, masks, weights, old, method="tangent")
    _, jensen = per_response_objectives(model64, batch, masks, weights, old, method="jensen")
    _, both = per_response_objectives(model64, batch, masks, weights, old, method="bgpo")
    up, down = batch[2] >= 0, batch[2] < 0
    assert (both <= R + 1e-12).all()
    assert (tangent[up] <= R[up] + 1e-12).all() and (tangent[down] > R[down] + 1e-9).any()
    assert (jensen[down] <= R[down] + 1e-12).all() and (jensen[up] > R[up] + 1e-9).any()
    assert torch.equal(torch.where(up, tangent, jensen), both)


@pytest.mark.parametrize("method", ["bgpo", "naive", "two_pass", "jensen"])
def test_recorded_distance_and_gap_match_the_obvious_ones(model64, method):
    """policy_loss_backward's diagnostics, from the terms its loss computed: 0
    on-policy; off-policy, the mean |d_j| per masked token, R - R_lb and the
    clip's share, each computed the obvious way over all n_t samples."""
    batch = make_batch()
    prompts, responses, adv = batch
    masks, weights, old = masks_and_old_terms(model64, batch, 6)
    stats = {}
    bgpo.policy_loss_backward(model64, *batch, masks, weights, None, MASK, method=method,
                              clip=0.2, diagnostics=stats)
    assert stats["abs_d"] == 0 and abs(stats["gap"]) < 1e-12 and stats["clipped"] == 0
    perturb(model64, 0.3)
    R, R_lb = per_response_objectives(model64, batch, masks, weights, old)
    with torch.no_grad():
        d = bgpo.elbo_terms(model64, prompts, responses, masks, weights, MASK) - old  # (n_t, B)
    per_token = [d[j, i].abs() / (weights[j, i] * masks[j, i].sum())
                 for j in range(6) for i in range(12) if masks[j, i].any()]
    if method in ("naive", "two_pass"):
        ratio = d.mean(0).exp()[None]                                   # one per response
    else:
        ratio = torch.where(adv >= 0, 1 + d, d.exp()) if method == "bgpo" else d.exp()
    changed = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & ((ratio < 0.8) | (ratio > 3)))
    stats = {}
    bgpo.policy_loss_backward(model64, *batch, masks, weights, old, MASK, method=method,
                              clip=0.2, diagnostics=stats)
    assert stats["abs_d"] == pytest.approx(torch.stack(per_token).mean().item(), rel=1e-9)
    assert stats["gap"] == pytest.approx((R - R_lb).mean().item(), rel=1e-9)
    assert stats["gap"] > 1e-6
    assert stats["clipped"] == pytest.approx(changed.double().mean().item(), rel=1e-12)
    assert 0 < stats["clipped"] < 1


def assert_equivalent_on_policy_bounded_off(model, batch, masks, weights, old, mask_id=MASK):
    """The two claims on any model (float64): bgpo and two_pass give naive's
    value and gradient on-policy; perturbed, the bound holds and is not tight."""
    v_naive, g_naive = grads_of(model, "naive", batch, masks, weights, old, mask_id=mask_id)
    assert g_naive.abs().max() > 0
    for method in ("bgpo", "two_pass"):
        v, g = grads_of(model, method, batch, masks, weights, old, mask_id=mask_id)
        assert v == pytest.approx(v_naive, rel=1e-9, abs=1e-12)
        assert torch.allclose(g, g_naive, rtol=1e-9, atol=1e-12 * g_naive.abs().max())
    bgpo.perturb_weights(model, 0.05, seed=1)
    naive, bound = per_response_objectives(model, batch, masks, weights, old, mask_id)
    assert (bound <= naive + 1e-12).all() and (bound < naive - 1e-9).any()


@pytest.mark.parametrize("advantage_sign", ["both", "positive", "negative"])
def test_bound_holds_off_policy(model64, advantage_sign):
    prompts, responses, _ = make_batch()
    adv = torch.linspace(-2, 2, 12, dtype=torch.float64)
    if advantage_sign == "positive":
        adv = adv.abs() + 0.1    # only the tangent-line lemma (A >= 0) at work
    elif advantage_sign == "negative":
        adv = -adv.abs() - 0.1   # only the Jensen lemma (A < 0) at work
    batch = (prompts, responses, adv)
    masks, weights, old = masks_and_old_terms(model64, batch, 8)
    perturb(model64, 0.05)
    naive, bound = per_response_objectives(model64, batch, masks, weights, old)
    assert (bound <= naive + 1e-12).all()
    assert (bound < naive - 1e-9).any()  # off-policy the bound is not tight


def test_two_pass_gives_naive_gradient_off_policy(model64):
    batch = make_batch()
    masks, weights, old = masks_and_old_terms(model64, batch, 5)
    perturb(model64, 0.05)
    v_naive, g_naive = grads_of(model64, "naive", batch, masks, weights, old)
    v_two, g_two = grads_of(model64, "two_pass", batch, masks, weights, old)
    v_bgpo, g_bgpo = grads_of(model64, "bgpo", batch, masks, weights, old)
    assert v_two == pytest.approx(v_naive, rel=1e-9)
    assert torch.allclose(g_two, g_naive, rtol=1e-9, atol=1e-12 * g_naive.abs().max())
    assert v_bgpo > v_naive                      # loss = -objective: bound means larger loss
    assert not torch.allclose(g_bgpo, g_naive, rtol=1e-6)


@pytest.mark.parametrize("clip", [0.2, 0.01])
def test_clipped_objectives_agree_on_policy_and_two_pass_off_policy(model64, clip):
    batch = make_batch()
    masks, weights, old = masks_and_old_terms(model64, batch, 4)
    _, g_naive = grads_of(model64, "naive", batch, masks, weights, old, clip)
    _, g_bgpo = grads_of(model64, "bgpo", batch, masks, weights, old, clip)
    assert torch.allclose(g_bgpo, g_naive, rtol=1e-9, atol=1e-12 * g_naive.abs().max())
    perturb(model64, 0.05)
    _, g_naive = grads_of(model64, "naive", batch, masks, weights, old, clip)
    _, g_two = grads_of(model64, "two_pass", batch, masks, weights, old, clip)
    assert torch.allclose(g_two, g_naive, rtol=1e-9, atol=1e-12 * (g_naive.abs().max() + 1))


def test_stratified_mask_counts():
    responses = torch.zeros(50, 8, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    masks, weights = bgpo.sample_masks(responses, 8, g)
    counts = masks.sum(-1)                                       # (8, 50)
    # n_t = L: the 8 counts of each response are a permutation of 1..8
    assert (counts.sort(0).values == torch.arange(1, 9)[:, None]).all()
    assert torch.allclose(weights, 8 / counts.float())
    # n_t = 2: counts half a cycle apart
    masks, _ = bgpo.sample_masks(responses, 2, g)
    c = masks.sum(-1)
    assert ((c[1] - c[0]) % 8 == 4).all()


@pytest.mark.parametrize("L", [3, 8, 13])
def test_every_mth_stratified_sample_is_a_stratified_draw(L):
    """grad-stats takes every (32/n)-th of 32 stratified samples as a draw of n:
    its counts must follow the formula for n_t = n, with the same offset k."""
    masks, _ = bgpo.sample_masks(torch.zeros(200, L, dtype=torch.long), 32,
                                 torch.Generator().manual_seed(L))
    counts = masks.sum(-1)                                          # (32, 200)
    k = counts[0]                                                   # j = 0 gives l = k
    for n in (1, 2, 4, 8, 16, 32):
        j = torch.arange(n)[:, None]
        formula = (k - 1 + j * L // n) % L + 1
        assert torch.equal(counts[::32 // n], formula)


@pytest.mark.parametrize("L", [3, 4, 5, 8])
def test_stratified_count_of_every_sample_is_uniform(L):
    """Each sample j on its own draws its mask count uniformly from 1..L, for odd
    and even L and n_t; otherwise E[l_j] is not the ELBO and the estimate is biased.
    (round() instead of floor in the count formula fails this for odd L, even n_t.)"""
    B = 6000
    se = math.sqrt((1 / L) * (1 - 1 / L) / B)                 # of one frequency
    for n in (1, 2, 4, 6, 16):
        masks, _ = bgpo.sample_masks(torch.zeros(B, L, dtype=torch.long), n,
                                     torch.Generator().manual_seed(10 * L + n))
        counts = masks.sum(-1)                                                    # (n, B)
        freq = torch.stack([torch.bincount(c, minlength=L + 1)[1:] for c in counts]) / B
        assert (freq - 1 / L).abs().max() < 5 * se, (n, freq)                    # (n, L)


ELBO_SCHEMES = ("stratified", "uniform_t", "complementary")  # one_step is not the ELBO


@pytest.mark.parametrize("scheme", ELBO_SCHEMES)
def test_weighted_mask_has_mean_one_at_every_position(scheme):
    """E[w_j 1[position i masked]] = 1 for every position i and sample j: the
    weight undoes the chance of being masked, term by term."""
    B, L, n = 20000, 5, 4
    masks, w = bgpo.sample_masks(torch.zeros(B, L, dtype=torch.long), n,
                                 torch.Generator().manual_seed(0), scheme)
    x = (w[..., None] * masks).double()                                         # (n, B, L)
    mean, se = x.mean(1), x.std(1) / math.sqrt(B)                              # (n, L)
    assert ((mean - 1).abs() < 5 * se).all(), mean


def test_uniform_t_masks_follow_the_forward_process():
    """t ~ U(0,1) and each token masked with prob. t: the masked count k is
    uniform on 0..L, and every position is masked half the time."""
    L = 8
    responses = torch.zeros(20000, L, dtype=torch.long)
    masks, weights = bgpo.sample_masks(responses, 1, torch.Generator().manual_seed(0), "uniform_t")
    k = masks[0].sum(-1)
    freq = torch.bincount(k, minlength=L + 1).float() / k.numel()
    assert (freq - 1 / (L + 1)).abs().max() < 0.012                # standard error ~0.002
    assert (masks[0].float().mean(0) - 0.5).abs().max() < 0.02
    assert (weights[0][k > 0] >= 1).all() and (weights[0][k > 0] <= L + 1).all()
    # an empty mask adds nothing: weight 0, so step 4 never computes it (as complementary's)
    assert (k == 0).any() and (weights[0][k == 0] == 0).all()
    passes = bgpo.mc_passes(masks[:, :50], weights[:, :50])
    assert sum(((c > 0) & (w > 0)).sum().item() for _, w, _, c in passes) == (k[:50] > 0).sum()


@pytest.mark.parametrize("L", [1, 3, 8])
def test_uniform_t_weight_is_the_mean_of_1_over_t_given_the_mask(L):
    """The weight of a mask with k of L tokens masked equals E[1/t | that mask],
    computed a second way: P(mask | t) = t^k (1-t)^(L-k), integrated over t
    numerically (midpoint rule)."""
    t = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    responses = torch.zeros(4000, L, dtype=torch.long)
    masks, weights = bgpo.sample_masks(responses, 1, torch.Generator().manual_seed(L), "uniform_t")
    k = masks[0].sum(-1)
    for count in range(1, L + 1):
        likelihood = t**count * (1 - t)**(L - count)
        expected = (likelihood / t).mean() / likelihood.mean()
        drawn = weights[0][k == count]
        assert drawn.numel() > 0
        assert torch.allclose(drawn.double(), expected.expand_as(drawn), rtol=1e-6)


def exact_elbo(model, prompt, response):
    """E over masks of l, by enumerating all 2^L masks of one response.

    Both schemes give mask m (|m| = k >= 1) the weight 1 / (k * C(L, k)):
    stratified draws k ~ U{1..L} (prob 1/L), a subset (1/C(L,k)), weight L/k;
    uniform_t draws m with prob. integral of t^k (1-t)^(L-k) dt = 1 / ((L+1) C(L,k))
    and weights it (L+1)/k: the same number.
    """
    L = response.shape[1]
    total = torch.zeros((), dtype=torch.float64)
    for bits in itertools.product([False, True], repeat=L):
        k = sum(bits)
        if k == 0:
            continue
        mask = torch.tensor([bits])
        w = torch.tensor([1.0 / (k * math.comb(L, k)) * 1.0], dtype=torch.float64)
        total += bgpo.elbo_term(model, prompt, response, mask, w, MASK)[0]
    return total.item()


class MaskCountSensitive(torch.nn.Module):
    """A stand-in masked LM whose log-probs depend strongly on how many and which
    tokens are masked: the logit of token 0 at position p is (p + 1) * (number
    of [MASK] in the input), every other logit 0. A random transformer is nearly
    flat in this (log p ~ -log V whatever is masked), so a sampler that draws
    the wrong mask counts would still look unbiased against it."""
    dtype = torch.float64

    def forward(self, input_ids):
        B, T = input_ids.shape
        masked = (input_ids == MASK).sum(1, keepdim=True).double()               # (B, 1)
        logits = torch.zeros(B, T, MASK + 1, dtype=torch.float64)               # (B, T, V)
        logits[..., 0] = torch.arange(1, T + 1, dtype=torch.float64) * masked
        return types.SimpleNamespace(logits=logits)


@pytest.mark.parametrize("scheme", ELBO_SCHEMES)
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("response", [[3, 7, 5], [3, 7, 5, 12, 12, 12, 12]],
                         ids=["answer", "answer+end_tokens"])
def test_monte_carlo_elbo_matches_exact_enumeration(scheme, n, response):
    """Also at a fixed length beyond the answer (12 is the end token): the
    ELBO then runs over the end tokens too, as LLaDA's does."""
    model = MaskCountSensitive()
    prompt, _ = random_batch(1, 6, 3, seed=5)
    response = torch.tensor([response])  # never token 0: log p falls with every [MASK]
    L = response.shape[1]
    with torch.no_grad():
        exact = exact_elbo(model, prompt, response)
        R = 4000  # independent estimates, each the mean of n_t samples
        masks, weights = bgpo.sample_masks(response.expand(R, L), n,
                                           torch.Generator().manual_seed(1), scheme)
        est = bgpo.elbo_terms(model, prompt.expand(R, 6), response.expand(R, L),
                              masks, weights, MASK, mc_batch=n).mean(0)      # (R,)
    se = est.std() / math.sqrt(R)
    assert abs(est.mean().item() - exact) < 4 * se.item()
    assert exact < -10


def naive_pairs(B, L, n, generator):
    """Complementary pairs built on stratified counts, as one might: count c
    on 1..L with weight L/c, its complement L - c (0..L-1) with L/(L - c)."""
    masks, weights = bgpo.sample_masks(torch.zeros(B, L, dtype=torch.long), n // 2, generator)
    counts = L - masks.sum(-1)
    return (torch.cat([masks, ~masks]),
            torch.cat([weights, torch.where(counts > 0, L / counts.clamp(min=1), 0.0)]))


@pytest.mark.parametrize("pairs", ["ours", "naive"])
def test_every_complementary_sample_has_the_elbo_as_its_mean(pairs):
    """Each mask of a pair on its own, sample by sample, against exact
    enumeration; the pairs built on stratified counts fail it (their
    complement never masks all L tokens and wastes the empty mask)."""
    model = MaskCountSensitive()
    prompt, _ = random_batch(1, 6, 3, seed=5)
    response = torch.tensor([[3, 7, 5, 12]])
    R, L, n = 6000, 4, 4
    generator = torch.Generator().manual_seed(7)
    masks, weights = (bgpo.sample_masks(response.expand(R, L), n, generator, "complementary")
                      if pairs == "ours" else naive_pairs(R, L, n, generator))
    with torch.no_grad():
        exact = exact_elbo(model, prompt, response)
        terms = bgpo.elbo_terms(model, prompt.expand(R, 6), response.expand(R, L), masks, weights,
                                MASK, mc_batch=n)                                # (n, R)
    off = (terms.mean(1) - exact).abs() / (terms.std(1) / math.sqrt(R))         # (n,) in se
    if pairs == "ours":
        assert (off < 4).all(), off
    else:
        assert (off[n // 2:] > 6).all(), off


def test_a_complementary_pair_masks_every_token_exactly_once():
    masks, weights = bgpo.sample_masks(torch.zeros(500, 5, dtype=torch.long), 6,
                                       torch.Generator().manual_seed(0), "complementary")
    first, second = masks[:3], masks[3:]
    assert torch.equal(first ^ second, torch.ones_like(first)) and not (first & second).any()
    counts = first.sum(-1)                                                       # (3, 500)
    assert set(counts.flatten().tolist()) == set(range(6))                       # 0..L
    assert (weights[:3] == torch.where(counts > 0, 6 / counts.clamp(min=1), 0.0)).all()


def test_one_step_is_the_count_L_term_of_the_stratified_estimator(model64):
    """Every response token masked, weight 1, the same in every sample: the
    stratified term of the sample whose count is L (weight L/L)."""
    prompts, responses, _ = make_batch()
    masks, weights = bgpo.sample_masks(responses, 3, torch.Generator().manual_seed(0), "one_step")
    assert masks.all() and (weights == 1).all()
    strat_masks, strat_weights = bgpo.sample_masks(responses, 4, torch.Generator().manual_seed(0))
    full = strat_masks.sum(-1) == 4                                              # (4, 12)
    with torch.no_grad():
        one = bgpo.elbo_terms(model64, prompts, responses, masks, weights, MASK)            # (3, 12)
        strat = bgpo.elbo_terms(model64, prompts, responses, strat_masks, strat_weights, MASK)
    assert full.any(0).all()  # n_t = L: each response has its count-L sample
    assert torch.allclose(one[0], strat[full.int().argmax(0), torch.arange(12)], rtol=1e-12)
    assert torch.equal(one[0], one[1]) and torch.equal(one[0], one[2])


@pytest.mark.parametrize("n", [1, 3])
def test_odd_sample_count_with_complementary_pairs_is_refused(n):
    with pytest.raises(ValueError, match="pairs: n_samples must be even"):
        bgpo.sample_masks(torch.zeros(2, 3, dtype=torch.long), n, scheme="complementary")


def test_uniform_t_weight_has_lower_variance_than_1_over_t(model64):
    """Rao-Blackwell: on the same forward-process masks, weighting by (L+1)/k
    instead of 1/t leaves the mean alone and cuts the variance (1/t's is infinite)."""
    prompt, response = random_batch(1, 6, 3, seed=5)
    R, L = 4000, 3
    g = torch.Generator().manual_seed(3)
    t = 1 - torch.rand(R, generator=g, dtype=torch.float64)
    masks = torch.rand(R, L, generator=g, dtype=torch.float64) < t[:, None]
    k = masks.sum(-1)
    ones = torch.ones(R, dtype=torch.float64)
    with torch.no_grad():
        s = bgpo.elbo_term(model64, prompt.expand(R, 6), response.expand(R, L), masks, ones, MASK)
    literal, ours = s / t, s * (L + 1) / k.clamp(min=1)
    exact = exact_elbo(model64, prompt, response)
    assert abs(ours.mean().item() - exact) < 4 * ours.std().item() / math.sqrt(R)
    assert ours.var() < literal.var() / 2


def test_stratified_has_lower_variance_than_uniform_t(model64):
    prompt, response = random_batch(1, 6, 3, seed=5)
    R = 2000
    var = {}
    with torch.no_grad():
        for scheme in bgpo.SCHEMES:
            masks, weights = bgpo.sample_masks(response.expand(R, 3), 4,
                                               torch.Generator().manual_seed(2), scheme)
            est = bgpo.elbo_terms(model64, prompt.expand(R, 6), response.expand(R, 3),
                                  masks, weights, MASK).mean(0)
            var[scheme] = est.var().item()
    assert var["stratified"] < var["uniform_t"]


def test_saved_tensor_meter_counts_storages_once():
    x = torch.randn(1000, requires_grad=True)                  # a parameter: not counted
    with real_dllm.SavedTensorMeter(exclude=[x]) as meter:
        y = x.exp()              # saves y: 4000 bytes
        z = (y * y).sum()        # saves y twice more: still the same storage
    assert meter.peak_bytes == 4000 and meter.current_bytes == 4000
    z.backward()
    assert meter.current_bytes == 0                            # freed with the graph
    with real_dllm.SavedTensorMeter() as meter:                      # nothing excluded
        (x * 2).sum().backward()
    assert meter.peak_bytes == 0                               # times a constant: nothing saved
    with real_dllm.SavedTensorMeter() as meter:
        (x * x).sum().backward()
    assert meter.peak_bytes == 4000                            # x, saved twice, counted once


def test_memory_bgpo_flat_naive_linear(tokenizer):
    """On the same work (all n_t samples computed, merge=False): naive holds n_t
    samples' activations, BGPO and two_pass one sample's, at every n_t."""
    model = tiny_model(tokenizer)
    prompts, responses = random_batch(4, 6, 3)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    peak = {}
    for n in (1, 64):
        masks, weights = bgpo.sample_masks(responses, n, torch.Generator().manual_seed(0))
        with torch.no_grad():
            old = bgpo.elbo_terms(model, prompts, responses, masks, weights, MASK)
        for method in bgpo.METHODS:
            model.zero_grad()
            _, peak[method, n], _, _ = real_dllm.measure(lambda: bgpo.policy_loss_backward(
                model, prompts, responses, adv, masks, weights, old, MASK, method=method,
                merge=False), model, "cpu")
    assert peak["naive", 1] > 0
    for method in ("bgpo", "two_pass", "tangent", "jensen"):
        assert peak[method, 64] <= 1.05 * peak[method, 1]
    assert peak["naive", 64] >= 32 * peak["naive", 1]


@pytest.mark.parametrize("n", [0, -1, 2.5])
def test_bad_sample_count_raises(n):
    with pytest.raises(ValueError, match="n_samples"):
        bgpo.sample_masks(torch.zeros(2, 3, dtype=torch.long), n)


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="scheme"):
        bgpo.sample_masks(torch.zeros(2, 3, dtype=torch.long), 2, scheme="sorted")


def test_bad_loss_inputs_raise_naming_them(model64):
    batch = make_batch()
    masks, weights, old = masks_and_old_terms(model64, batch, 2)
    prompts, responses, adv = batch
    call = lambda **kw: bgpo.policy_loss_backward(**{**dict(
        model=model64, prompts=prompts, responses=responses, advantages=adv, masks=masks,
        weights=weights, old_terms=old, mask_id=MASK), **kw})
    with pytest.raises(ValueError, match="method"):
        call(method="ppo")
    with pytest.raises(ValueError, match="advantages"):
        call(advantages=adv[:5])
    with pytest.raises(ValueError, match="masks"):
        call(masks=masks[:, :5])
    with pytest.raises(ValueError, match="weights"):
        call(weights=weights[:1])
    with pytest.raises(ValueError, match="old_terms"):
        call(old_terms=old[:, :3])
    with pytest.raises(ValueError, match="prompts"):
        call(prompts=prompts[:3])
    with pytest.raises(ValueError, match="mask"):
        bgpo.elbo_term(model64, prompts, responses, masks[0][:, :2], weights[0], MASK)
    with pytest.raises(ValueError, match="weight"):
        bgpo.elbo_term(model64, prompts, responses, masks[0], weights[0][:2], MASK)


def test_docstring_examples():
    import doctest
    import real_dllm
    import toy_dllm
    for module in (bgpo, toy_dllm, real_dllm):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("method", ["bgpo", "naive", "two_pass"])
def test_a_sample_whose_masks_are_all_empty_adds_nothing(tokenizer, method, merge):
    """uniform_t's empty masks get weight 0 and are not computed: a sample that masks
    nothing in any response (a pass with no row to compute) adds 0 and breaks nothing.
    Second way: the same call without that sample, its 1/n_t put back (on-policy, R and
    R_lb are linear in the samples' mean)."""
    model = tiny_model(tokenizer, dtype=torch.float64)
    prompts, responses = random_batch(2, 4, 3)
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)                  # sample 0: nothing masked
    masks[1, :, 0], masks[2, 0, :], masks[2, 1, 1:] = True, True, True
    n_masked = masks.sum(-1)
    weights = torch.where(n_masked > 0, 4.0 / n_masked.clamp(min=1), 0.0).double()
    grads = []
    for m, w, scale in [(masks, weights, 1.0), (masks[1:], weights[1:], 2 / 3)]:
        model.zero_grad(set_to_none=True)
        loss = bgpo.policy_loss_backward(model, prompts, responses, A, m, w, None, MASK,
                                         method=method, merge=merge)
        grads.append((loss, bgpo.flat_grad(model).clone() * scale))
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)
    assert grads[0][1].abs().max() > 0


def test_gradient_angle_matches_two_backward_passes_the_obvious_way(model64):
    """docs/grad_angle.py's cos(grad R_lb, grad R) and |grad R_lb - grad R| / |grad R|, against
    two autograd backward passes of R and R_lb written out from the l_j (float64); the gradient
    it leaves in .grad is BGPO's own, and on-policy it records nothing."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs"))
    import grad_angle
    prompts, responses, _ = make_batch()
    batch = (prompts, responses, torch.linspace(-2, 2, 12, dtype=torch.float64))
    masks, weights, old = masks_and_old_terms(model64, batch, 6)
    stats = {}
    grad_angle.loss_backward_with_angle(model64, *batch, masks, weights, None, MASK,
                                        diagnostics=stats)
    assert "cos" not in stats and "rel" not in stats                    # on-policy: nothing
    model64.zero_grad(set_to_none=True)
    perturb(model64, 0.1)
    params = [p for p in model64.parameters()]
    d = bgpo.elbo_terms(model64, prompts, responses, masks, weights, MASK) - old  # (n_t, B)
    adv = batch[2]
    R = (adv * d.mean(0).exp()).mean()
    R_lb = (torch.where(adv >= 0, adv * (1 + d), adv * d.exp())).mean(0).mean()
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(-R, params, retain_graph=True)])
    bound = torch.cat([g.flatten() for g in torch.autograd.grad(-R_lb, params)])
    stats = {}
    grad_angle.loss_backward_with_angle(model64, *batch, masks, weights, old, MASK,
                                        diagnostics=stats)
    left = bgpo.flat_grad(model64).clone()
    cos = torch.nn.functional.cosine_similarity(bound, exact, dim=0).item()
    assert stats["cos"] == pytest.approx(cos, rel=1e-9) and cos < 1 - 1e-6
    assert stats["rel"] == pytest.approx(((bound - exact).norm() / exact.norm()).item(), rel=1e-9)
    assert torch.equal(left, grads_of(model64, "bgpo", batch, masks, weights, old)[1])
