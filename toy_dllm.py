"""A tiny masked-diffusion language model that learns to add (or Countdown, Sudoku, yours).

The tasks and their rewards, the vocabulary, the forward (masking) process and
training loss, the LLaDA-style sampler, the network, and a supervised warm start.
Nothing here knows about RL; bgpo.py imports this file and adds it. Sections 1-5
read top-down, in the order an RL step uses them; 6-8 (evaluation, warm start,
saving) use them.

    operands   a = 37, b = 48, each written with exactly n_digits digits
    prompt x   "37+48="                       6 tokens, never masked
    answer y   "085"                          n_digits + 1 digits, zero-padded
    sequence   "37+48=085"                    what the network reads

A masked-diffusion LM corrupts the answer by replacing answer tokens with
[MASK] ("37+48=0[MASK]5") and learns to predict the originals, all masked
positions at once, with a bidirectional transformer. To generate, it starts
from an all-[MASK] answer ("37+48=[MASK][MASK][MASK]") and unmasks a few
tokens per step, the most confident first.

The network is a stock BertForMaskedLM with a tiny config and the vocabulary
a stock tokenizer, so code written against them runs on any masked LM that
reads its inputs the same way (forward_logits; real_dllm.py adapts others).
"""

import ast
import contextlib
import itertools
import hashlib
import json
import math
import operator
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction

import torch
from tqdm import tqdm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig,
                          BertForMaskedLM, PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load

# -----------------------------------------------------------------------------
# Settings of the warm start; they are its cache key.

WARM_START = dict(
    task="add",         # add, countdown, sudoku or a .jsonl file (toy_dllm.load_task)
    n_digits=2,         # digits per operand: "37+48=" -> "085"
    response_length=None,  # answer + end tokens up to this many; None: the answer alone
    n_test=1000,        # held-out problems for greedy test accuracy
    seed=0,             # one seed for the data split, the init and training
    hidden_size=128,    # BERT config: about 0.55M parameters in all
    num_layers=4,
    num_heads=4,
    intermediate_size=256,
    batch_size=256,     # supervised pre-training: problems per step
    lr=1e-3,            # AdamW, constant
    target_accuracy=0.3,  # stop once 30% of held-out train problems are right,
    eval_every=10,        # checked every 10 steps, leaving RL room to improve
    max_steps=1000,
)

# -----------------------------------------------------------------------------
# 1. The task: what the loop, the warm start and the evaluation ask of one
#    (Task), addition with an exact-match reward (the default), Countdown and
#    4x4 Sudoku with d1's rewards, and prompts of your own from a JSONL file.

class Task:
    """A task's problems are the rows of Long tensors that only the task reads:
        train, test          Long (N, k): disjoint problems, one a row
        prompts(problems)    the prompt strings, one a row
        answers(problems)    a right answer of each (what the warm start learns)
        rewards(problems, texts)  Float (B,) in [0, 1] of decoded responses
        solved(rewards)      Bool (B,): what accuracy counts (reward == 1)
        answer_length        tokens of the longest answer: L unless --response-length
        name                 add, countdown, sudoku or jsonl"""

    def solved(self, rewards):
        return rewards == 1

@dataclass
class ArithmeticTask(Task):
    """Addition problems as operand pairs; train and test are disjoint.
    reward(y) = 1.0 if the decoded answer equals the true one, else 0.0"""
    n_digits: int
    train: torch.Tensor  # (N_train, 2) operand pairs (a, b)
    test: torch.Tensor   # (N_test, 2)
    name = "add"

    @property
    def answer_length(self):
        return self.n_digits + 1

    def prompts(self, problems):
        """[(37, 48)] -> ["37+48="]"""
        d = self.n_digits
        return [f"{a:0{d}d}+{b:0{d}d}=" for a, b in problems.tolist()]

    def rewards(self, problems, texts):
        """Float (B,): 1.0 where the decoded answer is the true one, else 0.0.
        Strict: for 37+48, "085" is right; "85", "0850" and "08<end>5" are wrong."""
        return torch.tensor([float(s == t) for s, t in zip(texts, self.answers(problems))])

    def answers(self, problems):
        """[(37, 48)] -> ["085"]"""
        return [f"{a + b:0{self.n_digits + 1}d}" for a, b in problems.tolist()]

def exact_match_reward(task, tokenizer, problems, responses):
    """Float (B,): task.rewards of the decoded responses (B, L)."""
    return task.rewards(problems, decode_responses(tokenizer, responses))

def make_task(n_digits=2, n_test=1000, seed=0, max_train=100_000):
    """Disjoint train and test problems from a seeded permutation of all pairs
    (a, b), 0 <= a, b < 10**n_digits: test first, then up to max_train.

    >>> task = make_task(n_digits=1, n_test=20)
    >>> len(task.test), len(task.train)
    (20, 80)
    """
    if n_digits < 1:
        raise ValueError(f"n_digits must be a positive integer, got {n_digits}")
    total = 10 ** (2 * n_digits)
    if not 0 < n_test < total:
        raise ValueError(f"n_test must be between 1 and {total - 1} "
                         f"for n_digits={n_digits}, got {n_test}")
    g = torch.Generator().manual_seed(seed)
    n = n_test + min(total - n_test, max_train)
    if total <= 10**7:
        ids = torch.randperm(total, generator=g)[:n]
    else:  # too many problems to permute: draw numbers, keep distinct ones
        ids = torch.randint(total, (2 * n,), generator=g).unique()
        ids = ids[torch.randperm(len(ids), generator=g)][:n]
    pairs = torch.stack([ids // 10**n_digits, ids % 10**n_digits], dim=1)  # (n, 2)
    return ArithmeticTask(n_digits, train=pairs[n_test:], test=pairs[:n_test])

def load_task(name="add", n_digits=2, n_test=1000, seed=0):
    """--task: "add", "countdown", "sudoku" or the path of a .jsonl file."""
    if name == "add":
        return make_task(n_digits, n_test, seed)
    if name in ("countdown", "sudoku"):
        return (make_countdown if name == "countdown" else make_sudoku)(n_test, seed)
    if name.endswith(".jsonl"):
        return read_jsonl(name, n_test)
    raise ValueError(f"--task {name!r}: use add, countdown, sudoku or a .jsonl file")

@dataclass
class RecordTask(Task):
    """A task as records, one a problem: {"prompt": "2+3=", "answer": "5"}, and optionally
    "reward": "exact" (the default: equal without spaces), "countdown" (with "numbers"
    and "target") or "sudoku" (with "puzzle" and "solution"). make_countdown and
    make_sudoku make theirs; a JSONL file is records written down, one a line."""
    name: str
    records: list        # dicts as above
    train: torch.Tensor  # (N_train, 1) indices of records
    test: torch.Tensor   # (N_test, 1)
    answer_length: int   # characters of the longest answer

    def prompts(self, problems):
        return [self.records[i]["prompt"] for i in problems[:, 0].tolist()]

    def answers(self, problems):
        return [self.records[i]["answer"] for i in problems[:, 0].tolist()]

    def rewards(self, problems, texts):
        records = [self.records[i] for i in problems[:, 0].tolist()]
        return torch.tensor([REWARDS[r.get("reward", "exact")][1](r, t)
                             for r, t in zip(records, texts)])

REWARDS = {  # a record's "reward": the keys it needs, and (the record, decoded text) -> reward
    "exact": ((), lambda r, text: float("".join(text.split()) == "".join(r["answer"].split()))),
    "countdown": (("numbers", "target"), lambda r, t: countdown_reward(r["numbers"], r["target"], t)),
    "sudoku": (("puzzle", "solution"), lambda r, t: sudoku_reward(r["puzzle"], r["solution"], t))}

def make_countdown(n_test=1000, seed=0, high=10):
    """Countdown (d1's 3 numbers; here 1..high): every 3 numbers and each target in 1..100
    that (a o b) o c reaches, o in + - * /, once (so test's never in train); the numbers
    in a seeded order. {"prompt": "03,07,05:050=", "answer": "(3+7)*5", "numbers": ...}"""
    solutions, g = {}, torch.Generator().manual_seed(seed)
    for numbers in itertools.combinations_with_replacement(range(1, high + 1), 3):
        for a, b, c in itertools.permutations(numbers):
            for o, p in itertools.product("+-*/", repeat=2):
                try:
                    value = OPS[p](OPS[o](Fraction(a), b), c)
                except ZeroDivisionError:
                    continue
                if value.denominator == 1 and 1 <= value <= 100:  # the first found is kept
                    solutions.setdefault((numbers, int(value)), f"({a}{o}{b}){p}{c}")
    records = []
    for (numbers, target), answer in solutions.items():
        numbers = [numbers[i] for i in torch.randperm(3, generator=g).tolist()]
        records.append(dict(prompt=",".join(f"{n:02d}" for n in numbers) + f":{target:03d}=",
                            answer=answer, reward="countdown", numbers=numbers, target=target))
    order = torch.randperm(len(records), generator=g)[:, None]                 # test first
    return RecordTask("countdown", records, order[n_test:], order[:n_test], 10)  # "(10+10)*10"

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}

def make_sudoku(n_test=1000, seed=0, per_grid=100, test_grids=36):
    """4x4 Sudoku (d1's: 8 blanks): per_grid puzzles of each of the 288 grids, 8 random
    cells blanked, kept if no other grid fits the rest; test: the puzzles of test_grids of
    the grids (split by solution, as SPG's). {"prompt": "1030...=", "answer": "1234...", ...}"""
    rows, grids = list(itertools.permutations(range(1, 5))), [()]
    for r in range(4):  # a row fits if no column repeats, nor its 2x2 box on odd rows
        grids = [g + (row,) for g in grids for row in rows if all(row[c] != q[c] for q in g
                 for c in range(4)) and (r % 2 == 0 or not {*row[:2]} & {*g[-1][:2]})]
    grids = torch.tensor(grids).flatten(1)                                          # (288, 16)
    g = torch.Generator().manual_seed(seed)
    records, held_out = [], 0
    for i, grid in enumerate(grids[torch.randperm(len(grids), generator=g)]):
        if i == test_grids:  # the puzzles so far are test's
            held_out = len(records)
        shown = torch.rand(2 * per_grid, 16, generator=g).argsort(-1) >= 8          # 8 blanks
        fits = ((grids[None] == grid) | ~shown[:, None]).all(-1).sum(-1)            # grids that fit
        solution = "".join(map(str, grid.tolist()))
        for puzzle in (grid * shown[fits == 1][:per_grid]).tolist():
            puzzle = "".join(map(str, puzzle))
            records.append(dict(prompt=puzzle + "=", answer=solution, reward="sudoku",
                                puzzle=puzzle, solution=solution))
    train = held_out + torch.randperm(len(records) - held_out, generator=g)[:, None]
    test = torch.randperm(held_out, generator=g)[:n_test, None]
    return RecordTask("sudoku", records, train, test, 16)

def read_jsonl(path, n_test):
    """The RecordTask of a file; ValueError "path:line: what is wrong" at its first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from e
    records = []
    for n, line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
        r = r if isinstance(r, dict) else {}
        rule, split = REWARDS.get(r.get("reward", "exact")), r.get("split", "train")
        missing = [k for k in ("prompt", "answer", *(rule or [()])[0]) if k not in r]
        if missing or not rule or split not in ("train", "test") or not all(
                isinstance(r[k], str) and r[k] for k in ("prompt", "answer")):
            raise ValueError(f"{path}:{n}: " + (f"no {missing[0]!r}" if missing else "'prompt' "
                             f"and 'answer' must be text, 'split' train or test, 'reward' one of "
                             f"{sorted(REWARDS)}"))
        records.append(dict(r, line=n))
    test = [i for i, r in enumerate(records) if r.get("split") == "test"]
    if not any("split" in r for r in records):
        test = list(range(max(len(records) - n_test, 0), len(records)))
    train = sorted(set(range(len(records))) - set(test))
    if not train or not test:
        raise ValueError(f"{path}: {len(records)} prompts leave no {'test' if train else 'train'}"
                         " prompts (\"split\" keys, or --test-size for the last lines)")
    return RecordTask("jsonl", records, torch.tensor(train)[:, None], torch.tensor(test)[:, None],
                      max(len(r["answer"]) for r in records))

# The planning tasks' rewards, d1's rules (its reward_func.py) on the toy's answers, which
# are the expression or the grid alone, without <answer> tags

def countdown_reward(numbers, target, text):
    """Countdown: 0.0 with no answer; 1.0 for an expression of digits, + - * / ( ) and
    spaces that uses each of numbers exactly once and equals target to within 1e-5; 0.1
    for any other answer. Evaluated on its syntax tree, never by eval.

    >>> [countdown_reward([3, 5, 7], 22, t) for t in ("3*5+7", "3*5+5", "")]
    [1.0, 0.1, 0.0]
    """
    text = text.strip()
    if not text:
        return 0.0
    used = sorted(int(n) for n in re.findall(r"\d+", text))
    if not re.fullmatch(r"[0-9+\-*/() ]+", text) or used != sorted(numbers):
        return 0.1
    try:
        value = arithmetic(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):  # malformed, not arithmetic, x / 0
        return 0.1
    return 1.0 if abs(value - target) < 1e-5 else 0.1

def arithmetic(node):
    """The value of a syntax tree of integers, + - * / and signs; ValueError for aught else."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return (1 if isinstance(node.op, ast.UAdd) else -1) * arithmetic(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        return ARITHMETIC[type(node.op)](arithmetic(node.left), arithmetic(node.right))
    raise ValueError(f"not arithmetic: {ast.dump(node)}")  # a power, a name, a call ...

ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}

def sudoku_reward(puzzle, solution, text):
    """4x4 Sudoku: the share of the puzzle's blanks ('0') that text fills with the
    solution's digit; text without spaces, padded with '0' or cut to 16 characters; given
    cells are not counted. 16-character digit strings; no blank: 0.0.

    >>> sudoku_reward("1030" * 4, "1234" * 4, "1234" * 3 + "12")  # 7 of 8 blanks
    0.875
    """
    answer = "".join(text.split())[:16].ljust(16, "0")
    blanks = [i for i, cell in enumerate(puzzle) if cell == "0"]
    return sum(answer[i] == solution[i] for i in blanks) / len(blanks) if blanks else 0.0

# -----------------------------------------------------------------------------
# 2. The vocabulary: one token per character, plus [PAD] and [MASK]
#    [PAD] doubles as the end token that pads a response to its fixed length.

def build_tokenizer(more=False):
    """A character-level transformers tokenizer: 0-9 + = [PAD] [MASK] (addition's ids),
    then if more, MORE: what Countdown, Sudoku and a JSONL file may need."""
    tokens = list("0123456789+=") + ["[PAD]", "[MASK]"] + list(MORE if more else "")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # "0" "8" "5" -> "085", no spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                   eos_token="[PAD]", mask_token="[MASK]")

MORE = "-*/(),:;.?! abcdefghijklmnopqrstuvwxyz"

def show_tokens(tokenizer, prompt, response, mask=None):
    """'37+48=' + '0_5': a prompt, then its response with '_' where masked and
    '.' at end tokens."""
    end = end_token_id(tokenizer)
    text = tokenizer.decode([t for t in prompt.tolist() if t != end]).replace(" ", "")
    for i, t in enumerate(response.tolist()):
        masked = mask is not None and bool(mask[i])
        text += "_" if masked else "." if t == end else tokenizer.decode([t]).strip()
    return text

def encode_padded_prompts(tokenizer, texts, device=None):
    """Prompt strings -> Long (B, Lp), left-padded with the end token, and
    Bool (B, Lp) True at real tokens, or None if none is padded (the toy's)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(len(row) for row in ids)
    pad = end_token_id(tokenizer)
    padded = torch.tensor([[pad] * (width - len(row)) + row for row in ids])       # (B, Lp)
    real = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in ids])
    return padded.to(device), (None if real.all() else real.to(device))

def encode_prompts(tokenizer, texts):
    """Prompt strings -> Long (B, Lp), left-padded with the end token."""
    return encode_padded_prompts(tokenizer, texts)[0]

def encode_responses(tokenizer, texts, length):
    """Answer strings -> Long (B, length), right-padded with the end token."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [t for t, row in zip(texts, ids) if len(row) > length]
    if too_long:
        raise ValueError(f"response length {length} is too short for {too_long[0]!r}")
    pad = end_token_id(tokenizer)
    return torch.tensor([row + [pad] * (length - len(row)) for row in ids])

def decode_responses(tokenizer, responses):
    """Token ids (B, L) -> the texts before the first end token (as LLaDA's), without spaces."""
    end = end_token_id(tokenizer)
    rows = [row[:row.index(end)] if end in row else row for row in responses.tolist()]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return ["".join(t.split()) for t in texts]

def end_token_id(tokenizer):
    """The token that pads a response after its answer."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer names no end, separator or padding token")

# -----------------------------------------------------------------------------
# 3. Forward process and training loss
#    q(y_t | y): each response token becomes [MASK] independently with prob. t
#    loss = -E_t E_{y_t} (1/t) sum_i 1[y_t^i = M] log p(y^i | y_t, x) / L

def forward_mask(responses, t, generator=None):
    """Bool (B, L), True where the forward process at noise level t (B,)
    masks a response token; only responses' shape is used."""
    u = torch.rand(responses.shape, generator=generator,
                   device=generator.device if generator is not None else responses.device)
    return u.to(responses.device) < t[:, None]

def token_log_probs(model, prompts, responses, mask, mask_id, prompt_mask=None):
    """log p_theta(y^i | y_t, x) at every response position, Float (B, L), float32 or better:
    y_t is responses (B, L) with mask_id where mask (B, L); prompt_mask (B, Lp) or None."""
    noisy = torch.where(mask, mask_id, responses)                    # (B, L)
    attention = None if prompt_mask is None else torch.cat(         # responses are never padding
        [prompt_mask, torch.ones_like(mask)], 1)
    logits = forward_logits(model, torch.cat([prompts, noisy], dim=1), attention)
    logits = logits[:, prompts.shape[1]:]                             # (B, L, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log_softmax over a large vocabulary needs it
    return logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)

def diffusion_loss(model, prompts, responses, t, mask, mask_id):
    """Minus the ELBO per response token, a scalar: mean_b -(1/L) (1/t_b) sum_i
    mask_bi log p(y_bi | y_t, x), for noise levels t (B,) and their masks."""
    logp = token_log_probs(model, prompts, responses, mask, mask_id)  # (B, L)
    per_row = (logp * mask).sum(-1) / t                                # (B,)
    return -(per_row / responses.shape[1]).mean()

# -----------------------------------------------------------------------------
# 4. The sampler (LLaDA, "low-confidence remasking")
#    From an all-[MASK] response, block by block, left to right: each of a
#    block's steps predicts its masked positions and commits the k most
#    confident, k from a linear schedule that fills the block on its last step.

@torch.no_grad()
def generate(model, prompts, mask_id, length, block_length=None, steps=None, temperature=0.0,
             remasking="low_confidence", generator=None, prompt_mask=None, order=None):
    """Long (B, L): responses of L = length tokens to prompts (B, Lp), no mask left. model: any
    masked LM (logits (B, T, V)); block_length divides L; steps in all, a multiple of the blocks
    (both default L); temperature 0: greedy; remasking: "low_confidence" or "random"; generator
    on the model's device; prompt_mask (B, Lp): False at left padding; order: a list, given each
    step's commits: positions and their scores (B, k) (the decoding order; --explain)."""
    block_length, n_blocks, steps_per_block = sampler_blocks(length, block_length, steps)
    if temperature < 0 or remasking not in ("low_confidence", "random"):
        raise ValueError(f"temperature {temperature} < 0 or remasking {remasking!r} unknown")
    B, Lp = prompts.shape
    x = torch.cat([prompts, torch.full((B, length), mask_id, device=prompts.device)], 1)
    attention = None if prompt_mask is None else torch.cat(                # (B, T) or None
        [prompt_mask, prompt_mask.new_ones(B, length)], 1)
    for block in range(n_blocks):
        lo, hi = Lp + block * block_length, Lp + (block + 1) * block_length  # the block's columns
        for k in filter(None, transfer_schedule(block_length, steps_per_block)):  # k > 0
            logits = forward_logits(model, x, attention)[:, lo:hi].float()  # (B, Lb, V)
            logits[..., mask_id] = -math.inf   # [MASK] is never a prediction
            if temperature > 0:  # Gumbel-max: argmax(logits/T + G) ~ softmax(logits/T)
                u = torch.rand(logits.shape, generator=generator, device=logits.device)
                gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
                pred = (logits / temperature + gumbel).argmax(-1)          # (B, Lb)
            else:
                pred = logits.argmax(-1)                                   # (B, Lb)
            if remasking == "low_confidence":
                score = logits.softmax(-1).gather(-1, pred[..., None]).squeeze(-1)
            else:
                score = torch.rand(pred.shape, generator=generator, device=pred.device)
            masked = x[:, lo:hi] == mask_id                                # (B, Lb)
            score = torch.where(masked, score, -math.inf)  # committed tokens stay
            chosen = score.topk(k, dim=-1).indices                         # (B, k)
            x[:, lo:hi].scatter_(1, chosen, pred.gather(1, chosen))         # committed
            if order is not None:
                order.append((lo - Lp + chosen, score.gather(1, chosen)))
    return x[:, Lp:]

def sampler_blocks(length, block_length=None, steps=None):
    """(block length, blocks, steps per block) of `length` tokens; default: 1 block, L steps."""
    block_length = length if block_length is None else block_length
    steps = length if steps is None else steps
    if length <= 0 or block_length <= 0 or length % block_length:
        raise ValueError(f"length={length} and block_length={block_length} must be positive, "
                         "the block length dividing the length")
    if steps <= 0 or steps % (length // block_length):
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                         f"({length // block_length})")
    return block_length, length // block_length, steps // (length // block_length)

def transfer_schedule(block_length, steps):
    """How many tokens to commit at each step of a block: 5 over 3 -> [2, 2, 1]."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]

# -----------------------------------------------------------------------------
# 5. The network: a stock bidirectional masked LM with a tiny config

def build_model(tokenizer, max_length, seed=0, hidden_size=128, num_layers=4,
                num_heads=4, intermediate_size=256):
    """A fresh BertForMaskedLM sized for the toy task, without dropout: an RL
    objective compares the same model's log-probs on the same inputs."""
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_length,
        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return BertForMaskedLM(config)

def forward_logits(model, input_ids, attention_mask=None):
    """model(input_ids).logits, (B, T, V): position i predicts token i. attention_mask: Bool
    (B, T), False at left padding, or None; positions count from each row's first real
    token, so a padded prompt reads like the prompt alone. On CUDA: bfloat16."""
    use_bf16 = input_ids.is_cuda and getattr(model, "dtype", None) == torch.float32
    padding = {}
    if attention_mask is not None:
        real = attention_mask.long()                                       # (B, T)
        padding = dict(attention_mask=real, position_ids=(real.cumsum(-1) - 1).clamp(min=0))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        return model(input_ids=input_ids, **padding).logits                 # (B, T, V)

# -----------------------------------------------------------------------------
# 6. Evaluation: greedy exact-match accuracy, with a few failures shown

def evaluate(model, tokenizer, task, problems, mask_id=None, length=None,
             batch_size=1000, n_failures=0, with_reward=False, **sampler_kwargs):
    """(greedy accuracy: the share task.solved, up to n_failures lines "model says
    37+48=086, truth is 085", and with_reward: the mean reward)."""
    mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
    length = task.answer_length if length is None else length
    device = next(model.parameters()).device
    rewards, failures = [], []
    for chunk in problems.split(batch_size):
        prompts, prompt_mask = encode_padded_prompts(tokenizer, task.prompts(chunk), device)
        responses = generate(model, prompts, mask_id, length, temperature=0.0,
                             prompt_mask=prompt_mask, **sampler_kwargs)
        said = decode_responses(tokenizer, responses)                  # decoded once
        r = task.rewards(chunk, said)
        rewards.append(r)
        for i in (~task.solved(r)).nonzero().flatten().tolist()[: n_failures - len(failures)]:
            failures.append(f"model says {task.prompts(chunk[i:i+1])[0]}{said[i]}, "
                            f"truth is {task.answers(chunk[i:i+1])[0]}")
    rewards = torch.cat(rewards)
    acc = task.solved(rewards).float().mean().item()
    return (acc, failures, rewards.mean().item()) if with_reward else (acc, failures)

# -----------------------------------------------------------------------------
# 7. Warm start: supervised diffusion_loss training until 30% of 500 held-out
#    *train* problems are right: rewards to earn, room for RL to improve.

def warm_start_path(settings):
    """The cache directory of these settings, under $BGPO_CACHE or ~/.cache/bgpo."""
    cache = os.environ.get("BGPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bgpo")
    key = hashlib.sha256(json.dumps(cache_key(settings), sort_keys=True).encode()).hexdigest()
    return os.path.join(cache, f"warm-start-{key[:12]}")

def cache_key(settings):  # not the thread count, whose float rounding the first trained keeps
    key = dict(settings, torch=torch.__version__)
    if settings["task"].endswith(".jsonl"):  # and a JSONL file's contents
        with open(settings["task"], "rb") as f:
            key["sha256"] = hashlib.sha256(f.read()).hexdigest()
    return key

def pretrain(model, tokenizer, task, max_steps, batch_size, lr, seed=0,
             target_accuracy=None, eval_every=10, n_val=500, length=None, progress=False):
    """diffusion_loss training for max_steps, or until greedy accuracy on n_val
    held-out train problems reaches target_accuracy (a bar if progress); returns the steps."""
    length = task.answer_length if length is None else length
    g = torch.Generator().manual_seed(seed)
    n_val = min(n_val, len(task.train) // 2)  # a small JSONL file: half of it
    val, train = task.train[:n_val], task.train[n_val:]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    mask_id = tokenizer.mask_token_id
    bar = tqdm(range(1, max_steps + 1), desc="warm start", disable=not progress, leave=False)
    for step in bar:
        model.train()
        problems = train[torch.randint(len(train), (batch_size,), generator=g)]  # (B, k)
        prompts = encode_prompts(tokenizer, task.prompts(problems))          # (B, Lp)
        responses = encode_responses(tokenizer, task.answers(problems), length)  # (B, L)
        t = 1e-3 + (1 - 1e-3) * torch.rand(batch_size, generator=g)        # (B,), t > 0
        mask = forward_mask(responses, t, generator=g)                       # (B, L)
        loss = diffusion_loss(model, prompts, responses, t, mask, mask_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if target_accuracy is not None and step % eval_every == 0:
            model.eval()
            acc = evaluate(model, tokenizer, task, val, length=length)[0]
            bar.set_postfix(acc=f"{acc:.2f}", target=target_accuracy)
            if acc >= target_accuracy:
                break
    bar.close()
    model.eval()
    return step

def warm_start(verbose=True, **overrides):
    """(model, tokenizer, task, settings) of WARM_START with overrides, from the
    cache, or trained (seconds; a bar if verbose) and cached, one process at a
    time; a damaged entry is trained again."""
    settings = {**WARM_START, **overrides}
    unknown = set(settings) - set(WARM_START)
    if unknown:
        raise ValueError(f"unknown warm-start setting(s): {sorted(unknown)}")
    task = load_task(settings["task"], settings["n_digits"], settings["n_test"], settings["seed"])
    tokenizer, length = build_tokenizer(more=task.name != "add"), settings["response_length"]
    lines = task.records if task.name == "jsonl" else []  # a JSONL file: where it goes wrong
    for r in lines:  # its characters must be the toy's
        c = next((c for c in r["prompt"] + r["answer"] if c not in tokenizer.vocab), None)
        if c is not None:
            raise ValueError(f"{settings['task']}:{r['line']}: {c!r} is not in the toy's "
                             "vocabulary (0-9 + = and MORE in toy_dllm.py); give --model")
    length = length or task.answer_length
    if length < task.answer_length:
        r = next((r for r in lines if len(r["answer"]) > length), None)
        raise ValueError((f"{settings['task']}:{r['line']}: " if r else "")
                         + f"response length {length} is shorter than the "
                         f"{task.answer_length}-token answer")
    if length == task.answer_length:  # one cache entry for the answer's own length
        settings["response_length"] = None
    path, key = warm_start_path(settings), cache_key(settings)
    with cache_lock(os.path.dirname(path)):  # one process trains; the others wait, then load
        cached = load_cached(path, key)
        if cached:
            return (*cached, task, settings)
        t0 = time.time()
        network = {key: settings[key] for key in ("hidden_size", "num_layers", "num_heads",
                                                  "intermediate_size")}
        prompt_length = max(map(len, task.prompts(torch.cat([task.train, task.test]))))
        model = build_model(tokenizer, prompt_length + length, settings["seed"], **network)
        steps = pretrain(model, tokenizer, task, settings["max_steps"], settings["batch_size"],
                         settings["lr"], settings["seed"], settings["target_accuracy"],
                         settings["eval_every"], length=length, progress=verbose)

        def save(tmp):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "warm_start.json"), "w") as f:
                json.dump(key, f, indent=1)

        save_dir_atomic(path, save, replace=False)  # kept if another process saved it first
    if verbose:
        print(f"warm start: {steps} steps in {time.time() - t0:.1f}s, cached at {path}",
              file=sys.stderr)
    return model, tokenizer, task, settings

@contextlib.contextmanager
def cache_lock(cache):
    """The cache directory, made, checked writable and locked (its .lock file)."""
    try:
        os.makedirs(cache, exist_ok=True)
        lock = open(os.path.join(cache, ".lock"), "a")
    except OSError as e:
        raise ValueError(f"warm-start cache {cache} is not a writable directory "
                         f"({e.strerror or e}); point $BGPO_CACHE at one") from e
    with lock:  # closing it unlocks
        if os.name != "nt":  # Windows has no fcntl: each process trains, the first saved is kept
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield

def load_cached(path, key):
    """(model, tokenizer) at path, or None: none there, or damaged (then removed)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(os.path.join(path, "warm_start.json")) as f:
            if json.load(f) != key:
                raise ValueError("its warm_start.json names other settings")
        return AutoModelForMaskedLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a missing or truncated file, a foreign directory: many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"warm start: the cache entry {path} is damaged ({reason}); training it again",
              file=sys.stderr)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)

# -----------------------------------------------------------------------------
# 8. Saving without half-written files

def write_atomic(path, text):
    """Write a file that is either the old one or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

def save_dir_atomic(path, save, replace=True):
    """save(tmp_dir), which must write a model's weights (under torchrun, save_pretrained
    writes none but on rank 0), then rename it to path, replacing it (replace=False: kept)."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        save(tmp)
        if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(tmp)):
            raise RuntimeError(f"nothing wrote a model's weights for {path}")
        if os.path.isdir(path):
            if not replace:
                return
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if replace or not os.path.isdir(path):  # kept: saved first by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    model, tokenizer, task, _ = warm_start()
    acc, failures = evaluate(model, tokenizer, task, task.test, n_failures=5)
    print("\n".join(failures))
    print(f"greedy test accuracy: {acc:.1%} of {len(task.test)}")
