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

Run `python bgpo.py --help` for the experiments; the README has recipes.
"""

import argparse
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
from tqdm import tqdm

import toy_dllm

METHODS = ("bgpo", "naive", "two_pass")
SCHEMES = ("stratified", "uniform_t")

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
    B, L = responses.shape
    if prompts.dim() != 2 or prompts.shape[0] != B:
        raise ValueError(f"prompts must be (B={B}, Lp), got shape {tuple(prompts.shape)}")
    if mask.shape != (B, L):
        raise ValueError(f"mask must have the responses' shape {(B, L)}, got {tuple(mask.shape)}")
    if weight.shape != (B,):
        raise ValueError(f"weight must be ({B},), got shape {tuple(weight.shape)}")
    mask = mask.bool()
    logp = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id,
                                    prompt_mask)                                # (B, L)
    return weight.to(logp.dtype) * (logp * mask).sum(-1)                       # (B,)


def elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask=None):
    """elbo_term for each of the n_t masks: Float (n_t, B). Call it under
    torch.no_grad() for the old policy's terms, as it keeps every graph."""
    return torch.stack([elbo_term(model, prompts, responses, m, w, mask_id, prompt_mask)
                        for m, w in zip(masks, weights)])

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
                       prompt_mask):
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
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if prompts.dim() != 2 or prompts.shape[0] != B:
        raise ValueError(f"prompts must be ({B}, Lp), got shape {tuple(prompts.shape)}")
    if prompt_mask is not None and prompt_mask.shape != prompts.shape:
        raise ValueError(f"prompt_mask must have the prompts' shape {tuple(prompts.shape)}, "
                         f"got {tuple(prompt_mask.shape)}")


def policy_loss_backward(model, prompts, responses, advantages, masks, weights,
                         old_terms, mask_id, method="bgpo", clip=None, prompt_mask=None):
    """Backward the RL loss L = -(1/B) sum_i R_i into the model's .grad.

    Gradients accumulate (nothing is zeroed), as in gradient accumulation.
    Args:
        prompts: Long (B, Lp); responses: Long (B, L); advantages: Float (B,);
        masks: Bool (n_t, B, L) and weights: Float (n_t, B) from sample_masks;
        old_terms: Float (n_t, B), the old policy's l_j on the same masks;
        method: "bgpo"     R = R_lb; one forward + backward per sample, so
                           only one sample's graph is alive at a time;
                "naive"    R = exp(mean d) A; all n_t graphs, one backward;
                "two_pass" the naive gradient at constant memory: a no-grad
                           pass finds c_i = dR_i / d(mean d_i), then sample j
                           backwards -(1/B) sum_i c_i l_ij / n_t on its own;
        clip: PPO epsilon, or None (the paper) for no clipping;
        prompt_mask: Bool (B, Lp), False at left padding, or None (no padding).
    Returns:
        L's value, a float.
    """
    _check_loss_inputs(prompts, responses, advantages, masks, weights, old_terms, method,
                       prompt_mask)
    n = masks.shape[0]
    # the old policy's terms and the advantages are constants of the objective
    old_terms, advantages = old_terms.detach(), advantages.detach()

    def term(j):
        return elbo_term(model, prompts, responses, masks[j], weights[j], mask_id,
                         prompt_mask)                                                # (B,)

    if method == "naive":
        terms = elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask)  # n graphs alive
        loss = -naive_objective(terms, old_terms, advantages, clip).mean()
        loss.backward()
        return loss.item()

    if method == "bgpo":
        total = 0.0
        for j in range(n):
            loss_j = -bgpo_sample_objective(term(j), old_terms[j], advantages, n, clip).mean()
            loss_j.backward()                                       # frees sample j's graph
            total += loss_j.item()
        return total

    # two_pass: R depends on the samples only through m = mean_j d_j, so
    # dL/dtheta = -(1/B) sum_i (dR_i/dm_i) (1/n_t) sum_j dl_ij/dtheta.
    with torch.no_grad():
        mean_d = (elbo_terms(model, prompts, responses, masks, weights, mask_id, prompt_mask)
                  - old_terms).mean(0)                                           # (B,)
    mean_d.requires_grad_(True)
    objective = clipped(torch.exp(mean_d), advantages, clip)       # (B,)
    coef, = torch.autograd.grad(objective.sum(), mean_d)           # = A e^{mean d} unclipped
    for j in range(n):
        loss_j = -(coef * term(j)).mean() / n
        loss_j.backward()
    return -objective.mean().item()

# -----------------------------------------------------------------------------
# 4. Measuring memory
#    What grows with n_t is what autograd saves for backward (activations).
#    A saved-tensor hook sees every one of them: count each storage once while
#    it is held, and keep the peak. Works on any device; on CUDA the
#    allocator's own peak is reported as well.


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


def measure(fn, model, device):
    """Run fn() once; return (its result, peak activation bytes, seconds, CUDA peak bytes or None)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with SavedTensorMeter(exclude=list(model.parameters()) + list(model.buffers())) as meter:
        result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return result, meter.peak_bytes, seconds, cuda_peak

# -----------------------------------------------------------------------------
# 5. Rollout: G responses per prompt, their rewards and advantages


@dataclass
class Policy:
    """The model being trained and what it needs to talk about arithmetic."""
    model: torch.nn.Module
    tokenizer: object
    task: toy_dllm.ArithmeticTask
    mask_id: int
    response_length: int
    device: torch.device


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
    """Sample cfg.group responses per problem at the rollout temperature."""
    problems = problems.repeat_interleave(cfg.group, dim=0)                   # (B, 2)
    prompts, prompt_mask = toy_dllm.encode_padded_prompts(policy.tokenizer,
                                                          policy.task.prompts(problems))
    prompts = prompts.to(policy.device)                                       # (B, Lp)
    if prompt_mask is not None:
        prompt_mask = prompt_mask.to(policy.device)                           # (B, Lp)
    responses = toy_dllm.generate(
        policy.model, prompts, policy.mask_id, policy.response_length,
        block_length=cfg.block_length, steps=cfg.sampler_steps,
        temperature=cfg.temperature, generator=generator, prompt_mask=prompt_mask)  # (B, L)
    rewards = toy_dllm.exact_match_reward(policy.task, policy.tokenizer, problems, responses)
    return Rollout(problems, prompts, responses, rewards.to(policy.device),
                   group_advantages(rewards, cfg.group).to(policy.device), prompt_mask)


def masks_and_old_terms(policy, batch, n_samples, scheme, generator, length_norm=False):
    """Step 3: n_t masks per response, and the old policy's l_j on them.

    The old policy is the model as it is now; its terms carry no gradient.
    length_norm divides every l_j by the response length L (the official
    code's per-token ELBO), so d_j and a clip band act per token.
    Returns masks (n_t, B, L), weights (n_t, B), old_terms (n_t, B).
    """
    masks, weights = sample_masks(batch.responses, n_samples, generator, scheme)
    if length_norm:
        weights = weights / batch.responses.shape[1]
    with torch.no_grad():
        old_terms = elbo_terms(policy.model, batch.prompts, batch.responses, masks, weights,
                               policy.mask_id, batch.prompt_mask)
    return masks, weights, old_terms

# -----------------------------------------------------------------------------
# 6. The GRPO-style loop
#    each step: rollout -> advantages -> masks + old terms (no grad) ->
#    updates_per_batch mini-batch updates through policy_loss_backward.
#    With 1 update the old policy is the current one (on-policy: BGPO equals
#    the naive objective); with 2 the second mini-batch is off-policy.


def rl_step(policy, optimizer, batch, cfg, data_rng):
    """Old terms, then cfg.updates_per_batch optimizer updates on one rollout.

    Returns (mean loss of the updates taken, number of updates skipped
    because the loss or a gradient was not finite, peak activation bytes).
    """
    model = policy.model
    masks, weights, old_terms = masks_and_old_terms(policy, batch, cfg.samples, cfg.scheme,
                                                    data_rng, cfg.length_norm)
    losses, skipped, peak = [], 0, 0
    n_prompts = batch.responses.shape[0] // cfg.group
    for groups in torch.arange(n_prompts).chunk(cfg.updates_per_batch):
        rows = (groups[:, None] * cfg.group + torch.arange(cfg.group)).flatten()  # whole groups
        rows = rows.to(policy.device)
        optimizer.zero_grad(set_to_none=True)
        loss, nbytes, _, _ = measure(lambda: policy_loss_backward(
            model, batch.prompts[rows], batch.responses[rows], batch.advantages[rows],
            masks[:, rows], weights[:, rows], old_terms[:, rows], policy.mask_id,
            method=cfg.method, clip=cfg.clip,
            prompt_mask=None if batch.prompt_mask is None else batch.prompt_mask[rows]),
            model, policy.device)
        peak = max(peak, nbytes)
        # the norm of all gradients together, before clipping: nan or inf if any is
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.max_grad_norm or math.inf)
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            warnings.warn(f"non-finite loss ({loss}) or gradient: update skipped")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        optimizer.step()
        losses.append(loss)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return mean_loss, skipped, peak


def evaluate_policy(policy, cfg, n_failures=0):
    """Greedy exact-match accuracy on the task's test problems."""
    return toy_dllm.evaluate(policy.model, policy.tokenizer, policy.task, policy.task.test,
                             mask_id=policy.mask_id, length=policy.response_length,
                             n_failures=n_failures, block_length=cfg.block_length,
                             steps=cfg.sampler_steps)


def write_atomic(path, text):
    """Write a file so that it is either the old one or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_dir_atomic(path, save):
    """save(tmp_dir), then rename tmp_dir to path: path is never half-written."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    try:
        save(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoints(out):
    """Complete checkpoint directories (out/checkpoint-STEP), oldest first."""
    if not os.path.isdir(out):
        return []
    steps = [n.split("-", 1)[1] for n in os.listdir(out) if n.startswith("checkpoint-")]
    return [os.path.join(out, f"checkpoint-{s}") for s in sorted(
        (s for s in steps if s.isdigit()), key=int)]


SAVED_SETTINGS = "bgpo.json"  # beside a saved model: what --model needs to use it again


def save_model(policy, path):
    """save_pretrained for the model and tokenizer, plus the response length
    and mask id, so that `--model path` works again with no other flag."""
    policy.model.save_pretrained(path)
    policy.tokenizer.save_pretrained(path)
    write_atomic(os.path.join(path, SAVED_SETTINGS), json.dumps(dict(
        response_length=policy.response_length, mask_id=policy.mask_id), indent=1) + "\n")


def save_checkpoint(out, policy, optimizer, state):
    """Model, tokenizer, optimizer, RNG states and step, then drop older ones."""
    path = os.path.join(out, f"checkpoint-{state['step']}")

    def save(tmp):
        save_model(policy, tmp)
        torch.save({**state, "optimizer": optimizer.state_dict()},
                   os.path.join(tmp, "trainer_state.pt"))

    save_dir_atomic(path, save)
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
    return state


def train(policy, cfg, out=None, resume_state=None, show=print):
    """The RL loop. Returns the summary dict (also written to out/summary.json).

    Every step appends one record to the metrics (and rewrites
    out/metrics.jsonl atomically); every cfg.save_every steps a checkpoint is
    written; resume_state (from load_trainer_state) continues a run exactly.
    """
    model, device = policy.model, policy.device
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)                # prompts, masks
    sample_rng = torch.Generator(device=device).manual_seed(cfg.seed)  # rollouts
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.eval()  # no dropout: old and new policy must see the same network
    if resume_state is None:
        acc_before, failures = evaluate_policy(policy, cfg, n_failures=3)
        show("\n".join(failures))
        show(f"greedy test accuracy before RL: {acc_before:.1%}")
        state = dict(step=0, acc_before=acc_before, seconds=0.0, peak_activation_bytes=0,
                     skipped_updates=0, metrics=[], device_type=device.type)
    else:
        state = dict(resume_state)
        optimizer.load_state_dict(state.pop("optimizer"))
        data_rng.set_state(state.pop("data_rng"))
        sample_rng.set_state(state.pop("sample_rng"))
        torch.set_rng_state(state.pop("torch_rng"))
        show(f"resumed at step {state['step']}")
    metrics = state["metrics"]
    t_start = time.time() - state["seconds"]

    last_acc = next((m["acc"] for m in reversed(metrics) if "acc" in m), state["acc_before"])
    final_eval = None  # (accuracy, failures) at the last step, printed at the end
    bar = tqdm(range(state["step"] + 1, cfg.steps + 1), initial=state["step"],
               total=cfg.steps, disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        problems = policy.task.train[
            torch.randint(len(policy.task.train), (cfg.prompts,), generator=data_rng)]
        batch = rollout(policy, problems, cfg, sample_rng)
        loss, skipped, peak = rl_step(policy, optimizer, batch, cfg, data_rng)
        state["peak_activation_bytes"] = max(state["peak_activation_bytes"], peak)
        state["skipped_updates"] += skipped
        record = dict(step=step, reward_mean=batch.rewards.mean().item(), loss=loss,
                      skipped_updates=skipped, seconds=round(time.time() - t_start, 3))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            final_eval = evaluate_policy(policy, cfg, n_failures=3)
            record["acc"] = last_acc = final_eval[0]
        metrics.append(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{last_acc:.2f}")
        state.update(step=step, seconds=time.time() - t_start)
        if out:
            write_atomic(os.path.join(out, "metrics.jsonl"),
                         "".join(json.dumps(m) + "\n" for m in metrics))
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(out, policy, optimizer, dict(
                    state, data_rng=data_rng.get_state(), sample_rng=sample_rng.get_state(),
                    torch_rng=torch.get_rng_state()))
    bar.close()

    acc_after, failures = final_eval or evaluate_policy(policy, cfg, n_failures=3)
    show("\n".join(failures))
    show(f"greedy test accuracy: {state['acc_before']:.1%} before RL -> {acc_after:.1%} after "
         f"{cfg.steps} steps ({time.time() - t_start:.0f}s)")
    summary = dict(method=cfg.method, samples=cfg.samples, scheme=cfg.scheme, steps=cfg.steps,
                   seed=cfg.seed, acc_before=state["acc_before"], acc_after=acc_after,
                   seconds=round(time.time() - t_start, 3),
                   peak_activation_bytes=state["peak_activation_bytes"],
                   skipped_updates=state["skipped_updates"])
    if out:
        save_dir_atomic(os.path.join(out, "model"), lambda tmp: save_model(policy, tmp))
        write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary

# -----------------------------------------------------------------------------
# 7. Measurements: naive vs BGPO side by side, and gradient quality
#    compare:    for each n_t and method, the objective (1/B) sum_i R_i, the
#                largest gradient difference to "naive", the peak activation
#                bytes and the time of one policy_loss_backward call.
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


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def fixed_batch(policy, cfg):
    """One seeded rollout batch on the first cfg.prompts train problems."""
    rng = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    return rollout(policy, policy.task.train[:cfg.prompts], cfg, rng)


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
            noise_rng = torch.Generator().manual_seed(cfg.seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(cfg.perturb * p.std() * torch.randn(p.shape, generator=noise_rng).to(p))
        reference = None
        for method in ("naive", "two_pass", "bgpo"):
            times = []
            for _ in range(repeats):  # the fastest of `repeats` calls; memory is the same each time
                model.zero_grad(set_to_none=True)
                loss, nbytes, seconds, cuda_peak = measure(lambda: policy_loss_backward(
                    model, batch.prompts, batch.responses, batch.advantages, masks, weights,
                    old_terms, policy.mask_id, method=method, clip=cfg.clip,
                    prompt_mask=batch.prompt_mask), model, policy.device)
                times.append(seconds)
            grad = flat_grad(model)
            reference = grad if reference is None else reference
            rows.append(dict(method=method, samples=n, objective=-loss,
                             grad_max_abs_diff=(grad - reference).abs().max().item(),
                             peak_activation_bytes=nbytes, seconds=min(times),
                             cuda_peak_bytes=cuda_peak))
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

# -----------------------------------------------------------------------------
# 8. Command line


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: 'bgpo.py: error: ...', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def build_parser():
    p = Parser(prog="bgpo.py", description="BGPO on a tiny diffusion LM (or a real one).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true",
                      help="table: naive vs two_pass vs bgpo, per n_t (value, gradient, memory, time)")
    mode.add_argument("--grad-stats", action="store_true",
                      help="table: relative std, bias and error of the BGPO gradient, per n_t and scheme")
    a = p.add_argument
    a("--samples", type=_sample_counts, default=[16], metavar="N[,N...]",
      help="n_t, Monte-Carlo samples per response (a list for --compare / --grad-stats)")
    a("--method", choices=METHODS, default="bgpo", help="objective for training")
    a("--scheme", choices=SCHEMES, default="stratified", help="how masks are drawn")
    a("--steps", type=_number(int, 1), default=250, help="RL steps")
    a("--prompts", type=_number(int, 1), default=16, help="prompts per step")
    a("--group", type=_number(int, 2), default=8, help="G, responses per prompt")
    a("--lr", type=_number(float, 0, low_open=True), default=1e-4, help="AdamW learning rate")
    a("--seed", type=_number(int, 0), default=0)
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--temperature", type=_number(float, 0), default=0.6, help="rollout temperature")
    a("--sampler-steps", type=_number(int, 1), default=None,
      help="denoising steps per response (default: one per token)")
    a("--block-length", type=_number(int, 1), default=None,
      help="sampler block length (default: the response length)")
    a("--updates-per-batch", type=_number(int, 1), default=1,
      help="optimizer updates per rollout batch, on disjoint mini-batches (1 = on-policy)")
    a("--clip", type=_number(float, 0, 1, low_open=True), default=None, metavar="EPS",
      help="PPO clipping of the surrogate ratio (off by default, as in the paper)")
    a("--length-norm", action="store_true",
      help="divide each ELBO term by the response length, as the official code does")
    a("--max-grad-norm", type=_number(float, 0, low_open=True), default=None, metavar="X",
      help="clip the gradient's total norm to X before each update (off by default)")
    a("--eval-every", type=_number(int, 1), default=25, help="steps between test evaluations")
    a("--perturb", type=_number(float, 0), default=0.0,
      help="--compare only: perturb the weights by this many parameter stds (off-policy)")
    a("--json", action="store_true", help="print --compare / --grad-stats rows as JSON")
    a("--out", metavar="DIR", help="write metrics.jsonl, summary.json and the final model here")
    a("--save-every", type=_number(int, 1), default=None, help="checkpoint every N steps under --out")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (its --out)")
    a("--model", metavar="PATH_OR_NAME", help="a transformers masked-LM checkpoint (default: the toy)")
    a("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (LLaDA)")
    a("--mask-id", type=_number(int, 0), default=None, help="[MASK] id if the tokenizer names none")
    a("--response-length", type=_number(int, 1), default=None,
      help="response tokens with --model (default: the longest answer + 1)")
    a("--digits", type=_number(int, 2, 9), default=2, help="operand digits of the task")
    a("--test-size", type=_number(int, 1), default=1000, help="test problems")
    return p


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
    """
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=torch.float32)
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
    except ValueError:
        model = AutoModel.from_pretrained(path, **kwargs)
    return model, tokenizer


def saved_settings(path):
    """The response length and mask id that save_model wrote beside a model, or {}."""
    try:
        with open(os.path.join(path, SAVED_SETTINGS)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def load_policy(args, parser, device, checkpoint=None):
    """The toy warm start, or the checkpoint given by --model (or --resume)."""
    path = checkpoint or args.model
    source = f"--resume {args.resume}" if checkpoint else f"--model {path}"
    if path is None:
        try:
            model, tokenizer, task, _ = toy_dllm.warm_start(n_digits=args.digits,
                                                            n_test=args.test_size)
        except ValueError as e:
            parser.error(str(e))
    else:
        looks_like_hub_name = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if not os.path.exists(path) and not looks_like_hub_name:
            parser.error(f"{source}: no such file or directory")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, tokenizer = load_checkpoint(path, args.trust_remote_code)
        except Exception as e:  # transformers raises many kinds; all mean "unusable"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            parser.error(f"{source}: cannot load a masked LM and tokenizer ({reason})")
        try:
            task = toy_dllm.make_task(args.digits, args.test_size)
        except ValueError as e:
            parser.error(str(e))
    saved = saved_settings(path) if path else {}
    mask_id = next((m for m in (args.mask_id, saved.get("mask_id"), tokenizer.mask_token_id)
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
    length = (args.response_length or saved.get("response_length")
              or (task.answer_length if path is None else longest + 1))
    if length < longest:
        parser.error(f"--response-length {length} is shorter than the longest answer ({longest} tokens)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    prompt_len = toy_dllm.encode_prompts(tokenizer, task.prompts(task.test)).shape[1]
    if max_pos is not None and prompt_len + length > max_pos:
        parser.error(f"prompt ({prompt_len}) + response ({length}) tokens exceed the model's "
                     f"{max_pos} positions")
    return Policy(model.to(device).eval(), tokenizer, task, mask_id, length, device)


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


RESUMABLE = ("steps", "device", "save_every", "trust_remote_code")  # what --resume may change


def parse_args(parser, argv):
    """Flags, merged with the saved run's settings under --resume, and checked
    against each other. Returns (args, the checkpoint to resume or None)."""
    unset = object()
    given = {k for k, v in vars(parser.parse_args(
        argv, namespace=argparse.Namespace(**{a.dest: unset for a in parser._actions}))).items()
        if v is not unset}  # the flags typed on the command line, not defaulted
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        saved, found = os.path.join(args.resume, "run.json"), checkpoints(args.resume)
        if not os.path.isfile(saved) or not found:
            parser.error(f"--resume {args.resume}: no run with a checkpoint there")
        try:
            with open(saved) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:
            parser.error(f"--resume {args.resume}: cannot read run.json ({e})")
        if not isinstance(run, dict) or not {"samples", "method", "steps", "seed"} <= set(run):
            parser.error(f"--resume {args.resume}: run.json does not hold this program's settings")
        if run.get("trust_remote_code") and "trust_remote_code" not in given:
            parser.error(f"--resume {args.resume}: its model ships code of its own; "
                         "add --trust-remote-code to allow it to run")
        changed = sorted(k for k in given - {"resume", "out", *RESUMABLE}
                         if getattr(args, k) != run.get(k))
        if changed:
            parser.error("--resume continues a run as it was set up; "
                         f"cannot change --{changed[0].replace('_', '-')}")
        # a setting that run.json lacks (a flag added since) keeps its default;
        # consent to run shipped code comes from this command line only
        args = argparse.Namespace(**{**vars(args), **run, "trust_remote_code": False,
                                     **{k: getattr(args, k) for k in given}})
        args.out, checkpoint = args.resume, found[-1]
    if not (args.compare or args.grad_stats):
        if len(args.samples) != 1:
            parser.error("--samples takes one n_t when training "
                         "(lists are for --compare / --grad-stats)")
        if args.prompts % args.updates_per_batch:
            parser.error(f"--updates-per-batch {args.updates_per_batch} must divide "
                         f"--prompts {args.prompts}")
        if args.save_every and not args.out:
            parser.error("--save-every needs --out")
    return args, checkpoint


def check_sampler_args(args, length, parser):
    """--block-length and --sampler-steps against the response length."""
    block = args.block_length or length
    if length % block:
        parser.error(f"--block-length {block} must divide the response length {length}")
    if (args.sampler_steps or length) % (length // block):
        parser.error(f"--sampler-steps {args.sampler_steps} must be a multiple of the "
                     f"number of blocks ({length // block})")


def main(argv=None):
    parser = build_parser()
    args, checkpoint = parse_args(parser, argv)
    device = resolve_device(args.device, parser)
    policy = load_policy(args, parser, device, checkpoint)
    args.response_length = policy.response_length  # saved in run.json for --resume
    check_sampler_args(args, policy.response_length, parser)
    args.progress = True

    if args.compare or args.grad_stats:
        rows = (compare(policy, args, args.samples) if args.compare
                else grad_stats(policy, args, args.samples))
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        return 0

    args.samples = args.samples[0]
    resume_state = None
    if checkpoint:
        try:
            resume_state = load_trainer_state(checkpoint, device)
        except ValueError as e:
            parser.error(f"--resume {args.resume}: {e}")
        except Exception as e:  # truncated or foreign file: torch raises many kinds
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            parser.error(f"--resume {args.resume}: cannot read "
                         f"{os.path.basename(checkpoint)}/trainer_state.pt ({reason})")
    if args.out:  # only now, with every check passed, is anything written
        prepare_out(args.out, parser, resuming=checkpoint is not None)
        run = {k: v for k, v in vars(args).items() if k != "progress"}
        run["samples"] = [args.samples]
        write_atomic(os.path.join(args.out, "run.json"), json.dumps(run, indent=1) + "\n")
    print(f"BGPO ({args.method}, n_t={args.samples}) on {args.model or 'the toy diffusion LM'}, "
          f"{args.steps} steps of {args.prompts}x{args.group} responses, device {device}")
    try:
        train(policy, args, out=args.out, resume_state=resume_state)
    except KeyboardInterrupt:
        found = checkpoints(args.out) if args.out else []
        hint = (f"continue with --resume {args.out} (from {os.path.basename(found[-1])})"
                if found else "no checkpoint to resume from (see --save-every)")
        print(f"\nbgpo.py: interrupted; {hint}", file=sys.stderr)
        return 130
    return 0


def format_table(rows):
    """Rows of dicts -> an aligned text table, with the units of the columns."""
    if rows and "method" in rows[0]:
        head = ["method", "n_t", "objective", "max|grad-naive|", "act. MB", "ms/call", "time/naive"]
        naive_seconds = {r["samples"]: r["seconds"] for r in rows if r["method"] == "naive"}
        body = [[r["method"], r["samples"], f"{r['objective']:+.6f}", f"{r['grad_max_abs_diff']:.1e}",
                 f"{r['peak_activation_bytes'] / 2**20:.2f}", f"{1000 * r['seconds']:.0f}",
                 f"{r['seconds'] / naive_seconds[r['samples']]:.2f}"]
                + ([f"{r['cuda_peak_bytes'] / 2**20:.1f}"] if r["cuda_peak_bytes"] is not None else [])
                for r in rows]
        if rows[0]["cuda_peak_bytes"] is not None:
            head.append("CUDA peak MB")
    else:
        head = ["scheme", "n_t", "rel. std", "rel. bias", "bias floor", "rel. error"]
        body = [[r["scheme"], r["samples"], f"{r['rel_std']:.3f}", f"{r['rel_bias']:.3f}",
                 f"{r['bias_floor']:.3f}", f"{r['rel_error']:.3f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in [head] + body]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
