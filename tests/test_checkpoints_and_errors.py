"""Real transformers checkpoints, resumable runs, skipped non-finite steps and
one-line errors for everything a user can get wrong."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

import bgpo
import real_dllm
from test_rl import SMALL, assert_same_final_state, read_metrics, run

TINY = ["--steps", "2", "--prompts", "2", "--group", "2", "--samples", "2", "--test-size", "20"]


@pytest.fixture(scope="module")
def saved_run(warm, tmp_path_factory):
    """A 3-step toy run with a checkpoint at step 3. Tests copy it before touching it."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert run(SMALL + ["--save-every", "3", "--out", str(out)])[0] == 0
    return out


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def copy_of(saved_run, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def make_bert_checkpoint(path, with_mask=True):
    """A tiny BERT with its own WordPiece vocabulary, saved like any hub model."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if with_mask else [])
    words = specials + list("0123456789+=") + [f"##{d}" for d in "0123456789"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)},
                              mask_token="[MASK]" if with_mask else None)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def test_wordpiece_checkpoint_trains_through_model_flag(tmp_path, capsys):
    tokenizer = make_bert_checkpoint(tmp_path / "bert")
    # the task goes through this tokenizer: "37+48=" is 3 ##7 + 4 ##8 =
    assert tokenizer.tokenize("37+48=") == ["3", "##7", "+", "4", "##8", "="]
    out = tmp_path / "run"
    status, err = run(TINY + ["--model", str(tmp_path / "bert"), "--out", str(out)], capsys)
    assert status == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2 and summary["peak_activation_bytes"] > 0
    run_cfg = json.load(open(out / "run.json"))
    assert run_cfg["response_length"] == 4  # longest answer "1 ##9 ##8" + the end token


def test_model_without_mask_token_needs_mask_id(tmp_path, capsys):
    make_bert_checkpoint(tmp_path / "bert", with_mask=False)
    status, err = run(TINY + ["--model", str(tmp_path / "bert")], capsys)
    assert status == 2 and "--mask-id" in err and err.count("\n") == 1
    status, err = run(TINY + ["--model", str(tmp_path / "bert"), "--mask-id", "1"], capsys)
    assert status == 0, err
    status, err = run(TINY + ["--model", str(tmp_path / "bert"), "--mask-id", "999"], capsys)
    assert status == 2 and "--mask-id 999" in err


def assert_clean_error(status, err, *words):
    assert status == 2
    assert err.startswith("bgpo.py: error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unusable_warm_start_cache_is_one_line_before_training(where, tmp_path, monkeypatch,
                                                                  capsys):
    (tmp_path / "notadir").write_text("")
    cache = tmp_path / "notadir" / ("sub" if where == "below a file" else "")
    monkeypatch.setenv("BGPO_CACHE", str(cache).rstrip("/"))
    monkeypatch.setattr(bgpo.toy_dllm, "pretrain", lambda *a, **k: pytest.fail("trained first"))
    status, err = run(TINY + ["--out", str(tmp_path / "run")], capsys)
    assert_clean_error(status, err, str(cache).rstrip("/"), "not a writable directory", "BGPO_CACHE")
    assert not (tmp_path / "run").exists()


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "run"
    status, err = run(TINY + ["--model", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert_clean_error(status, err, str(tmp_path / "nope"), "no such")
    assert not out.exists()


def test_unloadable_model_path(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ this is not json")
    out = tmp_path / "run"
    status, err = run(TINY + ["--model", str(bad), "--out", str(out)], capsys)
    assert_clean_error(status, err, str(bad), "cannot load")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys):
    status, err = run(TINY + ["--device", "cuda"], capsys)
    assert_clean_error(status, err, "CUDA")


def test_unwritable_out(warm, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, err = run(SMALL + ["--out", str(blocker / "run")], capsys)
    assert_clean_error(status, err, "--out", "cannot write")


def test_out_holding_a_run_is_not_overwritten(saved_run, tmp_path, capsys):
    out = copy_of(saved_run, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    status, err = run(SMALL + ["--out", str(out)], capsys)
    assert_clean_error(status, err, "--resume")
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_without_checkpoint(tmp_path, capsys):
    status, err = run(["--resume", str(tmp_path)], capsys)
    assert_clean_error(status, err, "--resume", "checkpoint")


def test_interrupted_and_resumed_run_matches_uninterrupted(warm, tmp_path, capsys, monkeypatch):
    """Guards exact resume: metrics, and the final weights and last checkpoint's
    optimizer state bit for bit (caught: no optimizer state restored)."""
    args = SMALL[:] + ["--save-every", "2", "--eval-every", "2"]
    args[1] = "5"  # --steps 5: checkpoints at 2 and 4, evaluations at 2, 4 and 5
    assert run(args + ["--out", str(tmp_path / "whole")], capsys)[0] == 0

    real_step, calls = bgpo.policy_loss_backward, []

    def interrupted_at_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of step 4
        return real_step(*a, **k)

    monkeypatch.setattr(bgpo, "policy_loss_backward", interrupted_at_step_4)
    status, err = run(args + ["--out", str(tmp_path / "cut")], capsys)
    assert status == 130 and "--resume" in err
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(bgpo, "policy_loss_backward", real_step)

    status, err = run(["--resume", str(tmp_path / "cut")], capsys)
    assert status == 0, err
    assert read_metrics(tmp_path / "cut") == read_metrics(tmp_path / "whole")
    whole = json.load(open(tmp_path / "whole" / "summary.json"))
    cut = json.load(open(tmp_path / "cut" / "summary.json"))
    for key in ("acc_before", "acc_after", "peak_activation_bytes", "skipped_updates"):
        assert whole[key] == cut[key]
    assert [p.name for p in bgpo_checkpoints(tmp_path / "cut")] == ["checkpoint-4"]
    assert_same_final_state(tmp_path / "cut", tmp_path / "whole")  # caught: no optimizer state


def bgpo_checkpoints(out):
    return [type(out)(p) for p in real_dllm.checkpoints(str(out))]


def test_resume_refuses_changed_settings(saved_run, tmp_path, capsys):
    out = copy_of(saved_run, tmp_path)
    status, err = run(["--resume", str(out), "--lr", "0.1"], capsys)
    assert_clean_error(status, err, "--lr")


def test_non_finite_update_is_skipped_and_never_reaches_the_weights(warm, tmp_path, capsys,
                                                                    monkeypatch):
    real, calls = bgpo.policy_loss_backward, []

    def nan_on_second_call(model, *a, **k):
        calls.append(1)
        loss = real(model, *a, **k)
        if len(calls) == 2:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            return float("nan")
        return loss

    monkeypatch.setattr(bgpo, "policy_loss_backward", nan_on_second_call)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped"):
        assert run(SMALL + ["--save-every", "3", "--out", str(out)], capsys)[0] == 0
    rows = read_metrics(out)
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    assert json.load(open(out / "summary.json"))["skipped_updates"] == 1
    from safetensors.torch import load_file
    for name in ("model", "checkpoint-3"):
        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_skipped_update_leaves_weights_and_optimizer_untouched(warm):
    import copy
    model = copy.deepcopy(warm[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.warns(UserWarning):
        assert not bgpo.update(model, optimizer, 1.0)  # a finite loss, but not a finite gradient
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def start_real_processes(directory):
    """`python bgpo.py` as a user runs it, two at once (most of their time is
    Python importing torch and transformers): a command-line error, and
    `python bgpo.py --explain | head -c 20` through a pipe of one page, which
    its 3.6 KB fill: a write comes after head has left, and must fail."""
    import fcntl
    cwd = os.path.dirname(bgpo.__file__)
    error = subprocess.Popen([sys.executable, "bgpo.py", "--model", str(directory / "missing")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: the smallest pipe Linux allows
    into_head = subprocess.Popen([sys.executable, "bgpo.py", "--explain"], stdout=write_end,
                                 stderr=subprocess.PIPE, cwd=cwd)
    head = subprocess.Popen(["head", "-c", "20"], stdin=read_end, stdout=subprocess.PIPE)
    os.close(read_end)  # only the two processes hold the pipe now
    os.close(write_end)
    return {"error": error, "into_head": into_head, "head": head}


@pytest.fixture(scope="module")
def real_processes(warm, tmp_path_factory):
    return start_real_processes(tmp_path_factory.mktemp("cli"))


def finished(proc, timeout=300):
    """proc.communicate(), ended (and the test failed) if it hangs."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} did not end in {timeout} s")


def test_command_line_error_has_no_traceback(real_processes):
    """The real process: one line on stderr, exit status 2."""
    proc = real_processes["error"]
    _, stderr = finished(proc)
    assert proc.returncode == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_resume_on_another_kind_of_device_is_refused(saved_run, tmp_path, capsys):
    out = copy_of(saved_run, tmp_path)
    path = out / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["device_type"] = "cuda"  # as if the run had been saved on a GPU
    torch.save(state, path)
    before = (out / "run.json").read_text()
    status, err = run(["--resume", str(out), "--steps", "4"], capsys)
    assert_clean_error(status, err, "--resume", "cuda")
    assert (out / "run.json").read_text() == before


def test_output_piped_into_head_ends_without_traceback(real_processes):
    """`python bgpo.py --explain | head -c 20`: the first bytes arrive, and the
    program ends quietly with 1 once head has left (caught: no BrokenPipeError
    handler)."""
    first, _ = finished(real_processes["head"])
    _, err = finished(real_processes["into_head"])
    assert first.decode() == "One BGPO step: 2 pro"
    assert real_processes["into_head"].returncode == 1
    assert "Traceback" not in err.decode() and "Exception" not in err.decode(), err.decode()


@pytest.mark.parametrize("damage", ["trainer_state", "model_file", "run_json_not_json",
                                    "run_json_not_object"])
def test_damaged_run_is_a_one_line_error_that_changes_nothing(saved_run, tmp_path, capsys,
                                                              damage):
    out = copy_of(saved_run, tmp_path)
    if damage == "trainer_state":
        truncate(out / "checkpoint-3" / "trainer_state.pt")
    elif damage == "model_file":
        truncate(out / "checkpoint-3" / "model.safetensors")
    elif damage == "run_json_not_json":
        (out / "run.json").write_text('{"samples": [2], "method": ')
    else:
        (out / "run.json").write_text('["samples", 2]')
    before = snapshot(out)
    status, err = run(["--resume", str(out), "--steps", "4"], capsys)
    assert_clean_error(status, err, f"--resume {out}:")
    assert "--model" not in err
    assert snapshot(out) == before


def test_saved_model_loads_back_with_model_flag_alone(saved_run, capsys):
    """What --out saved is usable as --model with no other flag: the response
    length and mask id saved beside it are used."""
    status, err = run(["--model", str(saved_run / "model"), "--compare", "--samples", "1",
                       "--prompts", "2", "--group", "2"], capsys)
    assert status == 0, err
    args, _ = bgpo.parse_args(bgpo.build_parser(), ["--model", str(saved_run / "model")])
    policy = bgpo.load_policy(args, torch.device("cpu"))
    assert policy.response_length == 3 and policy.mask_id == 13


def make_remote_code_checkpoint(path, trace):
    """A masked LM whose code ships with the checkpoint (an `auto_map` in its
    config): both of its modules, configuration and modeling, add a line to
    `trace` when imported and when one of their classes is built."""
    make_bert_checkpoint(path)
    announce = ("import pathlib\n\n\ndef announce(what):\n"
                f"    with open({str(trace)!r}, 'a') as f:\n        f.write(what + '\\n')\n\n\n")
    (path / "configuration_tracer.py").write_text(
        announce + "announce('configuration imported')\nfrom transformers import BertConfig\n\n\n"
        "class TracerConfig(BertConfig):\n    model_type = 'tracer'\n\n"
        "    def __init__(self, **kwargs):\n        announce('configuration built')\n"
        "        super().__init__(**kwargs)\n")
    (path / "modeling_tracer.py").write_text(
        announce + "announce('modeling imported')\nfrom transformers import BertForMaskedLM\n"
        "from .configuration_tracer import TracerConfig\n\n\n"
        "class TracerForMaskedLM(BertForMaskedLM):\n    config_class = TracerConfig\n\n"
        "    def __init__(self, config):\n        announce('model built')\n"
        "        super().__init__(config)\n")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tracer", architectures=["TracerForMaskedLM"], auto_map={
        "AutoConfig": "configuration_tracer.TracerConfig",
        "AutoModelForMaskedLM": "modeling_tracer.TracerForMaskedLM"})
    (path / "config.json").write_text(json.dumps(config))


def test_shipped_code_runs_only_with_trust_remote_code_typed(tmp_path, capsys):
    """Guards consent: no line of the checkpoint's code, its configuration
    module included, runs unless --trust-remote-code is on the command line
    (caught: the config loaded with trust_remote_code=True regardless)."""
    trace = tmp_path / "trace"
    make_remote_code_checkpoint(tmp_path / "tracer", trace)
    out = tmp_path / "run"
    status, err = run(TINY + ["--model", str(tmp_path / "tracer"), "--out", str(out)], capsys)
    assert status == 2 and not trace.exists()                  # no consent: nothing ran
    status, err = run(TINY + ["--model", str(tmp_path / "tracer"), "--trust-remote-code",
                              "--save-every", "1", "--out", str(out)], capsys)
    assert status == 0, err
    ran = trace.read_text()
    assert "configuration imported" in ran and "configuration built" in ran and "model built" in ran
    assert (out / "checkpoint-2" / "modeling_tracer.py").exists()
    trace.unlink()
    before = snapshot(out)
    status, err = run(["--resume", str(out), "--steps", "3"], capsys)
    assert_clean_error(status, err, f"--resume {out}", "--trust-remote-code")
    assert not trace.exists() and snapshot(out) == before
    status, err = run(["--resume", str(out), "--steps", "3", "--trust-remote-code"], capsys)
    assert status == 0, err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
