"""The noise of BGPO's gradient and of the ELBO estimate, per mask scheme and n_t
(the paper's Figure 3 at toy scale; docs/results.md 4b and 6).

    python docs/grad_stats.py --samples 1,2,4,8,16 --json > docs/data/grad_stats_len3.json
    python docs/grad_stats.py --samples 1,2,4,8,16 --response-length 16 --block-length 8 \
        --sampler-steps 8 --json > docs/data/grad_stats_len16.json

On a fixed seeded batch (16 prompts x 8 responses of the toy's warm start), for each scheme and
n_t, 8 mask draws: their ELBO estimates against the exact ELBO (all 2^L - 1 masks; L > 10: 8 x
256 stratified samples) and their BGPO gradients against g*, 8 draws at n_t = 256. A study,
not part of training: it uses bgpo.py's functions and adds none to them.
"""
import argparse
import itertools
import json
import math
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bgpo  # noqa: E402
import runs  # noqa: E402
from runs import SCHEMES  # noqa: E402

def bgpo_gradient(policy, batch, masks, weights, old_terms):
    bgpo.measure_loss_call(policy, batch, masks, weights, old_terms, "bgpo")
    grad = bgpo.flat_grad(policy.model)
    policy.model.zero_grad(set_to_none=True)
    return grad

def grad_stats(policy, cfg, sample_counts, draws=8, golden_samples=256):
    """Rows of scheme x n_t (the banner). A draw's masks for n_t are every
    (max/n_t)-th of one draw at the largest n_t: the rows differ by n_t, not by luck."""
    batch = bgpo.fixed_batch(policy, cfg)
    if not batch.advantages.any():
        raise ValueError("every group of the fixed batch has equal rewards: no gradient to study")
    rng = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=draws * (1 + len(SCHEMES)), desc="draws", dynamic_ncols=True, leave=False)

    def measured(scheme, n_ts):  # n_t -> BGPO gradients, ELBO estimates, masks computed
        got = {n: [] for n in n_ts}  # each n_t once, even if listed twice
        for _ in range(draws):
            shared = bgpo.masks_and_old_terms(policy, batch, max(n_ts), scheme, rng, cfg.length_norm)
            for n in got:  # a sub-grid of the shared draw, or a draw of its own
                masks, weights, old_terms = ((x[::max(n_ts) // n] for x in shared)
                                             if max(n_ts) % n == 0 else bgpo.masks_and_old_terms(
                                                 policy, batch, n, scheme, rng, cfg.length_norm))
                computed = sum(((c > 0) & (w > 0)).sum(0) for _, w, _, c in bgpo.mc_passes(masks, weights))
                got[n].append((bgpo_gradient(policy, batch, masks, weights, old_terms),
                               old_terms.mean(0), computed.float()))  # old_terms: the l_j
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
        n_ts = [n for n in sample_counts if scheme != "complementary" or n % 2 == 0]
        for n, (g, elbo, masks) in (measured(scheme, n_ts) if n_ts else {}).items():
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
        terms = bgpo.elbo_terms(policy.model, batch.prompts, batch.responses,
                           subsets[:, None].expand(-1, B, -1).to(dev), weights.to(dev),
                           policy.mask_id, batch.prompt_mask, mc_batch=64)         # (S, B)
    chance = torch.tensor([L * math.comb(L, s) for s in sizes.tolist()], device=dev)
    return (terms / chance[:, None]).sum(0)

#####

def main(argv=None):
    p = argparse.ArgumentParser(prog="docs/grad_stats.py", description=__doc__.split("\n")[0])
    p.add_argument("--samples", default="1,2,4,8,16", help="the n_t to measure, comma-separated")
    for name in ("response-length", "block-length", "sampler-steps"):
        p.add_argument("--" + name, type=int, help="as bgpo.py's")
    p.add_argument("--length-norm", action="store_true", help="as bgpo.py's")
    p.add_argument("--draws", type=int, default=8, help="mask draws per scheme and n_t")
    p.add_argument("--json", action="store_true", help="rows as JSON, not a table")
    args = p.parse_args(argv)
    cfg = runs.Config(response_length=args.response_length, block_length=args.block_length,
                      sampler_steps=args.sampler_steps, length_norm=args.length_norm)
    policy = bgpo.load_policy(cfg, torch.device("cpu"))
    rows = grad_stats(policy, cfg, [int(n) for n in args.samples.split(",")], args.draws)
    print(json.dumps(rows, indent=1) if args.json else runs.format_table(rows))

if __name__ == "__main__":
    main()
