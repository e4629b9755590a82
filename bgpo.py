"""BGPO: Boundary-Guided Policy Optimization for diffusion LMs, in one file.

RL needs log pi(y|x); a masked-diffusion LM gives a lower bound, the ELBO,
estimated from n_t masked copies of y. The ELBO-ratio objective is not
linear in those samples, so all n_t graphs are kept until backward. BGPO's
lower bound is linear in them: each is backwarded and freed on its own.

One RL step, in the paper's symbols (arXiv 2510.11683):

  1. for each prompt x, sample G responses y_i with the diffusion sampler
  2. reward r_i; advantage A_i = (r_i - mean(r)) / std(r) within the group
  3. draw n_t masks of each y_i; ELBO term of sample j under the old policy:
       l_old_j = w_j * sum_i 1[y_t^i = M] log p_old(y^i | y_t, x)
  4. for j = 1 .. n_t:
       d_j = l_j - l_old_j            (current policy, same mask)
       g_j = A (1 + d_j) / n_t        if A >= 0
             A exp(d_j) / n_t         if A <  0
       L_j = -(1/B) sum_i g_ij ; L_j.backward() ; free sample j's graph
  5. one optimizer step

The naive objective exp(mean_j d_j) * A needs every sample's graph at once;
sum_j g_j is below it, equal in value and gradient on-policy (all d_j = 0).

Read in this order: group_advantages, sample_masks, elbo_term,
bgpo_sample_objective, bgpo_loss_backward, rollout, train, rl_step.
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import real_dllm
import toy_dllm
from real_dllm import load_checkpoint  # noqa: F401 (public here too: (model, tokenizer))

METHODS = ("bgpo", "naive", "two_pass", "tangent", "jensen")
SCHEMES = ("stratified", "uniform_t", "complementary", "one_step")

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
    return torch.where(std > 0, centred / std.clamp_min(1e-12), 0.0).flatten()

# -----------------------------------------------------------------------------
# 2. The ELBO and its Monte-Carlo estimate
#    B(y|x) = E_t E_{y_t ~ q(.|t,y)} l(y_t, t, y | x)  <=  log pi(y|x)
#    l_j    = w_j * sum_i 1[y_t^i = M] * log p(y^i | y_t, x)
#    B_hat  = (1/n_t) sum_j l_j
#    "stratified": mask exactly l_j of the L tokens, w_j = L / l_j, with counts
#                  l_j = ((k - 1 + floor((j-1) L/n_t)) mod L) + 1, k ~ U{1..L}
#                  per response: each l_j is uniform on 1..L, and together
#                  they spread evenly (round(), as official, is biased: README)
#    "uniform_t":  t ~ U(0,1), each token masked with prob. t; w = (L+1)/l,
#                  the paper's 1/t averaged given the mask (finite variance)
#    "complementary": pairs (DiffuCoder's): l of L tokens, l uniform on 0..L over
#                  the pairs, and the other L - l; w = (L+1)/l: each mask unbiased
#    "one_step":   every token masked, w = 1 (diffu-GRPO without its prompt
#                  masking): one pass, the count-L term; not the ELBO

def sample_masks(responses, n_samples, generator=None, scheme="stratified"):
    """n_t = n_samples masks of each response (B, L) (only its shape is used)
    and their weights: Bool (n_t, B, L), Float (n_t, B).

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
    pairs = scheme == "complementary"
    if pairs and n_samples % 2:
        raise ValueError(f"complementary masks come in pairs: n_samples must be even, got {n_samples}")
    if scheme in ("stratified", "complementary"):
        n, values = (n_samples // 2, L + 1) if pairs else (n_samples, L)  # counts 0..L or 1..L
        k = torch.randint(1, values + 1, (B,), generator=generator, device=dev)  # (B,)
        # floor((j-1) L / n_t): count - 1 is k - 1 shifted by a constant, mod L
        offsets = torch.arange(n, device=dev)[:, None] * values // n          # (n, 1)
        counts = (k - 1 + offsets) % values + (not pairs)                     # (n, B)
        # mask the `count` positions with the smallest random keys: a uniform subset
        keys = torch.rand(n, B, L, generator=generator, device=dev)
        place = keys.argsort(-1).argsort(-1)                 # (n, B, L): each key's place, 0..L-1
        masks = place < counts[..., None]
        if pairs:  # the second half masks what the first does not
            masks, counts = torch.cat([masks, ~masks]), torch.cat([counts, L - counts])
        weights = torch.where(counts > 0, values / counts.clamp(min=1), 0.0)  # empty: not computed
    elif scheme == "one_step":  # n_t copies of one mask: merging computes it once
        masks = torch.ones(n_samples, B, L, dtype=torch.bool, device=dev)
        weights = torch.ones(n_samples, B, device=dev)
    else:
        t = 1 - torch.rand(n_samples, B, generator=generator, device=dev)        # (n, B) in (0, 1]
        masks = torch.rand(n_samples, B, L, generator=generator, device=dev) < t[..., None]
        # E[1/t | l masked]; a sample that masks nothing adds 0 whatever its weight
        weights = (L + 1) / masks.sum(-1).clamp(min=1)
    return masks.to(responses.device), weights.float().to(responses.device)

def elbo_term(model, prompts, responses, mask, weight, mask_id, prompt_mask=None):
    """l_j = w * sum_i mask_i * log p(y^i | y_t, x) of every response: Float
    (B,), differentiable. prompts Long (B, Lp), responses Long (B, L), mask
    Bool (B, L) True where y_t has [MASK], weight Float (B,), prompt_mask
    Bool (B, Lp) False at left padding, or None."""
    check_shapes(prompts, responses, mask[None], weight[None])
    return elbo_terms_at_once(model, prompts, responses, mask[None], weight[None], mask_id,
                              prompt_mask)[0]

def elbo_terms_at_once(model, prompts, responses, masks, weights, mask_id, prompt_mask=None):
    """l_j of K masks (K, B, L) of every response in one forward pass over K
    copies of the batch: Float (K, B). A row of weight 0 is 0, not computed."""
    K, B, L = masks.shape
    rows = weights.flatten().nonzero().squeeze(1)                        # of the K B rows
    b = rows % B                                                         # their responses
    mask = masks.reshape(K * B, L)[rows].bool()                          # (R, L)
    logp = toy_dllm.token_log_probs(model, prompts[b], responses[b], mask, mask_id,
                                    None if prompt_mask is None else prompt_mask[b])  # (R, L)
    terms = weights.reshape(K * B)[rows].to(logp.dtype) * (logp * mask).sum(-1)      # (R,)
    return terms.new_zeros(K * B).index_put((rows,), terms).view(K, B)

def elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask=None,
               mc_batch=1):
    """elbo_term of each of the n_t masks, mc_batch masks to a forward pass:
    Float (n_t, B). Every graph is kept: for old terms, use torch.no_grad()."""
    check_shapes(prompts, responses, masks, weights)
    return torch.cat([elbo_terms_at_once(model, prompts, responses, m, w, mask_id, prompt_mask)
                      for m, w in zip(masks.split(mc_batch), weights.split(mc_batch))])

def check_shapes(prompts, responses, masks, weights, **more):
    """Shapes checked once, at the door; ValueError names the first that is wrong."""
    if responses.dim() != 2 or masks.dim() != 3 or masks.shape[1:] != responses.shape \
            or len(masks) < 1:
        raise ValueError(f"masks must be (n_samples, B, L) for responses (B, L), got "
                         f"{tuple(masks.shape)} and {tuple(responses.shape)}")
    (n, B, _), Lp = masks.shape, prompts.shape[-1]
    shapes = dict(prompts=(B, Lp), weights=(n, B), advantages=(B,), old_terms=(n, B),
                  prompt_mask=(B, Lp))
    for name, x in dict(more, prompts=prompts, weights=weights).items():
        if x is not None and tuple(x.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]}, got {tuple(x.shape)}")

def masks_and_old_terms(policy, batch, n_samples, scheme, generator, length_norm=False,
                        old=True, mc_batch=1):
    """Step 3 on a Rollout: masks (n_t, B, L), weights (n_t, B) and the old
    policy's l_old_j (n_t, B) without gradient, or None if not old.
    length_norm divides each l_j by L (the official code's per-token ELBO)."""
    masks, weights = sample_masks(batch.responses, n_samples, generator, scheme)
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
#    BGPO:   R_lb = sum_j g_j, g_j of step 4: a tangent (e^x >= 1 + x) for A >= 0,
#            Jensen for A < 0. L = -(1/B) sum_i R_i; with R_lb, L = sum_j L_j.
#    tangent, jensen: one lemma for every A (Table 3's rows, our reading): not bounds.
#    --clip (the official code, not the paper): the ratio e^{mean d}, or
#    1 + d_j / e^{d_j}, clipped to [1 - eps, 1 + eps]; dual clip 3 A if A < 0.

def clipped(ratio, advantages, clip=None, dual_clip=3.0):
    """ratio * A, or its PPO-clipped version when clip (= eps) is given."""
    if clip is None:
        return ratio * advantages
    obj = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return torch.where(advantages < 0, torch.maximum(obj, dual_clip * advantages), obj)

def naive_objective(terms, old_terms, advantages, clip=None, counts=None):
    """R = exp(mean_j d_j) * A for each response: Float (B,) from (n_t, B)
    terms; counts (n_t, B) weigh each sample in the mean (merge_repeats)."""
    d = terms - old_terms
    mean_d = d.mean(0) if counts is None else (counts * d).sum(0) / counts.sum(0)
    return clipped(torch.exp(mean_d), advantages, clip)

def bgpo_sample_objective(term, old_term, advantages, n_samples, clip=None, method="bgpo"):
    """g_j for one MC sample j: Float (B,). Linear in the sample, so sum_j g_j
    can be backwarded one j at a time. "tangent", "jensen": that lemma for every A."""
    d = term - old_term                                                   # (B,)
    upper = {"bgpo": advantages >= 0, "tangent": True, "jensen": False}[method]
    upper = torch.as_tensor(upper, device=d.device)                       # (B,) or ()
    # exp only where it is used: an overflowing e^{d} on the A >= 0 side would
    # turn its zero gradient into inf * 0 = nan
    ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)))
    return clipped(ratio, advantages, clip) / n_samples

def bgpo_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                       counts, mask_id, clip=None, prompt_mask=None, mc_batch=1, method="bgpo",
                       seen=None):
    """Step 4: R_lb = sum_j g_j, one sample j (or mc_batch of them) at a time:
    forward, g_j, backward, which frees the sample's graph. Sample j stands for
    counts[j] of each response's n_t samples (merge_repeats). seen: a list that
    gets each l_j's value (policy_loss_backward's diagnostics)."""
    n_t = int(counts[:, 0].sum())
    total = 0.0
    for j in range(0, len(masks), mc_batch):                             # as LLaDA's mc_num loop
        s = slice(j, j + mc_batch)                                        # K samples, K = mc_batch
        terms = elbo_terms_at_once(model, prompts, responses, masks[s], weights[s], mask_id,
                                   prompt_mask)                           # (K, B) l_j, a graph
        old = terms.detach() if old_terms is None else old_terms[s]       # on-policy: d_j = 0
        g = bgpo_sample_objective(terms, old, advantages, n_t, clip, method)  # (K, B)
        loss = -(counts[s] * g).mean(-1).sum()                            # L_j
        loss.backward()                                                   # frees sample j's graph
        total += loss.item()
        if seen is not None:
            seen.append(terms.detach())
    return total

def naive_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                        counts, mask_id, clip=None, prompt_mask=None, mc_batch=1, seen=None):
    """R = exp(mean_j d_j) A: all n_t graphs alive at once, one backward."""
    terms = elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask,
                       mc_batch)                                          # (n_t, B), n_t graphs
    if seen is not None:
        seen.append(terms.detach())
    old_terms = terms.detach() if old_terms is None else old_terms
    loss = -naive_objective(terms, old_terms, advantages, clip, counts).mean()
    loss.backward()
    return loss.item()

def two_pass_loss_backward(model, prompts, responses, advantages, masks, weights, old_terms,
                           counts, mask_id, clip=None, prompt_mask=None, mc_batch=1, seen=None):
    """The naive gradient at constant memory: R depends on the samples only
    through m = mean_j d_j, so pass 1 (no grad; skipped on-policy, m = 0)
    finds c_i = dR_i/dm_i, and pass 2 backwards -(1/B) sum_i c_i l_ij / n_t
    one sample at a time."""
    n_t = int(counts[:, 0].sum())
    mean_d = torch.zeros_like(advantages)
    if old_terms is not None:
        with torch.no_grad():
            terms = elbo_terms(model, prompts, responses, masks, weights, mask_id,
                               prompt_mask, mc_batch)                     # (n_t, B)
            mean_d = (counts * (terms - old_terms)).sum(0) / n_t          # (B,)
    mean_d.requires_grad_(True)
    objective = clipped(torch.exp(mean_d), advantages, clip)             # (B,)
    coef, = torch.autograd.grad(objective.sum(), mean_d)                 # A e^{m} unclipped
    for j in range(0, len(masks), mc_batch):
        s = slice(j, j + mc_batch)
        terms = elbo_terms_at_once(model, prompts, responses, masks[s], weights[s], mask_id,
                                   prompt_mask)                           # (K, B)
        loss = -(coef * counts[s] * terms).mean(-1).sum() / n_t
        loss.backward()
        if seen is not None:
            seen.append(terms.detach())
    return -objective.mean().item()

def merge_repeats(masks, weights, old_terms=None):
    """Equal masks give equal l_j: the sum over n_t samples may run over the
    distinct masks of each response times their counts (3 tokens have 7).
    Returns masks, weights, old_terms and counts with n' <= n_t slots; an
    empty slot has count, weight and old term 0.

    >>> masks = torch.tensor([[[1, 0]], [[0, 1]], [[1, 0]]]).bool()  # (n_t, B, L) = (3, 1, 2)
    >>> masks, weights, _, counts = merge_repeats(masks, torch.full((3, 1), 2.0))
    >>> masks.int().tolist(), counts.tolist()
    ([[[1, 0]], [[0, 1]]], [[2.0], [1.0]])
    """
    n, B, L = masks.shape
    response = torch.arange(B, device=masks.device).expand(n, B)
    key = torch.cat([response[..., None].to(weights.dtype), weights[..., None],
                     masks.to(weights.dtype)], -1).flatten(0, 1)         # (n B, L + 2)
    _, copy_of, copies = key.unique(dim=0, return_inverse=True, return_counts=True)
    order = torch.arange(n * B, device=masks.device)                     # sample j of i: j B + i
    first = torch.full_like(copies, n * B).scatter_reduce(0, copy_of, order, "amin")
    is_first = (first[copy_of] == order).view(n, B)                      # (n, B)
    j, i = is_first.nonzero(as_tuple=True)
    slot = is_first.cumsum(0)[j, i] - 1                                  # its place among them
    index = torch.zeros(int(slot.max()) + 1, B, dtype=torch.long, device=masks.device)
    index[slot, i] = j                                                   # (n', B); 0: empty
    counts = torch.zeros(index.shape, dtype=weights.dtype, device=weights.device)
    counts[slot, i] = copies[copy_of.view(n, B)[j, i]].to(weights.dtype)
    used = counts > 0
    masks = masks.gather(0, index[..., None].expand(-1, -1, L))
    old_terms = None if old_terms is None else old_terms.gather(0, index) * used
    return masks, weights.gather(0, index) * used, old_terms, counts

def policy_loss_backward(model, prompts, responses, advantages, masks, weights,
                         old_terms, mask_id, method="bgpo", clip=None, prompt_mask=None,
                         mc_batch=1, merge=True, diagnostics=None):
    """Backward L = -(1/B) sum_i R_i into .grad (accumulating); returns L.
    prompts (B, Lp), responses (B, L), advantages (B,); masks (n_t, B, L) and
    weights (n_t, B) from sample_masks; old_terms (n_t, B), or None on-policy
    (each l_j's own value, detached). method: one of METHODS (two_pass: the naive
    gradient at constant memory); clip: PPO eps or None; mc_batch: samples per
    forward pass; merge: each distinct mask once (mc_batch and merge change the
    gradient only by rounding); diagnostics: a dict, given off_policy_stats."""
    check_shapes(prompts, responses, masks, weights, advantages=advantages, old_terms=old_terms,
                 prompt_mask=prompt_mask)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    if not isinstance(mc_batch, int) or mc_batch < 1:
        raise ValueError(f"mc_batch must be an integer >= 1, got {mc_batch!r}")
    if old_terms is not None:
        old_terms = old_terms.detach()  # the old policy's terms are constants of the objective
    masks, weights, old_terms, counts = (merge_repeats(masks, weights, old_terms) if merge else
                                         (masks, weights, old_terms, torch.ones_like(weights)))
    advantages, seen = advantages.detach(), None if diagnostics is None else []
    backward = {"naive": naive_loss_backward, "two_pass": two_pass_loss_backward}.get(
        method, functools.partial(bgpo_loss_backward, method=method))  # bgpo, tangent, jensen
    loss = backward(model, prompts, responses, advantages, masks, weights, old_terms, counts,
                    mask_id, clip, prompt_mask, mc_batch, seen=seen)
    if seen:
        diagnostics.update(off_policy_stats(torch.cat(seen), old_terms, advantages, masks,
                                            weights, counts, method, clip))
    return loss

def off_policy_stats(terms, old_terms, advantages, masks, weights, counts, method="bgpo", clip=None):
    """How far an update is from the rollout's policy, from the l_j (n', B) its loss
    computed anyway: abs_d, the mean |d_j| per masked token; gap, the mean over
    responses of R - R_lb (BGPO's bound: >= 0, 0 on-policy); with clip, clipped: the
    share of ratios (per sample; naive, two_pass: per response) the clip changed."""
    old = (terms if old_terms is None else old_terms).double()  # float64: gap ~1e-16 on-policy
    terms, advantages, tokens = terms.double(), advantages.double(), weights * masks.sum(-1)
    used = counts * (tokens != 0)                                         # the empty mask: l_j = 0
    R = naive_objective(terms, old, advantages, counts=counts)            # (B,)
    R_lb = (counts * bgpo_sample_objective(terms, old, advantages, counts.sum(0))).sum(0)
    per_token = (terms - old).abs() / tokens.where(used > 0, 1.0)        # (n', B); w |S| per l_j
    stats = dict(abs_d=(used * per_token).sum() / used.sum(), gap=R - R_lb)
    if clip is not None and method in ("naive", "two_pass"):                # a ratio per response
        stats["clipped"] = (naive_objective(terms, old, advantages, clip, counts) != R).double()
    elif clip is not None:                                                    # a ratio per sample
        changed = (bgpo_sample_objective(terms, old, advantages, 1, clip, method)
                   != bgpo_sample_objective(terms, old, advantages, 1, None, method))
        stats["clipped"] = (counts * changed).sum() / counts.sum()
    return {key: float(v.mean()) for key, v in stats.items()}

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

    def __getitem__(self, rows):
        """The rollout of these responses only."""
        return Rollout(**{name: None if x is None else x[rows.to(x.device)]
                          for name, x in vars(self).items()})

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
# 5. The GRPO-style loop: rollout -> advantages -> masks (+ old terms) ->
#    updates -> log. One update per rollout is on-policy; with two, the second
#    is off-policy. Lines marked "torchrun" share the work over ranks.

def train(policy, cfg, out=None, resume_state=None):
    """The RL loop, fresh or resumed exactly from resume_state; returns the summary."""
    rank, size = real_dllm.world()                                    # torchrun; (0, 1) if not
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)               # prompts and masks
    sample_rng = torch.Generator(device=policy.device).manual_seed(cfg.seed + rank)  # rollouts
    trained = [p for p in policy.model.parameters() if p.requires_grad]  # LoRA: adapters only
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr)
    real_dllm.eval_mode(policy.model)  # no dropout: old and new policy must be the same network
    state = start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state)
    first = state["step"] + 1
    bar = tqdm(range(first, cfg.steps + 1), initial=state["step"], total=cfg.steps,
               dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        problems = problems.chunk(size)[rank]                         # torchrun: this rank's share
        start = real_dllm.clock(policy.device)
        batch = rollout(policy, problems, cfg, sample_rng)            # 1-2: responses, A
        record = dict(time_rollout=real_dllm.clock(policy.device) - start)
        loss, skipped, peak = rl_step(policy, optimizer, batch, cfg, data_rng,
                                      measure_memory=step == first, record=record)  # 3-5
        log_step(state, step, batch, loss, skipped, peak, policy, cfg, bar, record)
        if out:
            save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng)
    bar.close()
    return finish(policy, cfg, state, out)

def rl_step(policy, optimizer, batch, cfg, data_rng, measure_memory=True, record=None):
    """Steps 3-5: masks (and old terms, off-policy), then one update per mini-batch of whole
    groups. Returns (mean loss, updates skipped, peak activation bytes if measure_memory, else
    0); record, a dict, gets the loss's and updates' seconds and each update's off_policy_stats."""
    one_process, clock = real_dllm.world()[1] == 1, functools.partial(real_dllm.clock, policy.device)
    # torchrun: masks of this rank's own, from the state all ranks share; no merging, which
    # would give the ranks different numbers of (collective) forward passes
    mask_rng = data_rng if one_process else real_dllm.rank_generator(data_rng)
    start = clock()
    masks, weights, old_terms = masks_and_old_terms(
        policy, batch, cfg.samples, cfg.scheme, mask_rng, cfg.length_norm,
        old=cfg.updates_per_batch > 1, mc_batch=cfg.mc_batch)
    record = {} if record is None else record
    record.update(time_loss=clock() - start, time_update=0.0, updates=[])
    losses, skipped, peak = [], 0, 0
    for minibatch in torch.arange(len(batch.responses) // cfg.group).chunk(cfg.updates_per_batch):
        rows = (minibatch[:, None] * cfg.group + torch.arange(cfg.group)).flatten()  # its groups
        mini = batch[rows]
        optimizer.zero_grad(set_to_none=True)
        meter = real_dllm.activation_meter(policy.model) if measure_memory and one_process else None
        stats, start = {}, clock()
        with meter or contextlib.nullcontext():
            loss = policy_loss_backward(
                policy.model, mini.prompts, mini.responses, mini.advantages, masks[:, rows],
                weights[:, rows], None if old_terms is None else old_terms[:, rows],
                policy.mask_id, method=cfg.method, clip=cfg.clip, prompt_mask=mini.prompt_mask,
                mc_batch=cfg.mc_batch, merge=one_process, diagnostics=stats)
        peak, computed = max(peak, meter.peak_bytes if meter else 0), clock()
        if update(policy.model, optimizer, loss, cfg.max_grad_norm):
            losses.append(loss)
        else:
            skipped += 1
        record["time_loss"] += computed - start
        record["time_update"] += clock() - computed
        record["updates"].append(stats)
    return (sum(losses) / len(losses) if losses else math.nan), skipped, peak

def update(model, optimizer, loss, max_grad_norm=None):
    """Step 5 (clipping the gradient's norm); skipped (False) if not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if not real_dllm.all_finite(loss, grad_norm):  # torchrun: every rank skips, or none
        warnings.warn(f"non-finite loss ({loss}) or gradient: update skipped")
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True

def evaluate_policy(policy, cfg, n_failures=3):
    """Greedy test accuracy and a few failures (torchrun: over all ranks)."""
    test, size = policy.task.test, real_dllm.world()[1]
    share, batch_size = real_dllm.rank_share(test, 1000)  # torchrun: every W-th problem
    acc, failures = toy_dllm.evaluate(
        policy.model, policy.tokenizer, policy.task, share, policy.mask_id,
        policy.response_length, batch_size=batch_size, n_failures=n_failures,
        block_length=cfg.block_length, steps=cfg.sampler_steps)
    if size == 1:
        return acc, failures
    return real_dllm.global_mean(acc * len(share)) * size / len(test), failures

def start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state):
    """The loop's state: fresh (with the accuracy before RL), or as saved."""
    if resume_state is None:
        acc_before, failures = evaluate_policy(policy, cfg)
        say("\n".join(failures + [f"greedy test accuracy before RL: {acc_before:.1%}"]))
        return dict(step=0, acc_before=acc_before, seconds=0.0, peak_activation_bytes=0,
                    skipped_updates=0, metrics=[], device_type=policy.device.type,
                    world_size=real_dllm.world()[1], last_acc=acc_before, last_eval=None,
                    started=time.time())
    state = dict(resume_state)
    real_dllm.load_optimizer_state(policy.model, optimizer, state.pop("optimizer"))
    data_rng.set_state(state.pop("data_rng"))
    sample_rng.set_state(state.pop("sample_rng")[real_dllm.world()[0]])  # one per rank
    torch.set_rng_state(state.pop("torch_rng"))
    say(f"resumed at step {state['step']}")
    last_acc = next((m["acc"] for m in reversed(state["metrics"]) if "acc" in m),
                    state["acc_before"])
    return dict(state, last_acc=last_acc, last_eval=None, started=time.time() - state["seconds"])

def log_step(state, step, batch, loss, skipped, peak, policy, cfg, bar, more):
    """One metrics record (with rl_step's), the test accuracy every eval_every steps, its time."""
    state["peak_activation_bytes"] = max(state["peak_activation_bytes"], peak)
    state["skipped_updates"] += skipped
    record = dict(step=step, reward_mean=real_dllm.global_mean(batch.rewards.mean().item()),
                  loss=real_dllm.global_mean(loss), skipped_updates=skipped,
                  seconds=round(time.time() - state["started"], 3), **more)
    if step % cfg.eval_every == 0 or step == cfg.steps:
        start = real_dllm.clock(policy.device)
        state["last_eval"] = evaluate_policy(policy, cfg)  # (acc, failures)
        record["acc"] = state["last_acc"] = state["last_eval"][0]
        record["time_eval"] = real_dllm.clock(policy.device) - start
    state["metrics"].append(record)
    bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{state['last_acc']:.2f}")
    state.update(step=step, seconds=time.time() - state["started"])

def save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng):
    """metrics.jsonl after every step; a checkpoint every cfg.save_every steps."""
    if real_dllm.world()[0] == 0:
        toy_dllm.write_atomic(os.path.join(out, "metrics.jsonl"),
                              "".join(json.dumps(m) + "\n" for m in state["metrics"]))
    if cfg.save_every and state["step"] % cfg.save_every == 0:
        saved = {key: v for key, v in state.items() if key not in ("last_acc", "last_eval", "started")}
        save_checkpoint(out, policy, optimizer, dict(
            saved, data_rng=data_rng.get_state(), torch_rng=torch.get_rng_state(),
            sample_rng=real_dllm.all_ranks(sample_rng.get_state())))

def finish(policy, cfg, state, out):
    """Say the accuracy before and after; write the summary and the model."""
    acc_after, failures = state["last_eval"] or evaluate_policy(policy, cfg)
    seconds = time.time() - state["started"]
    say("\n".join(failures + [f"greedy test accuracy: {state['acc_before']:.1%} before RL -> "
                              f"{acc_after:.1%} after {cfg.steps} steps ({seconds:.0f}s)"]))
    rank, size = real_dllm.world()
    summary = dict(method=cfg.method, samples=cfg.samples, scheme=cfg.scheme, steps=cfg.steps,
                   seed=cfg.seed, acc_before=state["acc_before"], acc_after=acc_after,
                   seconds=round(seconds, 3), peak_activation_bytes=state["peak_activation_bytes"],
                   skipped_updates=state["skipped_updates"], world_size=size,
                   time_split={part: round(sum(m.get("time_" + part, 0) for m in state["metrics"]), 3)
                               for part in ("rollout", "loss", "update", "eval")})
    if size > 1:  # torchrun: the activation meter is off; each rank's peak memory instead
        summary["peak_rss_bytes_per_rank"] = real_dllm.peak_memory_per_rank()
    weights = real_dllm.full_state(policy.model)[0] if out else None  # torchrun: all gather
    if out and rank == 0:
        toy_dllm.save_dir_atomic(os.path.join(out, "model"),
                                 lambda tmp: save_model(policy, tmp, weights))
        toy_dllm.write_atomic(os.path.join(out, "summary.json"),
                              json.dumps(summary, indent=1) + "\n")
    return summary

def say(text):  # print, on rank 0 only under torchrun
    if real_dllm.world()[0] == 0:
        print(text)

# -----------------------------------------------------------------------------
# 6. Checkpoints: out/checkpoint-STEP holds the model, its tokenizer and
#    settings, and trainer_state.pt (step, metrics, optimizer, RNG states).

def save_model(policy, path, weights=None):
    """The model, tokenizer and what --model needs to use them (weights: if sharded)."""
    settings = dict(response_length=policy.response_length, mask_id=policy.mask_id,
                    shifted_logits=real_dllm.reads_shifted(policy.model))
    if real_dllm.has_lora(policy.model):  # peft saves the adapters only
        settings["lora_base"] = policy.lora_base
    real_dllm.save_model(path, policy.model, policy.tokenizer, settings, weights)

def save_checkpoint(out, policy, optimizer, state):
    """out/checkpoint-STEP, written whole or not at all; older ones are removed."""
    weights, optimizer_state = real_dllm.full_state(policy.model, optimizer)  # torchrun: gathered
    if real_dllm.world()[0] != 0:
        return

    def save(tmp):
        save_model(policy, tmp, weights)
        torch.save({**state, "optimizer": optimizer_state},
                   os.path.join(tmp, "trainer_state.pt"))

    toy_dllm.save_dir_atomic(os.path.join(out, f"checkpoint-{state['step']}"), save)
    for old in real_dllm.checkpoints(out)[:-1]:
        shutil.rmtree(old)

# -----------------------------------------------------------------------------
# 7. Measurements: memory, naive vs BGPO side by side, gradient quality, --explain
#    memory:     what grows with n_t is what autograd saves for backward
#                (activations), counted by a saved-tensor hook while held.
#    compare:    per n_t, each method's policy_loss_backward on the same work;
#                BGPO per K of --mc-batch, and merged, as trained.
#    grad-stats: per scheme and n_t, 8 mask draws: ELBO estimates against the
#                exact ELBO (2^L - 1 masks; L > 10: 8 x 256 stratified samples),
#                BGPO gradients against g*, 8 draws at n_t = 256 (docs/results.md).

def measure_loss_call(policy, batch, masks, weights, old_terms, method, clip=None, mc_batch=1,
                      merge=True):
    """real_dllm.measure() of one policy_loss_backward on a Rollout, from zero gradients."""
    policy.model.zero_grad(set_to_none=True)
    return real_dllm.measure(lambda: policy_loss_backward(
        policy.model, batch.prompts, batch.responses, batch.advantages, masks, weights,
        old_terms, policy.mask_id, method=method, clip=clip, prompt_mask=batch.prompt_mask,
        mc_batch=mc_batch, merge=merge), policy.model, policy.device)

def flat_grad(model):  # every parameter's .grad, as one vector
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

def fixed_batch(policy, cfg, both_signs=False, tries=100):
    """A seeded rollout of the first cfg.prompts train problems, or with
    both_signs of random ones, drawn until both signs of A appear."""
    data_rng = torch.Generator().manual_seed(cfg.seed)
    sample_rng = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    if not both_signs:
        return rollout(policy, policy.task.train[:cfg.prompts], cfg, sample_rng)
    for _ in range(tries):
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        batch = rollout(policy, problems, cfg, sample_rng)
        if (batch.advantages > 0).any() and (batch.advantages < 0).any():
            return batch
    print(f"(no batch of the first {tries} had advantages of both signs: one lemma only)")
    return batch

def perturb_weights(model, scale, seed):
    """Move each parameter by scale * its std * N(0, 1): an off-policy model."""
    noise_rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=noise_rng).to(p))

def compare(policy, cfg, sample_counts, repeats=2):
    """Rows of method x n_t (see the banner); cfg.perturb moves the model off-policy."""
    model, batch = policy.model, fixed_batch(policy, cfg)
    rng = torch.Generator().manual_seed(cfg.seed)
    original = {name: t.clone() for name, t in model.state_dict().items()} if cfg.perturb else None
    rows = []
    for n in sample_counts:
        masks, weights, old_terms = masks_and_old_terms(policy, batch, n, cfg.scheme, rng,
                                                        cfg.length_norm)
        if cfg.perturb:
            perturb_weights(model, cfg.perturb, cfg.seed)
        Ks = sorted({min(K, n) for K in cfg.mc_batches})  # BGPO's samples per forward pass
        calls = [("naive", 1, False), ("two_pass", 1, False)] + [("bgpo", K, False) for K in Ks]
        for method, K, merge in calls + [("bgpo", Ks[0], True)] + [(m, 1, False) for m in METHODS[3:]]:
            call = functools.partial(measure_loss_call, policy, batch, masks, weights,
                                     old_terms, method, cfg.clip, K, merge)
            runs = [call() for _ in range(repeats)]  # the fastest; the memory is the same
            grad = flat_grad(model)
            if method == "naive":
                reference, naive_seconds = grad, min(r[2] for r in runs)
            row = dict(method=method, samples=n, mc_batch=K, merged=merge, objective=-runs[0][0],
                       grad_max_abs_diff=(grad - reference).abs().max().item(),
                       peak_activation_bytes=runs[0][1], seconds=min(r[2] for r in runs),
                       time_vs_naive=min(r[2] for r in runs) / naive_seconds,
                       cuda_peak_bytes=runs[0][3])
            if cfg.gradient_checkpointing:  # the same call with each layer checkpointed
                real_dllm.set_checkpointing(model, True)
                _, row["checkpointed_activation_bytes"], _, row["checkpointed_cuda_peak_bytes"] = call()
                real_dllm.set_checkpointing(model, False)
            rows.append(row)
        if cfg.perturb:
            model.load_state_dict(original)
    model.zero_grad(set_to_none=True)
    return rows

def bgpo_gradient(policy, batch, masks, weights, old_terms):
    measure_loss_call(policy, batch, masks, weights, old_terms, "bgpo")
    grad = flat_grad(policy.model)
    policy.model.zero_grad(set_to_none=True)
    return grad

def grad_stats(policy, cfg, sample_counts, draws=8, golden_samples=256):
    """Rows of scheme x n_t (the banner). A draw's masks for n_t are every
    (max/n_t)-th of one draw at the largest n_t: the rows differ by n_t, not by luck."""
    batch = fixed_batch(policy, cfg)
    if not batch.advantages.any():
        raise ValueError("every group of the fixed batch has equal rewards: no gradient to study")
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=draws * (1 + len(SCHEMES)), desc="draws", dynamic_ncols=True, leave=False)

    def measured(scheme, counts):  # n_t -> BGPO gradients, ELBO estimates, masks computed
        got = {n: [] for n in counts}  # each count once, even if listed twice
        for _ in range(draws):
            shared = masks_and_old_terms(policy, batch, max(counts), scheme, rng, cfg.length_norm)
            for n in got:  # a sub-grid of the shared draw, or a draw of its own
                masks, weights, old_terms = ((x[::max(counts) // n] for x in shared)
                                             if max(counts) % n == 0 else masks_and_old_terms(
                                                 policy, batch, n, scheme, rng, cfg.length_norm))
                _, merged, _, slots = merge_repeats(masks, weights)           # old_terms: the l_j
                got[n].append((bgpo_gradient(policy, batch, masks, weights, old_terms),
                               old_terms.mean(0), ((slots > 0) & (merged > 0)).sum(0).float()))
            bar.update()
        return {n: [torch.stack(x) for x in zip(*got[n])] for n in got}  # (draws, P), (draws, B) x 2

    golden_draws, estimates, _ = measured("stratified", [golden_samples])[golden_samples]
    golden = golden_draws.mean(0)
    golden_var = (golden_draws - golden).pow(2).sum() / (draws - 1) / draws   # of the mean
    exact = batch.responses.shape[1] <= 10  # else the golden draws' samples
    reference = exact_elbo(policy, batch, cfg.length_norm) if exact else estimates.mean(0)
    reference_var = 0.0 if exact else estimates.var(0) / draws                  # (B,)
    rows = []
    for scheme in SCHEMES:
        counts = [n for n in sample_counts if scheme != "complementary" or n % 2 == 0]
        for n, (g, elbo, masks) in (measured(scheme, counts) if counts else {}).items():
            var = (g - g.mean(0)).pow(2).sum() / (draws - 1)                # of one draw
            rows.append(dict(scheme=scheme, samples=n, masks=masks.mean().item(),
                elbo_bias=(elbo.mean(0) - reference).pow(2).mean().sqrt().item(),
                elbo_std=elbo.var(0).mean().sqrt().item(),
                elbo_floor=(elbo.var(0) / draws + reference_var).mean().sqrt().item(),
                elbo_reference="exact" if exact else "stratified",
                rel_std=(var.sqrt() / golden.norm()).item(),
                rel_bias=((g.mean(0) - golden).norm() / golden.norm()).item(),
                bias_floor=((var / draws + golden_var).sqrt() / golden.norm()).item(),
                rel_error=((g - golden).norm(dim=1).mean() / golden.norm()).item()))
    bar.close()
    return rows

def exact_elbo(policy, batch, length_norm=False):
    """The ELBO of each response, Float (B,), by enumeration: the sum over all
    2^L - 1 masks S of l(S) / (L C(L, |S|)), l with the stratified weight L/|S|."""
    B, L = batch.responses.shape
    subsets = torch.tensor(list(itertools.product([False, True], repeat=L))[1:])  # (S, L)
    sizes = subsets.sum(-1)                                                     # (S,)
    weights = (L / sizes / (L if length_norm else 1)).float()[:, None].expand(-1, B)
    dev = batch.responses.device
    with torch.no_grad():
        terms = elbo_terms(policy.model, batch.prompts, batch.responses,
                           subsets[:, None].expand(-1, B, -1).to(dev), weights.to(dev),
                           policy.mask_id, batch.prompt_mask, mc_batch=64)         # (S, B)
    chance = torch.tensor([L * math.comb(L, s) for s in sizes.tolist()], device=dev)
    return (terms / chance[:, None]).sum(0)

def explain(policy, cfg):
    """One BGPO step on a small batch, every number printed; weights unchanged."""
    model, batch = policy.model, fixed_batch(policy, cfg, both_signs=True)
    n, A = cfg.samples, batch.advantages
    print(f"One BGPO step: {cfg.prompts} prompts x G = {cfg.group} responses, n_t = {n}, "
          f"scheme {cfg.scheme}; '_' is [MASK], '.' the end token\n")
    print("1-2. rollout; reward r (exact match); advantage A = (r - mean r) / std r per group")
    truths = policy.task.answers(batch.problems)

    def show(i, mask=None):  # '37+48=0_5'
        return toy_dllm.show_tokens(policy.tokenizer, batch.prompts[i], batch.responses[i], mask)

    for i in range(len(A)):
        print(f"  y{i + 1:<2} {show(i)}   (truth {truths[i]})"
              f"   r = {batch.rewards[i]:.0f}   A = {A[i]:+.3f}")
    masks, weights, old_terms = masks_and_old_terms(
        policy, batch, n, cfg.scheme, torch.Generator().manual_seed(cfg.seed), cfg.length_norm)
    rule = {"stratified": "L/l", "one_step": "1"}.get(cfg.scheme, "(L+1)/l") + " / L" * cfg.length_norm
    print(f"\n3. n_t = {n} masks per response, weight w = {rule} for l of L tokens masked; the "
          "old policy's l_old_j = w sum_i 1[masked] log p_old(y^i | y_t, x), without gradient")
    print("\n4. for j = 1..n_t: l_j (with a graph), d_j = l_j - l_old_j, g_j; "
          "L_j = -(1/B) sum_i g_ij; L_j.backward() frees sample j's graph")
    model.zero_grad(set_to_none=True)
    for j in range(n):
        term = elbo_term(model, batch.prompts, batch.responses, masks[j], weights[j],
                         policy.mask_id, batch.prompt_mask)                   # (B,), a graph
        g = bgpo_sample_objective(term, old_terms[j], A, n, cfg.clip)        # (B,)
        for i in range(len(A)):
            print(f"  j={j + 1} y{i + 1:<2} {show(i, masks[j, i])}"
                  f"  masked={int(masks[j, i].sum())} w={weights[j, i]:.3f}"
                  f"  l_old={old_terms[j, i]:+.4f}  l={term[i].item():+.4f}"
                  f"  d={term[i].item() - old_terms[j, i]:+.1e}  g={g[i].item():+.4f}  "
                  + ("tangent A(1+d)/n_t" if A[i] >= 0 else "Jensen  A e^d/n_t"))
        loss_j = -g.mean()
        loss_j.backward()
        print(f"  L_{j + 1} = {loss_j.item():+.6f}: backwarded; sample {j + 1}'s graph is freed\n")
    print("5. one optimizer step would follow; --explain leaves the weights as they are\n")
    explain_checks(policy, cfg, batch, masks, weights, old_terms)

def explain_checks(policy, cfg, batch, masks, weights, old_terms):
    """On --explain's batch: equal gradients, R_lb <= R off-policy, memory."""
    model, n, A = policy.model, len(masks), batch.advantages
    bgpo_grad = flat_grad(model).clone()  # what step 4 accumulated
    measure_loss_call(policy, batch, masks, weights, old_terms, "naive", cfg.clip)
    naive_grad = flat_grad(model)
    print(f"check, on-policy: max |grad BGPO - grad naive| = "
          f"{(bgpo_grad - naive_grad).abs().max():.2e}, largest |grad naive| = "
          f"{naive_grad.abs().max():.2e}")
    scale = cfg.perturb or 0.05
    original = {name: t.clone() for name, t in model.state_dict().items()}
    perturb_weights(model, scale, cfg.seed)
    with torch.no_grad():
        terms = elbo_terms(model, batch.prompts, batch.responses, masks, weights,
                           policy.mask_id, batch.prompt_mask)                 # (n_t, B)
        R = naive_objective(terms, old_terms, A, cfg.clip)                    # (B,)
        R_lb = bgpo_sample_objective(terms, old_terms, A, n, cfg.clip).sum(0)  # (B,)
    model.load_state_dict(original)
    print(f"check, off-policy (weights moved by {scale} parameter stds): "
          "R_lb = sum_j g_j <= R = exp(mean_j d_j) A for every response")
    for i in range(len(A)):
        print(f"  y{i + 1:<2} A = {A[i]:+.3f}   R_lb = {R_lb[i]:+.6f} <= R = {R[i]:+.6f}   "
              f"{'holds' if R_lb[i] <= R[i] else 'FAILS'}")
    print("activation memory held for backward by one policy_loss_backward call on this batch")
    for method in ("bgpo", "naive", "two_pass"):
        nbytes = measure_loss_call(policy, batch, masks, weights, old_terms, method, cfg.clip)[1]
        print(f"  {method:<8} {nbytes / 2**20:8.3f} MB")
    model.zero_grad(set_to_none=True)

def format_table(rows):
    """Rows of dicts -> an aligned text table of the columns below that the rows have."""
    three, megabytes = "{:.3f}".format, lambda v: f"{v / 2**20:.2f}"
    columns = dict(  # key: (head, format)
        method=("method", str), scheme=("scheme", str), samples=("n_t", str), mc_batch=("K", str),
        merged=("merged", lambda v: "yes" if v else "no"), objective=("objective", "{:+.6f}".format),
        grad_max_abs_diff=("max|grad-naive|", "{:.1e}".format),
        peak_activation_bytes=("act. MB", megabytes), seconds=("ms/call", lambda v: f"{1000 * v:.0f}"),
        time_vs_naive=("time/naive", "{:.2f}".format), cuda_peak_bytes=("CUDA peak MB", megabytes),
        checkpointed_activation_bytes=("act. MB ckpt", megabytes),
        checkpointed_cuda_peak_bytes=("CUDA peak MB ckpt", megabytes), masks=("masks", three),
        elbo_bias=("ELBO bias", three), elbo_std=("ELBO std", three), elbo_floor=("ELBO floor", three),
        rel_std=("rel. std", three), rel_bias=("rel. bias", three), bias_floor=("bias floor", three),
        rel_error=("rel. error", three))
    shown = [key for key in columns if rows[0].get(key) is not None]
    table = [[columns[k][0] for k in shown]] + [[columns[k][1](r[k]) for k in shown] for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(shown))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in table)

# -----------------------------------------------------------------------------
# 8. Command line: Config, then what main calls in order. A check raises
#    ValueError; main says it in one line, exit status 2.

def flag(default, help, **keywords):
    """A Config field and its flag: help, bounds low / high / above, choices,
    metavar, list=True (--samples 1,4,16)."""
    return dataclasses.field(default=default, metadata=dict(keywords, help=help))

@dataclass(frozen=True)
class Config:
    """Every setting, its default and its flag's help; built once, never changed."""
    # what to do: train, unless one of these is given
    compare: bool = flag(False, "table: naive vs two_pass vs bgpo per n_t, memory and time")
    grad_stats: bool = flag(False, "table per scheme and n_t: the ELBO's and gradient's bias, std")
    explain: bool = flag(False, "one BGPO step on a small batch, every number printed")
    # the objective and its Monte-Carlo estimate
    method: str = flag("bgpo", "objective for training", choices=METHODS)
    samples: int = flag(16, "n_t, samples per response (--compare: a list)", low=1, list=True)
    sample_counts: tuple = (16,)  # all of --samples 1,4,16
    mc_batch: int = flag(1, "K, samples per forward pass (--compare: a list)", low=1, list=True)
    mc_batches: tuple = (1,)  # all of --mc-batch 1,4,16
    scheme: str = flag("stratified", "how masks are drawn", choices=SCHEMES)
    clip: float = flag(None, "PPO clipping epsilon of the ratio (the paper: none)", above=0, high=1)
    length_norm: bool = flag(False, "divide each ELBO term by the response length")
    # the GRPO loop
    steps: int = flag(275, "RL steps", low=1)
    prompts: int = flag(16, "prompts per step", low=1)
    group: int = flag(8, "G, responses per prompt", low=2)
    lr: float = flag(1e-4, "AdamW learning rate", above=0)
    max_grad_norm: float = flag(None, "clip the gradient's norm to this", above=0)
    updates_per_batch: int = flag(1, "updates per rollout on disjoint groups (1: on-policy)", low=1)
    seed: int = flag(0, "seed of prompts, responses and masks", low=0)
    device: str = flag("auto", "where to run", choices=("auto", "cpu", "cuda"))
    # the sampler
    temperature: float = flag(0.6, "rollout temperature (evaluation is greedy)", low=0)
    sampler_steps: int = flag(None, "denoising steps per response (default: L)", low=1)
    block_length: int = flag(None, "sampler block length (default: L)", low=1)
    # evaluation, measurements, output
    eval_every: int = flag(25, "steps between test evaluations", low=1)
    perturb: float = flag(0.0, "--compare, --explain: move weights by this many stds", low=0)
    json: bool = flag(False, "print --compare, --grad-stats rows as JSON")
    out: str = flag(None, "write metrics.jsonl, summary.json and the model here", metavar="DIR")
    save_every: int = flag(None, "checkpoint every N steps under --out", low=1)
    resume: str = flag(None, "continue the run saved in DIR (its --out)", metavar="DIR")
    # the model and the task
    model: str = flag(None, "a transformers masked LM (default: the toy)", metavar="PATH")
    trust_remote_code: bool = flag(False, "let the checkpoint's own code run (LLaDA, Dream)")
    mask_id: int = flag(None, "[MASK] id, if the tokenizer names none", low=0)
    shifted_logits: str = flag("auto", "read token i at i-1 (Dream)", choices=("auto", "yes", "no"))
    response_length: int = flag(None, "L: the answer, then end tokens (default: the answer)", low=1)
    digits: int = flag(2, "operand digits of the task", low=2, high=9)
    test_size: int = flag(1000, "test problems", low=1)
    # memory levers for a real diffusion LM (real_dllm.py)
    lora_rank: int = flag(None, "train LoRA adapters of this rank, not the weights", low=1)
    lora_alpha: float = flag(None, "LoRA updates scaled by alpha / rank (default: rank)", above=0)
    lora_targets: str = flag(None, "modules given adapters (default: linear layers but the head)",
                             metavar="NAMES")
    gradient_checkpointing: bool = flag(False, "recompute layers' activations in backward")
    activation_budget: float = flag(None, "stop if a loss call needs more activation MB", above=0)

MODES = ("compare", "grad_stats", "explain")  # at most one; none: train
RESUMABLE = ("steps", "device", "save_every", "trust_remote_code", "mc_batch", "mc_batches")
EXPLAIN = dict(prompts=2, group=4, samples=2, sample_counts=(2,))  # --explain's batch, unless given
NOT_TYPED = object()  # parse_args: the value of a flag that was not typed

class Parser(argparse.ArgumentParser):
    """argparse, errors on one line (under torchrun, from rank 0 only)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if os.environ.get("RANK", "0") == "0"
                  else None)

def number(kind, low=None, high=None, above=None):
    """An argparse type: a finite number of this kind, >= low (> above), <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        lowest = f">= {low}" if low is not None else f"> {above}"
        if not math.isfinite(value) or (low is not None and value < low) or (
                above is not None and value <= above) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text} must be {lowest}" + (f" and <= {high}" if high is not None else ""))
        return value
    return parse

class FirstAndList(argparse.Action):
    """--samples 1,4,16: samples the first, sample_counts all (--mc-batch too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0])
        setattr(namespace, {"samples": "sample_counts", "mc_batch": "mc_batches"}[self.dest],
                tuple(values))

def build_parser():
    p = Parser(prog="bgpo.py", description="BGPO on a tiny diffusion LM (or a real one).")
    modes = p.add_mutually_exclusive_group()
    for f in (f for f in dataclasses.fields(Config) if f.metadata):
        keywords = dict(f.metadata)
        bounds = {key: keywords.pop(key) for key in ("low", "high", "above") if key in keywords}
        if f.default not in (None, False):
            keywords["help"] += f" (default: {f.default})"
        if f.type is bool:
            keywords["action"] = "store_true"
        elif keywords.pop("list", False):
            keywords.update(type=lambda text, each=number(int, **bounds): [
                each(part) for part in text.split(",")], action=FirstAndList, metavar="N[,N...]")
        elif f.type in (int, float):
            keywords.update(type=number(f.type, **bounds), metavar="N" if f.type is int else "X")
        (modes if f.name in MODES else p).add_argument("--" + f.name.replace("_", "-"),
                                                       **keywords)
    p.set_defaults(**dataclasses.asdict(Config()))
    return p

def parse_args(parser, argv):
    """(Config, checkpoint or None): the flags over --explain's batch or the
    --resume run's settings, checked against each other."""
    args = vars(parser.parse_args(argv))
    given = {name: v for name, v in vars(parser.parse_args(argv, argparse.Namespace(
        **{name: NOT_TYPED for name in args}))).items() if v is not NOT_TYPED}  # typed
    checkpoint = None
    if args["explain"]:
        args.update({name: v for name, v in EXPLAIN.items() if name not in given})
    if args["resume"]:
        run, checkpoint = read_run(args["resume"], given)
        changed = sorted(name for name in set(given) - {"resume", "out", *RESUMABLE}
                         if json.loads(json.dumps(given[name])) != run.get(name))
        if changed:
            raise ValueError("--resume continues a run as it was set up; "
                             f"cannot change --{changed[0].replace('_', '-')}")
        # consent to run shipped code comes from this command line only
        args.update({**run, "trust_remote_code": False, **given, "out": args["resume"]})
    cfg = Config(**{**args, "sample_counts": tuple(args["sample_counts"]),
                    "mc_batches": tuple(args["mc_batches"])})
    check_flags(cfg)
    return cfg, checkpoint

def read_run(out, given):
    try:
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        run = None
    found = real_dllm.checkpoints(out)
    if not found or not isinstance(run, dict) or not {"samples", "method", "steps", "seed"} <= set(run):
        raise ValueError(f"--resume {out}: no run of this program with a checkpoint there")
    if run.get("trust_remote_code") and "trust_remote_code" not in given:
        raise ValueError(f"--resume {out}: its model ships code of its own; "
                         "add --trust-remote-code to allow it to run")
    known = {f.name for f in dataclasses.fields(Config)}
    return {name: v for name, v in run.items() if name in known}, found[-1]

def check_flags(cfg):
    """Flags that are each fine but do not go together."""
    training = not (cfg.compare or cfg.grad_stats)
    if training and (len(cfg.sample_counts) > 1 or len(cfg.mc_batches) > 1):
        raise ValueError("--samples and --mc-batch take one number when training "
                         "(lists are for --compare / --grad-stats)")
    if cfg.scheme == "complementary" and any(n % 2 for n in cfg.sample_counts) and not cfg.grad_stats:
        raise ValueError("--scheme complementary draws masks in pairs: --samples must be even")
    if training and cfg.prompts % cfg.updates_per_batch:
        raise ValueError(f"--updates-per-batch {cfg.updates_per_batch} must divide "
                         f"--prompts {cfg.prompts}")
    if training and cfg.save_every and not cfg.out:
        raise ValueError("--save-every needs --out")
    if cfg.lora_rank is None and (cfg.lora_alpha is not None or cfg.lora_targets):
        raise ValueError("--lora-alpha and --lora-targets need --lora-rank")
    size = real_dllm.torchrun_processes()
    if size > 1 and (cfg.compare or cfg.grad_stats or cfg.explain or cfg.lora_rank
                     or cfg.activation_budget):
        raise ValueError("--compare, --grad-stats, --explain, --lora-rank and "
                         "--activation-budget run in one process, not under torchrun")
    if size > 1 and cfg.prompts % (size * cfg.updates_per_batch):
        raise ValueError(f"--prompts {cfg.prompts} must divide into {size} processes "
                         f"x {cfg.updates_per_batch} updates per batch")

@contextlib.contextmanager
def blame(source):
    """A ValueError inside is said as 'source: message'."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{source}: {real_dllm.first_line(e)}") from e

def load_policy(cfg, device, checkpoint=None):
    """The toy, or the model of --model / --resume, checked against the task."""
    path = checkpoint or cfg.model
    saved = real_dllm.saved_settings(path) if path else {}
    task = toy_dllm.make_task(cfg.digits, cfg.test_size)
    source = f"--resume {cfg.resume}" if checkpoint else f"--model {path}"
    with blame(source) if path else contextlib.nullcontext():
        model, tokenizer = load_model(cfg, path, saved)
        mask_id = next((m for m in (cfg.mask_id, saved.get("mask_id"), tokenizer.mask_token_id)
                        if m is not None), None)
        if mask_id is None:
            raise ValueError("the tokenizer names no mask token; give --mask-id")
        prompts, padded = toy_dllm.encode_padded_prompts(tokenizer, task.prompts(task.test))
    longest = max(len(ids) for ids in tokenizer(task.answers(task.test),
                                                add_special_tokens=False)["input_ids"])
    length = (cfg.response_length or saved.get("response_length")
              or (task.answer_length if path is None else longest + 1))
    if length < longest:
        raise ValueError(f"--response-length {length} is shorter than the longest answer "
                         f"({longest} tokens)")
    real_dllm.check_fits(model, tokenizer, mask_id, prompts.shape[1] + length, padded is not None)
    model = model.to(device).eval()
    here = os.path.abspath(path) if path and os.path.exists(path) else path
    lora_base = saved.get("lora_base", here)  # what LoRA adapters adapt (None: the toy)
    if cfg.lora_rank:
        with blame(f"--lora-rank {cfg.lora_rank}"
                   + (f" --lora-targets {cfg.lora_targets}" if cfg.lora_targets else "")):
            model = real_dllm.add_lora(model, cfg.lora_rank, cfg.lora_alpha,
                                       cfg.lora_targets and cfg.lora_targets.split(","), cfg.seed)
    if cfg.gradient_checkpointing:
        with blame("--gradient-checkpointing"):  # a model that refuses it
            real_dllm.set_checkpointing(model, True)
        if cfg.compare:  # which measures with it and without
            real_dllm.set_checkpointing(model, False)
    return Policy(model, tokenizer, task, mask_id, length, device, lora_base)

def load_model(cfg, path, saved):
    """(model, tokenizer) of path (None: the toy); LoRA adapters on their base."""
    if path is None:
        with real_dllm.rank_zero_first():  # torchrun: rank 0 trains the warm start, the rest load it
            return toy_dllm.warm_start(n_digits=cfg.digits, n_test=cfg.test_size,
                                       response_length=cfg.response_length)[:2]
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        base = saved.get("lora_base")
        with blame(f"its base model {base}"):
            model, tokenizer = load_model(cfg, base, real_dllm.saved_settings(base) if base else {})
        return real_dllm.load_lora(model, path), tokenizer
    shifted = {"yes": True, "no": False}.get(cfg.shifted_logits, saved.get("shifted_logits", "auto"))
    return load_checkpoint(path, cfg.trust_remote_code, shifted)

def check_activation_budget(policy, cfg):
    """--activation-budget: one loss call as the run makes it, measured as
    --compare does; over budget, an error naming the largest n_t that fits."""
    batch, need = fixed_batch(policy, cfg), {}  # MB of activations at each n_t tried

    def fits(n):
        masks, weights, old_terms = masks_and_old_terms(
            policy, batch, n, cfg.scheme, torch.Generator().manual_seed(cfg.seed), cfg.length_norm)
        need[n] = measure_loss_call(policy, batch, masks, weights, old_terms, cfg.method,
                                    cfg.clip, cfg.mc_batch)[1] / 2**20
        policy.model.zero_grad(set_to_none=True)
        return need[n] <= cfg.activation_budget

    if fits(cfg.samples):
        return
    most, too_many = 0, cfg.samples  # bisection: the largest n_t that fits is in [most, too_many)
    while too_many - most > 1:
        n = (most + too_many) // 2
        most, too_many = (n, too_many) if fits(n) else (most, n)
    with_k = f" with --mc-batch {cfg.mc_batch}" if cfg.mc_batch > 1 else ""
    raise ValueError(f"--activation-budget {cfg.activation_budget:g} MB: {cfg.method} at n_t = "
                     f"{cfg.samples}{with_k} needs {need[cfg.samples]:.1f} MB of activations; "
                     + (f"the largest n_t that fits is {most}" if most else "not even n_t = 1 fits"))

def prepare_out(cfg, policy, resuming):
    """--out: a writable directory with no other run in it; run.json there."""
    if not resuming and os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):
        raise ValueError(f"--out {cfg.out} already holds a run; use --resume {cfg.out} or "
                         "another --out")
    run = dict(dataclasses.asdict(cfg), response_length=policy.response_length)
    try:
        os.makedirs(cfg.out, exist_ok=True)
        if real_dllm.world()[0] == 0:
            toy_dllm.write_atomic(os.path.join(cfg.out, "run.json"),
                                  json.dumps(run, indent=1) + "\n")
    except OSError as e:
        raise ValueError(f"--out {cfg.out}: cannot write there ({e.strerror or e})") from e

def main(argv=None):
    parser = build_parser()
    try:
        cfg, checkpoint = parse_args(parser, argv)
        device, joined = real_dllm.start(cfg.device)  # torchrun: this rank's, in the group
        policy = load_policy(cfg, device, checkpoint)
        with blame(f"--block-length {cfg.block_length}, --sampler-steps {cfg.sampler_steps}"):
            toy_dllm.sampler_blocks(policy.response_length, cfg.block_length, cfg.sampler_steps)
        if real_dllm.world()[1] > 1:
            real_dllm.shard(policy.model)
        if cfg.compare or cfg.grad_stats:
            rows = (compare if cfg.compare else grad_stats)(policy, cfg, cfg.sample_counts)
            print(json.dumps(rows, indent=1) if cfg.json else format_table(rows))
            return 0
        if cfg.explain:
            explain(policy, cfg)
            return 0
        if cfg.activation_budget:
            check_activation_budget(policy, cfg)
        with blame(f"--resume {cfg.resume}"):
            resume_state = real_dllm.load_trainer_state(checkpoint, device) if checkpoint else None
        if cfg.out:  # only now, with every check passed, is anything written
            prepare_out(cfg, policy, resuming=checkpoint is not None)
    except ValueError as e:
        parser.error(real_dllm.first_line(e))
    say(f"BGPO ({cfg.method}, n_t={cfg.samples}) on {cfg.model or 'the toy diffusion LM'}, "
        f"{cfg.steps} steps of {cfg.prompts}x{cfg.group} responses, device {device}"
        + (f", {real_dllm.world()[1]} processes" if real_dllm.world()[1] > 1 else ""))
    try:
        train(policy, cfg, out=cfg.out, resume_state=resume_state)
    except KeyboardInterrupt:
        found = real_dllm.checkpoints(cfg.out) if cfg.out else []
        hint = (f"continue with --resume {cfg.out} (from {os.path.basename(found[-1])})"
                if found else "no checkpoint to resume from (see --save-every)")
        print(f"\nbgpo.py: interrupted; {hint}", file=sys.stderr)
        return 130
    if joined:
        real_dllm.stop()
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
