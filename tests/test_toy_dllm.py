"""The tiny masked-diffusion LM: task, tokenizer, masking, loss, sampler, warm start."""
import contextlib
import os
import shutil
import types

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

import toy_dllm
from conftest import TINY_WARM_START, random_batch, tiny_model


class RecordingModel(torch.nn.Module):
    """Wraps a masked LM and keeps a copy of every input it is shown."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    @property
    def dtype(self):
        return self.model.dtype

    def forward(self, input_ids):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids=input_ids)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits ignore the input: position p prefers token p % 10
    with a confidence that grows with p. Shows the sampler's order of commits."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.inputs = vocab, []
        self.dtype = torch.float32

    def forward(self, input_ids):
        self.inputs.append(input_ids.clone())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for p in range(T):
            logits[:, p, p % 10] = 1.0 + p
        return types.SimpleNamespace(logits=logits)


def test_task_splits_are_disjoint_and_seeded():
    a, b = toy_dllm.make_task(seed=3), toy_dllm.make_task(seed=3)
    assert torch.equal(a.test, b.test) and torch.equal(a.train, b.train)
    ids = lambda pairs: set((pairs[:, 0] * 100 + pairs[:, 1]).tolist())
    assert not ids(a.train) & ids(a.test)
    assert len(ids(a.train)) + len(ids(a.test)) == 10_000
    assert not torch.equal(a.test, toy_dllm.make_task(seed=4).test)


def test_prompts_and_answers_are_fixed_width():
    task = toy_dllm.make_task()
    problems = torch.tensor([[37, 48], [5, 0], [99, 99]])
    assert task.prompts(problems) == ["37+48=", "05+00=", "99+99="]
    assert task.answers(problems) == ["085", "005", "198"]


def test_exact_match_reward_is_strict(tokenizer):
    task = toy_dllm.make_task()
    problems = torch.tensor([[37, 48]] * 4)
    pad = tokenizer.pad_token_id
    said = ["085", "086", "85", "0850"]
    responses = torch.tensor([tokenizer(s, add_special_tokens=False).input_ids[:3]
                              + [pad] * (3 - len(s)) for s in said])
    responses[3] = torch.tensor(tokenizer("085", add_special_tokens=False).input_ids)
    wide = torch.cat([responses, torch.full((4, 1), pad)], 1)
    wide[3, 3] = tokenizer.convert_tokens_to_ids("0")
    assert toy_dllm.exact_match_reward(task, tokenizer, problems, wide).tolist() == [1, 0, 0, 0]


def test_reward_at_a_fixed_length_reads_the_answer_up_to_the_first_end_token(tokenizer):
    """--response-length 8: the answer, then end tokens ([PAD]) up to 8."""
    task = toy_dllm.make_task()
    problems = torch.tensor([[37, 48]] * 5)
    ids = lambda text: [tokenizer.convert_tokens_to_ids(c) for c in text]
    pad = tokenizer.pad_token_id
    rows = [ids("085") + [pad] * 5,            # right
            ids("08") + [pad] + ids("5") + [pad] * 4,  # the answer ends at the first end token
            ids("085") + [pad] + ids("7") + [pad] * 3,  # what follows the end is not read
            ids("0850") + [pad] * 4,           # too long
            ids("08") + [pad] * 6]             # too short
    reward = toy_dllm.exact_match_reward(task, tokenizer, problems, torch.tensor(rows))
    assert reward.tolist() == [1, 0, 1, 0, 0]


def test_warm_start_at_a_response_length_learns_the_end_tokens():
    """The warm start is trained at the response length it is asked for (its
    cache key holds it): after a few steps a greedy answer of 8 tokens ends
    in end tokens, which no model trained on 3-token answers could know."""
    model, tokenizer, task, settings = toy_dllm.warm_start(verbose=False, response_length=8,
                                                           **TINY_WARM_START)
    assert settings["response_length"] == 8
    assert model.config.max_position_embeddings >= 6 + 8
    assert toy_dllm.warm_start_path(settings) != toy_dllm.warm_start_path(
        {**settings, "response_length": None})
    prompts = toy_dllm.encode_prompts(tokenizer, task.prompts(task.test))
    out = toy_dllm.generate(model, prompts, tokenizer.mask_token_id, 8, block_length=4, steps=4)
    assert out.shape == (200, 8)
    assert (out[:, 3:] == tokenizer.pad_token_id).float().mean() > 0.95
    with pytest.raises(ValueError, match="shorter than the 3-token answer"):
        toy_dllm.warm_start(verbose=False, response_length=2)


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer("37+48=085", add_special_tokens=False).input_ids
    assert len(ids) == 9
    assert tokenizer.decode(ids) == "37+48=085"
    assert tokenizer.mask_token_id is not None and tokenizer.mask_token_id not in ids


def test_prompt_is_never_masked(tokenizer):
    model = RecordingModel(tiny_model(tokenizer))
    prompts, responses = random_batch(4, 6, 3)
    mask_id = tokenizer.mask_token_id
    t = torch.ones(4)  # the forward process at t = 1 masks every response token
    mask = toy_dllm.forward_mask(responses, t)
    assert mask.shape == responses.shape and mask.all()
    toy_dllm.diffusion_loss(model, prompts, responses, t, mask, mask_id)
    toy_dllm.generate(model, prompts, mask_id, length=4, block_length=2, steps=4, temperature=1.0)
    for seen in model.inputs:
        assert torch.equal(seen[:, :6], prompts)
    assert (model.inputs[0][:, 6:] == mask_id).all()


def test_forward_mask_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    responses = torch.zeros(4, 5000, dtype=torch.long)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9])
    rate = toy_dllm.forward_mask(responses, t, generator=g).float().mean(1)
    assert rate[0] == 0
    assert torch.allclose(rate[1:], t[1:], atol=0.03)


@pytest.mark.parametrize("length,block,steps,temperature,remasking", [
    (3, None, None, 0.0, "low_confidence"),
    (6, 2, 6, 0.0, "low_confidence"),
    (6, 3, 4, 1.0, "low_confidence"),
    (5, 5, 2, 0.7, "random"),
    (4, 1, 8, 0.0, "random"),
])
def test_sampled_responses_have_requested_length_and_no_mask(tokenizer, length, block, steps,
                                                              temperature, remasking):
    model = tiny_model(tokenizer)
    prompts, _ = random_batch(8, 6, 1)
    g = torch.Generator().manual_seed(0)
    out = toy_dllm.generate(model, prompts, tokenizer.mask_token_id, length, block, steps,
                            temperature, remasking, generator=g)
    assert out.shape == (8, length)
    assert not (out == tokenizer.mask_token_id).any()


def test_greedy_sampling_is_deterministic(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    prompts, _ = random_batch(16, 6, 1)
    mask_id = tokenizer.mask_token_id
    runs = [toy_dllm.generate(model, prompts, mask_id, 6, block_length=3) for _ in range(2)]
    assert torch.equal(*runs)
    # sampling at a temperature is reproducible from its generator
    hot = [toy_dllm.generate(model, prompts, mask_id, 6, temperature=1.0,
                             generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*hot)


def test_low_confidence_commits_most_confident_first_and_blocks_left_to_right():
    vocab, mask_id = 14, 13
    model = FixedLogits(vocab)
    prompts = torch.zeros(1, 2, dtype=torch.long)
    out = toy_dllm.generate(model, prompts, mask_id, length=4, block_length=2, steps=4)
    # four steps, one commit each: block 1 (positions 2, 3), then block 2 (4, 5);
    # within a block the later position is more confident, so it goes first
    seen = [x[0, 2:].tolist() for x in model.inputs]
    M = mask_id
    assert seen == [[M, M, M, M], [M, 3, M, M], [2, 3, M, M], [2, 3, M, 5]]
    assert out.tolist() == [[2, 3, 4, 5]]


def test_transfer_schedule_is_linear_and_fills_the_block():
    assert toy_dllm.transfer_schedule(5, 3) == [2, 2, 1]
    assert toy_dllm.transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert sum(toy_dllm.transfer_schedule(32, 7)) == 32


def test_training_loss_matches_hand_computation_on_two_tokens(tokenizer):
    model = tiny_model(tokenizer, dtype=torch.float64)
    prompts = torch.tensor([[3, 10, 4, 11]])       # "3+4="
    responses = torch.tensor([[0, 7]])             # "07"
    t = torch.tensor([0.4], dtype=torch.float64)
    mask = torch.tensor([[False, True]])           # y_t = "0[MASK]"
    loss = toy_dllm.diffusion_loss(model, prompts, responses, t, mask, tokenizer.mask_token_id)

    # by hand: feed "3+4=0[MASK]", read position 5, log-softmax written out
    seq = torch.tensor([[3, 10, 4, 11, 0, tokenizer.mask_token_id]])
    z = model(input_ids=seq).logits[0, 5]
    log_p_7 = z[7] - torch.log(torch.exp(z).sum())
    by_hand = -(1 / 2) * (1 / 0.4) * log_p_7        # -(1/L) (1/t) sum over masked tokens
    assert torch.allclose(loss, by_hand, rtol=1e-12)

    # and with both tokens masked, both terms count
    mask2 = torch.tensor([[True, True]])
    loss2 = toy_dllm.diffusion_loss(model, prompts, responses, t, mask2, tokenizer.mask_token_id)
    z2 = model(input_ids=torch.tensor([[3, 10, 4, 11, 13, 13]])).logits[0]
    lp = z2.log_softmax(-1)
    assert torch.allclose(loss2, -(lp[4, 0] + lp[5, 7]) / (2 * 0.4), rtol=1e-12)


def test_saved_and_reloaded_model_gives_identical_logits(tokenizer, tmp_path):
    model = tiny_model(tokenizer, seed=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model2 = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor(tok2(["37+48=085", "99+01=100"], add_special_tokens=False).input_ids)
    assert torch.equal(model(input_ids=ids).logits, model2(input_ids=ids).logits)
    assert tok2.mask_token_id == tokenizer.mask_token_id
    assert tok2.decode(ids[0]) == "37+48=085"


def test_warm_start_lands_in_its_accuracy_window(warm):
    model, tokenizer, task, settings = warm
    acc, failures = toy_dllm.evaluate(model, tokenizer, task, task.test, n_failures=3)
    assert 0.20 <= acc <= 0.50
    assert len(failures) == 3 and all(f.startswith("model says ") for f in failures)


def test_second_warm_start_call_loads_the_cache_and_trains_nothing(warm, monkeypatch):
    """Guards the cache lookup: with it gone, the second call would train again
    (deterministically, so equal logits alone could not tell)."""
    model = warm[0]
    monkeypatch.setattr(toy_dllm, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    again, _, _, _ = toy_dllm.warm_start()
    ids = torch.tensor([[3, 7, 10, 4, 8, 11, 13, 13, 13]])
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


TINIEST = dict(TINY_WARM_START, max_steps=2)  # a warm start of 2 steps: the cache's plumbing


def weights_of(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("damage", ["no weights", "truncated config", "foreign directory", "a file"])
def test_a_damaged_warm_start_entry_is_trained_again_in_one_line(damage, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path))
    model, _, _, settings = toy_dllm.warm_start(verbose=False, **TINIEST)
    path = toy_dllm.warm_start_path(settings)
    if damage == "no weights":
        os.remove(os.path.join(path, "model.safetensors"))
    elif damage == "truncated config":
        text = open(os.path.join(path, "config.json")).read()
        open(os.path.join(path, "config.json"), "w").write(text[:40])
    else:
        shutil.rmtree(path)
        if damage == "a file":
            open(path, "w").write("not a model")
        else:
            os.makedirs(path)
            open(os.path.join(path, "notes.txt"), "w").write("someone else's")
    capsys.readouterr()
    again = toy_dllm.warm_start(verbose=False, **TINIEST)[0]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and "damaged" in err and "training it again" in err
    assert torch.equal(weights_of(again), weights_of(model))
    toy_dllm.warm_start(verbose=False, **TINIEST)  # now whole: loaded without a word
    assert capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == [".lock", os.path.basename(path)]


def _cold_start(rank, log):
    torch.set_num_threads(1)
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        model = toy_dllm.warm_start(verbose=True, **TINIEST)[0]
        torch.save(weights_of(model), log + ".pt")


def test_concurrent_cold_starts_train_once_and_leave_one_good_entry(tmp_path, monkeypatch):
    """Three processes at once on an empty cache (five seeds started together,
    say): one trains, the others wait for its lock and load what it saved."""
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    fork = torch.multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"p{i}.log") for i in range(3)]
    procs = [fork.Process(target=_cold_start, args=(i, log)) for i, log in enumerate(logs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0], [open(log).read() for log in logs]
    said = [open(log).read() for log in logs]
    assert sum("cached at" in s for s in said) == 1 and not any("damaged" in s for s in said)
    weights = [torch.load(log + ".pt") for log in logs]
    assert all(torch.equal(w, weights[0]) for w in weights)
    entries = [n for n in os.listdir(tmp_path / "cache") if not n.startswith(".")]
    assert len(entries) == 1
    monkeypatch.setattr(toy_dllm, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    assert torch.equal(weights_of(toy_dllm.warm_start(verbose=False, **TINIEST)[0]), weights[0])


def test_a_save_without_weights_is_never_renamed_into_place(tmp_path):
    """What rank 1 of a torchrun run saved before (save_pretrained writes no
    weights there): an error, and nothing at the path."""
    with pytest.raises(RuntimeError, match="weights"):
        toy_dllm.save_dir_atomic(str(tmp_path / "entry"),
                                 lambda tmp: open(os.path.join(tmp, "tokenizer.json"), "w").close())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs,name", [
    (dict(length=6, block_length=4), "block_length"),
    (dict(length=6, block_length=2, steps=4), "steps"),
    (dict(length=0), "length"),
    (dict(length=-3), "length"),
    (dict(length=4, temperature=-1.0), "temperature"),
    (dict(length=4, remasking="sideways"), "remasking"),
])
def test_bad_sampler_arguments_raise_value_error_naming_them(tokenizer, kwargs, name):
    model = tiny_model(tokenizer)
    prompts, _ = random_batch(2, 6, 1)
    with pytest.raises(ValueError, match=name):
        toy_dllm.generate(model, prompts, tokenizer.mask_token_id, **kwargs)


@pytest.mark.parametrize("n_digits", [0, -1])
def test_non_positive_digit_count_raises_value_error(n_digits):
    with pytest.raises(ValueError, match="n_digits"):
        toy_dllm.make_task(n_digits=n_digits)


def test_left_padded_prompt_reads_like_the_unpadded_prompt(tokenizer):
    """With the prompt mask, padding is neither attended nor counted in the
    positions: log-probs and greedy samples equal those of the prompt alone."""
    model = tiny_model(tokenizer, dtype=torch.float64)
    pad, mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
    short, long_ = torch.tensor([[3, 10, 4, 11]]), torch.tensor([[3, 7, 10, 4, 8, 11]])
    prompts = torch.cat([torch.cat([torch.full((1, 2), pad), short], 1), long_])   # (2, 6)
    prompt_mask = prompts != pad
    prompt_mask[1] = True
    responses = torch.tensor([[0, 7, 1], [0, 8, 5]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    alone = toy_dllm.token_log_probs(model, short, responses[:1], mask[:1], mask_id)
    padded = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id, prompt_mask)
    assert torch.allclose(padded[0], alone[0], rtol=1e-10)
    unmasked = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id)
    assert not torch.allclose(unmasked[0], alone[0], rtol=1e-3)   # padding does matter
    gen = dict(temperature=0.0, block_length=2)
    assert torch.equal(toy_dllm.generate(model, prompts, mask_id, 4, prompt_mask=prompt_mask, **gen)[0],
                       toy_dllm.generate(model, short, mask_id, 4, **gen)[0])
    ids, real = toy_dllm.encode_padded_prompts(tokenizer, ["3+4=", "37+48="])
    assert torch.equal(ids, prompts) and torch.equal(real, prompt_mask)
    assert toy_dllm.encode_padded_prompts(tokenizer, ["3+4=", "5+6="])[1] is None
