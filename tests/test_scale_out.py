"""torchrun + FSDP2 on the CPU (gloo, 2 processes): tests/distributed_check.py,
in two processes forked with the environment torchrun gives its workers,
started in the background once the warm start is cached (conftest.warm)."""
import json
import os
import signal

import pytest
import torch

import bgpo
import toy_dllm
from conftest import BACKGROUND, TINY_WARM_START
from test_checkpoints_and_errors import assert_clean_error
from test_rl import assert_same_final_state, read_metrics, run


@pytest.fixture(scope="module")
def torchrun_result(warm):
    out, procs = BACKGROUND["torchrun"]
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():  # hung: ended here, not left behind
            p.kill()
            p.join()
    logs = "".join((out / f"rank{r}.log").read_text()[-2000:] for r in range(2))
    # exit status 0 from every rank, not just its files written: a negative exitcode is a
    # signal, as SIGABRT from a gloo thread at exit (tests/torchrun_count.py counts those)
    ended = [f"rank {r}: " + (f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                              else f"exit status {p.exitcode}")
             for r, p in enumerate(procs) if p.exitcode != 0]
    assert not ended, "; ".join(ended) + "\n" + logs
    return out, json.load(open(out / "result.json"))


@pytest.mark.parametrize("method", ["bgpo", "naive", "two_pass"])
def test_fsdp2_gradient_equals_the_single_process_gradient(torchrun_result, method):
    """Each rank's loss is a mean over its half; FSDP2 averages (a reduce-scatter
    after each backward): the global mean."""
    _, result = torchrun_result
    assert result[method]["same_names"] and result[method]["rel_diff"] <= 1e-12


def test_bad_flag_under_torchrun_is_said_once_and_every_rank_exits_2(torchrun_result):
    _, result = torchrun_result
    (status0, err0), (status1, err1) = result["bad_flag_all"]
    assert status0 == status1 == 2
    assert err0.startswith("bgpo.py: error: --prompts 3") and err0.count("\n") == 1
    assert err1 == ""


def test_torchrun_run_saves_on_rank_0_and_resumes_exactly(torchrun_result, tmp_path, capsys):
    """Guards resume under torchrun: the cut run's final weights equal the
    whole run's bit for bit (caught: no optimizer state restored)."""
    out, _ = torchrun_result
    whole, cut = out / "whole", out / "cut"
    assert read_metrics(cut) == read_metrics(whole)
    summary = json.load(open(whole / "summary.json"))
    assert summary["world_size"] == 2 and len(summary["peak_rss_bytes_per_rank"]) == 2
    assert json.load(open(cut / "summary.json"))["acc_after"] == summary["acc_after"]
    assert_same_final_state(cut, whole)  # caught: no optimizer state on resume
    from transformers import AutoModelForMaskedLM
    AutoModelForMaskedLM.from_pretrained(whole / "model")             # the full model, unsharded
    status, err = run(["--model", str(whole / "model"), "--steps", "1", "--prompts", "2",
                       "--group", "2", "--samples", "2"], capsys)
    assert status == 0, err
    status, err = run(["--resume", str(cut), "--steps", "4"], capsys)  # one process now
    assert_clean_error(status, err, "saved by 2 process", "--nproc_per_node 2")



def test_cold_cache_under_torchrun_is_trained_on_rank_0_and_loads_in_one_process(
        torchrun_result, monkeypatch, capsys):
    """A torchrun run on an empty cache once poisoned it: rank 1, whose
    save_pretrained writes nothing, renamed a model without weights into place."""
    out, result = torchrun_result
    assert result["cold_cache_same_weights"]
    assert "cached at" in (out / "rank0.log").read_text()
    assert "cached at" not in (out / "rank1.log").read_text()
    monkeypatch.setenv("BGPO_CACHE", str(out / "cold-cache"))
    monkeypatch.setattr(toy_dllm, "WARM_START", {**toy_dllm.WARM_START, **TINY_WARM_START})
    monkeypatch.setattr(toy_dllm, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    status, err = run(["--explain", "--test-size", "200"], capsys)
    assert status == 0 and "damaged" not in err, err
    assert len([n for n in os.listdir(out / "cold-cache") if not n.startswith(".")]) == 1
