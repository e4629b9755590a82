import os
import shutil
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Forced for the test session, whatever the user exported, and put back after
# it (pytest_unconfigure): nothing is downloaded, and model code shipped with
# test checkpoints is copied and imported from a directory of the session's
# own. Both are read when transformers is imported, so they are set first.
MODULES = tempfile.mkdtemp(prefix="bgpo-test-modules-")
USER_ENV = {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "HF_MODULES_CACHE")}
os.environ.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=MODULES)

import toy_dllm  # noqa: E402


def pytest_unconfigure(config):
    for name, value in USER_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(MODULES, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory):
    """A cache of its own for this test session: the warm start is trained
    here from its seed once, then reused by every test that needs it.
    $BGPO_TEST_CACHE names one to share between sessions instead (the
    mutation script's runs)."""
    old = os.environ.get("BGPO_CACHE")
    os.environ["BGPO_CACHE"] = os.environ.get("BGPO_TEST_CACHE") or str(
        tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        del os.environ["BGPO_CACHE"]
    else:
        os.environ["BGPO_CACHE"] = old


@pytest.fixture(scope="session")
def warm(fresh_cache, tmp_path_factory, request):
    """(model, tokenizer, task, settings) of the default warm start. Shared:
    a test that changes the model must work on a copy.

    Once it is cached, the two-process checks of test_scale_out.py (if
    selected) start in the background, to use the core that the tests of
    tiny models leave idle; that module collects them."""
    result = toy_dllm.warm_start()
    if any(item.module.__name__ == "test_scale_out" for item in request.session.items):
        import distributed_check
        out = tmp_path_factory.mktemp("torchrun")
        BACKGROUND["torchrun"] = (out, distributed_check.fork_workers(
            str(out), toy_dllm.warm_start_path(result[3])))
    return result


BACKGROUND = {}  # name -> (output directory, processes), see `warm`


@pytest.fixture(scope="session")
def tokenizer():
    return toy_dllm.build_tokenizer()


# a warm start of tiny_model's size, 20 steps: seconds, for the plumbing of a setting
TINY_WARM_START = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       target_accuracy=None, max_steps=20, batch_size=64, n_test=200)


def tiny_model(tokenizer, seed=0, dtype=torch.float32, max_length=16):
    """A randomly initialised toy-sized masked LM (smaller than the real toy)."""
    model = toy_dllm.build_model(tokenizer, max_length=max_length, seed=seed, hidden_size=32,
                                 num_layers=2, num_heads=2, intermediate_size=64)
    return model.to(dtype).eval()


def random_batch(B, Lp, L, seed=0, vocab=12):
    """Random prompt and response ids drawn from the 12 ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(vocab, (B, Lp), generator=g),
            torch.randint(vocab, (B, L), generator=g))
