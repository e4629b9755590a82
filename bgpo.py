"""BGPO: Boundary-Guided Policy Optimization for diffusion LMs, in one file.

RL needs log pi(y|x); a masked-diffusion LM gives a lower bound, the ELBO,
estimated from n_t masked copies of y. The ELBO-ratio objective is not
linear in those samples, so all n_t graphs are kept until backward. BGPO's
lower bound is linear in them: each is backwarded and freed on its own.

One RL step, in the paper's symbols (arXiv 2510.11683); step k is section k:

  1. rollout: for each prompt x, G responses y_i from the diffusion sampler
  2. advantages: reward r_i, A_i = (r_i - mean r) / std r within the group
  3. masks: n_t masks of each y_i; off-policy, the old policy's ELBO terms
       l_old_j = w_j * sum_pos 1[y_t^pos = M] log p_old(y^pos | y_t, x)
  4. for j = 1 .. n_t:
       d_j = l_j - l_old_j            (current policy, same mask)
       g_j = A (1 + d_j) / n_t        if A >= 0
             A exp(d_j) / n_t         if A <  0
       loss_j = -(1/B) sum_i g_ij ; loss_j.backward() ; sample j's graph is freed
  5. update: one optimizer step

The naive objective exp(mean_j d_j) * A needs every sample's graph at once;
sum_j g_j is below it, equal in value and gradient on-policy (all d_j = 0).

Read top-down: `train` (the loop) first, then each function before the ones
it calls, in the order one step runs them. The algorithm ends with section 5;
after it come what step 4 can be swapped for (6), the loop's bookkeeping (7),
the measurements (8) and the command line (9): none is needed to follow a step.
"""

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import real_dllm
import runs
import toy_dllm
from real_dllm import load_checkpoint  # noqa: F401 (public here too: (model, tokenizer))
from runs import METHODS, SCHEMES, Config, build_parser, parse_args  # noqa: F401 (public here too)

# -----------------------------------------------------------------------------
# The loop: steps 1-5, cfg.steps times. Lines marked "torchrun" share the work
# over processes; one process skips them. With updates_per_batch = 1 the update
# is on-policy; with more, every update after the first is off-policy.

def train(policy, cfg, out=None, resume_state=None):
    """The RL loop, fresh or resumed exactly from resume_state; returns the summary."""
    rank, size = real_dllm.world()                                    # torchrun; (0, 1) if not
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)               # prompts and masks
    sample_rng = torch.Generator(device=policy.device).manual_seed(cfg.seed + rank)  # rollouts
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad],
                                  lr=cfg.lr)                         # LoRA: the adapters only
    real_dllm.eval_mode(policy.model)  # no dropout: old and new policy must be the same network
    state = runs.start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state)
    first, clock = state["step"] + 1, functools.partial(real_dllm.clock, policy.device)
    bar = tqdm(range(first, cfg.steps + 1), initial=first - 1, total=cfg.steps,
               dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        problems = problems.chunk(size)[rank]                        # torchrun: this rank's share
        mask_rng = real_dllm.rank_generator(data_rng) if size > 1 else data_rng  # torchrun: its own
        times = [clock()]                                             # stamps: the time split
        batch = rollout(policy, problems, cfg, sample_rng)            # 1-2: responses, rewards, A
        times.append(clock())
        masks, weights, old_terms = masks_and_old_terms(              # 3: l_old_j if off-policy
            policy, batch, cfg.samples, cfg.scheme, mask_rng, cfg.length_norm,
            old=cfg.updates_per_batch > 1, mc_batch=cfg.mc_batch)
        times.append(clock())
        updates = []
        for groups in torch.arange(len(problems)).chunk(cfg.updates_per_batch):
            rows = (groups[:, None] * cfg.group + torch.arange(cfg.group)).flatten()  # responses
            part = batch if cfg.updates_per_batch == 1 else batch[rows]
            diagnostics = None if old_terms is None else {}  # off-policy: how far from rollout's
            meter = real_dllm.activation_meter(policy.model) if step == first and size == 1 else None
            optimizer.zero_grad(set_to_none=True)
            with meter or contextlib.nullcontext():                   # memory, on the first step
                loss = policy_loss_backward(                          # 4: one backward per sample
                    policy.model, part.prompts, part.responses, part.advantages, masks[:, rows],
                    weights[:, rows], None if old_terms is None else old_terms[:, rows],
                    policy.mask_id, cfg.method, cfg.clip, part.prompt_mask, cfg.mc_batch,
                    merge=size == 1, diagnostics=diagnostics)
            times.append(clock())
            done = update(policy.model, optimizer, loss, cfg.max_grad_norm, size)  # 5
            times.append(clock())
            updates.append((loss, done, diagnostics, meter))
        log_step(state, step, batch, updates, times, policy, cfg, bar)
        if out:
            runs.save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng)
    bar.close()
    return runs.finish(policy, cfg, state, out)

# -----------------------------------------------------------------------------
# 1. Rollout: G responses per prompt, from the diffusion sampler at the rollout
#    temperature, and their rewards (2. advantages: section 2, called here)

@dataclass
class Policy:
    """The model being trained and what it needs to talk about the task."""
    model: torch.nn.Module
    tokenizer: object
    task: toy_dllm.Task  # its problems, prompts, answers and reward
    mask_id: int
    response_length: int
    device: torch.device
    lora_base: str = None  # with LoRA adapters: the checkpoint they adapt (None: the toy)

@dataclass
class Rollout:
    problems: torch.Tensor     # (B, k) the task's problems, each repeated G times
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
    """Steps 1-2: cfg.group responses per problem, their rewards and advantages."""
    problems = problems.repeat_interleave(cfg.group, dim=0)                   # (B, k)
    prompts, prompt_mask = toy_dllm.encode_padded_prompts(
        policy.tokenizer, policy.task.prompts(problems), policy.device)      # (B, Lp) each
    responses = toy_dllm.generate(
        policy.model, prompts, policy.mask_id, policy.response_length,
        block_length=cfg.block_length, steps=cfg.sampler_steps,
        temperature=cfg.temperature, generator=generator, prompt_mask=prompt_mask)  # (B, L)
    rewards = policy.task.rewards(problems, toy_dllm.decode_responses(policy.tokenizer, responses))
    return Rollout(problems, prompts, responses, rewards.to(policy.device),
                   group_advantages(rewards, cfg.group).to(policy.device), prompt_mask)

# -----------------------------------------------------------------------------
# 2. Rewards -> group-relative advantages
#    A_i = (r_i - mean(r_group)) / std(r_group); a group with equal rewards
#    (all right or all wrong) carries no signal and gets A = 0.

def group_advantages(rewards, group_size):
    """Float (B,) rewards, B = n_prompts * group_size -> Float (B,) advantages.

    >>> group_advantages(torch.tensor([1., 0., 0., 1., 1., 1.]), 3)
    tensor([ 1.1547, -0.5774, -0.5774,  0.0000,  0.0000,  0.0000])
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide {rewards.numel()}")
    r = rewards.view(-1, group_size)                          # (P, G)
    std = r.std(dim=1, keepdim=True)                          # unbiased, as in GRPO
    return torch.where(std > 0, (r - r.mean(1, keepdim=True)) / std.clamp_min(1e-12), 0.0).flatten()

# -----------------------------------------------------------------------------
# 3. The masks: Monte-Carlo samples of the ELBO
#    ELBO(y|x) = E_t E_{y_t ~ q(.|t,y)} l(y_t, t, y | x)  <=  log pi(y|x),
#    estimated by (1/n_t) sum_j l_j, where l_j (section 4) is the log-likelihood
#    of the tokens mask j hides, weighted by w_j. "stratified" (the default):
#    mask exactly m_j of the L tokens, w_j = L / m_j, with one offset k ~ U{1..L}
#    per response and m_j = ((k - 1 + floor((j-1) L / n_t)) mod L) + 1: each m_j
#    alone is uniform on 1..L (unbiased), and together they spread evenly.
#    The official code's round() in place of floor is biased (README).
#    Other schemes: section 6.

def masks_and_old_terms(policy, batch, n_samples, scheme, generator, length_norm=False,
                        old=True, mc_batch=1):
    """Step 3 on a Rollout: masks (n_t, B, L), weights (n_t, B), and the old policy's
    l_old_j (n_t, B) without gradient, or None if not old (on-policy: step 4 uses its
    own). length_norm divides each l_j by L (the official code's per-token ELBO)."""
    masks, weights = sample_masks(batch.responses, n_samples, generator, scheme)
    weights = weights / batch.responses.shape[1] if length_norm else weights
    if not old:
        return masks, weights, None
    with torch.no_grad():
        old_terms = elbo_terms(policy.model, batch.prompts, batch.responses, masks, weights,
                               policy.mask_id, batch.prompt_mask, mc_batch)
    return masks, weights, old_terms

def sample_masks(responses, n_samples, generator=None, scheme="stratified"):
    """n_t = n_samples masks of responses (B, L) and their weights: Bool (n_t, B, L), Float (n_t, B).

    >>> masks, w = sample_masks(torch.zeros(1, 4, dtype=torch.long), 4)  # n_t = L = 4
    >>> masks.sum(-1).flatten().sort().values.tolist(), (w * masks.sum(-1)).flatten().tolist()
    ([1, 2, 3, 4], [4.0, 4.0, 4.0, 4.0])
    """
    if not isinstance(n_samples, int) or n_samples < 1 or responses.dim() != 2 \
            or not responses.shape[1]:
        raise ValueError(f"n_samples must be an integer >= 1 and responses (B, L) with L >= 1, "
                         f"got {n_samples!r} and shape {tuple(responses.shape)}")
    if scheme != "stratified":
        return other_scheme_masks(responses, n_samples, generator, scheme)   # section 6
    B, L = responses.shape
    dev = generator.device if generator is not None else responses.device
    k = torch.randint(1, L + 1, (B,), generator=generator, device=dev)       # (B,)
    offsets = torch.arange(n_samples, device=dev)[:, None] * L // n_samples  # (n_t, 1)
    n_masked = (k - 1 + offsets) % L + 1                                     # (n_t, B): m_j
    # mask the m_j positions with the smallest random keys: a uniform subset
    keys = torch.rand(n_samples, B, L, generator=generator, device=dev)
    masks = keys.argsort(-1).argsort(-1) < n_masked[..., None]  # (n_t, B, L): key's place < m_j
    weights = L / n_masked                                                   # (n_t, B): w_j
    return masks.to(responses.device), weights.float().to(responses.device)

# -----------------------------------------------------------------------------
# 4. The loss, one backward per sample
#    BGPO:   R_lb = sum_j g_j, g_j = A (1 + d_j) / n_t (e^x >= 1 + x) if A >= 0,
#            A e^{d_j} / n_t (Jensen) if A < 0;  loss = -(1/B) sum_i R_lb_i
#    Linear in the samples: loss = sum_j loss_j, each backwarded on its own.
#    What the loop runs over can be made cheaper without changing the sum:
#    a mask a response drew twice is computed once (mc_passes), K samples
#    share a forward pass (--mc-batch). Both, and the naive, two_pass, tangent
#    and jensen objectives and --clip, are in section 6.

def policy_loss_backward(model, prompts, responses, advantages, masks, weights,
                         old_terms, mask_id, method="bgpo", clip=None, prompt_mask=None,
                         mc_batch=1, merge=True, diagnostics=None):
    """Step 4: backward loss = -(1/B) sum_i R_i into .grad (accumulating); returns it.
    prompts (B, Lp), responses (B, L), advantages (B,); masks (n_t, B, L), weights (n_t, B)
    and old_terms (n_t, B) or None on-policy; method in METHODS; clip: PPO eps; mc_batch,
    merge: section 6 (the same gradient); diagnostics: a dict for off_policy_stats, "terms"."""
    check_inputs(prompts, responses, advantages, masks, weights, old_terms, prompt_mask,
                 method, mc_batch)
    n_t, advantages = len(masks), advantages.detach()
    passes = mc_passes(masks, weights, old_terms, mc_batch, merge)  # [(mask, w, l_old, copies)]
    if method in ("naive", "two_pass"):                              # section 6
        return exact_loss_backward(model, prompts, responses, advantages, passes, n_t, mask_id,
                                   method, clip, prompt_mask, diagnostics)
    total, computed = 0.0, []
    for mask, weight, old_term, copies in passes:                    # j = 1 .. n_t
        term = elbo_terms(model, prompts, responses, mask, weight, mask_id, prompt_mask)  # (K, B) l_j
        old = term.detach() if old_term is None else old_term       # on-policy: d_j = 0
        g = bgpo_sample_objective(term, old, advantages, n_t, clip, method)  # (K, B) g_j
        loss = -(copies * g).mean(-1).sum()                          # loss_j = -(1/B) sum_i g_ij
        loss.backward()                                              # frees sample j's graph
        total += loss.item()
        computed.append(term.detach())
    if diagnostics is not None:
        record_diagnostics(diagnostics, passes, computed, advantages, method, clip)
    return total

def bgpo_sample_objective(term, old_term, advantages, n_samples, clip=None, method="bgpo"):
    """g_j for one MC sample j: Float (B,). Linear in the sample, so sum_j g_j
    can be backwarded one j at a time. "tangent", "jensen": that lemma for every A."""
    d = term - old_term                                                   # (B,)
    upper = torch.as_tensor({"bgpo": advantages >= 0, "tangent": True, "jensen": False}[method],
                            device=d.device)                              # (B,) or ()
    # exp only where it is used: an overflowing e^{d} on the A >= 0 side would
    # turn its zero gradient into inf * 0 = nan
    ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)))
    objective = ratio * advantages if clip is None else clipped(ratio, advantages, clip)
    return objective / n_samples

def elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask=None,
               mc_batch=None):
    """l_j = w_j * sum_pos masks_j[pos] * log p(y^pos | y_t, x), Float (K, B), of K masks
    (K, B, L) and weights (K, B) of every response (prompt_mask: (B, Lp) or None): in one
    forward pass, or mc_batch masks to a pass; a row of weight 0 is 0, not computed."""
    if mc_batch is not None:
        return torch.cat([elbo_terms(model, prompts, responses, m, w, mask_id, prompt_mask)
                          for m, w in zip(masks.split(mc_batch), weights.split(mc_batch))])
    K, B, L = masks.shape
    rows = weights.flatten().nonzero().squeeze(1)                        # of the K B rows
    rows = rows if len(rows) else rows.new_zeros(1)  # none: one of weight 0, to have a graph
    b = rows % B                                                         # their responses
    mask = masks.reshape(K * B, L)[rows].bool()                          # (R, L)
    logp = toy_dllm.token_log_probs(model, prompts[b], responses[b], mask, mask_id,
                                    None if prompt_mask is None else prompt_mask[b])  # (R, L)
    terms = weights.reshape(K * B)[rows].to(logp.dtype) * (logp * mask).sum(-1)      # (R,)
    return terms.new_zeros(K * B).index_put((rows,), terms).view(K, B)

# -----------------------------------------------------------------------------
# 5. The update: one optimizer step on the accumulated gradient

def update(model, optimizer, loss, max_grad_norm=None, world_size=1):
    """Step 5 (clipping the gradient's norm); skipped (False) if not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    finite = (math.isfinite(loss) and bool(torch.isfinite(grad_norm)) if world_size == 1
              else real_dllm.all_finite(loss, grad_norm))  # torchrun: every rank skips, or none
    if finite:
        optimizer.step()
    else:
        warnings.warn(f"non-finite loss ({loss}) or gradient: update skipped")
        optimizer.zero_grad(set_to_none=True)
    return finite

# =============================================================================
# The algorithm ends here. What follows is not needed to follow one step:
#   6. what step 4 can iterate over and be swapped for: merged masks, K samples
#      per pass, the other mask schemes, naive / two_pass, clipping, diagnostics
#   7. the loop's bookkeeping: metrics, checkpoints, resume, the summary
#   8. the measurements: --explain, --compare (the gradient's noise: docs/grad_stats.py)
#   9. the command line
# =============================================================================

# -----------------------------------------------------------------------------
# 6. What step 4 can iterate over, and be swapped for
#    Merged masks: equal masks give equal l_j, so the sum over a response's n_t
#    samples may run over its distinct masks times their copies (3 tokens have
#    7 masks). K samples per forward pass: K times the memory, fewer passes.
#    Schemes: "uniform_t": t ~ U(0,1), each token masked with prob. t, weight
#    (L+1)/m, the paper's 1/t averaged given the mask (finite variance);
#    "complementary" (DiffuCoder's pairs): m of L tokens, m uniform on 0..L
#    over the pairs, and the other L - m, weight (L+1)/m, each mask unbiased;
#    "one_step": every token masked, weight 1 (diffu-GRPO without its prompt
#    masking): one pass, the count-L term; not the ELBO.
#    naive:   R = exp((1/n_t) sum_j d_j) * A, every sample's graph at once.
#    tangent, jensen: one lemma for every A (Table 3's rows, our reading): not bounds.
#    --clip (the official code, not the paper): the ratio e^{mean d}, or
#    1 + d_j / e^{d_j}, clipped to [1 - eps, 1 + eps]; dual clip 3 A if A < 0.

def check_inputs(prompts, responses, advantages, masks, weights, old_terms, prompt_mask,
                 method="bgpo", mc_batch=1):
    """policy_loss_backward's arguments, checked once, at the door: ValueError names a wrong one."""
    if method not in METHODS or not isinstance(mc_batch, int) or mc_batch < 1:
        raise ValueError(f"method must be one of {METHODS} and mc_batch an integer >= 1, "
                         f"got {method!r} and {mc_batch!r}")
    if responses.dim() != 2 or masks.dim() != 3 or masks.shape[1:] != responses.shape \
            or len(masks) < 1:
        raise ValueError(f"masks must be (n_samples, B, L) for responses (B, L), got "
                         f"{tuple(masks.shape)} and {tuple(responses.shape)}")
    (n, B, _), Lp = masks.shape, prompts.shape[-1]
    for name, x, shape in [("prompts", prompts, (B, Lp)), ("weights", weights, (n, B)),
                           ("advantages", advantages, (B,)), ("old_terms", old_terms, (n, B)),
                           ("prompt_mask", prompt_mask, (B, Lp))]:
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")

def mc_passes(masks, weights, old_terms=None, mc_batch=1, merge=True):
    """Step 4's loop runs over [(masks (K, B, L), weights, old terms or None, copies (K, B))],
    K = mc_batch masks to a forward pass. merge: a mask a response drew again is computed
    once, copies counted; slot s holds its s-th distinct mask, or nothing (copies, weight 0).

    >>> masks = torch.tensor([[[1, 0]], [[0, 1]], [[1, 0]]]).bool()  # (n_t, B, L) = (3, 1, 2)
    >>> [(m.int().tolist(), c.tolist()) for m, _, _, c in mc_passes(masks, torch.ones(3, 1))]
    [([[[1, 0]]], [[2.0]]), ([[[0, 1]]], [[1.0]])]
    """
    copies = torch.ones_like(weights)                                    # (n_t, B)
    if merge:
        key = torch.cat([weights[..., None], masks.to(weights.dtype)], -1)  # (n_t, B, L + 1)
        same = (key[:, None] == key[None]).all(-1)                       # (n_t, n_t, B)
        j = torch.arange(len(masks), device=masks.device)[:, None]       # (n_t, 1)
        is_first = same.to(torch.uint8).argmax(1) == j                   # (n_t, B): first of its kind
        distinct = is_first.sum(0)                                       # (B,)
        index = (~is_first).to(torch.uint8).argsort(dim=0, stable=True)[:int(distinct.max())]  # (n', B)
        copies = same.sum(1).gather(0, index).to(weights.dtype) * (j[:len(index)] < distinct)
        masks = masks.gather(0, index[..., None].expand(-1, -1, masks.shape[-1]))
        weights = weights.gather(0, index) * (copies > 0)
        old_terms = None if old_terms is None else old_terms.gather(0, index) * (copies > 0)
    olds = [None] * len(masks) if old_terms is None else old_terms.detach().split(mc_batch)
    return list(zip(masks.split(mc_batch), weights.split(mc_batch), olds, copies.split(mc_batch)))

def other_scheme_masks(responses, n_samples, generator, scheme):
    """sample_masks for the schemes other than stratified (the banner)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: use one of {SCHEMES}")
    B, L = responses.shape
    dev = generator.device if generator is not None else responses.device
    if scheme == "complementary":
        if n_samples % 2:
            raise ValueError(f"complementary masks come in pairs: n_samples must be even, "
                             f"got {n_samples}")
        n = n_samples // 2
        k = torch.randint(1, L + 2, (B,), generator=generator, device=dev)    # (B,)
        n_masked = (k - 1 + torch.arange(n, device=dev)[:, None] * (L + 1) // n) % (L + 1)
        keys = torch.rand(n, B, L, generator=generator, device=dev)          # as stratified's
        masks = keys.argsort(-1).argsort(-1) < n_masked[..., None]           # (n, B, L)
        masks, n_masked = torch.cat([masks, ~masks]), torch.cat([n_masked, L - n_masked])
        weights = torch.where(n_masked > 0, (L + 1) / n_masked.clamp(min=1), 0.0)  # empty: 0
    elif scheme == "one_step":  # n_t copies of one mask: merging computes it once
        masks = torch.ones(n_samples, B, L, dtype=torch.bool, device=dev)
        weights = torch.ones(n_samples, B, device=dev)
    else:
        t = 1 - torch.rand(n_samples, B, generator=generator, device=dev)        # (n, B) in (0, 1]
        masks = torch.rand(n_samples, B, L, generator=generator, device=dev) < t[..., None]
        m = masks.sum(-1)                                                        # (n, B)
        # E[1/t | m masked]; an empty mask adds 0: weight 0, so it is never computed
        weights = torch.where(m > 0, (L + 1) / m.clamp(min=1), 0.0)
    return masks.to(responses.device), weights.float().to(responses.device)

def elbo_term(model, prompts, responses, mask, weight, mask_id, prompt_mask=None):
    """l_j of one mask (B, L) with weight (B,) for every response: Float (B,), differentiable."""
    check_inputs(prompts, responses, None, mask[None], weight[None], None, prompt_mask)
    return elbo_terms(model, prompts, responses, mask[None], weight[None], mask_id, prompt_mask)[0]

def clipped(ratio, advantages, clip=None, dual_clip=3.0):
    """ratio * A, PPO-clipped with eps = clip (None: not clipped)."""
    if clip is None:
        return ratio * advantages
    obj = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return torch.where(advantages < 0, torch.maximum(obj, dual_clip * advantages), obj)

def naive_objective(terms, old_terms, advantages, clip=None, copies=None):
    """R = exp(mean_j d_j) * A for each response: Float (B,) from (n_t, B)
    terms; copies (n_t, B) weigh each sample in the mean (mc_passes)."""
    d = terms - old_terms
    mean_d = d.mean(0) if copies is None else (copies * d).sum(0) / copies.sum(0)
    return clipped(torch.exp(mean_d), advantages, clip)

def exact_loss_backward(model, prompts, responses, advantages, passes, n_t, mask_id, method,
                        clip=None, prompt_mask=None, diagnostics=None):
    """The naive objective's loss -(1/B) sum_i R_i backwarded. naive: every graph alive
    at once, one backward. two_pass: the same gradient at constant memory: R depends
    on the samples only through dbar = mean_j d_j, so pass 1 (no grad; skipped
    on-policy, dbar = 0) finds c_i = dR_i / d dbar_i, and pass 2 backwards
    -(1/B) sum_i c_i l_ij / n_t one sample at a time."""
    def terms_of(chunks):  # l_j of every pass, (n', B)
        return torch.cat([elbo_terms(model, prompts, responses, m, w, mask_id, prompt_mask)
                          for m, w, _, _ in chunks])

    copies = torch.cat([c for *_, c in passes])                          # (n', B)
    old_terms = None if passes[0][2] is None else torch.cat([o for _, _, o, _ in passes])
    if method == "naive":
        terms = terms_of(passes)                                           # n' graphs alive
        computed = [terms.detach()]
        old = computed[0] if old_terms is None else old_terms
        loss = -naive_objective(terms, old, advantages, clip, copies).mean()
        loss.backward()
        total = loss.item()
    else:
        mean_d = torch.zeros_like(advantages)
        if old_terms is not None:
            with torch.no_grad():
                mean_d = (copies * (terms_of(passes) - old_terms)).sum(0) / n_t  # (B,)
        mean_d.requires_grad_(True)
        objective = clipped(torch.exp(mean_d), advantages, clip)                # (B,)
        coef, = torch.autograd.grad(objective.sum(), mean_d)                    # A e^dbar unclipped
        computed = []
        for chunk in passes:
            terms = terms_of([chunk])                                           # (K, B)
            (-(coef * chunk[3] * terms).mean(-1).sum() / n_t).backward()
            computed.append(terms.detach())
        total = -objective.mean().item()
    if diagnostics is not None:
        record_diagnostics(diagnostics, passes, computed, advantages, method, clip)
    return total

def record_diagnostics(diagnostics, passes, computed, advantages, method, clip):
    """diagnostics["terms"]: the l_j computed (n', B), and off_policy_stats."""
    masks, weights, olds, copies = (torch.cat(x) if x[0] is not None else None
                                    for x in zip(*passes))
    terms = torch.cat(computed)
    diagnostics.update(off_policy_stats(terms, olds, advantages, masks, weights, copies,
                                        method, clip), terms=terms)

def off_policy_stats(terms, old_terms, advantages, masks, weights, copies, method="bgpo",
                     clip=None):
    """How far an update is from the rollout's policy, from the l_j (n', B) its loss
    computed anyway: abs_d, the mean |d_j| per masked token; gap, the mean over all B
    responses (A = 0 too) of R - R_lb (BGPO's bound: >= 0, 0 on-policy); with clip,
    clipped: the share of all ratios (per slot, copies counted, A = 0 and empty masks
    too; naive, two_pass: per response) the clip changed."""
    old = (terms if old_terms is None else old_terms).double()  # float64: gap ~1e-16 on-policy
    terms, advantages, tokens = terms.double(), advantages.double(), weights * masks.sum(-1)
    used = copies * (tokens != 0)                                         # the empty mask: l_j = 0
    R = naive_objective(terms, old, advantages, copies=copies)            # (B,)
    R_lb = (copies * bgpo_sample_objective(terms, old, advantages, copies.sum(0))).sum(0)
    per_token = (terms - old).abs() / tokens.where(used > 0, 1.0)        # (n', B); w |S| per l_j
    stats = dict(abs_d=(used * per_token).sum() / used.sum(), gap=R - R_lb)
    if clip is not None and method in ("naive", "two_pass"):                # a ratio per response
        stats["clipped"] = (naive_objective(terms, old, advantages, clip, copies) != R).double()
    elif clip is not None:                                                    # a ratio per sample
        changed = (bgpo_sample_objective(terms, old, advantages, 1, clip, method)
                   != bgpo_sample_objective(terms, old, advantages, 1, None, method))
        stats["clipped"] = (copies * changed).sum() / copies.sum()
    return {key: float(v.mean()) for key, v in stats.items()}

# -----------------------------------------------------------------------------
# 7. The loop's bookkeeping: a metrics record per step (its time split, each
#    update's distance from the rollout's policy) and the test accuracy every
#    eval_every steps; the start, checkpoints and the summary are in runs.py.

def log_step(state, step, batch, updates, times, policy, cfg, bar):
    """One metrics record from the step's updates [(loss, done, diagnostics, meter)] and
    its clock stamps (start, rollout, masks, then a loss and an update per update)."""
    losses = [loss for loss, done, _, _ in updates if done]
    means = [batch.rewards.mean().item(), sum(losses) / len(losses) if losses else math.nan]
    if state["world_size"] > 1:  # torchrun: over every rank's responses
        means = [real_dllm.global_mean(x) for x in means]
    on_policy = dict(abs_d=0.0, gap=0.0, **({"clipped": 0.0} if cfg.clip else {}))  # d_j = 0
    record = dict(step=step, reward_mean=means[0], loss=means[1],
                  skipped_updates=sum(not done for _, done, _, _ in updates),
                  seconds=round(time.time() - state["started"], 3), time_rollout=times[1] - times[0],
                  time_loss=times[2] - times[1] + sum(b - a for a, b in zip(times[2::2], times[3::2])),
                  time_update=sum(b - a for a, b in zip(times[3::2], times[4::2])),
                  updates=[on_policy if d is None else {k: v for k, v in d.items() if k != "terms"}
                           for _, _, d, _ in updates])
    if step % cfg.eval_every == 0 or step == cfg.steps:
        start = real_dllm.clock(policy.device)
        state["last_eval"] = runs.evaluate_policy(policy, cfg)  # (acc, failures)
        record["acc"] = state["last_acc"] = state["last_eval"][0]
        record["time_eval"] = real_dllm.clock(policy.device) - start
    state["peak_activation_bytes"] = max([state["peak_activation_bytes"]]
                                         + [m.peak_bytes for *_, m in updates if m is not None])
    state["skipped_updates"] += record["skipped_updates"]
    for part in state["time_split"]:
        state["time_split"][part] += record.get("time_" + part, 0)
    state["metrics"].append(record)
    bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{state['last_acc']:.2f}")
    state.update(step=step, seconds=time.time() - state["started"])


# -----------------------------------------------------------------------------
# 8. Measurements: --explain, and naive vs BGPO side by side (--compare)
#    memory:  what grows with n_t is what autograd saves for backward
#             (activations), counted by a saved-tensor hook while held.
#    compare: per n_t, each method's policy_loss_backward on the same work;
#             BGPO per K of --mc-batch, and merged, as trained.

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

def explain(policy, cfg):
    """One BGPO step on a small batch, every number printed; weights unchanged.
    Step 4 is policy_loss_backward itself: its l_j are read back and printed."""
    model, batch = policy.model, fixed_batch(policy, cfg, both_signs=True)
    n, A = cfg.samples, batch.advantages
    print(f"One BGPO step: {cfg.prompts} prompts x G = {cfg.group} responses, n_t = {n}, "
          f"scheme {cfg.scheme}; '_' is [MASK], '.' the end token\n")
    print("1-2. rollout; reward r (the task's); advantage A = (r - mean r) / std r per group")
    truths = policy.task.answers(batch.problems)

    def show(i, mask=None, response=None):  # '37+48=0_5'
        return toy_dllm.show_tokens(policy.tokenizer, batch.prompts[i], batch.responses[i]
                                    if response is None else response, mask)

    for i in range(len(A)):
        print(f"  y{i + 1:<2} {show(i)}   (truth {truths[i]})"
              f"   r = {batch.rewards[i]:g}   A = {A[i]:+.3f}")
    first = batch[torch.arange(1)]  # greedy on y1's prompt, its padding mask too (a real model's)
    order, y = [], torch.full_like(first.responses, policy.mask_id)
    greedy = toy_dllm.generate(model, first.prompts, policy.mask_id, y.shape[1], cfg.block_length,
                               cfg.sampler_steps, prompt_mask=first.prompt_mask, order=order)
    print("   the sampler's order, greedy on y1's prompt: the most confident first, anywhere")
    for step, (pos, score) in enumerate(order, 1):  # (1, k) each
        y[0, pos[0]] = greedy[0, pos[0]]
        print(f"  {step:>3}. {show(0, y[0] == policy.mask_id, y[0])}   position "
              + ", ".join(f"{p} (p = {c:.2f})" for p, c in zip(pos[0].tolist(), score[0].tolist())))
    masks, weights, old_terms = masks_and_old_terms(
        policy, batch, n, cfg.scheme, torch.Generator().manual_seed(cfg.seed), cfg.length_norm)
    rule = {"stratified": "L/m", "one_step": "1"}.get(cfg.scheme, "(L+1)/m") + " / L" * cfg.length_norm
    print(f"\n3. n_t = {n} masks per response, weight w = {rule} for m of L tokens masked; the "
          "old policy's l_old_j = w sum_pos 1[masked] log p_old(y^pos | y_t, x), without gradient")
    print("\n4. policy_loss_backward: for j = 1..n_t: l_j (with a graph), d_j = l_j - l_old_j, "
          "g_j; loss_j = -(1/B) sum_i g_ij; loss_j.backward() frees sample j's graph")
    model.zero_grad(set_to_none=True)
    diagnostics = {}
    loss = policy_loss_backward(model, batch.prompts, batch.responses, A, masks, weights,
                                old_terms, policy.mask_id, clip=cfg.clip,
                                prompt_mask=batch.prompt_mask, merge=False, diagnostics=diagnostics)
    for j, term in enumerate(diagnostics["terms"]):                              # (B,) l_j of sample j
        g = bgpo_sample_objective(term, old_terms[j], A, n, cfg.clip)     # (B,)
        for i in range(len(A)):
            print(f"  j={j + 1} y{i + 1:<2} {show(i, masks[j, i])}"
                  f"  masked={int(masks[j, i].sum())} w={weights[j, i]:.3f}"
                  f"  l_old={old_terms[j, i]:+.4f}  l={term[i].item():+.4f}"
                  f"  d={term[i].item() - old_terms[j, i]:+.1e}  g={g[i].item():+.4f}  "
                  + ("tangent A(1+d)/n_t" if A[i] >= 0 else "Jensen  A e^d/n_t"))
        print(f"  loss_{j + 1} = {-g.mean().item():+.6f}: backwarded on its own\n")
    print(f"  loss = sum_j loss_j = {loss:+.6f}\n")
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

# -----------------------------------------------------------------------------
# 9. The command line (its flags and the run's directory: runs.py). A check
#    raises ValueError; main says it in one line, exit status 2.

def load_policy(cfg, device, checkpoint=None):
    """The toy, or the model of --model / --resume, checked against the task."""
    path = checkpoint or cfg.model
    saved = real_dllm.saved_settings(path) if path else {}
    task = toy_dllm.load_task(cfg.task, cfg.digits, cfg.test_size)
    source = f"--resume {cfg.resume}" if checkpoint else f"--model {path}"
    with runs.blame(source) if path else contextlib.nullcontext():
        model, tokenizer = runs.load_model(cfg, path, saved)
        mask_id = next((m for m in (cfg.mask_id, saved.get("mask_id"), tokenizer.mask_token_id)
                        if m is not None), None)
        if mask_id is None:
            raise ValueError("the tokenizer names no mask token; give --mask-id")
        problems = torch.cat([task.train, task.test]) if task.name == "jsonl" else task.test
        prompts, padded = toy_dllm.encode_padded_prompts(tokenizer, task.prompts(problems))
    tokens = [len(t) for t in tokenizer(task.answers(problems), add_special_tokens=False)["input_ids"]]
    longest = max(tokens)
    length = (cfg.response_length or saved.get("response_length")
              or (task.answer_length if path is None else longest + 1))
    if length < longest:
        i = problems[next(i for i, n in enumerate(tokens) if n > length), 0]  # a JSONL line's
        raise ValueError((f"{cfg.task}:{task.records[i]['line']}: " if task.name == "jsonl" else "")
                         + f"--response-length {length} is shorter than the longest answer "
                         f"({longest} tokens)")
    real_dllm.check_fits(model, tokenizer, mask_id, prompts.shape[1] + length, padded is not None)
    model = model.to(device).eval()
    here = os.path.abspath(path) if path and os.path.exists(path) else path
    lora_base = saved.get("lora_base", here)  # what LoRA adapters adapt (None: the toy)
    if cfg.lora_rank:
        with runs.blame(f"--lora-rank {cfg.lora_rank}"
                   + (f" --lora-targets {cfg.lora_targets}" if cfg.lora_targets else "")):
            model = real_dllm.add_lora(model, cfg.lora_rank, cfg.lora_alpha,
                                       cfg.lora_targets and cfg.lora_targets.split(","), cfg.seed)
    if cfg.gradient_checkpointing:
        with runs.blame("--gradient-checkpointing"):  # a model that refuses it
            real_dllm.set_checkpointing(model, True)
        if cfg.compare:  # which measures with it and without
            real_dllm.set_checkpointing(model, False)
    return Policy(model, tokenizer, task, mask_id, length, device, lora_base)

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

def run(cfg, checkpoint, device):
    """Everything after the flags: the model, the checks that need it, then a measurement
    or training. Returns the exit status, or a bad input's one line (before anything is
    written)."""
    try:
        policy = load_policy(cfg, device, checkpoint)
        with runs.blame(f"--block-length {cfg.block_length}, --sampler-steps {cfg.sampler_steps}"):
            toy_dllm.sampler_blocks(policy.response_length, cfg.block_length, cfg.sampler_steps)
        if real_dllm.world()[1] > 1:
            real_dllm.shard(policy.model)
        if cfg.compare:
            rows = compare(policy, cfg, cfg.sample_counts)
            print(json.dumps(rows, indent=1) if cfg.json else runs.format_table(rows))
            return 0
        if cfg.explain:
            explain(policy, cfg)
            return 0
        if cfg.activation_budget:
            check_activation_budget(policy, cfg)
        with runs.blame(f"--resume {cfg.resume}"):
            resume_state = real_dllm.load_trainer_state(checkpoint, device) if checkpoint else None
        if cfg.out:  # only now, with every check passed, is anything written
            runs.prepare_out(cfg, policy, resuming=checkpoint is not None)
    except ValueError as e:
        return real_dllm.first_line(e)
    runs.say(f"BGPO ({cfg.method}, n_t={cfg.samples}) on {cfg.model or 'the toy diffusion LM'}, "
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
    return 0

def main(argv=None):
    """bgpo.py's command line; bad input ends in one line, exit status 2."""
    parser, joined, status = runs.build_parser(), False, None
    try:
        cfg, checkpoint = runs.parse_args(parser, argv)
        device, joined = real_dllm.start(cfg.device)  # torchrun: this rank's, in the group
        status = run(cfg, checkpoint, device)
    except ValueError as e:
        status = real_dllm.first_line(e)
    finally:
        if joined:  # run() has returned: the sharded model can be collected before the group
            real_dllm.stop(clean=status == 0)
    if isinstance(status, str):
        parser.error(status)
    return status

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
