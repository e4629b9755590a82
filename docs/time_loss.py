"""The loss call of an off-policy update per method, timed side by side (docs/results.md 4d).

    python docs/time_loss.py                                   # 3 tokens, n_t = 16
    python docs/time_loss.py --response-length 16 --samples 4  # 16 tokens, n_t = 4

The second update of `--updates-per-batch 2`, as training makes it: the old policy's terms
from the rollout's weights, the weights moved by one AdamW step on the first half of the groups,
then policy_loss_backward on the other half (8 prompts x 8 responses), for bgpo, naive and
two_pass in turn, --repeats times, interleaved. Prints each method's median seconds and its
ratio to bgpo's: the median and quartiles over the repeats, each ratio within one round.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bgpo  # noqa: E402

METHODS = ("bgpo", "naive", "two_pass")

def main(argv=None):
    p = argparse.ArgumentParser(prog="docs/time_loss.py", description=__doc__.split("\n")[0])
    p.add_argument("--response-length", type=int, help="as bgpo.py's (16: 8-token blocks, 8 steps)")
    p.add_argument("--samples", type=int, default=16, help="n_t")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    long = args.response_length is not None
    cfg = bgpo.Config(response_length=args.response_length, block_length=8 if long else None,
                      sampler_steps=8 if long else None)
    policy = bgpo.load_policy(cfg, torch.device("cpu"))
    batch = bgpo.fixed_batch(policy, cfg)
    masks, weights, old = bgpo.masks_and_old_terms(policy, batch, args.samples, "stratified",
                                                   torch.Generator().manual_seed(0))
    first, second = torch.arange(len(batch.responses)).chunk(2)  # the two updates' responses
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)
    bgpo.policy_loss_backward(policy.model, batch.prompts[first], batch.responses[first],
                              batch.advantages[first], masks[:, first], weights[:, first],
                              old[:, first], policy.mask_id)
    optimizer.step()                                               # now the second is off-policy
    part = batch[second]
    seconds = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            policy.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            bgpo.policy_loss_backward(policy.model, part.prompts, part.responses, part.advantages,
                                      masks[:, second], weights[:, second], old[:, second],
                                      policy.mask_id, method=method)
            seconds[method].append(time.perf_counter() - start)
    print(f"L = {policy.response_length}, n_t = {args.samples}, {len(second)} responses, "
          f"{args.repeats} rounds")
    for method in METHODS:
        ratio = [t / b for t, b in zip(seconds[method], seconds["bgpo"])]
        q = statistics.quantiles(ratio, n=4)
        print(f"  {method:8} median {statistics.median(seconds[method]):.3f} s, / bgpo: median "
              f"{statistics.median(ratio):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f})")

if __name__ == "__main__":
    main()
