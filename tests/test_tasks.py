"""The task interface: Countdown and Sudoku problems, their splits, JSONL files of
your own (and their one-line errors), and the sampler's decoding order."""
import itertools
import json

import pytest
import torch

import toy_dllm
from conftest import TINY_WARM_START, tiny_model
from test_rl import read_metrics, run


@pytest.fixture(scope="module")
def countdown():
    return toy_dllm.load_task("countdown")


@pytest.fixture(scope="module")
def sudoku():
    return toy_dllm.load_task("sudoku")


@pytest.mark.parametrize("name", ["add", "countdown", "sudoku"])
def test_each_answer_the_warm_start_learns_earns_reward_one(name, countdown, sudoku):
    task = {"add": toy_dllm.make_task(), "countdown": countdown, "sudoku": sudoku}[name]
    for problems in (task.train[:300], task.test[:300]):
        answers = task.answers(problems)
        assert task.solved(task.rewards(problems, answers)).all()
        assert max(map(len, answers)) <= task.answer_length
        assert len(set(map(len, task.prompts(problems)))) == 1  # the toy needs no padding
    wrong = task.rewards(task.test[:50], ["9" * task.answer_length] * 50)
    assert wrong.shape == (50,) and (wrong < 1).all()


def test_countdown_problems_are_reachable_and_split_without_leaks(countdown):
    records = countdown.records
    numbers = torch.tensor([r["numbers"] for r in records])
    targets = torch.tensor([r["target"] for r in records])
    assert numbers.min() >= 1 and numbers.max() <= 20 and targets.min() >= 1 and targets.max() <= 100
    key = lambda i: (tuple(sorted(records[i]["numbers"])), records[i]["target"])  # noqa: E731
    train, test = ({key(i) for i in x[:, 0].tolist()} for x in (countdown.train, countdown.test))
    assert len(test) == len(countdown.test) == 1000 and not train & test
    assert len(train) == len(countdown.train) == len(records) - 1000
    # the target is reachable: found a second way, by brute force over (a o b) o c
    for i in countdown.test[:40, 0].tolist():
        numbers, target = records[i]["numbers"], records[i]["target"]
        assert records[i]["prompt"].startswith(",".join(f"{n:02d}" for n in numbers))
        assert any(toy_dllm.countdown_reward(numbers, target, f"({a}{o}{b}){p}{c}") == 1.0
                   for a, b, c in itertools.permutations(numbers)
                   for o, p in itertools.product("+-*/", repeat=2))


def test_sudoku_split_by_solution_with_unique_puzzles(sudoku):
    """No solution is in both train and test; each puzzle has 8 blanks, agrees with
    its solution, and no other grid of the 288 (found by brute force) fits it."""
    records = sudoku.records
    train, test = ({records[i]["solution"] for i in x[:, 0].tolist()}
                   for x in (sudoku.train, sudoku.test))
    assert not train & test and len(sudoku.test) == 1000
    assert len(sudoku.train) + 36 * 100 == len(records)  # every puzzle of a train grid
    rows = list(itertools.permutations("1234"))
    grids = ["".join(sum(g, ())) for g in itertools.product(rows, repeat=4)
             if all(len({g[r][c] for r in range(4)}) == 4 for c in range(4))
             and all(len({g[r + i][c + j] for i in (0, 1) for j in (0, 1)}) == 4
                     for r in (0, 2) for c in (0, 2))]
    assert len(grids) == 288 and train | test == set(grids)
    for i in sudoku.test[:30, 0].tolist():
        puzzle, solution = records[i]["puzzle"], records[i]["solution"]
        assert puzzle.count("0") == 8 and records[i]["prompt"] == puzzle + "="
        assert all(x in ("0", v) for x, v in zip(puzzle, solution))
        fits = [g for g in grids if all(x in ("0", v) for x, v in zip(puzzle, g))]
        assert fits == [solution]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return str(path)


GOOD = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def test_a_jsonl_file_trains_on_the_toy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy_dllm, "WARM_START", {**toy_dllm.WARM_START, **TINY_WARM_START})
    lines = GOOD[:60] + [dict(prompt="3 5 7 : 22 =", answer="(3*5)+7", reward="countdown",
                              numbers=[3, 5, 7], target=22, split="test")] + [
        dict(r, split="test") for r in GOOD[60:70]]
    lines = [dict(r, split=r.get("split", "train")) for r in lines]
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    task = toy_dllm.load_task(path)
    assert len(task.train) == 60 and len(task.test) == 11 and task.answer_length == 7
    assert task.rewards(task.test[:1], ["(7+5)*3"]).tolist() == [pytest.approx(0.1)]  # 36
    assert task.rewards(task.test[-1:], [" 1 5 "]).tolist() == [1.0]   # 6+9: spaces removed
    out = tmp_path / "run"
    assert run(["--task", path, "--steps", "2", "--prompts", "2", "--group", "2",
                "--samples", "2", "--out", str(out)], capsys)[0] == 0
    assert len(read_metrics(out)) == 2
    with open(out / "summary.json") as f:
        assert json.load(f)["task"] == path
    held_out = toy_dllm.load_task(write_jsonl(tmp_path / "plain.jsonl", GOOD[:30]), n_test=5)
    assert held_out.test.flatten().tolist() == [25, 26, 27, 28, 29]  # the last lines


@pytest.mark.parametrize("lines,flags,says", [
    (GOOD[:5] + [{"prompt": "1+1="}], [], "mine.jsonl:6: no 'answer'"),
    (GOOD[:2] + ['{"prompt": "1+1=", "answer": '], [], "mine.jsonl:3: not JSON"),
    ([], [], "mine.jsonl: 0 prompts"),
    (GOOD[:3] + [dict(prompt="1", answer="2", reward="countdown", numbers=[1])], [],
     "mine.jsonl:4: no 'target'"),
    (GOOD[:3] + [dict(prompt="1", answer="2", reward="bleu")], [], "mine.jsonl:4: "),
    (GOOD[:3] + [dict(prompt="1", answer="2", split="dev")], [], "mine.jsonl:4: "),
    (GOOD[:20], ["--test-size", "20"], "leave no train prompts"),
    (GOOD[:20] + [dict(prompt="Why?", answer="2")], ["--test-size", "5"],
     "mine.jsonl:21: 'W' is not in the toy's vocabulary"),
    (GOOD[:20] + [dict(prompt="2+2=", answer="4444")], ["--test-size", "5",
     "--response-length", "3"], "mine.jsonl:21: response length 3 is shorter"),
])
def test_a_bad_jsonl_file_is_one_line_naming_the_file_and_line(lines, flags, says, tmp_path,
                                                              capsys, monkeypatch):
    monkeypatch.setattr(toy_dllm, "WARM_START", {**toy_dllm.WARM_START, **TINY_WARM_START})
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    status, err = run(["--task", path, "--steps", "1", "--out", str(tmp_path / "out")] + flags,
                      capsys)
    assert status == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["countdown", "sudoku"])
def test_each_built_in_task_trains_from_the_command_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(toy_dllm, "WARM_START", {**toy_dllm.WARM_START, **TINY_WARM_START})
    out = tmp_path / "run"
    assert run(["--task", name, "--steps", "1", "--prompts", "2", "--group", "2", "--samples",
                "2", "--test-size", "50", "--out", str(out)], capsys)[0] == 0
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["task"] == name and 0 <= summary["reward_after"] <= 1


def test_the_sampler_order_commits_each_position_once_most_confident_first(tokenizer):
    """order: every position exactly once; one step at a time (L steps), each commit is
    the most probable of the positions still masked, computed a second way."""
    model, L = tiny_model(tokenizer), 5
    prompts = torch.tensor([[1, 2, 10, 3, 4, 11]])
    order = []
    y = toy_dllm.generate(model, prompts, tokenizer.mask_token_id, L, order=order)
    positions = torch.cat([pos for pos, _ in order], 1)[0]
    assert sorted(positions.tolist()) == list(range(L))
    x = torch.cat([prompts, torch.full((1, L), tokenizer.mask_token_id)], 1)
    for pos, score in order:
        logits = toy_dllm.forward_logits(model, x)[0, 6:].float()
        logits[:, tokenizer.mask_token_id] = -float("inf")
        confidence = logits.softmax(-1).max(-1).values                       # (L,)
        still = x[0, 6:] == tokenizer.mask_token_id
        assert pos.item() == confidence.where(still, -1.0).argmax().item()
        assert torch.allclose(score, confidence[pos])
        x[0, 6 + pos] = y[0, pos]


def test_accuracy_is_the_share_solved_and_the_mean_reward_counts_the_rest(countdown):
    """Countdown's 0.1 for a wrong expression is reward, not accuracy: evaluate, and a
    second way (generate, decode, reward)."""
    tokenizer = toy_dllm.build_tokenizer(more=True)
    model, problems = tiny_model(tokenizer, max_length=32, seed=1), countdown.test[:40]
    acc, _, reward = toy_dllm.evaluate(model, tokenizer, countdown, problems, with_reward=True)
    prompts = toy_dllm.encode_prompts(tokenizer, countdown.prompts(problems))
    responses = toy_dllm.generate(model, prompts, tokenizer.mask_token_id, 10)
    r = countdown.rewards(problems, toy_dllm.decode_responses(tokenizer, responses))
    assert ((r - 0.1).abs() < 1e-6).any()
    assert acc == (r == 1).float().mean().item() and reward == pytest.approx(r.mean().item())


def test_a_jsonl_file_trains_a_model_of_its_own_tokenizer(tmp_path, capsys):
    """--task FILE.jsonl with --model: the prompts go through the model's tokenizer
    (WordPiece here: "12+7=" is 1 ##2 + 7 =), the answers' length in its tokens."""
    from test_checkpoints_and_errors import make_bert_checkpoint
    make_bert_checkpoint(tmp_path / "bert")
    path = write_jsonl(tmp_path / "mine.jsonl", GOOD[:40])
    out = tmp_path / "run"
    assert run(["--model", str(tmp_path / "bert"), "--task", path, "--test-size", "8",
                "--steps", "2", "--prompts", "2", "--group", "2", "--samples", "2",
                "--out", str(out)], capsys)[0] == 0
    with open(out / "run.json") as f:
        assert json.load(f)["response_length"] == 3  # "18": 1 ##8, and an end token


def test_explain_shows_the_decoding_order_of_a_padded_prompt(tmp_path, capsys):
    """--explain's decoding order runs the sampler on y1's prompt alone, with its own
    padding mask: prompts of two lengths through a WordPiece model (seed 1 draws both)."""
    from test_checkpoints_and_errors import make_bert_checkpoint
    make_bert_checkpoint(tmp_path / "bert")
    path = write_jsonl(tmp_path / "mine.jsonl", [
        dict(r, prompt=r["prompt"] if i % 2 else r["prompt"][:-1] + "+0=") for i, r in enumerate(GOOD)])
    status, _ = run(["--model", str(tmp_path / "bert"), "--task", path, "--test-size", "20",
                     "--explain", "--seed", "1"])
    assert status == 0 and "the sampler's order" in capsys.readouterr().out
