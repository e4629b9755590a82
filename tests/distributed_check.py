"""The two-process checks of test_scale_out.py (gloo, CPU): FSDP2 gradients
against one process's, a bad flag, a short
run saved and resumed, and a warm start on a cold cache. Rank 0 writes what it found to OUT/result.json.

test_scale_out.py forks two processes with the environment torchrun gives
them (RANK, WORLD_SIZE, MASTER_ADDR, ...), which spares each a fresh import
of torch and transformers; by hand:
    torchrun --standalone --nproc_per_node 2 tests/distributed_check.py OUT
"""
import contextlib
import copy
import io
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]
import bgpo  # noqa: E402
import real_dllm  # noqa: E402
from conftest import TINY_WARM_START, random_batch, tiny_model  # noqa: E402
import toy_dllm  # noqa: E402


def check(out, warm=None):
    started = time.time()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    result = {"seconds": {}}  # since the start, after each part

    # 1. The gradient on a fixed global batch of 8 responses, float64
    model = tiny_model(toy_dllm.build_tokenizer(), dtype=torch.float64)
    prompts, responses = random_batch(8, 6, 3)
    advantages = torch.linspace(-1.5, 1, 8, dtype=torch.float64)
    masks, weights = bgpo.sample_masks(responses, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = bgpo.elbo_terms(model, prompts, responses, masks, weights, 13)
    rows = slice(rank * 4, rank * 4 + 4)  # this rank's half of the batch


    def full_grads(m):
        return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for n, p in m.named_parameters() if p.grad is not None}


    for method in ("bgpo", "naive", "two_pass"):
        single = copy.deepcopy(model)  # one process, the whole batch
        bgpo.policy_loss_backward(single, prompts, responses, advantages, masks, weights, old, 13,
                                  method=method)
        reference = full_grads(single)
        sharded = real_dllm.shard(copy.deepcopy(model))
        bgpo.policy_loss_backward(sharded, prompts[rows], responses[rows], advantages[rows],
                                  masks[:, rows], weights[:, rows], old[:, rows], 13,
                                  method=method, merge=False)
        got = full_grads(sharded)
        # over the whole gradient: some entries are 0 but for rounding (key biases)
        diff = (torch.cat([(got[n] - g).flatten() for n, g in reference.items()]).norm()
                / torch.cat([g.flatten() for g in reference.values()]).norm()).item()
        result[method] = dict(rel_diff=diff, same_names=sorted(got) == sorted(reference))

    result["seconds"]["gradients"] = round(time.time() - started, 1)
    # 2. A bad flag: every rank stops with 2, only rank 0 says why
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            bgpo.main(["--prompts", "3", "--group", "2", "--samples", "2"])
            status = 0
        except SystemExit as e:
            status = e.code
    result["bad_flag"] = [status, err.getvalue()]
    result["bad_flag_all"] = [None] * size
    dist.all_gather_object(result["bad_flag_all"], result["bad_flag"])

    result["seconds"]["bad_flag"] = round(time.time() - started, 1)
    # 3. A short run with a checkpoint at step 2; the same run cut there and resumed
    # on the warm start as a saved model, so that 100 test problems do without a new warm start
    if warm is None:  # by hand: rank 0 trains it (in a private cache), the other loads it
        with real_dllm.rank_zero_first():
            warm = toy_dllm.warm_start_path(toy_dllm.warm_start(verbose=False)[3])
    args = ["--model", warm, "--response-length", "3", "--test-size", "100", "--steps", "3",
            "--prompts", "4", "--group", "4",
            "--samples", "2", "--save-every", "2"]
    assert quiet_main(args + ["--out", os.path.join(out, "whole")]) == (0, "")
    result["seconds"]["whole"] = round(time.time() - started, 1)
    if rank == 0:
        cut = os.path.join(out, "cut")
        shutil.copytree(os.path.join(out, "whole"), cut)
        shutil.rmtree(os.path.join(cut, "model"))
        with open(os.path.join(cut, "metrics.jsonl")) as f:
            lines = f.readlines()[:2]
        with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
            f.writelines(lines)
        os.remove(os.path.join(cut, "summary.json"))
    dist.barrier()
    assert quiet_main(["--resume", os.path.join(out, "cut")]) == (0, "")

    result["seconds"]["resumed"] = round(time.time() - started, 1)
    # 4. A cold cache (a tiny warm start): rank 0 trains and saves it, the other
    # loads it, as bgpo.py loads the toy; rank 1 arrives first, as it may
    os.environ["BGPO_CACHE"] = os.path.join(out, "cold-cache")
    toy_dllm.WARM_START = {**toy_dllm.WARM_START, **TINY_WARM_START}
    if rank == 0:
        time.sleep(1)
    cfg, _ = bgpo.parse_args(bgpo.build_parser(), ["--test-size", "200"])
    weights = torch.cat([p.detach().flatten() for p in bgpo.load_policy(cfg, torch.device("cpu"))
                         .model.parameters()])
    every = [None] * size
    dist.all_gather_object(every, weights)
    result["cold_cache_same_weights"] = all(torch.equal(w, every[0]) for w in every)
    result["seconds"]["cold_cache"] = round(time.time() - started, 1)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def quiet_main(argv):
    """bgpo.main with its output swallowed: (exit status, its own
    "bgpo.py: ..." lines on stderr, without the progress bar and warnings)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status = bgpo.main(argv)
        except SystemExit as e:
            status = e.code
    return status, "".join(line for line in err.getvalue().splitlines(keepends=True)
                           if line.startswith("bgpo.py"))


def fork_workers(out, warm, size=2):
    """Start `check` in `size` forked processes with torchrun's environment,
    on the saved warm start `warm`: returns them, running."""
    import socket
    # A free port for the rendezvous. It is free again before the workers bind
    # it, so another process could take it first: a race accepted here (the
    # tests would fail, not hang), as torchrun's own --standalone accepts it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = torch.multiprocessing.get_context("fork")
    procs = [fork.Process(target=_worker, args=(rank, size, port, out, warm)) for rank in range(size)]
    for p in procs:
        p.start()
    return procs


def _worker(rank, size, port, out, warm):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with open(os.path.join(out, f"rank{rank}.log"), "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log  # not the streams the test session captures
        check(out, warm)


if __name__ == "__main__":
    os.environ["BGPO_CACHE"] = os.path.join(sys.argv[1], "cache")  # not the user's own
    check(sys.argv[1])
