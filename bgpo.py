"""BGPO: Boundary-Guided Policy Optimization for diffusion LMs, in one file.

Reinforcement learning needs log pi(y|x), and a masked-diffusion LM cannot
compute it. It can compute a lower bound, the ELBO, but only as an average
over n_t Monte-Carlo samples of masked copies of y. The ELBO-ratio objective
is non-linear in those samples, so all n_t forward graphs must be kept until
backward: memory grows with n_t. BGPO replaces it with a lower bound that is
*linear* in the samples, so each sample is backwarded and freed on its own.

One RL step, in the paper's symbols (arXiv 2510.11683; ../shared/PAPER.md):

  1. for each prompt x, sample G responses y_i with the diffusion sampler
  2. reward r_i; advantage A_i = (r_i - mean(r)) / std(r) within the group
  3. draw n_t masks of each y_i; ELBO term of sample j under the old policy:
       l_old_j = w_j * sum_k 1[y_t^k = M] log p_old(y^k | y_t, x)
  4. for j = 1 .. n_t:
       d_j = l_j - l_old_j            (current policy, same mask)
       g_j = A (1 + d_j) / n_t        if A >= 0
             A exp(d_j) / n_t         if A <  0
       L_j = -(1/B) sum_i g_ij ; L_j.backward() ; free sample j's graph
  5. one optimizer step

The naive objective is exp(mean_j d_j) * A, which needs every sample's graph
at once. Sum_j g_j <= exp(mean_j d_j) * A always, with equality in value and
gradient on-policy (every d_j = 0).

Run `python bgpo.py --explain` to watch one step with every number printed,
`python bgpo.py --help` for the experiments; the README has recipes.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import toy_dllm

METHODS = ("bgpo", "naive", "two_pass")
SCHEMES = ("stratified", "uniform_t")


@dataclass(frozen=True)
class Config:
    """Every setting of a run, with its default; the command line is built
    from these (build_parser) and the result is never changed afterwards."""
    # what to do (training unless one of these is set)
    compare: bool = False          # table: naive vs two_pass vs bgpo per n_t
    grad_stats: bool = False       # table: std, bias and error of the BGPO gradient per n_t
    explain: bool = False          # one BGPO step on a small batch, every number printed
    # the objective and its Monte-Carlo estimate
    method: str = "bgpo"           # "bgpo", "naive" or "two_pass"
    samples: int = 16              # n_t, Monte-Carlo samples per response
    sample_counts: tuple = (16,)   # the n_t list of --compare / --grad-stats (--samples 1,4,16)
    mc_batch: int = 1              # K, Monte-Carlo samples per forward pass (memory for speed)
    mc_batches: tuple = (1,)       # the K list of --compare (--mc-batch 1,4,16)
    scheme: str = "stratified"     # how masks are drawn: "stratified" or "uniform_t"
    clip: float = None             # PPO epsilon; None: no clipping (the paper)
    length_norm: bool = False      # divide each l_j by the response length (official code)
    # the GRPO loop
    steps: int = 275               # RL steps
    prompts: int = 16              # prompts per step
    group: int = 8                 # G, responses per prompt
    lr: float = 1e-4               # AdamW learning rate
    max_grad_norm: float = None    # clip the total gradient norm; None: no clipping
    updates_per_batch: int = 1     # optimizer updates per rollout (1 = on-policy)
    seed: int = 0
    device: str = "auto"           # "auto", "cpu" or "cuda"
    # the sampler
    temperature: float = 0.6       # rollout temperature (evaluation is greedy)
    sampler_steps: int = None      # denoising steps per response; None: one per token
    block_length: int = None       # sampler block length; None: the response length
    # evaluation, measurements, output
    eval_every: int = 25           # steps between test evaluations
    perturb: float = 0.0           # --compare / --explain: move the weights (off-policy)
    json: bool = False             # print --compare / --grad-stats rows as JSON
    out: str = None                # directory for metrics.jsonl, summary.json, model
    save_every: int = None         # checkpoint every N steps under out
    resume: str = None             # continue the run saved in this directory
    # the model and the task
    model: str = None              # a transformers masked-LM checkpoint; None: the toy
    trust_remote_code: bool = False  # allow code shipped with the checkpoint
    mask_id: int = None            # [MASK] id if the tokenizer names none
    shifted_logits: str = "auto"   # "yes": token i is predicted at position i - 1 (Dream);
                                   # "auto": yes for the model types in SHIFTED_MODEL_TYPES
    response_length: int = None    # response tokens, the answer then end tokens; None: the
                                   # answer (+ 1 with --model); the toy's warm start is
                                   # trained at this length
    digits: int = 2                # operand digits of the task
    test_size: int = 1000          # test problems
    # memory levers for a real diffusion LM
    lora_rank: int = None          # train LoRA adapters of this rank (peft), not the weights
    lora_alpha: float = None       # LoRA's alpha (update scale alpha / rank); None: the rank
    lora_targets: str = None       # modules given adapters, comma-separated; None: every
                                   # linear layer but the output head
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward
    activation_budget: float = None  # MB: stop before training if one loss call needs more
    sync_each_sample: bool = False  # torchrun: reduce gradients after every sample's backward

# -----------------------------------------------------------------------------
# 1. Rewards -> group-relative advantages
#    A_i = (r_i - mean(r_group)) / std(r_group); a group with equal rewards
#    (all right or all wrong) carries no signal and gets A = 0.


def group_advantages(rewards, group_size):
    """Float (B,) rewards, B = n_prompts * group_size -> Float (B,) advantages.

    >>> group_advantages(torch.tensor([1., 0., 0., 1., 1., 1.]), 3)
    tensor([ 1.1547, -0.5774, -0.5774,  0.0000,  0.0000,  0.0000])
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the "
                         f"{rewards.numel()} rewards")
    r = rewards.view(-1, group_size)                          # (P, G)
    std = r.std(dim=1, keepdim=True)                          # unbiased, as in GRPO
    centred = r - r.mean(dim=1, keepdim=True)
    adv = torch.where(std > 0, centred / std.clamp_min(1e-12), 0.0)
    return adv.flatten()

# -----------------------------------------------------------------------------
# 2. The ELBO and its Monte-Carlo estimate
#    B(y|x) = E_t E_{y_t ~ q(.|t,y)} l(y_t, t, y | x)  <=  log pi(y|x)
#    l_j    = w_j * sum_k 1[y_t^k = M] * log p(y^k | y_t, x)
#    B_hat  = (1/n_t) sum_j l_j
#    "uniform_t":  t ~ U(0,1), mask each token with prob. t (the forward
#                  process itself), w = E[1/t | y_t] = (L+1)/k for k masked
#    "stratified": mask exactly l of the L tokens, w = L/l, with the n_t counts
#                  l_j = ((k - 1 + floor((j-1) L/n_t)) mod L) + 1, k ~ U{1..L}
#                  one offset k per response: each l_j on its own is uniform on
#                  1..L, and together they spread evenly over 1..L (n_t = L:
#                  every count once). LLaDA's and the official code write
#                  round(k + (j-1) L/n_t); round() sends ties (odd L, even n_t)
#                  to the even number, and that sample's count is then not
#                  uniform: biased. floor has no ties.
#    Both have the same expectation; stratified has much lower variance.
#    Why not w = 1/t as written: a sample with t near 0 that masks one token
#    gets a huge weight, and the variance is infinite (P(one token masked) ~ L t,
#    so E[w^2] ~ integral of L t / t^2 dt near 0 diverges). l depends on t only
#    through w, so w may be replaced by its average over t given the mask (Rao-
#    Blackwell): given k of L masked, t ~ Beta(k+1, L-k+1), and E[1/t] = (L+1)/k.
#    Same expectation for every mask, lower variance, weight at most L+1.


def sample_masks(responses, n_samples, generator=None, scheme="stratified"):
    """Draw n_samples masks per response, and their ELBO weights.

    Args:
        responses: Long (B, L); only its shape and device are used.
        n_samples: n_t >= 1.
        generator: a torch.Generator (any device) for reproducible masks.
        scheme: "stratified" or "uniform_t" (see the banner above).
    Returns:
        masks Bool (n_samples, B, L), weights Float (n_samples, B).

    >>> masks, w = sample_masks(torch.zeros(1, 4, dtype=torch.long), 4)
    >>> sorted(masks.sum(-1).flatten().tolist())  # n_t = L: each count 1..L once
    [1, 2, 3, 4]
    >>> bool(((w * masks.sum(-1)) == 4).all())      # weight L / count
    True
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {SCHEMES}")
    if responses.dim() != 2 or responses.shape[1] < 1:
        raise ValueError(f"responses must be (B, L) with L >= 1, got shape {tuple(responses.shape)}")
    B, L = responses.shape
    dev = generator.device if generator is not None else responses.device
    if scheme == "stratified":
        k = torch.randint(1, L + 1, (B,), generator=generator, device=dev)       # (B,)
        # floor(j L / n_t) in integers: k - 1 + offset is a uniform draw shifted
        # by a constant, so each count on its own is uniform on 1..L
        offsets = torch.arange(n_samples, device=dev)[:, None] * L // n_samples  # (n, 1)
        counts = (k - 1 + offsets) % L + 1                                        # (n, B) in 1..L
        # mask the `count` positions with the smallest random keys: a uniform subset
        keys = torch.rand(n_samples, B, L, generator=generator, device=dev)
        ranks = keys.argsort(-1).argsort(-1)                                      # (n, B, L)
        masks = ranks < counts[..., None]
        weights = L / counts
    else:
        t = 1 - torch.rand(n_samples, B, generator=generator, device=dev)        # (n, B) in (0, 1]
        masks = torch.rand(n_samples, B, L, generator=generator, device=dev) < t[..., None]
        # E[1/t | k masked] (banner); a sample that masks nothing adds 0 whatever its weight
        weights = (L + 1) / masks.sum(-1).clamp(min=1)
    return masks.to(responses.device), weights.float().to(responses.device)


def elbo_term(model, prompts, responses, mask, weight, mask_id, prompt_mask=None):
    """One Monte-Carlo sample l_j of the ELBO for every response; differentiable.

    Args:
        model: any transformers masked LM: model(input_ids=...).logits is (B, T, V).
        prompts: Long (B, Lp); responses: Long (B, L);
        mask: Bool (B, L), True where y_t has [MASK]; weight: Float (B,);
        prompt_mask: Bool (B, Lp), False at left padding, or None (no padding).
    Returns:
        Float (B,): w * sum_k mask_k * log p(y^k | y_t, x).
    """
    _check_term_inputs(prompts, responses, mask, weight)
    return _elbo_term(model, prompts, responses, mask, weight, mask_id, prompt_mask)


def _elbo_term(model, prompts, responses, mask, weight, mask_id, prompt_mask=None):
    """elbo_term without the input checks, for the inner loops over n_t."""
    mask = mask.bool()
    logp = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id,
                                    prompt_mask)                                # (B, L)
    return weight.to(logp.dtype) * (logp * mask).sum(-1)                       # (B,)


def _check_term_inputs(prompts, responses, mask, weight):
    B, L = responses.shape
    if prompts.dim() != 2 or prompts.shape[0] != B:
        raise ValueError(f"prompts must be (B={B}, Lp), got shape {tuple(prompts.shape)}")
    if mask.shape != (B, L):
        raise ValueError(f"mask must have the responses' shape {(B, L)}, got {tuple(mask.shape)}")
    if weight.shape != (B,):
        raise ValueError(f"weight must be ({B},), got shape {tuple(weight.shape)}")


def elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask=None,
               mc_batch=1):
    """elbo_term for each of the n_t masks: Float (n_t, B). Call it under
    torch.no_grad() for the old policy's terms, as it keeps every graph.
    mc_batch: masks per forward pass (see _elbo_terms_at_once)."""
    _check_term_inputs(prompts, responses, masks[0], weights[0])
    return torch.cat([_elbo_terms_at_once(model, prompts, responses, m, w, mask_id, prompt_mask)
                      for m, w in zip(masks.split(mc_batch), weights.split(mc_batch))])


def _elbo_terms_at_once(model, prompts, responses, masks, weights, mask_id, prompt_mask=None,
                        keep=None):
    """l_j for K masks in one forward pass over K copies of the batch:
    Float (K, B) from masks (K, B, L). Faster than K passes where the device
    has room (a GPU), at K times one pass's activation memory.
    keep: Bool (K, B) or None: only these rows are computed, the others are 0."""
    K, B, L = masks.shape
    rows = (torch.arange(K * B, device=masks.device) if keep is None
            else keep.flatten().nonzero().squeeze(1))                    # of the K B rows
    b = rows % B                                                         # their responses
    terms = _elbo_term(model, prompts[b], responses[b], masks.reshape(K * B, L)[rows],
                       weights.reshape(K * B)[rows], mask_id,
                       None if prompt_mask is None else prompt_mask[b])
    if len(rows) < K * B:
        terms = terms.new_zeros(K * B).index_put((rows,), terms)
    return terms.view(K, B)


def repeat_counts(masks, weights):
    """How many of its response's samples each sample stands for: Float (n_t, B).

    A sample whose mask and weight equal an earlier sample's of the same
    response gets 0, and the first of them the number of copies. Their l_j
    are the same number, so a sum over samples may run over the distinct
    ones, each times its count: the same estimate, fewer forward passes where
    responses are short (3 tokens have 7 non-empty masks, and n_t = 16
    stratified samples hold about 6.3 distinct ones; at 16 tokens or more,
    repeats are rare and this changes nothing).

    >>> masks = torch.tensor([[[1, 0]], [[0, 1]], [[1, 0]]]).bool()  # (3, 1, 2)
    >>> repeat_counts(masks, torch.full((3, 1), 2.0)).flatten().tolist()
    [2.0, 1.0, 0.0]
    """
    n, B, L = masks.shape
    response = torch.arange(B, device=masks.device).expand(n, B)
    key = torch.cat([response[..., None].to(weights.dtype), weights[..., None],
                     masks.to(weights.dtype)], -1).flatten(0, 1)         # (n B, L + 2)
    _, group, size = key.unique(dim=0, return_inverse=True, return_counts=True)
    order = torch.arange(n * B, device=masks.device)                     # j B + i: sample j first
    first = torch.full_like(size, n * B).scatter_reduce(0, group, order, "amin")
    counts = torch.zeros(n * B, dtype=weights.dtype, device=weights.device)
    counts[first] = size.to(weights.dtype)
    return counts.view(n, B)


def masks_and_old_terms(policy, batch, n_samples, scheme, generator, length_norm=False,
                        shard=(0, 1), old=True, mc_batch=1):
    """Step 3: n_t masks per response, and the old policy's l_j on them.

    The old policy is the model as it is now; its terms carry no gradient.
    old=False skips them (old_terms is None): with one update per rollout
    they equal the new terms' values, which policy_loss_backward then takes
    from its own forward passes instead of n_t extra ones here.
    length_norm divides every l_j by the response length L (the official
    code's per-token ELBO), so d_j and a clip band act per token.
    policy and batch: a Policy and a Rollout (section 4).
    shard: (rank, world size) under torchrun: the masks are drawn for the
    world's whole batch, as one process would, and this rank's rows kept.
    mc_batch: masks per forward pass for the old terms.
    Returns masks (n_t, B, L), weights (n_t, B), old_terms (n_t, B) or None.
    """
    rank, size = shard
    B = batch.responses.shape[0]
    masks, weights = sample_masks(batch.responses.repeat(size, 1), n_samples, generator, scheme)
    masks, weights = masks[:, rank * B:(rank + 1) * B], weights[:, rank * B:(rank + 1) * B]
    if length_norm:
        weights = weights / batch.responses.shape[1]
    if not old:
        return masks, weights, None
    with torch.no_grad():
        old_terms = elbo_terms(policy.model, batch.prompts, batch.responses, masks, weights,
                               policy.mask_id, batch.prompt_mask, mc_batch)
    return masks, weights, old_terms

# -----------------------------------------------------------------------------
# 3. The objectives: naive ELBO ratio vs the BGPO lower bound
#    naive:  R    = exp((1/n_t) sum_j d_j) * A                (one big graph)
#    BGPO:   R_lb = sum_j g_j,  g_j = A (1 + d_j) / n_t   if A >= 0  (e^x >= 1 + x)
#                               g_j = A e^{d_j} / n_t     if A <  0  (Jensen)
#    loss L = -(1/B) sum_i R_i; with R_lb it splits into L = sum_j L_j.
#    Optional PPO clipping (the official code, not the paper): the ratio
#    (e^{mean d}, or 1 + d_j / e^{d_j}) is clipped to [1 - eps, 1 + eps], with a
#    dual clip at 3 A for A < 0.


def clipped(ratio, advantages, clip=None, dual_clip=3.0):
    """ratio * A, or its PPO-clipped version when clip (= eps) is given."""
    if clip is None:
        return ratio * advantages
    obj = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return torch.where(advantages < 0, torch.maximum(obj, dual_clip * advantages), obj)


def naive_objective(terms, old_terms, advantages, clip=None):
    """R = exp(mean_j d_j) * A for each response: Float (B,) from (n_t, B) terms."""
    return clipped(torch.exp((terms - old_terms).mean(0)), advantages, clip)


def bgpo_sample_objective(term, old_term, advantages, n_samples, clip=None):
    """g_j for one MC sample j: Float (B,). Linear in the sample, so
    sum_j g_j can be backwarded one j at a time."""
    d = term - old_term                                                   # (B,)
    upper = advantages >= 0
    # exp only where it is used: an overflowing e^{d} on the A >= 0 side would
    # turn its zero gradient into inf * 0 = nan
    ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)))
    return clipped(ratio, advantages, clip) / n_samples


def _check_loss_inputs(prompts, responses, advantages, masks, weights, old_terms, method,
                       prompt_mask, mc_batch):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if responses.dim() != 2:
        raise ValueError(f"responses must be (B, L), got shape {tuple(responses.shape)}")
    B, L = responses.shape
    if masks.dim() != 3 or masks.shape[1:] != (B, L) or masks.shape[0] < 1:
        raise ValueError(f"masks must be (n_samples >= 1, {B}, {L}), got {tuple(masks.shape)}")
    n = masks.shape[0]
    for name, x, shape in (("advantages", advantages, (B,)), ("weights", weights, (n, B)),
                           ("old_terms", old_terms, (n, B))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if prompts.dim() != 2 or prompts.shape[0] != B:
        raise ValueError(f"prompts must be ({B}, Lp), got shape {tuple(prompts.shape)}")
    if prompt_mask is not None and prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask must have the prompts' shape {tuple(prompts.shape)}, "
                         f"got {tuple(prompt_mask.shape)}")
    if not isinstance(mc_batch, int) or mc_batch < 1:
        raise ValueError(f"mc_batch must be an integer >= 1, got {mc_batch!r}")


def policy_loss_backward(model, prompts, responses, advantages, masks, weights,
                         old_terms, mask_id, method="bgpo", clip=None, prompt_mask=None,
                         mc_batch=1):
    """Backward the RL loss L = -(1/B) sum_i R_i into the model's .grad.

    Gradients accumulate (nothing is zeroed), as in gradient accumulation.
    Args:
        prompts: Long (B, Lp); responses: Long (B, L); advantages: Float (B,);
        masks: Bool (n_t, B, L) and weights: Float (n_t, B) from sample_masks;
        old_terms: Float (n_t, B), the old policy's l_j on the same masks, or
            None on-policy: each l_j's own value, detached, from the same
            forward pass (identical to passing them, without n_t extra passes);
        method: "bgpo"     R = R_lb; one forward + backward per sample, so
                           only one sample's graph is alive at a time;
                "naive"    R = exp(mean d) A; all n_t graphs, one backward;
                "two_pass" the naive gradient at constant memory: a no-grad
                           pass finds c_i = dR_i / d(mean d_i), then sample j
                           backwards -(1/B) sum_i c_i l_ij / n_t on its own;
        clip: PPO epsilon, or None (the paper) for no clipping;
        prompt_mask: Bool (B, Lp), False at left padding, or None (no padding);
        mc_batch: K, samples per forward pass (K copies of the batch at once;
            where samples repeat, as many as have K * B rows to compute):
            K = 1 is BGPO's least memory, K = n_t one pass like the naive
            objective's; the same gradient, up to floating-point rounding.
    Returns:
        L's value, a float.
    """
    _check_loss_inputs(prompts, responses, advantages, masks, weights, old_terms, method,
                       prompt_mask, mc_batch)
    backward = {"bgpo": bgpo_loss_backward, "naive": naive_loss_backward,
                "two_pass": two_pass_loss_backward}[method]
    # the old policy's terms and the advantages are constants of the objective
    return backward(model, prompts, responses, advantages.detach(), masks, weights,
                    None if old_terms is None else old_terms.detach(), mask_id, clip,
                    prompt_mask, mc_batch)


def bgpo_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                       mask_id, clip=None, prompt_mask=None, mc_batch=1):
    """R = R_lb = sum_j g_j: one sample (or mc_batch) at a time, forward,
    backward, free. A sample that repeats an earlier one of its response is
    not computed again: the first copy counts for all (repeat_counts)."""
    n = masks.shape[0]
    counts = repeat_counts(masks, weights)                               # (n, B), 0: a repeat
    groups = sample_groups(counts, mc_batch)
    total = 0.0
    for k in groups:                                                     # samples k.start..k.stop-1
        keep = first_copies(counts[k])                                   # (K, B)
        terms = _elbo_terms_at_once(model, prompts, responses, masks[k], weights[k], mask_id,
                                    prompt_mask, keep)                   # (K, B), with a graph
        old = terms.detach() if old_terms is None else old_terms[k] * keep  # d = 0: on-policy,
        g = bgpo_sample_objective(terms, old, advantages, n, clip)          # or a repeat
        loss_k = -(counts[k] * g).mean(-1).sum()
        sync_gradients(model, last=k == groups[-1])                      # torchrun only
        loss_k.backward()                                                # frees their graph
        total += loss_k.item()
    return total


def sample_groups(counts, mc_batch):
    """The samples that share a forward pass: consecutive slices of the n_t,
    each with at most mc_batch * B rows to compute (so at most mc_batch
    samples' memory). Without repeats that is mc_batch samples a pass; with
    them, later samples have few rows left, and several share one pass.
    Under torchrun every rank must make the same passes: mc_batch each.

    >>> counts = torch.tensor([[1, 1], [1, 1], [2, 0], [0, 0], [1, 0], [1, 1]])
    >>> sample_groups(counts, 1)  # rows to compute: 2, 2, 1, 0, 1, 2
    [slice(0, 1, None), slice(1, 2, None), slice(2, 5, None), slice(5, 6, None)]
    """
    n, B = counts.shape
    if world()[1] > 1:
        return [slice(j, j + mc_batch) for j in range(0, n, mc_batch)]
    groups, start, rows = [], 0, 0
    for j, r in enumerate((counts > 0).sum(1).tolist()):
        if rows + r > mc_batch * B:
            groups.append(slice(start, j))
            start, rows = j, 0
        rows += r
    return groups + [slice(start, n)]


def first_copies(counts):
    """The rows to compute, Bool (K, B): those with a count. Never none: a
    forward pass with nothing in it is still made on one row (count 0), since
    under torchrun every rank must make the same forward passes."""
    keep = counts > 0
    if not keep.any():
        keep = keep.clone()
        keep[0, 0] = True
    return keep


def naive_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                        mask_id, clip=None, prompt_mask=None, mc_batch=1):
    """R = exp(mean_j d_j) A: all n_t graphs alive at once, one backward."""
    terms = elbo_terms(model, prompts, responses, masks, weights, mask_id,
                       prompt_mask, mc_batch)                            # (n_t, B), n graphs
    old_terms = terms.detach() if old_terms is None else old_terms
    loss = -naive_objective(terms, old_terms, advantages, clip).mean()
    loss.backward()
    return loss.item()


def two_pass_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                           mask_id, clip=None, prompt_mask=None, mc_batch=1):
    """The naive gradient at constant memory. R depends on the samples only
    through m = mean_j d_j, so dL/dtheta = -(1/B) sum_i (dR_i/dm_i) (1/n_t)
    sum_j dl_ij/dtheta: pass 1 (no grad) finds c_i = dR_i/dm_i, pass 2
    backwards -(1/B) sum_i c_i l_ij / n_t one sample at a time.
    On-policy (old_terms None) m = 0 is known, and pass 1 is skipped."""
    n = masks.shape[0]
    if old_terms is None:
        mean_d = torch.zeros_like(advantages)
    else:
        with torch.no_grad():
            mean_d = (elbo_terms(model, prompts, responses, masks, weights, mask_id,
                                 prompt_mask, mc_batch) - old_terms).mean(0)  # (B,)
    mean_d.requires_grad_(True)
    objective = clipped(torch.exp(mean_d), advantages, clip)             # (B,)
    coef, = torch.autograd.grad(objective.sum(), mean_d)                 # A e^{m} unclipped
    counts = repeat_counts(masks, weights)                               # as in bgpo_loss_backward
    groups = sample_groups(counts, mc_batch)
    for k in groups:
        terms = _elbo_terms_at_once(model, prompts, responses, masks[k], weights[k], mask_id,
                                    prompt_mask, first_copies(counts[k]))  # (K, B)
        loss_k = -(coef * counts[k] * terms).mean(-1).sum() / n
        sync_gradients(model, last=k == groups[-1])
        loss_k.backward()
    return -objective.mean().item()

# -----------------------------------------------------------------------------
# 4. Rollout: G responses per prompt, their rewards and advantages


@dataclass
class Policy:
    """The model being trained and what it needs to talk about arithmetic."""
    model: torch.nn.Module
    tokenizer: object
    task: toy_dllm.ArithmeticTask
    mask_id: int
    response_length: int
    device: torch.device
    lora_base: str = None  # with LoRA adapters: the checkpoint they adapt (None: the toy)


@dataclass
class Rollout:
    problems: torch.Tensor     # (B, 2) operand pairs, each repeated G times
    prompts: torch.Tensor      # (B, Lp)
    responses: torch.Tensor    # (B, L)
    rewards: torch.Tensor      # (B,)
    advantages: torch.Tensor   # (B,)
    prompt_mask: torch.Tensor = None  # (B, Lp), False at left padding; None: no padding


@torch.no_grad()
def rollout(policy, problems, cfg, generator):
    """Steps 1-2: cfg.group responses per problem at the rollout temperature,
    their rewards and group advantages."""
    problems = problems.repeat_interleave(cfg.group, dim=0)                   # (B, 2)
    prompts, prompt_mask = toy_dllm.encode_padded_prompts(
        policy.tokenizer, policy.task.prompts(problems), policy.device)      # (B, Lp) each
    responses = toy_dllm.generate(
        policy.model, prompts, policy.mask_id, policy.response_length,
        block_length=cfg.block_length, steps=cfg.sampler_steps,
        temperature=cfg.temperature, generator=generator, prompt_mask=prompt_mask)  # (B, L)
    rewards = toy_dllm.exact_match_reward(policy.task, policy.tokenizer, problems, responses)
    return Rollout(problems, prompts, responses, rewards.to(policy.device),
                   group_advantages(rewards, cfg.group).to(policy.device), prompt_mask)

# -----------------------------------------------------------------------------
# 5. The GRPO-style loop
#    each step: rollout -> advantages -> masks + old terms (no grad) ->
#    updates_per_batch mini-batch updates through policy_loss_backward -> log.
#    With 1 update the old policy is the current one (on-policy: BGPO equals
#    the naive objective, and the old terms are the new terms' own values,
#    taken from the same forward passes); with 2 the second mini-batch is
#    off-policy, and the old terms need their own no-grad passes.


def train(policy, cfg, out=None, resume_state=None):
    """The RL loop. Returns the summary dict (also written to out/summary.json).

    Every step appends one record to the metrics (and rewrites
    out/metrics.jsonl atomically); every cfg.save_every steps a checkpoint is
    written; resume_state (from load_trainer_state) continues a run exactly.
    """
    rank, size = world()  # (0, 1) unless under torchrun (section 10)
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)           # prompts, masks: same on all ranks
    sample_rng = torch.Generator(device=policy.device).manual_seed(cfg.seed + rank)  # rollouts
    trained = [p for p in policy.model.parameters() if p.requires_grad]  # LoRA: adapters only
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr)
    eval_mode(policy.model)  # no dropout: old and new policy must see the same network
    state = start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state)
    first = state["step"] + 1
    bar = tqdm(range(first, cfg.steps + 1), initial=state["step"], total=cfg.steps,
               dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        problems = problems.chunk(size)[rank]                         # this rank's prompts
        batch = rollout(policy, problems, cfg, sample_rng)            # 1-2: responses, A
        loss, skipped, peak = rl_step(policy, optimizer, batch, cfg, data_rng,
                                      measure_memory=step == first)  # 3-5: masks, update
        log_step(state, step, batch, loss, skipped, peak, policy, cfg, bar)
        if out:
            save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng)
    bar.close()
    return finish(policy, cfg, state, out)


def rl_step(policy, optimizer, batch, cfg, data_rng, measure_memory=True):
    """Steps 3-5 on one rollout: masks and old terms, then cfg.updates_per_batch
    optimizer updates, each on a mini-batch of whole groups.

    Returns (mean loss of the updates taken, number of updates skipped
    because the loss or a gradient was not finite, peak activation bytes,
    0 unless measure_memory).
    """
    model = policy.model
    # one update: on-policy, the old terms come from the loss's own forward passes
    masks, weights, old_terms = masks_and_old_terms(
        policy, batch, cfg.samples, cfg.scheme, data_rng, cfg.length_norm, world(),
        old=cfg.updates_per_batch > 1, mc_batch=cfg.mc_batch)
    losses, skipped, peak = [], 0, 0
    n_prompts = batch.responses.shape[0] // cfg.group
    for groups in torch.arange(n_prompts).chunk(cfg.updates_per_batch):
        rows = (groups[:, None] * cfg.group + torch.arange(cfg.group)).flatten()  # whole groups
        rows = rows.to(policy.device)
        optimizer.zero_grad(set_to_none=True)
        measure_memory = measure_memory and world()[1] == 1  # FSDP2's gathered weights would count
        meter = activation_meter(model) if measure_memory else contextlib.nullcontext()
        with meter:
            loss = policy_loss_backward(
                model, batch.prompts[rows], batch.responses[rows], batch.advantages[rows],
                masks[:, rows], weights[:, rows],
                None if old_terms is None else old_terms[:, rows], policy.mask_id,
                method=cfg.method, clip=cfg.clip,
                prompt_mask=None if batch.prompt_mask is None else batch.prompt_mask[rows],
                mc_batch=cfg.mc_batch)
        peak = max(peak, meter.peak_bytes if measure_memory else 0)
        # the norm of all gradients together, before clipping: nan or inf if any is
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.max_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a distributed tensor
            grad_norm = grad_norm.full_tensor()
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if global_mean(float(finite)) < 1:  # every rank skips, or none
            warnings.warn(f"non-finite loss ({loss}) or gradient: update skipped")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        losses.append(loss)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return mean_loss, skipped, peak


def evaluate_policy(policy, cfg, n_failures=0):
    """Greedy exact-match accuracy on the task's test problems, and failures.
    Under torchrun each rank takes every W-th problem, in as many batches as
    the others (FSDP2's forward passes are collective), and the counts add up."""
    rank, size = world()
    test = policy.task.test
    share = test[rank::size]
    widest = -(-len(test) // size)
    batches = -(-widest // 1000)
    acc, failures = toy_dllm.evaluate(policy.model, policy.tokenizer, policy.task, share,
                                      mask_id=policy.mask_id, length=policy.response_length,
                                      batch_size=-(-widest // batches), n_failures=n_failures,
                                      block_length=cfg.block_length, steps=cfg.sampler_steps)
    if size == 1:
        return acc, failures
    return global_mean(acc * len(share)) * size / len(test), failures


RUN_TIME_ONLY = ("last_acc", "last_eval", "started")  # state that checkpoints leave out


def start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state):
    """The loop's state: fresh (with the accuracy before RL), or as saved."""
    rank, size = world()
    if resume_state is None:
        acc_before, failures = evaluate_policy(policy, cfg, n_failures=3)
        say("\n".join(failures))
        say(f"greedy test accuracy before RL: {acc_before:.1%}")
        return dict(step=0, acc_before=acc_before, seconds=0.0, peak_activation_bytes=0,
                    skipped_updates=0, metrics=[], device_type=policy.device.type,
                    world_size=size, last_acc=acc_before, last_eval=None, started=time.time())
    state = dict(resume_state)
    if size > 1:
        load_full_optimizer_state(policy.model, optimizer, state.pop("optimizer"))
    else:
        optimizer.load_state_dict(state.pop("optimizer"))
    data_rng.set_state(state.pop("data_rng"))
    sample_rngs = state.pop("sample_rng")  # a list of one per rank under torchrun
    sample_rng.set_state(sample_rngs[rank] if isinstance(sample_rngs, list) else sample_rngs)
    torch.set_rng_state(state.pop("torch_rng"))
    say(f"resumed at step {state['step']}")
    last_acc = next((m["acc"] for m in reversed(state["metrics"]) if "acc" in m),
                    state["acc_before"])
    return dict(state, last_acc=last_acc, last_eval=None, started=time.time() - state["seconds"])


def log_step(state, step, batch, loss, skipped, peak, policy, cfg, bar):
    """One metrics record; a test evaluation every cfg.eval_every steps and at the end."""
    state["peak_activation_bytes"] = max(state["peak_activation_bytes"], peak)
    state["skipped_updates"] += skipped
    record = dict(step=step, reward_mean=global_mean(batch.rewards.mean().item()),
                  loss=global_mean(loss),
                  skipped_updates=skipped, seconds=round(time.time() - state["started"], 3))
    if step % cfg.eval_every == 0 or step == cfg.steps:
        state["last_eval"] = evaluate_policy(policy, cfg, n_failures=3)  # (acc, failures)
        record["acc"] = state["last_acc"] = state["last_eval"][0]
    state["metrics"].append(record)
    bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{state['last_acc']:.2f}")
    state.update(step=step, seconds=time.time() - state["started"])


def save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng):
    """metrics.jsonl after every step; a checkpoint every cfg.save_every steps."""
    if world()[0] == 0:
        toy_dllm.write_atomic(os.path.join(out, "metrics.jsonl"),
                              "".join(json.dumps(m) + "\n" for m in state["metrics"]))
    if cfg.save_every and state["step"] % cfg.save_every == 0:
        saved = {k: v for k, v in state.items() if k not in RUN_TIME_ONLY}
        sample_rngs = all_ranks(sample_rng.get_state())
        save_checkpoint(out, policy, optimizer, dict(
            saved, data_rng=data_rng.get_state(), torch_rng=torch.get_rng_state(),
            sample_rng=sample_rngs if len(sample_rngs) > 1 else sample_rngs[0]))


def finish(policy, cfg, state, out):
    """Print the accuracy before and after; write the summary and final model."""
    acc_after, failures = state["last_eval"] or evaluate_policy(policy, cfg, n_failures=3)
    seconds = time.time() - state["started"]
    say("\n".join(failures))
    say(f"greedy test accuracy: {state['acc_before']:.1%} before RL -> {acc_after:.1%} after "
        f"{cfg.steps} steps ({seconds:.0f}s)")
    summary = dict(method=cfg.method, samples=cfg.samples, scheme=cfg.scheme, steps=cfg.steps,
                   seed=cfg.seed, acc_before=state["acc_before"], acc_after=acc_after,
                   seconds=round(seconds, 3), peak_activation_bytes=state["peak_activation_bytes"],
                   skipped_updates=state["skipped_updates"], world_size=world()[1])
    if world()[1] > 1:  # the activation meter is off under torchrun; each rank's peak memory
        import resource
        summary["peak_rss_bytes_per_rank"] = all_ranks(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if out:
        weights = full_state_dicts(policy.model, None)[0] if world()[1] > 1 else None
        if world()[0] == 0:
            toy_dllm.save_dir_atomic(os.path.join(out, "model"),
                                     lambda tmp: save_model(policy, tmp, weights))
            toy_dllm.write_atomic(os.path.join(out, "summary.json"),
                                  json.dumps(summary, indent=1) + "\n")
    return summary


def say(text):
    """print, on rank 0 only under torchrun."""
    if world()[0] == 0:
        print(text)

# -----------------------------------------------------------------------------
# 6. Checkpoints: out/checkpoint-STEP holds the model (save_pretrained), the
#    tokenizer, bgpo.json (response length, mask id) and trainer_state.pt
#    (step, metrics, optimizer, RNG states); only the latest is kept.

SAVED_SETTINGS = "bgpo.json"  # beside a saved model: what --model needs to use it again


def checkpoints(out):
    """Complete checkpoint directories (out/checkpoint-STEP), oldest first."""
    if not os.path.isdir(out):
        return []
    steps = [n.split("-", 1)[1] for n in os.listdir(out) if n.startswith("checkpoint-")]
    return [os.path.join(out, f"checkpoint-{s}") for s in sorted(
        (s for s in steps if s.isdigit()), key=int)]


def save_model(policy, path, weights=None):
    """save_pretrained for the model and tokenizer, plus the response length
    and mask id, so that `--model path` works again with no other flag.
    weights: the full state dict of a sharded model (full_state_dicts)."""
    policy.model.save_pretrained(path, state_dict=weights)
    generation = getattr(policy.model, "generation_config", None)
    if generation is not None and not os.path.exists(os.path.join(path, "generation_config.json")):
        generation.save_pretrained(path)  # Dream's from_pretrained reads it back
    policy.tokenizer.save_pretrained(path)
    settings = dict(response_length=policy.response_length, mask_id=policy.mask_id)
    if hasattr(policy.model, "peft_config"):  # peft saved the adapters only
        settings["lora_base"] = policy.lora_base
    toy_dllm.write_atomic(os.path.join(path, SAVED_SETTINGS),
                          json.dumps(settings, indent=1) + "\n")


def save_checkpoint(out, policy, optimizer, state):
    """Model, tokenizer, optimizer, RNG states and step, then drop older ones."""
    path = os.path.join(out, f"checkpoint-{state['step']}")
    if world()[1] > 1:  # every rank gathers, rank 0 writes
        weights, optimizer_state = full_state_dicts(policy.model, optimizer)
        if world()[0] != 0:
            return
    else:
        weights, optimizer_state = None, optimizer.state_dict()

    def save(tmp):
        save_model(policy, tmp, weights)
        torch.save({**state, "optimizer": optimizer_state},
                   os.path.join(tmp, "trainer_state.pt"))

    toy_dllm.save_dir_atomic(path, save)
    for old in checkpoints(out)[:-1]:
        shutil.rmtree(old)


def load_trainer_state(checkpoint, device):
    """The loop's state saved in a checkpoint: step, metrics, optimizer, RNGs.

    The sampler's RNG lives on the device, and a CUDA generator's state cannot
    seed a CPU one (or the reverse): a run resumes on the kind of device it
    was saved on, or not at all.
    """
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu",
                       weights_only=True)
    if state["device_type"] != device.type:
        raise ValueError(f"{checkpoint} was saved on {state['device_type']}; "
                         f"resume it there (--device {state['device_type']})")
    saved, now = state.get("world_size", 1), world()[1]
    if saved != now:  # the optimizer state and the sampler streams are per rank
        raise ValueError(f"{checkpoint} was saved by {saved} process(es); resume it with "
                         f"{saved} (torchrun --nproc_per_node {saved}), not {now}")
    return state

# -----------------------------------------------------------------------------
# 7. Measurements: memory, naive vs BGPO side by side, gradient quality, --explain
#    compare:    for each n_t and method, the objective (1/B) sum_i R_i, the
#                largest gradient difference to "naive", the peak activation
#                bytes and the time of one policy_loss_backward call; BGPO
#                once for each K of --mc-batch (samples per forward pass).
#    grad-stats: on-policy BGPO gradients g_1..g_8 from 8 independent mask
#                draws at each n_t, against a "golden" gradient g*, the mean
#                of 8 draws at n_t = 256 (stratified):
#                relative std   = sqrt(sum_r |g_r - mean g|^2 / 7) / |g*|
#                relative bias  = |mean_r g_r - g*| / |g*|
#                bias floor     = what noise alone gives the bias column:
#                                 sqrt(std^2 / 8 + var(g*)) / |g*|
#                relative error = mean_r |g_r - g*| / |g*|  (one draw's distance)
#                Draw r takes max(n_t) masks per response; the row for n_t
#                uses every (max/n_t)-th of them, which is itself a draw of
#                n_t samples (for stratified: the same offset k, spacing
#                L/n_t). The rows share random numbers, so the change from
#                one row to the next is due to n_t, not to luck.
#    memory:     what grows with n_t is what autograd saves for backward
#                (activations). A saved-tensor hook sees every one of them:
#                count each storage once while it is held, and keep the peak.
#                Works on any device; on CUDA the allocator's own peak is
#                reported as well.
#    explain:    one BGPO step on a small batch, every number printed.


class _Held:
    """A saved tensor, as autograd keeps it until backward frees the graph."""

    def __init__(self, meter, tensor):
        self.meter, self.tensor = meter, tensor
        self.key = tensor.untyped_storage().data_ptr()
        meter._hold(self.key, tensor.untyped_storage().nbytes())

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager: peak bytes autograd holds for backward inside it.

    Parameters (and anything else passed as `exclude`) are not activations and
    are not counted.

    >>> w = torch.randn(1000, requires_grad=True)
    >>> with SavedTensorMeter(exclude=[w]) as meter:
    ...     loss = w.exp().sum()          # exp saves its output: 1000 floats
    >>> meter.peak_bytes
    4000
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs, self.sizes = {}, {}
        self.current_bytes = self.peak_bytes = 0

    def _hold(self, key, nbytes):
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, nbytes
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self.refs[key] += 1

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current_bytes -= self.sizes.pop(key)

    def _pack(self, tensor):
        if tensor.untyped_storage().data_ptr() in self.exclude:
            return tensor
        return _Held(self, tensor)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def activation_meter(model):
    """A SavedTensorMeter that leaves out the model's parameters and buffers."""
    return SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers()))


def measure(fn, model, device):
    """Run fn() once; return (its result, peak activation bytes, seconds, CUDA peak bytes or None)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with activation_meter(model) as meter:
        result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return result, meter.peak_bytes, seconds, cuda_peak


def measure_loss_call(policy, batch, masks, weights, old_terms, method, clip=None, mc_batch=1):
    """measure() of one policy_loss_backward call on a Rollout, from zero
    gradients; the gradient it leaves is in the model's .grad."""
    policy.model.zero_grad(set_to_none=True)
    return measure(lambda: policy_loss_backward(
        policy.model, batch.prompts, batch.responses, batch.advantages, masks, weights,
        old_terms, policy.mask_id, method=method, clip=clip, prompt_mask=batch.prompt_mask,
        mc_batch=mc_batch), policy.model, policy.device)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def fixed_batch(policy, cfg):
    """One seeded rollout batch on the first cfg.prompts train problems."""
    rng = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    return rollout(policy, policy.task.train[:cfg.prompts], cfg, rng)


def perturb_weights(model, scale, seed):
    """Move every parameter by scale * its std * N(0, 1): an off-policy model."""
    noise_rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=noise_rng).to(p))


def compare(policy, cfg, sample_counts, repeats=2):
    """Rows of method x n_t measurements (see the banner). With cfg.perturb > 0
    the model is perturbed after the old terms are taken: off-policy, where
    BGPO's objective is a strict lower bound of the naive one."""
    model = policy.model
    batch = fixed_batch(policy, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    original = {k: v.clone() for k, v in model.state_dict().items()} if cfg.perturb > 0 else None
    rows = []
    for n in sample_counts:
        masks, weights, old_terms = masks_and_old_terms(policy, batch, n, cfg.scheme, rng,
                                                        cfg.length_norm)
        if cfg.perturb > 0:
            perturb_weights(model, cfg.perturb, cfg.seed)
        reference = None
        ks = sorted({min(k, n) for k in cfg.mc_batches})  # BGPO's samples per forward pass
        for method, k in [("naive", 1), ("two_pass", 1)] + [("bgpo", k) for k in ks]:
            def call():
                return measure_loss_call(policy, batch, masks, weights, old_terms, method,
                                         cfg.clip, k)
            # the fastest of `repeats` calls; memory is the same each time
            runs = [call() for _ in range(repeats)]
            loss, nbytes, _, cuda_peak = runs[-1]
            grad = flat_grad(model)
            reference = grad if reference is None else reference
            row = dict(method=method, samples=n, mc_batch=k, objective=-loss,
                       grad_max_abs_diff=(grad - reference).abs().max().item(),
                       peak_activation_bytes=nbytes, seconds=min(r[2] for r in runs),
                       cuda_peak_bytes=cuda_peak)
            if cfg.gradient_checkpointing:  # the same call with each layer checkpointed
                set_checkpointing(model, True)
                _, row["checkpointed_activation_bytes"], _, row["checkpointed_cuda_peak_bytes"] = call()
                set_checkpointing(model, False)
            rows.append(row)
        if cfg.perturb > 0:
            model.load_state_dict(original)
    model.zero_grad(set_to_none=True)
    return rows


def bgpo_gradient(policy, batch, masks, weights, old_terms):
    """The on-policy BGPO gradient on the given masks, as one flat vector."""
    model = policy.model
    model.zero_grad(set_to_none=True)
    policy_loss_backward(model, batch.prompts, batch.responses, batch.advantages, masks,
                         weights, old_terms, policy.mask_id, method="bgpo",
                         prompt_mask=batch.prompt_mask)
    grad = flat_grad(model)
    model.zero_grad(set_to_none=True)
    return grad


def grad_stats(policy, cfg, sample_counts, draws=8, golden_samples=256):
    """Rows of scheme x n_t: relative std, bias and error of the BGPO gradient (see the banner)."""
    batch = fixed_batch(policy, cfg)
    if not batch.advantages.any():
        raise ValueError("every group of the fixed batch has equal rewards: no gradient to study")
    rng = torch.Generator().manual_seed(cfg.seed)

    def draw(n, scheme):  # masks, weights, old_terms
        return masks_and_old_terms(policy, batch, n, scheme, rng)

    golden_draws = torch.stack([bgpo_gradient(policy, batch, *draw(golden_samples, "stratified"))
                                for _ in range(draws)])                        # (draws, P)
    golden = golden_draws.mean(0)
    golden_var = (golden_draws - golden).pow(2).sum() / (draws - 1) / draws   # of the mean
    largest = max(sample_counts)
    rows = []
    for scheme in SCHEMES:
        grads = {n: [] for n in sample_counts}
        for _ in range(draws):
            shared = draw(largest, scheme)
            for n in grads:  # each count once, even if listed twice
                if largest % n == 0:
                    masks, weights, old_terms = (x[::largest // n] for x in shared)
                else:  # not a sub-grid of the shared draw: a draw of its own
                    masks, weights, old_terms = draw(n, scheme)
                grads[n].append(bgpo_gradient(policy, batch, masks, weights, old_terms))
        for n in sample_counts:
            g = torch.stack(grads[n])                                        # (draws, P)
            var = (g - g.mean(0)).pow(2).sum() / (draws - 1)                # of one draw
            rows.append(dict(scheme=scheme, samples=n,
                             rel_std=(var.sqrt() / golden.norm()).item(),
                             rel_bias=((g.mean(0) - golden).norm() / golden.norm()).item(),
                             bias_floor=((var / draws + golden_var).sqrt() / golden.norm()).item(),
                             rel_error=((g - golden).norm(dim=1).mean() / golden.norm()).item()))
    return rows


def explain(policy, cfg):
    """--explain: one BGPO step on a small batch, in the order of the algorithm,
    with every number printed; then the two claims checked on that batch.
    The weights are left as they were (no optimizer step is taken)."""
    model = policy.model
    batch = batch_with_both_signs(policy, cfg)
    n, A = cfg.samples, batch.advantages
    if not ((A > 0).any() and (A < 0).any()):
        print("(no batch of the first 100 had advantages of both signs: one lemma only)")
    print(f"One BGPO step: {cfg.prompts} prompts x G = {cfg.group} responses, n_t = {n}, "
          f"scheme {cfg.scheme}; '_' is [MASK], '.' the end token\n")
    print("1-2. rollout; reward r (exact match); advantage A = (r - mean r) / std r per group")
    truths = policy.task.answers(batch.problems)
    for i in range(len(A)):
        print(f"  y{i + 1:<2} {show_tokens(policy, batch.prompts[i], batch.responses[i])}"
              f"   (truth {truths[i]})   r = {batch.rewards[i]:.0f}   A = {A[i]:+.3f}")
    masks, weights, old_terms = masks_and_old_terms(
        policy, batch, n, cfg.scheme, torch.Generator().manual_seed(cfg.seed), cfg.length_norm)
    rule = {"stratified": "L/k", "uniform_t": "(L+1)/k"}[cfg.scheme] + " / L" * cfg.length_norm
    print(f"\n3. n_t = {n} masks per response, weight w = {rule} for k of L masked; the old "
          "policy's l_old_j = w sum_k 1[masked] log p_old(y^k | y_t, x), without gradient")
    print("\n4. for j = 1..n_t: l_j (with a graph), d_j = l_j - l_old_j, g_j; "
          "L_j = -(1/B) sum_i g_ij; L_j.backward() frees sample j's graph")
    model.zero_grad(set_to_none=True)
    for j in range(n):
        term = _elbo_term(model, batch.prompts, batch.responses, masks[j], weights[j],
                          policy.mask_id, batch.prompt_mask)                  # (B,), a graph
        g = bgpo_sample_objective(term, old_terms[j], A, n, cfg.clip)        # (B,)
        for i in range(len(A)):
            branch = "tangent A(1+d)/n_t" if A[i] >= 0 else "Jensen  A e^d/n_t"
            print(f"  j={j + 1} y{i + 1:<2} "
                  f"{show_tokens(policy, batch.prompts[i], batch.responses[i], masks[j, i])}"
                  f"  k={int(masks[j, i].sum())} w={weights[j, i]:.3f}  l_old={old_terms[j, i]:+.4f}"
                  f"  l={term[i].item():+.4f}  d={term[i].item() - old_terms[j, i]:+.1e}"
                  f"  g={g[i].item():+.4f}  {branch}")
        loss_j = -g.mean()
        loss_j.backward()
        print(f"  L_{j + 1} = {loss_j.item():+.6f}: backwarded; sample {j + 1}'s graph is freed\n")
    print("5. one optimizer step would follow; --explain leaves the weights as they are\n")
    explain_checks(policy, cfg, batch, masks, weights, old_terms)


def explain_checks(policy, cfg, batch, masks, weights, old_terms):
    """The claims, on the batch --explain printed: equal gradients on-policy,
    R_lb <= R off-policy, and the activation memory of each method."""
    model, n, A = policy.model, masks.shape[0], batch.advantages
    inputs = (model, batch.prompts, batch.responses, A, masks, weights, old_terms, policy.mask_id)
    bgpo_grad = flat_grad(model).clone()            # what step 4 accumulated
    model.zero_grad(set_to_none=True)
    policy_loss_backward(*inputs, method="naive", clip=cfg.clip, prompt_mask=batch.prompt_mask)
    naive_grad = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    print(f"check, on-policy: max |grad BGPO - grad naive| = "
          f"{(bgpo_grad - naive_grad).abs().max():.2e}, largest |grad naive| = "
          f"{naive_grad.abs().max():.2e}")
    scale = cfg.perturb or 0.05
    original = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_weights(model, scale, cfg.seed)
    with torch.no_grad():
        terms = elbo_terms(model, batch.prompts, batch.responses, masks, weights,
                           policy.mask_id, batch.prompt_mask)                 # (n_t, B)
        R = naive_objective(terms, old_terms, A, cfg.clip)                    # (B,)
        R_lb = sum(bgpo_sample_objective(terms[j], old_terms[j], A, n, cfg.clip)
                   for j in range(n))                                          # (B,)
    model.load_state_dict(original)
    print(f"check, off-policy (weights moved by {scale} parameter stds): "
          "R_lb = sum_j g_j <= R = exp(mean_j d_j) A for every response")
    for i in range(len(A)):
        print(f"  y{i + 1:<2} A = {A[i]:+.3f}   R_lb = {R_lb[i]:+.6f} <= R = {R[i]:+.6f}   "
              f"{'holds' if R_lb[i] <= R[i] else 'FAILS'}")
    print("activation memory held for backward by one policy_loss_backward call on this batch")
    for method in METHODS:
        _, nbytes, _, _ = measure(lambda: policy_loss_backward(
            *inputs, method=method, clip=cfg.clip, prompt_mask=batch.prompt_mask),
            model, policy.device)
        print(f"  {method:<8} {nbytes / 2**20:8.3f} MB")
    model.zero_grad(set_to_none=True)


def batch_with_both_signs(policy, cfg, tries=100):
    """A seeded rollout in which some A > 0 and some A < 0, so that both of
    BGPO's lemmas show (the first of `tries` draws that has both)."""
    data_rng = torch.Generator().manual_seed(cfg.seed)
    sample_rng = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    for _ in range(tries):
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        batch = rollout(policy, problems, cfg, sample_rng)
        if (batch.advantages > 0).any() and (batch.advantages < 0).any():
            break
    return batch


def show_tokens(policy, prompt, response, mask=None):
    """'37+48=' + '0_5': the prompt, then the response with '_' where masked."""
    tokenizer, end = policy.tokenizer, toy_dllm.end_token_id(policy.tokenizer)
    prompt = [t for t in prompt.tolist() if t != end]  # left padding
    text = tokenizer.decode(prompt).replace(" ", "")
    for k, t in enumerate(response.tolist()):
        masked = mask is not None and bool(mask[k])
        text += "_" if masked else "." if t == end else tokenizer.decode([t]).strip()
    return text


def format_table(rows):
    """Rows of dicts -> an aligned text table, with the units of the columns."""
    if rows and "method" in rows[0]:
        head = ["method", "n_t", "K", "objective", "max|grad-naive|", "act. MB", "ms/call",
                "time/naive"]
        naive_seconds = {r["samples"]: r["seconds"] for r in rows if r["method"] == "naive"}
        body = [[r["method"], r["samples"], r["mc_batch"], f"{r['objective']:+.6f}",
                 f"{r['grad_max_abs_diff']:.1e}",
                 f"{r['peak_activation_bytes'] / 2**20:.2f}", f"{1000 * r['seconds']:.0f}",
                 f"{r['seconds'] / naive_seconds[r['samples']]:.2f}"]
                + ([f"{r['cuda_peak_bytes'] / 2**20:.1f}"] if r["cuda_peak_bytes"] is not None else [])
                + ([f"{r['checkpointed_activation_bytes'] / 2**20:.2f}"]
                   if "checkpointed_activation_bytes" in r else [])
                + ([f"{r['checkpointed_cuda_peak_bytes'] / 2**20:.1f}"]
                   if r.get("checkpointed_cuda_peak_bytes") is not None else [])
                for r in rows]
        if rows[0]["cuda_peak_bytes"] is not None:
            head.append("CUDA peak MB")
        if "checkpointed_activation_bytes" in rows[0]:
            head.append("act. MB ckpt")
        if rows[0].get("checkpointed_cuda_peak_bytes") is not None:
            head.append("CUDA peak MB ckpt")
    else:
        head = ["scheme", "n_t", "rel. std", "rel. bias", "bias floor", "rel. error"]
        body = [[r["scheme"], r["samples"], f"{r['rel_std']:.3f}", f"{r['rel_bias']:.3f}",
                 f"{r['bias_floor']:.3f}", f"{r['rel_error']:.3f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in [head] + body]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 8. Command line, in the order main calls it: flags -> Config, device,
#    model (the toy or --model), checks, then one of compare / grad-stats /
#    explain / train.


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: 'bgpo.py: error: ...', exit status 2."""

    def error(self, message):
        """Under torchrun every rank stops with status 2; rank 0 alone says why."""
        shown = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"{self.prog}: error: {message}\n" if shown else None)


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: a number of the given kind within [low, high]."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value
    return parse


def _sample_counts(text):
    return [_number(int, 1)(part) for part in text.split(",")]


class _FirstAndList(argparse.Action):
    """--samples 16 or --samples 1,4,16: n_t (the first) and the whole list
    (sample_counts); the same for --mc-batch (mc_batch, mc_batches)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0])
        setattr(namespace, {"samples": "sample_counts", "mc_batch": "mc_batches"}[self.dest],
                tuple(values))


def build_parser():
    p = Parser(prog="bgpo.py", description="BGPO on a tiny diffusion LM (or a real one).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true",
                      help="table: naive vs two_pass vs bgpo, per n_t (value, gradient, memory, time)")
    mode.add_argument("--grad-stats", action="store_true",
                      help="table: relative std, bias and error of the BGPO gradient, per n_t and scheme")
    mode.add_argument("--explain", action="store_true",
                      help="one BGPO step on a small batch (2 prompts x 4 responses, n_t = 2 "
                           "unless given), every number printed")
    a = p.add_argument
    a("--samples", type=_sample_counts, action=_FirstAndList, metavar="N[,N...]",
      help="n_t, Monte-Carlo samples per response (a list for --compare / --grad-stats)")
    a("--mc-batch", type=_sample_counts, action=_FirstAndList, metavar="K[,K...]",
      help="Monte-Carlo samples per forward pass (K x the batch's rows): 1 uses the least "
           "memory, more is faster where the device has room (a list for --compare)")
    a("--method", choices=METHODS, help="objective for training")
    a("--scheme", choices=SCHEMES, help="how masks are drawn")
    a("--steps", type=_number(int, 1), help="RL steps")
    a("--prompts", type=_number(int, 1), help="prompts per step")
    a("--group", type=_number(int, 2), help="G, responses per prompt")
    a("--lr", type=_number(float, 0, low_open=True), help="AdamW learning rate")
    a("--seed", type=_number(int, 0))
    a("--device", choices=("auto", "cpu", "cuda"))
    a("--temperature", type=_number(float, 0), help="rollout temperature")
    a("--sampler-steps", type=_number(int, 1),
      help="denoising steps per response (default: one per token)")
    a("--block-length", type=_number(int, 1),
      help="sampler block length (default: the response length)")
    a("--updates-per-batch", type=_number(int, 1),
      help="optimizer updates per rollout batch, on disjoint mini-batches (1 = on-policy)")
    a("--clip", type=_number(float, 0, 1, low_open=True), metavar="EPS",
      help="PPO clipping of the surrogate ratio (off by default, as in the paper)")
    a("--length-norm", action="store_true",
      help="divide each ELBO term by the response length, as the official code does")
    a("--max-grad-norm", type=_number(float, 0, low_open=True), metavar="X",
      help="clip the gradient's total norm to X before each update (off by default)")
    a("--eval-every", type=_number(int, 1), help="steps between test evaluations")
    a("--perturb", type=_number(float, 0),
      help="--compare / --explain: perturb the weights by this many parameter stds (off-policy)")
    a("--json", action="store_true", help="print --compare / --grad-stats rows as JSON")
    a("--out", metavar="DIR", help="write metrics.jsonl, summary.json and the final model here")
    a("--save-every", type=_number(int, 1), help="checkpoint every N steps under --out")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (its --out)")
    a("--model", metavar="PATH_OR_NAME", help="a transformers masked-LM checkpoint (default: the toy)")
    a("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (LLaDA)")
    a("--mask-id", type=_number(int, 0), help="[MASK] id if the tokenizer names none")
    a("--shifted-logits", choices=("auto", "yes", "no"),
      help="read token i's prediction at position i-1, as Dream does (auto: by model type)")
    a("--response-length", type=_number(int, 1),
      help="response tokens: the answer, then end tokens (default: the answer's length "
           "for the toy, whose warm start is then trained at this length; the longest "
           "answer + 1 with --model)")
    a("--digits", type=_number(int, 2, 9), help="operand digits of the task")
    a("--test-size", type=_number(int, 1), help="test problems")
    a("--lora-rank", type=_number(int, 1), metavar="R",
      help="train LoRA adapters of rank R (peft) instead of all weights")
    a("--lora-alpha", type=_number(float, 0, low_open=True),
      help="LoRA alpha: adapter updates are scaled by alpha / R (default: R)")
    a("--lora-targets", metavar="NAME[,NAME...]",
      help="modules that get adapters (default: every linear layer but the output head)")
    a("--sync-each-sample", action="store_true",
      help="under torchrun: reduce-scatter gradients after each Monte-Carlo sample "
           "(n_t collectives, gradients stay sharded) instead of once per update; "
           "no effect in one process")
    a("--activation-budget", type=_number(float, 0, low_open=True), metavar="MB",
      help="before training, measure one loss call's activations at --samples and --method; "
           "more than MB stops with the largest n_t that fits")
    a("--gradient-checkpointing", action="store_true",
      help="recompute each layer's activations in backward (transformers' checkpointing); "
           "with --compare: a column with it")
    p.set_defaults(**dataclasses.asdict(Config()))  # the defaults live in Config
    return p


RESUMABLE = ("steps", "device", "save_every", "trust_remote_code",  # what --resume may change
             "sync_each_sample", "mc_batch", "mc_batches")
EXPLAIN = dict(prompts=2, group=4, samples=2, sample_counts=(2,))  # --explain's batch, unless given


def parse_args(parser, argv):
    """Flags, merged with the saved run's settings under --resume, and checked
    against each other. Returns (a Config, the checkpoint to resume or None)."""
    unset = object()
    given = {k for k, v in vars(parser.parse_args(argv, namespace=argparse.Namespace(
        **{f.name: unset for f in dataclasses.fields(Config)}))).items()
        if v is not unset}  # the flags typed on the command line, not defaulted
    args = vars(parser.parse_args(argv))
    checkpoint = None
    if args["resume"]:
        run, checkpoint = read_run(args["resume"], given, parser)
        changed = sorted(k for k in given - {"resume", "out", *RESUMABLE}
                         if json.loads(json.dumps(args[k])) != run.get(k))
        if changed:
            parser.error("--resume continues a run as it was set up; "
                         f"cannot change --{changed[0].replace('_', '-')}")
        # a setting that run.json lacks (a flag added since) keeps its default;
        # consent to run shipped code comes from this command line only
        args = {**args, **run, "trust_remote_code": False, **{k: args[k] for k in given},
                "out": args["resume"]}
    if args["explain"]:
        args.update({k: v for k, v in EXPLAIN.items() if k not in given})
    cfg = Config(**{**args, "sample_counts": tuple(args["sample_counts"]),
                    "mc_batches": tuple(args["mc_batches"])})
    check_flags(cfg, parser)
    return cfg, checkpoint


def read_run(out, given, parser):
    """run.json's settings and the latest checkpoint of the run saved in out."""
    saved, found = os.path.join(out, "run.json"), checkpoints(out)
    if not os.path.isfile(saved) or not found:
        parser.error(f"--resume {out}: no run with a checkpoint there")
    try:
        with open(saved) as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--resume {out}: cannot read run.json ({e})")
    if not isinstance(run, dict) or not {"samples", "method", "steps", "seed"} <= set(run):
        parser.error(f"--resume {out}: run.json does not hold this program's settings")
    if run.get("trust_remote_code") and "trust_remote_code" not in given:
        parser.error(f"--resume {out}: its model ships code of its own; "
                     "add --trust-remote-code to allow it to run")
    if isinstance(run["samples"], list):  # written before sample_counts had its own key
        run["samples"], run["sample_counts"] = run["samples"][0], run["samples"]
    known = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in run.items() if k in known}, found[-1]


def check_flags(cfg, parser):
    """Flags that are each fine but do not go together."""
    if not (cfg.compare or cfg.grad_stats):
        if len(cfg.sample_counts) != 1:
            parser.error("--samples takes one n_t when training "
                         "(lists are for --compare / --grad-stats)")
        if len(cfg.mc_batches) != 1:
            parser.error("--mc-batch takes one K when training (lists are for --compare)")
        if cfg.prompts % cfg.updates_per_batch:
            parser.error(f"--updates-per-batch {cfg.updates_per_batch} must divide "
                         f"--prompts {cfg.prompts}")
        if cfg.save_every and not cfg.out:
            parser.error("--save-every needs --out")
    if cfg.lora_rank is None and (cfg.lora_alpha is not None or cfg.lora_targets):
        parser.error("--lora-alpha and --lora-targets need --lora-rank")
    size = int(os.environ.get("WORLD_SIZE", "1"))  # processes torchrun started
    if size > 1:
        if cfg.compare or cfg.grad_stats or cfg.explain or cfg.lora_rank or cfg.activation_budget:
            parser.error("--compare, --grad-stats, --explain, --lora-rank and "
                         "--activation-budget run in one process, not under torchrun")
        if cfg.prompts % (size * cfg.updates_per_batch):
            parser.error(f"--prompts {cfg.prompts} must divide into {size} processes "
                         f"x {cfg.updates_per_batch} updates per batch")


def resolve_device(name, parser):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def load_checkpoint(path, trust_remote_code):
    """Model and tokenizer from a directory or hub name; masked-LM head first,
    then AutoModel (LLaDA registers its diffusion LM only as AutoModel).

    Weights load in float32 whatever the checkpoint holds: an RL update at a
    small learning rate is far below bfloat16's resolution and would vanish.
    On CUDA the forward passes still run in bfloat16 (toy_dllm.forward_logits).
    Code shipped with the checkpoint (an `auto_map` in its config, allowed by
    --trust-remote-code) goes through the compatibility step of section 9.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    shipped = trust_remote_code and bool(getattr(config, "auto_map", None))
    if shipped:
        adapt_shipped_code(config, path)
    kwargs = dict(config=config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
    except ValueError:
        model = AutoModel.from_pretrained(path, **kwargs)
    if shipped:
        finish_shipped_model(model)
    return model, tokenizer


def saved_settings(path):
    """The response length and mask id that save_model wrote beside a model, or {}."""
    try:
        with open(os.path.join(path, SAVED_SETTINGS)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load_policy(cfg, parser, device, checkpoint=None):
    """The toy warm start, or the checkpoint given by --model (or --resume),
    with its mask id and response length checked against the task."""
    path = checkpoint or cfg.model
    model, tokenizer, task = load_model_and_task(cfg, parser, path,
                                                 f"--resume {cfg.resume}" if checkpoint
                                                 else f"--model {path}")
    saved = saved_settings(path) if path else {}
    mask_id = next((m for m in (cfg.mask_id, saved.get("mask_id"), tokenizer.mask_token_id)
                    if m is not None), None)
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    if mask_id is None:
        parser.error(f"{path}: the tokenizer names no mask token; give --mask-id")
    if not 0 <= mask_id < vocab:
        parser.error(f"--mask-id {mask_id} is outside the model's vocabulary of {vocab}")
    try:
        toy_dllm.end_token_id(tokenizer)
    except ValueError as e:
        parser.error(f"{path}: {e}")
    answer_ids = tokenizer(task.answers(task.test), add_special_tokens=False)["input_ids"]
    longest = max(len(ids) for ids in answer_ids)
    length = (cfg.response_length or saved.get("response_length")
              or (task.answer_length if path is None else longest + 1))
    if length < longest:
        parser.error(f"--response-length {length} is shorter than the longest answer ({longest} tokens)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    prompt_len = toy_dllm.encode_prompts(tokenizer, task.prompts(task.test)).shape[1]
    if max_pos is not None and prompt_len + length > max_pos:
        parser.error(f"prompt ({prompt_len}) + response ({length}) tokens exceed the model's "
                     f"{max_pos} positions")
    set_shifted_logits(model, cfg.shifted_logits)
    model = model.to(device).eval()
    if path is not None:
        check_padding(model, tokenizer, task, mask_id, vocab, path)
    lora_base = saved.get("lora_base") if hasattr(model, "peft_config") else None
    if cfg.lora_rank:
        model, lora_base = add_lora(model, cfg, parser, path, lora_base)
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True, parser)  # a model that refuses it: one line
        if cfg.compare:  # which measures with and without
            set_checkpointing(model, False)
    return Policy(model, tokenizer, task, mask_id, length, device, lora_base)


def add_lora(model, cfg, parser, path, lora_base):
    """peft LoRA adapters of rank cfg.lora_rank on every target module: only
    they train. A model loaded with its adapters (a LoRA checkpoint) keeps
    them. Returns (the model, the checkpoint the adapters adapt or None)."""
    if hasattr(model, "peft_config"):
        rank = model.peft_config["default"].r
        if rank != cfg.lora_rank:
            parser.error(f"--lora-rank {cfg.lora_rank}: {path} holds adapters of rank {rank}")
        return model, lora_base
    import peft  # only here: importing it takes seconds
    vocab = model.config.vocab_size
    targets = (cfg.lora_targets.split(",") if cfg.lora_targets else  # every linear layer but
               [name for name, m in model.named_modules()             # the head, found by its
                if isinstance(m, torch.nn.Linear) and m.out_features != vocab])  # output size
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                             lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(cfg.seed)  # the adapters' random initialisation
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        parser.error(f"--lora-targets {cfg.lora_targets}: {first_line(e)}")
    local = path is not None and os.path.exists(path)
    return model, os.path.abspath(path) if local else path


def set_checkpointing(model, on, parser=None):
    """transformers' activation checkpointing on or off: each layer keeps only
    its input and recomputes the rest in backward. See eval_mode."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if on:
            base.activation_checkpointing_enable()
        else:
            base.activation_checkpointing_disable()
    except ValueError as e:  # "... does not support activation checkpointing"
        if parser is None:
            raise
        parser.error(f"--gradient-checkpointing: {first_line(e)}")
    eval_mode(model)


def eval_mode(model):
    """model.eval(): no dropout, so old and new policy are the same network.
    transformers checkpoints a layer only in training mode, so layers set to
    checkpoint are put back in it: the layer alone, not its dropout, so the
    network computes the same function."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", None) is True:
            module.training = True


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_padding(model, tokenizer, task, mask_id, vocab, path):
    """Find how the model hides left padding (toy_dllm.find_padding_mask) and,
    where it cannot and the task's prompts need padding, say so."""
    end = toy_dllm.end_token_id(tokenizer)
    toy_dllm.find_padding_mask(model, (end, mask_id if mask_id != end else (end + 1) % vocab),
                               mask_id)
    padded = toy_dllm.encode_padded_prompts(tokenizer, task.prompts(task.test))[1] is not None
    if model.padding_mask_form == "none" and padded:
        print(f"note: {path} does not hide padding with an attention mask; shorter prompts "
              "are read with the end tokens that pad them on the left", file=sys.stderr)


SHIFTED_MODEL_TYPES = ("dream",)  # adapted from autoregressive LMs: predict token i at i - 1


def set_shifted_logits(model, choice):
    """Record on the model's config whether it predicts shifted (see
    toy_dllm.predicts_shifted): by --shifted-logits, or for "auto" by what the
    checkpoint says (its model type, or a shifted_logits it was saved with)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    if choice == "auto":
        shifted = (getattr(config, "shifted_logits", False)
                   or str(getattr(config, "model_type", "")).lower() in SHIFTED_MODEL_TYPES)
    else:
        shifted = choice == "yes"
    if shifted or hasattr(config, "shifted_logits"):
        config.shifted_logits = shifted


def load_model_and_task(cfg, parser, path, source):
    """(model, tokenizer, task): the toy warm start if path is None, else the
    checkpoint at path; `source` names the flag that gave it, for errors."""
    try:
        if path is None:
            return toy_dllm.warm_start(n_digits=cfg.digits, n_test=cfg.test_size,
                                       response_length=cfg.response_length)[:3]
        task = toy_dllm.make_task(cfg.digits, cfg.test_size)
    except ValueError as e:
        parser.error(str(e))
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # LoRA adapters, see add_lora
        return load_adapters(cfg, parser, path, source)
    looks_like_hub_name = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not os.path.exists(path) and not looks_like_hub_name:
        parser.error(f"{source}: no such file or directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, tokenizer = load_checkpoint(path, cfg.trust_remote_code)
    except Exception as e:  # transformers raises many kinds; all mean "unusable"
        parser.error(f"{source}: cannot load a masked LM and tokenizer ({first_line(e)})")
    return model, tokenizer, task


def load_adapters(cfg, parser, path, source):
    """A LoRA checkpoint: its base model (bgpo.json's lora_base; None: the
    toy), with the saved adapters on it, trainable."""
    base = saved_settings(path).get("lora_base")
    model, tokenizer, task = load_model_and_task(
        cfg, parser, base, f"{source} (base model {base})" if base else source)
    import peft
    try:
        model = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
    except Exception as e:  # a damaged or foreign adapter: many kinds
        parser.error(f"{source}: cannot load its LoRA adapters ({first_line(e)})")
    return model, tokenizer, task


def check_activation_budget(policy, cfg, parser):
    """--activation-budget: one loss call of the run's method at its n_t, on a
    rollout batch of the run's size, measured by the saved-tensor meter (as
    --compare does). More than the budget stops here, before anything is
    written, naming the largest n_t that fits (memory grows with n_t for the
    naive objective and stays flat for BGPO, so a bisection finds it)."""
    batch = fixed_batch(policy, cfg)

    def megabytes(n):
        masks, weights, old_terms = masks_and_old_terms(
            policy, batch, n, cfg.scheme, torch.Generator().manual_seed(cfg.seed), cfg.length_norm)
        nbytes = measure_loss_call(policy, batch, masks, weights, old_terms, cfg.method,
                                   cfg.clip)[1]
        policy.model.zero_grad(set_to_none=True)
        return nbytes / 2**20

    need = megabytes(cfg.samples)
    if need <= cfg.activation_budget:
        return
    fits, too_many = 0, cfg.samples  # the largest n_t within the budget lies in [fits, too_many)
    while too_many - fits > 1:
        n = (fits + too_many) // 2
        fits, too_many = (n, too_many) if megabytes(n) <= cfg.activation_budget else (fits, n)
    parser.error(f"--activation-budget {cfg.activation_budget:g} MB: {cfg.method} at n_t = "
                 f"{cfg.samples} needs {need:.1f} MB of activations; "
                 + (f"the largest n_t that fits is {fits}" if fits else "not even n_t = 1 fits"))


def check_sampler_args(cfg, length, parser):
    """--block-length and --sampler-steps against the response length."""
    block = cfg.block_length or length
    if length % block:
        parser.error(f"--block-length {block} must divide the response length {length}")
    if (cfg.sampler_steps or length) % (length // block):
        parser.error(f"--sampler-steps {cfg.sampler_steps} must be a multiple of the "
                     f"number of blocks ({length // block})")


def load_resume_state(cfg, checkpoint, device, parser):
    """load_trainer_state, with a damaged or foreign file as a one-line error."""
    try:
        return load_trainer_state(checkpoint, device)
    except ValueError as e:
        parser.error(f"--resume {cfg.resume}: {e}")
    except Exception as e:  # truncated or foreign file: torch raises many kinds
        parser.error(f"--resume {cfg.resume}: cannot read "
                     f"{os.path.basename(checkpoint)}/trainer_state.pt ({first_line(e)})")


def prepare_out(out, parser, resuming):
    """Make sure --out is a writable directory that holds no other run."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        parser.error(f"--out {out}: cannot write there ({e.strerror or e})")
    if not resuming and os.path.exists(os.path.join(out, "metrics.jsonl")):
        parser.error(f"--out {out} already holds a run; use --resume {out} or another --out")


def main(argv=None):
    parser = build_parser()
    cfg, checkpoint = parse_args(parser, argv)
    device = resolve_device(cfg.device, parser)
    joined = launched_by_torchrun() and not dist.is_initialized()
    if launched_by_torchrun():
        device = start_distributed(device)
    policy = load_policy(cfg, parser, device, checkpoint)
    check_sampler_args(cfg, policy.response_length, parser)
    if world()[1] > 1:
        shard_model(policy.model, cfg.sync_each_sample)

    if cfg.compare or cfg.grad_stats:
        rows = (compare(policy, cfg, cfg.sample_counts) if cfg.compare
                else grad_stats(policy, cfg, cfg.sample_counts))
        print(json.dumps(rows, indent=1) if cfg.json else format_table(rows))
        return 0
    if cfg.explain:
        explain(policy, cfg)
        return 0

    if cfg.activation_budget:
        check_activation_budget(policy, cfg, parser)
    resume_state = load_resume_state(cfg, checkpoint, device, parser) if checkpoint else None
    if cfg.out:  # only now, with every check passed, is anything written
        prepare_out(cfg.out, parser, resuming=checkpoint is not None)
        run = dict(dataclasses.asdict(cfg), response_length=policy.response_length)
        if world()[0] == 0:
            toy_dllm.write_atomic(os.path.join(cfg.out, "run.json"),
                                  json.dumps(run, indent=1) + "\n")
    say(f"BGPO ({cfg.method}, n_t={cfg.samples}) on {cfg.model or 'the toy diffusion LM'}, "
        f"{cfg.steps} steps of {cfg.prompts}x{cfg.group} responses, device {device}"
        + (f", {world()[1]} processes" if world()[1] > 1 else ""))
    try:
        train(policy, cfg, out=cfg.out, resume_state=resume_state)
    except KeyboardInterrupt:
        found = checkpoints(cfg.out) if cfg.out else []
        hint = (f"continue with --resume {cfg.out} (from {os.path.basename(found[-1])})"
                if found else "no checkpoint to resume from (see --save-every)")
        print(f"\nbgpo.py: interrupted; {hint}", file=sys.stderr)
        return 130
    if joined:
        dist.destroy_process_group()
    return 0


# -----------------------------------------------------------------------------
# 9. Model code shipped with a checkpoint (LLaDA, Dream), written for
#    transformers 4.x, under the pinned 5.x. Each fix is applied only where the
#    loaded code needs it, checked on the code itself, and names the change in
#    transformers that made it necessary. Nothing here edits files: the classes
#    are adjusted in memory, for this process, after transformers imported them.


def adapt_shipped_code(config, path):
    """Import the model classes the config's auto_map names (as from_pretrained
    would) and adjust them, before any model is built."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    if not hasattr(config, "use_cache"):
        # 5.x's PreTrainedConfig drops generation settings (use_cache among them)
        # from a config's kwargs; 4.x forwards read config.use_cache. Our forward
        # passes never use a cache.
        config.use_cache = False
    for auto, ref in config.auto_map.items():
        if auto.startswith("AutoModel"):
            cls = get_class_from_dynamic_module(ref, path)
            package = cls.__module__.rpartition(".")[0] + "."
            for name, module in list(sys.modules.items()):
                if name.startswith(package):
                    adapt_module(module)


def adapt_module(module):
    from transformers import GenerationConfig, PreTrainedModel
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    table = getattr(module, "ROPE_INIT_FUNCTIONS", None)
    if table is ROPE_INIT_FUNCTIONS and "default" not in table:
        # 5.x removed the "default" entry (each model computes its own); this
        # module's copy of the table gets it back, transformers' own does not.
        module.ROPE_INIT_FUNCTIONS = {**table, "default": default_rope_parameters}
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__:
            if issubclass(cls, GenerationConfig):
                accept_new_keywords(cls, "validate")  # 5.x: validate(strict=, user_set_attributes=)
            elif issubclass(cls, PreTrainedModel):
                accept_new_keywords(cls, "tie_weights")  # 5.x: tie_weights(missing_keys=, ...)
                call_post_init(cls)
                tied_keys_as_mapping(cls)


def accept_new_keywords(cls, method):
    """Let cls.method(self, ...) written for 4.x be called with the keywords
    5.x passes: those it does not take are dropped."""
    import inspect
    original = cls.__dict__.get(method)
    if original is None or getattr(original, "adapted", False):
        return
    takes = inspect.signature(original).parameters
    if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        return

    def adapted(self, *args, **kwargs):
        return original(self, *args, **{k: v for k, v in kwargs.items() if k in takes})
    adapted.adapted = True
    setattr(cls, method, adapted)


def call_post_init(cls):
    """5.x's from_pretrained reads what post_init() sets (all_tied_weights_keys);
    4.x code could skip calling it. Call it after an __init__ that did not."""
    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, "adapted", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        outermost = type(self).__init__ is __init__  # not a parent's __init__ called by super()
        if outermost and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
    __init__.adapted = True
    cls.__init__ = __init__


def tied_keys_as_mapping(cls):
    """5.x reads _tied_weights_keys as {tied parameter: its source}; 4.x code
    lists the tied parameters, which were tied to the input embeddings."""
    keys = cls.__dict__.get("_tied_weights_keys")
    if not isinstance(keys, (list, tuple)):
        return

    def mapping(self):
        embeddings = self.get_input_embeddings()
        source = [n for n, m in self.named_modules() if m is embeddings]
        return {key: f"{source[0]}.weight" for key in keys} if source else {}
    cls._tied_weights_keys = property(mapping)


def default_rope_parameters(config, device=None, seq_len=None, **kwargs):
    """Rotary inverse frequencies 1 / theta^(2i/d), as 4.x's "default" entry
    computed them: (inv_freq, attention scaling 1.0)."""
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    base = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponent), 1.0


def finish_shipped_model(model):
    """After loading: no buffer that 5.x left uninitialised reaches training,
    and save_pretrained copies the model's code into every checkpoint."""
    bad = uninitialised_buffers(model)
    if bad:
        # 5.x builds models on the meta device, fills non-persistent buffers
        # with torch.empty and relies on _init_weights to set them; 4.x code
        # computed them in __init__ and its _init_weights may not know them.
        if hasattr(model, "reset_rope_parameters"):
            model.reset_rope_parameters()
        for name in bad:
            module = model.get_submodule(name.rpartition(".")[0])
            if hasattr(module, "reset_parameters") and not list(module.parameters(recurse=False)):
                module.reset_parameters()
        still = uninitialised_buffers(model)
        if still:
            raise ValueError(f"buffer {still[0]} was left uninitialised by transformers 5.x "
                             "and the model has no reset_parameters() to compute it")
    cls = type(model)
    if cls._auto_class is None:
        # The code registered the class with an auto class itself, so
        # from_pretrained did not, and save_pretrained would not copy the code.
        auto = [a for a, ref in getattr(model.config, "auto_map", {}).items()
                if a.startswith("AutoModel") and ref.endswith("." + cls.__name__)]
        if auto:
            cls.register_for_auto_class(auto[0])


def uninitialised_buffers(model):
    """Non-persistent float buffers holding what uninitialised memory would:
    non-finite values, or rotary inverse frequencies that are not decreasing
    values in (0, 1]."""
    bad = []
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if (name not in module._non_persistent_buffers_set or buffer is None
                    or not buffer.is_floating_point()):
                continue
            fine = bool(torch.isfinite(buffer).all())
            if fine and "inv_freq" in name:
                fine = bool((buffer > 0).all() and (buffer <= 1).all()
                            and (buffer.flatten().diff() <= 0).all())
            if not fine:
                bad.append(f"{module_name}.{name}" if module_name else name)
    return bad


# -----------------------------------------------------------------------------
# 10. Many processes: torchrun + FSDP2
#     `torchrun --nproc_per_node W bgpo.py ...` starts W copies of this script
#     (RANK, WORLD_SIZE in their environment). Each rank rolls out prompts/W of
#     the step's prompt groups. FSDP2 (torch.distributed.fsdp.fully_shard)
#     keeps 1/W of every weight, gradient and AdamW state on each rank; it
#     all-gathers a block's weights for its forward and backward, and reduce-
#     scatters the gradients as their mean over ranks. Each rank's loss is a
#     mean over its B/W responses, so that mean is the mean over all B: the
#     gradient is the single-process gradient on the same global batch.
#     Gradient sync: BGPO backwards once per sample. By default the gradients
#     are reduced once, after the last sample (set_requires_gradient_sync:
#     one collective, but each rank holds unsharded gradients until then);
#     --sync-each-sample reduces after every sample (n_t collectives, the
#     gradients stay sharded: what an 8B model needs). Rank 0 alone prints
#     and writes.


def world():
    """(rank, world size); (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_distributed(device):
    """Join the group torchrun set up: gloo on the CPU, nccl on CUDA (one GPU
    per rank). Returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (a caller may have joined already)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shard_model(model, sync_each_sample=False):
    """FSDP2: each block of the model's longest layer list, then the root
    (which keeps the rest: embeddings, head, and any weights tied between them)."""
    from torch.distributed.fsdp import fully_shard
    layer_lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    for block in max(layer_lists, key=len, default=[]):
        fully_shard(block)
    fully_shard(model)
    model.sync_each_sample = sync_each_sample
    return model


def sync_gradients(model, last):
    """Before a sample's backward: reduce gradients now, or let them
    accumulate unsharded until the last sample (FSDP2 models only)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last or getattr(model, "sync_each_sample", False))


def global_mean(value):
    """The mean over ranks of a number each rank has (itself in one process)."""
    rank, size = world()
    if size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / size


def full_state_dicts(model, optimizer):
    """(weights, optimizer state) gathered whole, on the CPU: rank 0 saves
    them. Every rank must call this (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return weights, (get_optimizer_state_dict(model, optimizer, options=options)
                     if optimizer is not None else None)


def load_full_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def all_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    rank, size = world()
    if size == 1:
        return [obj]
    gathered = [None] * size
    dist.all_gather_object(gathered, obj)
    return gathered


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
