"""A run of bgpo.py from the command line: its flags, its directory, its model.

Config holds every setting with its default and its flag's help; the parser
is built from Config's fields. A run's directory (--out) holds run.json,
metrics.jsonl, checkpoints to --resume from, summary.json and the final
model. Nothing here is needed to follow one RL step (bgpo.py sections 1-5).
It imports toy_dllm and real_dllm, never bgpo; checks raise ValueError, and
bgpo.main says them in one line.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch

import real_dllm
import toy_dllm

METHODS = ("bgpo", "naive", "two_pass", "tangent", "jensen")    # --method, bgpo.py sections 4, 6
SCHEMES = ("stratified", "uniform_t", "complementary", "one_step")  # --scheme, sections 3, 6

# -----------------------------------------------------------------------------
# 1. The flags: Config, then the parser built from it

def flag(default, help, **keywords):
    """A Config field and its flag: help, bounds low / high / above, choices,
    metavar, list=True (--samples 1,4,16)."""
    return dataclasses.field(default=default, metadata=dict(keywords, help=help))

@dataclass(frozen=True)
class Config:
    """Every setting, its default and its flag's help; built once, never changed."""
    # what to do: train, unless one of these is given
    compare: bool = flag(False, "table: naive vs two_pass vs bgpo per n_t, memory and time")
    explain: bool = flag(False, "one BGPO step on a small batch, every number printed")
    # the objective and its Monte-Carlo estimate
    method: str = flag("bgpo", "objective for training", choices=METHODS)
    samples: int = flag(16, "n_t, samples per response (--compare: a list)", low=1, list=True)
    sample_counts: tuple = (16,)  # all of --samples 1,4,16
    mc_batch: int = flag(1, "K, samples per forward pass (--compare: a list)", low=1, list=True)
    mc_batches: tuple = (1,)  # all of --mc-batch 1,4,16
    scheme: str = flag("stratified", "how masks are drawn", choices=SCHEMES)
    clip: float = flag(None, "PPO clipping epsilon of the ratio (the paper: none)", above=0, high=1)
    length_norm: bool = flag(False, "divide each ELBO term by the response length")
    # the GRPO loop
    steps: int = flag(275, "RL steps", low=1)
    prompts: int = flag(16, "prompts per step", low=1)
    group: int = flag(8, "G, responses per prompt", low=2)
    lr: float = flag(1e-4, "AdamW learning rate", above=0)
    max_grad_norm: float = flag(None, "clip the gradient's norm to this", above=0)
    updates_per_batch: int = flag(1, "updates per rollout on disjoint groups (1: on-policy)", low=1)
    seed: int = flag(0, "seed of prompts, responses and masks", low=0)
    device: str = flag("auto", "where to run", choices=("auto", "cpu", "cuda"))
    # the sampler
    temperature: float = flag(0.6, "rollout temperature (evaluation is greedy)", low=0)
    sampler_steps: int = flag(None, "denoising steps per response (default: L)", low=1)
    block_length: int = flag(None, "sampler block length (default: L)", low=1)
    # evaluation, measurements, output
    eval_every: int = flag(25, "steps between test evaluations", low=1)
    perturb: float = flag(0.0, "--compare, --explain: move weights by this many stds", low=0)
    json: bool = flag(False, "print --compare's rows as JSON")
    out: str = flag(None, "write metrics.jsonl, summary.json and the model here", metavar="DIR")
    save_every: int = flag(None, "checkpoint every N steps under --out", low=1)
    resume: str = flag(None, "continue the run saved in DIR (its --out)", metavar="DIR")
    # the model and the task
    model: str = flag(None, "a transformers masked LM (default: the toy)", metavar="PATH")
    trust_remote_code: bool = flag(False, "let the checkpoint's own code run (LLaDA, Dream)")
    mask_id: int = flag(None, "[MASK] id, if the tokenizer names none", low=0)
    shifted_logits: str = flag("auto", "read token i at i-1 (Dream)", choices=("auto", "yes", "no"))
    response_length: int = flag(None, "L: the answer, then end tokens (default: the answer)", low=1)
    task: str = flag("add", "add, countdown, sudoku, or FILE.jsonl of prompts and answers",
                     metavar="TASK")
    digits: int = flag(2, "operand digits of --task add", low=2, high=9)
    test_size: int = flag(1000, "test problems", low=1)
    # memory levers for a real diffusion LM (real_dllm.py)
    lora_rank: int = flag(None, "train LoRA adapters of this rank, not the weights", low=1)
    lora_alpha: float = flag(None, "LoRA updates scaled by alpha / rank (default: rank)", above=0)
    lora_targets: str = flag(None, "modules given adapters (default: linear layers but the head)",
                             metavar="NAMES")
    gradient_checkpointing: bool = flag(False, "recompute layers' activations in backward")
    activation_budget: float = flag(None, "stop if a loss call needs more activation MB", above=0)

MODES = ("compare", "explain")  # at most one; none: train
RESUMABLE = ("steps", "device", "save_every", "trust_remote_code", "mc_batch", "mc_batches")
EXPLAIN = dict(prompts=2, group=4, samples=2, sample_counts=(2,))  # --explain's batch, unless given
NOT_TYPED = object()  # parse_args: the value of a flag that was not typed

class Parser(argparse.ArgumentParser):
    """argparse, errors on one line (under torchrun, from rank 0 only)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if os.environ.get("RANK", "0") == "0"
                  else None)

def number(kind, low=None, high=None, above=None):
    """An argparse type: a finite number of this kind, >= low (> above), <= high."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind.__name__}") from None
        lowest = f">= {low}" if low is not None else f"> {above}"
        if not math.isfinite(value) or (low is not None and value < low) or (
                above is not None and value <= above) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text} must be {lowest}" + (f" and <= {high}" if high is not None else ""))
        return value
    return parse

class FirstAndList(argparse.Action):
    """--samples 1,4,16: samples the first, sample_counts all (--mc-batch too)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0])
        setattr(namespace, {"samples": "sample_counts", "mc_batch": "mc_batches"}[self.dest],
                tuple(values))

def build_parser():
    p = Parser(prog="bgpo.py", description="BGPO on a tiny diffusion LM (or a real one).")
    modes = p.add_mutually_exclusive_group()
    for f in (f for f in dataclasses.fields(Config) if f.metadata):
        keywords = dict(f.metadata)
        bounds = {key: keywords.pop(key) for key in ("low", "high", "above") if key in keywords}
        if f.default not in (None, False):
            keywords["help"] += f" (default: {f.default})"
        if f.type is bool:
            keywords["action"] = "store_true"
        elif keywords.pop("list", False):
            keywords.update(type=lambda text, each=number(int, **bounds): [
                each(part) for part in text.split(",")], action=FirstAndList, metavar="N[,N...]")
        elif f.type in (int, float):
            keywords.update(type=number(f.type, **bounds), metavar="N" if f.type is int else "X")
        (modes if f.name in MODES else p).add_argument("--" + f.name.replace("_", "-"),
                                                       **keywords)
    p.set_defaults(**dataclasses.asdict(Config()))
    return p

def parse_args(parser, argv):
    """(Config, checkpoint or None): the flags over --explain's batch or the
    --resume run's settings, checked against each other."""
    args = vars(parser.parse_args(argv))
    given = {name: v for name, v in vars(parser.parse_args(argv, argparse.Namespace(
        **{name: NOT_TYPED for name in args}))).items() if v is not NOT_TYPED}  # typed
    checkpoint = None
    if args["explain"]:
        args.update({name: v for name, v in EXPLAIN.items() if name not in given})
    if args["resume"]:
        run, checkpoint = read_run(args["resume"], given)
        changed = sorted(name for name in set(given) - {"resume", "out", *RESUMABLE}
                         if json.loads(json.dumps(given[name])) != run.get(name))
        if changed:
            raise ValueError("--resume continues a run as it was set up; "
                             f"cannot change --{changed[0].replace('_', '-')}")
        # consent to run shipped code comes from this command line only
        args.update({**run, "trust_remote_code": False, **given, "out": args["resume"]})
    cfg = Config(**{**args, "sample_counts": tuple(args["sample_counts"]),
                    "mc_batches": tuple(args["mc_batches"])})
    check_flags(cfg)
    return cfg, checkpoint

def read_run(out, given):
    try:
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        run = None
    found = real_dllm.checkpoints(out)
    if not found or not isinstance(run, dict) or not {"samples", "method", "steps", "seed"} <= set(run):
        raise ValueError(f"--resume {out}: no run of this program with a checkpoint there")
    if run.get("trust_remote_code") and "trust_remote_code" not in given:
        raise ValueError(f"--resume {out}: its model ships code of its own; "
                         "add --trust-remote-code to allow it to run")
    known = {f.name for f in dataclasses.fields(Config)}
    return {name: v for name, v in run.items() if name in known}, found[-1]

def check_flags(cfg):
    """Flags that are each fine but do not go together."""
    training = not cfg.compare
    if training and (len(cfg.sample_counts) > 1 or len(cfg.mc_batches) > 1):
        raise ValueError("--samples and --mc-batch take one number when training "
                         "(lists are for --compare)")
    if cfg.scheme == "complementary" and any(n % 2 for n in cfg.sample_counts):
        raise ValueError("--scheme complementary draws masks in pairs: --samples must be even")
    if training and cfg.prompts % cfg.updates_per_batch:
        raise ValueError(f"--updates-per-batch {cfg.updates_per_batch} must divide "
                         f"--prompts {cfg.prompts}")
    if training and cfg.save_every and not cfg.out:
        raise ValueError("--save-every needs --out")
    if cfg.lora_rank is None and (cfg.lora_alpha is not None or cfg.lora_targets):
        raise ValueError("--lora-alpha and --lora-targets need --lora-rank")
    size = real_dllm.torchrun_processes()
    if size > 1 and (cfg.compare or cfg.explain or cfg.lora_rank
                     or cfg.activation_budget):
        raise ValueError("--compare, --explain, --lora-rank and "
                         "--activation-budget run in one process, not under torchrun")
    if size > 1 and cfg.prompts % (size * cfg.updates_per_batch):
        raise ValueError(f"--prompts {cfg.prompts} must divide into {size} processes "
                         f"x {cfg.updates_per_batch} updates per batch")

@contextlib.contextmanager
def blame(source):
    """A ValueError inside is said as 'source: message'."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{source}: {real_dllm.first_line(e)}") from e


# -----------------------------------------------------------------------------
# 2. Loading the model: the toy's warm start, a checkpoint, or LoRA adapters on their base

def load_model(cfg, path, saved):
    """(model, tokenizer) of path (None: the toy); LoRA adapters on their base."""
    if path is None:
        with real_dllm.rank_zero_first():  # torchrun: rank 0 trains the warm start, the rest load it
            return toy_dllm.warm_start(task=cfg.task, n_digits=cfg.digits, n_test=cfg.test_size,
                                       response_length=cfg.response_length)[:2]
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        base = saved.get("lora_base")
        with blame(f"its base model {base}"):
            model, tokenizer = load_model(cfg, base, real_dllm.saved_settings(base) if base else {})
        return real_dllm.load_lora(model, path), tokenizer
    shifted = {"yes": True, "no": False}.get(cfg.shifted_logits, saved.get("shifted_logits", "auto"))
    return real_dllm.load_checkpoint(path, cfg.trust_remote_code, shifted)


# -----------------------------------------------------------------------------
# 3. The run's directory: run.json, metrics, checkpoints (out/checkpoint-STEP
#    holds the model, its tokenizer and settings, and trainer_state.pt: step,
#    metrics, optimizer, RNG states), and the tables the measurements print

def prepare_out(cfg, policy, resuming):
    """--out: a writable directory with no other run in it; run.json there."""
    if not resuming and os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):
        raise ValueError(f"--out {cfg.out} already holds a run; use --resume {cfg.out} or "
                         "another --out")
    run = dict(dataclasses.asdict(cfg), response_length=policy.response_length)
    try:
        os.makedirs(cfg.out, exist_ok=True)
        if real_dllm.world()[0] == 0:
            toy_dllm.write_atomic(os.path.join(cfg.out, "run.json"),
                                  json.dumps(run, indent=1) + "\n")
    except OSError as e:
        raise ValueError(f"--out {cfg.out}: cannot write there ({e.strerror or e})") from e

def save_progress(out, state, policy, cfg, optimizer, data_rng, sample_rng):
    """metrics.jsonl after every step; a checkpoint every cfg.save_every steps."""
    if real_dllm.world()[0] == 0:
        toy_dllm.write_atomic(os.path.join(out, "metrics.jsonl"),
                              "".join(json.dumps(m) + "\n" for m in state["metrics"]))
    if cfg.save_every and state["step"] % cfg.save_every == 0:
        saved = {key: v for key, v in state.items() if key not in ("last_acc", "last_eval", "started")}
        save_checkpoint(out, policy, optimizer, dict(
            saved, data_rng=data_rng.get_state(), torch_rng=torch.get_rng_state(),
            sample_rng=real_dllm.all_ranks(sample_rng.get_state())))

def save_model(policy, path, weights=None):
    """The model, tokenizer and what --model needs to use them (weights: if sharded)."""
    settings = dict(response_length=policy.response_length, mask_id=policy.mask_id,
                    shifted_logits=real_dllm.reads_shifted(policy.model))
    if real_dllm.has_lora(policy.model):  # peft saves the adapters only
        settings["lora_base"] = policy.lora_base
    real_dllm.save_model(path, policy.model, policy.tokenizer, settings, weights)

def save_checkpoint(out, policy, optimizer, state):
    """out/checkpoint-STEP, written whole or not at all; older ones are removed."""
    weights, optimizer_state = real_dllm.full_state(policy.model, optimizer)  # torchrun: gathered
    if real_dllm.world()[0] != 0:
        return

    def save(tmp):
        save_model(policy, tmp, weights)
        torch.save({**state, "optimizer": optimizer_state},
                   os.path.join(tmp, "trainer_state.pt"))

    toy_dllm.save_dir_atomic(os.path.join(out, f"checkpoint-{state['step']}"), save)
    for old in real_dllm.checkpoints(out)[:-1]:
        shutil.rmtree(old)

def format_table(rows):
    """Rows of dicts -> an aligned text table of the columns below that the rows have."""
    three, megabytes = "{:.3f}".format, lambda v: f"{v / 2**20:.2f}"
    columns = dict(  # key: (head, format)
        method=("method", str), scheme=("scheme", str), samples=("n_t", str), mc_batch=("K", str),
        merged=("merged", lambda v: "yes" if v else "no"), objective=("objective", "{:+.6f}".format),
        grad_max_abs_diff=("max|grad-naive|", "{:.1e}".format),
        peak_activation_bytes=("act. MB", megabytes), seconds=("ms/call", lambda v: f"{1000 * v:.0f}"),
        time_vs_naive=("time/naive", "{:.2f}".format), cuda_peak_bytes=("CUDA peak MB", megabytes),
        checkpointed_activation_bytes=("act. MB ckpt", megabytes),
        checkpointed_cuda_peak_bytes=("CUDA peak MB ckpt", megabytes), masks=("masks", three),
        elbo_bias=("ELBO bias", three), elbo_std=("ELBO std", three), elbo_floor=("ELBO floor", three),
        rel_std=("rel. std", three), rel_bias=("rel. bias", three), bias_floor=("bias floor", three),
        rel_error=("rel. error", three))
    shown = [key for key in columns if rows[0].get(key) is not None]
    table = [[columns[k][0] for k in shown]] + [[columns[k][1](r[k]) for k in shown] for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(shown))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in table)

# -----------------------------------------------------------------------------
# 4. The loop's start and end: the accuracy before RL (or the state resumed),
#    the greedy test accuracy, the summary and the final model

TIME_SPLIT = ("rollout", "loss", "update", "eval")

def evaluate_policy(policy, cfg, n_failures=3):
    """Greedy test accuracy, a few failures and the mean reward (torchrun: over all ranks)."""
    test, size = policy.task.test, real_dllm.world()[1]
    share, batch_size = real_dllm.rank_share(test, 1000)  # torchrun: every W-th problem
    acc, failures, reward = toy_dllm.evaluate(
        policy.model, policy.tokenizer, policy.task, share, policy.mask_id,
        policy.response_length, batch_size=batch_size, n_failures=n_failures,
        with_reward=True, block_length=cfg.block_length, steps=cfg.sampler_steps)
    if size > 1:
        acc, reward = (real_dllm.global_mean(x * len(share)) * size / len(test) for x in (acc, reward))
    return acc, failures, reward

def start_or_resume(policy, cfg, optimizer, data_rng, sample_rng, resume_state):
    """The loop's state: fresh (with the accuracy before RL), or as saved."""
    if resume_state is None:
        acc_before, failures, reward = evaluate_policy(policy, cfg)
        say("\n".join(failures + [f"greedy test accuracy before RL: {acc_before:.1%} "
                                  f"(mean reward {reward:.3f})"]))
        return dict(step=0, acc_before=acc_before, reward_before=reward, seconds=0.0,
                    peak_activation_bytes=0,
                    skipped_updates=0, metrics=[], device_type=policy.device.type,
                    world_size=real_dllm.world()[1], last_acc=acc_before, last_eval=None,
                    started=time.time(), time_split=dict.fromkeys(TIME_SPLIT, 0))
    state = dict(resume_state)
    real_dllm.load_optimizer_state(policy.model, optimizer, state.pop("optimizer"))
    data_rng.set_state(state.pop("data_rng"))
    sample_rng.set_state(state.pop("sample_rng")[real_dllm.world()[0]])  # one per rank
    torch.set_rng_state(state.pop("torch_rng"))
    say(f"resumed at step {state['step']}")
    last_acc = next((m["acc"] for m in reversed(state["metrics"]) if "acc" in m),
                    state["acc_before"])
    split = {part: sum(m.get("time_" + part, 0) for m in state["metrics"]) for part in TIME_SPLIT}
    return dict(state, last_acc=last_acc, last_eval=None, started=time.time() - state["seconds"],
                time_split=state.get("time_split", split))

def finish(policy, cfg, state, out):
    """Say the accuracy before and after; write the summary and the model."""
    acc_after, failures, reward = state["last_eval"] or evaluate_policy(policy, cfg)
    seconds = time.time() - state["started"]
    before = state.get("reward_before", math.nan)  # runs started before it was kept: nan
    say("\n".join(failures + [f"greedy test accuracy: {state['acc_before']:.1%} before RL -> "
                              f"{acc_after:.1%} after {cfg.steps} steps ({seconds:.0f}s); "
                              f"mean reward {before:.3f} -> {reward:.3f}"]))
    rank, size = real_dllm.world()
    summary = dict(method=cfg.method, samples=cfg.samples, scheme=cfg.scheme, steps=cfg.steps,
                   seed=cfg.seed, acc_before=state["acc_before"], acc_after=acc_after,
                   reward_before=state.get("reward_before"), reward_after=reward, task=cfg.task,
                   seconds=round(seconds, 3), peak_activation_bytes=state["peak_activation_bytes"],
                   skipped_updates=state["skipped_updates"], world_size=size,
                   time_split={part: round(t, 3) for part, t in state["time_split"].items()})
    if size > 1:  # torchrun: the activation meter is off; each rank's peak memory instead
        summary["peak_rss_bytes_per_rank"] = real_dllm.peak_memory_per_rank()
    weights = real_dllm.full_state(policy.model)[0] if out else None  # torchrun: all gather
    if out and rank == 0:
        toy_dllm.save_dir_atomic(os.path.join(out, "model"),
                                 lambda tmp: save_model(policy, tmp, weights))
        toy_dllm.write_atomic(os.path.join(out, "summary.json"),
                              json.dumps(summary, indent=1) + "\n")
    return summary

def say(text):  # print, on rank 0 only under torchrun
    if real_dllm.world()[0] == 0:
        print(text)
