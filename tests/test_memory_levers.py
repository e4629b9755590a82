"""Memory levers for a real diffusion LM: LoRA adapters (peft) and activation
checkpointing (transformers), on the toy and tiny models."""
import json
import shutil

import peft
import pytest
import torch

import bgpo
import real_dllm
from conftest import random_batch, tiny_model
from test_checkpoints_and_errors import assert_clean_error, saved_run  # noqa: F401 (fixture)
from test_objectives import assert_equivalent_on_policy_bounded_off
from test_rl import SMALL, assert_same_final_state, read_metrics, run, toy_policy

MASK = 13


def with_lora(model, seed=0):
    """model with rank-4 adapters whose B is random too (peft starts B at 0,
    which would leave A without gradient)."""
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4,
                                                       target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_objectives_agree_on_a_lora_model_and_only_adapters_get_gradients(tokenizer):
    model = with_lora(tiny_model(tokenizer, dtype=torch.float64))
    prompts, responses = random_batch(8, 6, 4)
    advantages = torch.linspace(-1.5, 1, 8, dtype=torch.float64)
    masks, weights = bgpo.sample_masks(responses, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = bgpo.elbo_terms(model, prompts, responses, masks, weights, MASK)

    model.zero_grad(set_to_none=True)
    bgpo.policy_loss_backward(model, prompts, responses, advantages, masks, weights, old, MASK)
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    assert_equivalent_on_policy_bounded_off(model, (prompts, responses, advantages), masks,
                                            weights, old)


def test_lora_on_a_saved_toy_model_trains_adapters_only_and_resumes_exactly(saved_run, tmp_path,
                                                                            capsys):
    """Guards LoRA resume: the resumed run saves the uninterrupted run's adapters
    and optimizer state bit for bit, names the true base in bgpo.json, and
    reloads to the same logits (caught: lora_base taken from the checkpoint)."""
    base = saved_run / "model"
    args = ["--model", str(base), "--lora-rank", "4", "--lr", "1e-3", "--steps", "3",
            "--prompts", "4", "--group", "4", "--samples", "2", "--save-every", "2"]
    assert run(args + ["--out", str(tmp_path / "whole")], capsys)[0] == 0
    starts = []  # the adapters' random start follows --seed alone
    for elsewhere in (1, 2):
        torch.manual_seed(elsewhere)
        model = bgpo.load_policy(bgpo.parse_args(bgpo.build_parser(), args[:-2])[0],
                                 torch.device("cpu")).model
        starts.append({k: v for k, v in model.state_dict().items() if "lora_A" in k})
    assert starts[0] and all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    saved = tmp_path / "whole" / "model"
    assert (saved / "adapter_config.json").exists() and not (saved / "model.safetensors").exists()
    assert json.load(open(saved / "bgpo.json"))["lora_base"] == str(base.resolve())
    cfg, _ = bgpo.parse_args(bgpo.build_parser(), ["--model", str(saved)])
    policy = bgpo.load_policy(cfg, torch.device("cpu"))
    original = bgpo.load_policy(bgpo.parse_args(bgpo.build_parser(), ["--model", str(base)])[0],
                                torch.device("cpu")).model.state_dict()
    trained = policy.model.get_base_model().state_dict()
    lora = {k for k in trained if "lora_" in k}
    assert lora and all(torch.equal(trained[k].cpu(), original[k.replace(".base_layer", "")])
                        for k in trained if k not in lora)         # the base did not move
    assert any(trained[k].abs().max() > 0 for k in lora if "lora_B" in k)  # the adapters did

    cut = tmp_path / "cut"  # the same run, resumed from its checkpoint at step 2
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "model")
    status, err = run(["--resume", str(cut)], capsys)
    assert status == 0, err
    assert read_metrics(cut) == read_metrics(tmp_path / "whole")
    assert_same_final_state(cut, tmp_path / "whole")
    # what a user reloads: the resumed run's adapters name the true base (caught:
    # lora_base taken from the checkpoint resumed), and give the same logits
    assert json.load(open(cut / "model" / "bgpo.json"))["lora_base"] == str(base.resolve())
    logits = []
    for out in (tmp_path / "whole", cut):
        cfg, _ = bgpo.parse_args(bgpo.build_parser(), ["--model", str(out / "model")])
        reloaded = bgpo.load_policy(cfg, torch.device("cpu"))
        logits.append(reloaded.model(input_ids=torch.tensor([[3, 7, 10, 4, 8, 11, 13, 13, 13]]))
                      .logits)
    assert torch.equal(logits[0], logits[1])


def test_gradient_checkpointing_keeps_the_gradient_and_cuts_activations(warm):
    policy = toy_policy(warm)
    cfg = bgpo.Config(prompts=2, group=4, gradient_checkpointing=True)
    rows = bgpo.compare(policy, cfg, [2], repeats=1)
    for r in rows:
        assert r["checkpointed_activation_bytes"] < r["peak_activation_bytes"] / 2
    assert rows[2]["grad_max_abs_diff"] < 1e-6
    model = policy.model  # the same gradient with checkpointing (float64: to rounding)
    model.double()
    batch = bgpo.fixed_batch(policy, cfg)
    masks, weights, old = bgpo.masks_and_old_terms(policy, batch, 2, "stratified",
                                                   torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        real_dllm.set_checkpointing(model, on)
        model.zero_grad(set_to_none=True)
        bgpo.policy_loss_backward(model, batch.prompts, batch.responses, batch.advantages.double(),
                                  masks, weights, old, policy.mask_id)
        grads.append(bgpo.flat_grad(model).clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-12, atol=0)
    assert not model.bert.encoder.layer[0].attention.training  # no dropout came back


@pytest.mark.parametrize("args,words", [
    (["--lora-alpha", "8"], ["--lora-alpha", "--lora-rank"]),
    (["--lora-targets", "query"], ["--lora-targets", "--lora-rank"]),
    (["--lora-rank", "0"], ["--lora-rank"]),
    (["--lora-rank", "2", "--lora-targets", "nosuchlayer"], ["--lora-targets nosuchlayer"]),
])
def test_bad_lora_flags_are_one_line_errors(warm, args, words, capsys):
    status, err = run(SMALL + args, capsys)
    assert_clean_error(status, err, *words)


def test_activation_budget_stops_before_anything_is_written_naming_what_fits(warm, tmp_path,
                                                                            capsys):
    rows = bgpo.compare(toy_policy(warm), bgpo.Config(prompts=2, group=4, mc_batches=(1, 2)),
                        [2, 3], repeats=1)
    naive = {r["samples"]: r["peak_activation_bytes"] / 2**20 for r in rows
             if r["method"] == "naive"}
    # --mc-batch K: BGPO's samples K to a forward pass, K times the memory, the same gradient
    # every method on the same work (all samples computed); merging is a row of its own
    assert [(r["method"], r["mc_batch"], r["merged"]) for r in rows if r["samples"] == 2] == [
        ("naive", 1, False), ("two_pass", 1, False), ("bgpo", 1, False), ("bgpo", 2, False),
        ("bgpo", 1, True), ("tangent", 1, False), ("jensen", 1, False)]
    bgpo_rows = {(r["samples"], r["mc_batch"]): r for r in rows
                 if r["method"] == "bgpo" and not r["merged"]}
    assert set(bgpo_rows) == {(2, 1), (2, 2), (3, 1), (3, 2)}
    for n in (2, 3):
        one, two = bgpo_rows[n, 1], bgpo_rows[n, 2]
        assert two["peak_activation_bytes"] == pytest.approx(2 * one["peak_activation_bytes"],
                                                             rel=0.05)
        assert one["grad_max_abs_diff"] < 1e-6 and two["grad_max_abs_diff"] < 1e-6
    budget = str((naive[2] + naive[3]) / 2)  # n_t = 2 fits, 3 does not
    args = ["--prompts", "2", "--group", "4", "--steps", "1", "--samples", "8",
            "--activation-budget", budget, "--out", str(tmp_path / "run")]
    status, err = run(args + ["--method", "naive"], capsys)
    assert_clean_error(status, err, f"--activation-budget {float(budget):g} MB",
                       "naive at n_t = 8", "the largest n_t that fits is 2")
    assert not (tmp_path / "run").exists()
    status, err = run(args[:-4] + ["--activation-budget", "0.001", "--method", "naive"], capsys)
    assert_clean_error(status, err, "not even n_t = 1 fits")
    status, err = run(args, capsys)  # BGPO's memory does not grow with n_t: it fits
    assert status == 0, err


def test_activation_budget_measures_at_the_runs_mc_batch(warm, tmp_path, capsys):
    """K samples to a forward pass hold K samples' activations: a budget that
    one sample fits is refused at --mc-batch 8 (it measured K = 1 before)."""
    rows = bgpo.compare(toy_policy(warm), bgpo.Config(prompts=2, group=4), [1], repeats=1)
    one_sample = rows[0]["peak_activation_bytes"] / 2**20
    args = ["--prompts", "2", "--group", "4", "--steps", "1", "--samples", "8",
            "--activation-budget", str(1.5 * one_sample), "--out", str(tmp_path / "run")]
    status, err = run(args + ["--mc-batch", "8"], capsys)
    assert_clean_error(status, err, "bgpo at n_t = 8 with --mc-batch 8 needs")
    assert not (tmp_path / "run").exists()
    status, err = run(args, capsys)  # one sample a pass: it fits
    assert status == 0, err
