"""Diffusion LMs whose code ships with the checkpoint, written for
transformers 4.x (LLaDA, Dream): stand-ins with their traits (tests/remote_code)
load, train, compare, save and resume through --model --trust-remote-code."""
import json
import uuid

import pytest
import torch

import bgpo
import real_dllm
import toy_dllm
from conftest import random_batch, tiny_model
from standins import DREAM, LLADA, make_standin
from test_objectives import assert_equivalent_on_policy_bounded_off
from test_rl import read_metrics, run

TINY = ["--steps", "2", "--prompts", "2", "--group", "2", "--samples", "2", "--test-size", "20"]
MASK_ID = {"llada_like": 15, "dream_like": None}  # LLaDA's tokenizer names no mask token


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    for kind in (LLADA, DREAM):
        make_standin(kind, root / kind["code"])
    return root


def flags(standins, code):
    mask = ["--mask-id", str(MASK_ID[code])] if MASK_ID[code] is not None else []
    return ["--model", str(standins / code), "--trust-remote-code"] + mask


def load(standins, code):
    cfg, _ = bgpo.parse_args(bgpo.build_parser(), flags(standins, code) + TINY)
    return bgpo.load_policy(cfg, torch.device("cpu"))


def test_standins_fail_to_load_without_the_compatibility_step(tmp_path, monkeypatch):
    """The stand-ins have the traits that break 4.x code under 5.x (fresh code,
    so that no class adjusted by another test is reused)."""
    monkeypatch.setattr(real_dllm, "adapt_shipped_code", lambda config, path: None)
    for kind, error in ((LLADA, "all_tied_weights_keys"), (DREAM, "default")):
        path = tmp_path / kind["code"]
        make_standin(kind, path)
        for py in path.glob("*.py"):  # new file contents: transformers imports them anew
            py.write_text(py.read_text() + f"# {uuid.uuid4()}\n")
        with pytest.raises(Exception, match=error):
            bgpo.load_checkpoint(str(path), trust_remote_code=True)


@pytest.mark.parametrize("code", ["llada_like", "dream_like"])
def test_standin_trains_compares_saves_and_resumes(standins, code, tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run(flags(standins, code) + TINY + ["--save-every", "1", "--out", str(out)],
                      capsys)
    assert status == 0, err
    saved = out / "checkpoint-2"
    assert list(saved.glob(f"modeling_{code}.py")) and list(saved.glob("configuration_*.py"))
    status, err = run(["--resume", str(out), "--steps", "3", "--trust-remote-code"], capsys)
    assert status == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert bgpo.main(["--model", str(out / "model"), "--trust-remote-code", "--compare",
                      "--samples", "1,2", "--prompts", "2", "--group", "2", "--test-size", "20",
                      "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["method"], r["samples"]) for r in rows} == {
        (m, n) for m in bgpo.METHODS for n in (1, 2)}


@pytest.mark.parametrize("code", ["llada_like", "dream_like"])
def test_objectives_agree_on_standins(standins, code):
    """BGPO and two_pass give naive's gradient on-policy, the bound holds
    off-policy: on each architecture as loaded (Dream's read shifted)."""
    policy = load(standins, code)
    model = policy.model.double()
    g = torch.Generator().manual_seed(0)
    prompts = toy_dllm.encode_prompts(policy.tokenizer, policy.task.prompts(policy.task.test[:6]))
    responses = torch.randint(10, (6, policy.response_length), generator=g)   # digit tokens
    advantages = torch.linspace(-1.5, 1, 6, dtype=torch.float64)
    masks, weights = bgpo.sample_masks(responses, 4, g)
    with torch.no_grad():
        old = bgpo.elbo_terms(model, prompts, responses, masks, weights, policy.mask_id)

    assert_equivalent_on_policy_bounded_off(model, (prompts, responses, advantages), masks,
                                            weights, old, policy.mask_id)


def test_loaded_dream_checkpoint_reads_its_logits_one_position_earlier(standins):
    """bgpo.load_checkpoint gives a model that every function reads right, with
    no further call: the Dream stand-in's prediction for token i sits at i - 1."""
    model, tokenizer = bgpo.load_checkpoint(str(standins / "dream_like"), trust_remote_code=True)
    assert real_dllm.reads_shifted(model)
    assert not real_dllm.reads_shifted(load(standins, "llada_like").model)
    mask_id = tokenizer.mask_token_id
    prompts = toy_dllm.encode_prompts(tokenizer, ["12+34=", "56+78="])         # (2, 6)
    responses = torch.tensor([[0, 4, 6, 12], [1, 3, 4, 12]])
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    got = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id)
    noisy = torch.cat([prompts, torch.where(mask, mask_id, responses)], 1)
    with torch.no_grad():
        logp = real_dllm.unwrap(model)(input_ids=noisy).logits.log_softmax(-1)  # as it comes
    at_previous = logp[torch.arange(2)[:, None], torch.arange(5, 9), responses]
    assert torch.allclose(got, at_previous, atol=1e-6)
    assert not torch.allclose(got, logp[torch.arange(2)[:, None], torch.arange(6, 10), responses],
                              atol=1e-3)


def test_uninitialised_rotary_buffer_is_recomputed_or_refused(standins, tokenizer):
    model = real_dllm.unwrap(bgpo.load_checkpoint(str(standins / "dream_like"), True)[0])
    rotary = model.model.rotary_emb
    expected, _ = real_dllm.default_rope_parameters(model.config)
    assert torch.equal(rotary.inv_freq, expected)
    for garbage in (torch.zeros_like(expected), torch.full_like(expected, -1.9e-30),
                    torch.full_like(expected, float("nan")), expected.flip(0)):
        rotary.inv_freq.copy_(garbage)           # what torch.empty may hold
        assert real_dllm.uninitialised_buffers(model) == ["model.rotary_emb.inv_freq"]
        real_dllm.finish_shipped_model(model)
        assert torch.equal(rotary.inv_freq, expected)
    bert = tiny_model(tokenizer)                  # a buffer with no way to compute it again
    bert.bert.embeddings.register_buffer("inv_freq", torch.full((4,), float("nan")),
                                         persistent=False)
    with pytest.raises(ValueError, match="bert.embeddings.inv_freq"):
        real_dllm.finish_shipped_model(bert)


def test_saved_checkpoint_carries_code_of_a_class_registered_by_its_module(standins, tmp_path):
    model = real_dllm.unwrap(bgpo.load_checkpoint(str(standins / "llada_like"), True)[0])
    type(model)._auto_class = None  # as when the code's own AutoModel.register came first
    real_dllm.finish_shipped_model(model)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "modeling_llada_like.py").exists()


def test_padding_is_hidden_in_the_form_each_model_takes(standins, tokenizer):
    """BERT takes a 2-D mask, the Dream stand-in a 4-D one (a 2-D one raises),
    the LLaDA stand-in ignores any: it reads the padding as tokens."""
    bert = tiny_model(tokenizer, dtype=torch.float64)
    assert real_dllm.padding_form(bert) == "2d" and real_dllm.adapt(bert) is bert  # as it is
    forms = {}
    for code in ("dream_like", "llada_like"):
        policy = load(standins, code)
        model, end = policy.model.double(), toy_dllm.end_token_id(policy.tokenizer)
        forms[code] = model.padding
        short = toy_dllm.encode_prompts(policy.tokenizer, ["2+3="])                 # (1, 4)
        padded = torch.cat([torch.full((1, 2), end), short], 1)                     # (1, 6)
        real = torch.tensor([[False, False, True, True, True, True]])
        responses, mask = torch.tensor([[5, 12, 12]]), torch.tensor([[True, True, False]])
        lp = lambda p, m: toy_dllm.token_log_probs(model, p, responses, mask, policy.mask_id, m)
        same = torch.allclose(lp(padded, real), lp(short, None), rtol=1e-10)
        assert same == (forms[code] != "none") == real_dllm.hides_padding(model)
    assert forms == {"dream_like": "4d", "llada_like": "none"}


def test_gradient_checkpointing_refused_by_a_model_is_a_one_line_error(standins, capsys):
    for mode in ([], ["--compare", "--samples", "1,2"]):
        status, err = run(flags(standins, "llada_like") + TINY + mode + ["--gradient-checkpointing"],
                          capsys)
        assert status == 2 and err.count("\n") == 1
        assert "--gradient-checkpointing" in err and "does not support" in err


def test_lora_adapts_every_linear_layer_but_the_head_of_a_model_that_does_not_name_it(standins):
    cfg, _ = bgpo.parse_args(bgpo.build_parser(), flags(standins, "llada_like") + ["--lora-rank", "2"])
    model = bgpo.load_policy(cfg, torch.device("cpu")).model
    adapted = {n.split("base_model.model.")[1].rsplit(".lora_A", 1)[0]
               for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == {f"model.blocks.{i}.{name}" for i in (0, 1)
                       for name in ("att_proj", "attn_out", "ff_proj", "ff_out")}


def test_adapter_reads_a_shifted_model_one_position_earlier(tokenizer):
    """A model that predicts token i at position i - 1 (Dream's convention),
    wrapped once: log-probs and greedy samples are read there."""
    model = tiny_model(tokenizer, dtype=torch.float64)
    prompts, responses = random_batch(2, 6, 3)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    mask_id = tokenizer.mask_token_id
    plain = toy_dllm.token_log_probs(model, prompts, responses, mask, mask_id)
    noisy = torch.cat([prompts, torch.where(mask, mask_id, responses)], 1)
    logp = model(input_ids=noisy).logits.log_softmax(-1)                      # (B, T, V)
    at = lambda pos: logp[torch.arange(2)[:, None], pos, responses]           # (B, L)
    assert torch.allclose(plain, at(torch.arange(6, 9)), rtol=1e-12)
    shifted_model = real_dllm.MaskedLM(model, shifted=True)
    shifted = toy_dllm.token_log_probs(shifted_model, prompts, responses, mask, mask_id)
    assert torch.allclose(shifted, at(torch.arange(5, 8)), rtol=1e-12)
    # the sampler reads the same place: greedy tokens = argmax of the logits at i - 1
    out = toy_dllm.generate(shifted_model, prompts, mask_id, 1)
    first = model(input_ids=torch.cat([prompts, torch.full((2, 1), mask_id)], 1)).logits[:, 5]
    first[:, mask_id] = -float("inf")
    assert torch.equal(out[:, 0], first.argmax(-1))


def test_shifted_logits_are_chosen_by_model_type_and_overridable(standins, tmp_path):
    from test_checkpoints_and_errors import make_bert_checkpoint
    dream = str(standins / "dream_like")
    assert real_dllm.reads_shifted(bgpo.load_checkpoint(dream, True)[0])          # auto: by type
    assert not real_dllm.reads_shifted(bgpo.load_checkpoint(dream, True, shifted=False)[0])
    make_bert_checkpoint(tmp_path / "bert")
    bert, _ = bgpo.load_checkpoint(str(tmp_path / "bert"), False)
    assert not isinstance(bert, real_dllm.MaskedLM)                                # plain: as is
    assert real_dllm.reads_shifted(bgpo.load_checkpoint(str(tmp_path / "bert"), False, True)[0])
