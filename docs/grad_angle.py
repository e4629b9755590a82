"""How far BGPO's off-policy gradient is from the exact one (docs/results.md 4c, the sweep).

    python docs/grad_angle.py --updates-per-batch 4 --steps 64 --eval-every 4 --seed 0 \
        --out runs/sweep/bgpo-u4-s0             # any flags of bgpo.py; --method bgpo only

This is `python bgpo.py` with one more backward per update: before BGPO's own, the exact
gradient of R = A e^{mean_j d_j} (two_pass) on the same masks and old terms. Each update's
record in metrics.jsonl then also holds

    cos = cos(grad R_lb, grad R),   rel = |grad R_lb - grad R| / |grad R|

(both of the loss -(1/B) sum_i; on-policy 1 and 0; none where every A of the mini-batch is 0
and both gradients vanish). The trained path is BGPO's, bit for bit: the extra backward draws no
random numbers and its gradient is dropped before BGPO's. A study, not part of training: it
wraps bgpo.py's functions and adds none to them.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bgpo  # noqa: E402

def angle(bound, exact):
    """cos and the relative norm of the difference of two flat gradients, in float64."""
    bound, exact = bound.double(), exact.double()
    return dict(cos=float(bound @ exact / (bound.norm() * exact.norm())),
                rel=float((bound - exact).norm() / exact.norm()))

def loss_backward_with_angle(model, prompts, responses, advantages, masks, weights, old_terms,
                             mask_id, method="bgpo", *args, diagnostics=None, **kwargs):
    """bgpo.policy_loss_backward, and into diagnostics (off-policy: old_terms given) the
    angle between its gradient and two_pass's. .grad must be empty on entry, as train() leaves it."""
    call = (model, prompts, responses, advantages, masks, weights, old_terms, mask_id)
    if old_terms is None or method != "bgpo":
        return LOSS_BACKWARD(*call, method, *args, diagnostics=diagnostics, **kwargs)
    LOSS_BACKWARD(*call, "two_pass", *args, **kwargs)
    exact = bgpo.flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    loss = LOSS_BACKWARD(*call, method, *args, diagnostics=diagnostics, **kwargs)
    if diagnostics is not None and exact.norm() > 0:  # every A = 0: no direction to compare
        diagnostics.update(angle(bgpo.flat_grad(model), exact))
    return loss

LOSS_BACKWARD = bgpo.policy_loss_backward

if __name__ == "__main__":
    if any(a.startswith("--method") for a in sys.argv[1:]):
        sys.exit("grad_angle.py: trains BGPO only; drop --method")
    bgpo.policy_loss_backward = loss_backward_with_angle  # train() looks it up by name
    sys.exit(bgpo.main(sys.argv[1:]))
