"""How much probability the likelihood's softmax gives [MASK], which the sampler never picks
(docs/paper-and-code.md, "One policy, two normalisations").

    python docs/mask_mass.py [MODEL_DIR]     # default: the toy's warm start

On the fixed seeded batch of --compare (16 prompts x 8 responses) and 16 stratified masks of
each: the mean and largest P([MASK]) at masked positions, and the mean of log(1 - P([MASK])),
which is what each masked token's log-probability in the ELBO has in addition to the sampler's.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bgpo  # noqa: E402
import toy_dllm  # noqa: E402

if len(sys.argv) > 1:
    model, tokenizer = bgpo.load_checkpoint(sys.argv[1])
else:
    model, tokenizer = toy_dllm.warm_start(verbose=False)[:2]
task, mask_id = toy_dllm.make_task(), tokenizer.mask_token_id
policy = bgpo.Policy(model, tokenizer, task, mask_id, task.answer_length, torch.device("cpu"))
batch = bgpo.fixed_batch(policy, bgpo.Config())
masks, _, _ = bgpo.masks_and_old_terms(policy, batch, 16, "stratified",
                                       torch.Generator().manual_seed(0), old=False)
with torch.no_grad():
    p = torch.cat([toy_dllm.forward_logits(model, torch.cat(
        [batch.prompts, torch.where(m, mask_id, batch.responses)], 1))[:, batch.prompts.shape[1]:]
        .softmax(-1)[..., mask_id][m] for m in masks])                # at every masked position
print(f"P([MASK]) at masked positions: mean {p.mean():.2e}, largest {p.max():.2e}; "
      f"mean log(1 - P) {torch.log1p(-p).mean():.2e} nats per masked token")
