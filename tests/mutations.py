"""Break the code on purpose, one plausible bug at a time, and run the one
test that should catch it: a claim test counts once it has been seen failing.

    python tests/mutations.py              # every mutation (5-10 minutes on 2 cores)
    python tests/mutations.py lora resume  # those whose name holds one of these words

Each mutation is made in a copy of the project in a temporary directory (the
working tree is never touched), as one exact replacement of a line of code:
if the line has changed, the mutation says so instead of running. The tests
are first run on the unbroken copy, where each must pass. Not part of
`python -m pytest`; the runs share one warm-start cache ($BGPO_TEST_CACHE).
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJ, RL, CKPT = "tests/test_objectives.py::", "tests/test_rl.py::", "tests/test_checkpoints_and_errors.py::"
TOY, LEVERS, SCALE = "tests/test_toy_dllm.py::", "tests/test_memory_levers.py::", "tests/test_scale_out.py::"
TASKS = "tests/test_tasks.py::"

# (name, file, the line as it is, the line broken, the test that must fail)
MUTATIONS = [
    ("consent: the config loaded trusting shipped code", "real_dllm.py",
     "config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)",
     "config = AutoConfig.from_pretrained(path, trust_remote_code=True)",
     CKPT + "test_shipped_code_runs_only_with_trust_remote_code_typed"),
    ("lora resume: lora_base from the checkpoint resumed", "bgpo.py",
     'lora_base = saved.get("lora_base", here)', "lora_base = here",
     LEVERS + "test_lora_on_a_saved_toy_model_trains_adapters_only_and_resumes_exactly"),
    ("resume: no optimizer state restored", "runs.py",
     'real_dllm.load_optimizer_state(policy.model, optimizer, state.pop("optimizer"))',
     'state.pop("optimizer")',
     CKPT + "test_interrupted_and_resumed_run_matches_uninterrupted"),
    ("resume under torchrun: no optimizer state restored", "runs.py",
     'real_dllm.load_optimizer_state(policy.model, optimizer, state.pop("optimizer"))',
     'state.pop("optimizer")',
     SCALE + "test_torchrun_run_saves_on_rank_0_and_resumes_exactly"),
    ("g_j without its 1 / n_t", "bgpo.py",
     "return objective / n_samples", "return objective",
     RL + "test_bgpo_and_naive_runs_match_on_policy"),
    ("warm start: no cache lookup", "toy_dllm.py",
     "cached = load_cached(path, key)", "cached = None",
     TOY + "test_second_warm_start_call_loads_the_cache_and_trains_nothing"),
    ("warm start: a damaged entry loaded unchecked", "toy_dllm.py",
     "except Exception as e:  # a missing or truncated file",
     "except ImportError as e:  # a missing or truncated file",
     TOY + "test_a_damaged_warm_start_entry_is_trained_again_in_one_line"),
    ("warm start: no lock", "toy_dllm.py",
     "fcntl.flock(lock, fcntl.LOCK_EX)", "pass",
     TOY + "test_concurrent_cold_starts_train_once_and_leave_one_good_entry"),
    ("warm start: a save without weights renamed into place", "toy_dllm.py",
     "raise RuntimeError(f\"nothing wrote a model's weights for {path}\")", "pass",
     TOY + "test_a_save_without_weights_is_never_renamed_into_place"),
    ("warm start: every torchrun rank trains it", "runs.py",
     "with real_dllm.rank_zero_first():", "with contextlib.nullcontext():",
     SCALE + "test_cold_cache_under_torchrun_is_trained_on_rank_0_and_loads_in_one_process"),
    ("| head: no BrokenPipeError handler", "bgpo.py",
     "except BrokenPipeError:  # output piped", "except ZeroDivisionError:  # output piped",
     CKPT + "test_output_piped_into_head_ends_without_traceback"),
    ("stratified counts: round, as the official code", "bgpo.py",
     "n_masked = (k - 1 + offsets) % L + 1",
     "n_masked = (torch.round(k + offsets * 0 + torch.arange(n_samples, device=dev)[:, None] * L "
     "/ n_samples).long() - 1) % L + 1",
     OBJ + "test_stratified_count_of_every_sample_is_uniform"),
    ("tangent 1 + d replaced by e^d", "bgpo.py",
     "ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)))",
     "ratio = torch.where(upper, torch.exp(d), torch.exp(d.masked_fill(upper, 0.0)))",
     OBJ + "test_bound_holds_off_policy"),
    ("tangent row: the tangent only where A >= 0 (bgpo itself)", "bgpo.py",
     '"tangent": True,', '"tangent": advantages >= 0,',
     OBJ + "test_one_lemma_objectives_are_not_bounds"),
    ("Jensen's e^d detached", "bgpo.py",
     "ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)))",
     "ratio = torch.where(upper, 1 + d, torch.exp(d.masked_fill(upper, 0.0)).detach())",
     OBJ + "test_every_method_equals_naive_on_policy"),
    ("step 4 ignores the method: tangent and jensen train as bgpo", "bgpo.py",
     "g = bgpo_sample_objective(term, old, advantages, n_t, clip, method)",
     "g = bgpo_sample_objective(term, old, advantages, n_t, clip)",
     OBJ + "test_repeated_masks_are_computed_once_with_the_same_gradient"),
    ("gap: the method's own objective, not BGPO's bound", "bgpo.py",
     "R_lb = (copies * bgpo_sample_objective(terms, old, advantages, copies.sum(0))).sum(0)",
     "R_lb = (copies * bgpo_sample_objective(terms, old, advantages, copies.sum(0), method=method)).sum(0)",
     OBJ + "test_recorded_distance_and_gap_match_the_obvious_ones"),
    ("|d|: per sample, not per masked token", "bgpo.py",
     "per_token = (terms - old).abs() / tokens.where(used > 0, 1.0)",
     "per_token = (terms - old).abs()",
     OBJ + "test_recorded_distance_and_gap_match_the_obvious_ones"),
    ("the off-policy updates' distance not measured", "bgpo.py",
     "diagnostics = None if old_terms is None else {}", "diagnostics = None",
     RL + "test_metrics_split_each_steps_time_and_give_each_update_its_distance"),
    ("two_pass: the first pass keeps its graphs", "bgpo.py",
     "    with torch.no_grad():\n                mean_d = ",
     "    with contextlib.nullcontext():\n                mean_d = ",
     OBJ + "test_memory_bgpo_flat_naive_linear"),
    ("FSDP2 without the root fully_shard", "real_dllm.py",
     "    fully_shard(inner)\n", "\n",
     SCALE + "test_fsdp2_gradient_equals_the_single_process_gradient"),
    ("complementary: pairs on the stratified counts 1..L", "bgpo.py",
     "[:, None] * (L + 1) // n) % (L + 1)", "[:, None] * (L + 1) // n) % L + 1",
     OBJ + "test_every_complementary_sample_has_the_elbo_as_its_mean"),
    ("one_step: weight L, not 1", "bgpo.py",
     "weights = torch.ones(n_samples, B, device=dev)",
     "weights = L * torch.ones(n_samples, B, device=dev)",
     OBJ + "test_one_step_is_the_count_L_term_of_the_stratified_estimator"),
    ("torchrun fixture: a rank killed by a signal after writing its files", "tests/distributed_check.py",
     "    dist.destroy_process_group()\n\n\ndef quiet_main",
     "    dist.destroy_process_group()\n    if rank == 1:\n        os.abort()\n\n\ndef quiet_main",
     SCALE + "test_fsdp2_gradient_equals_the_single_process_gradient"),
    ("Welch's degrees of freedom without the - 1", "docs/stats.py",
     "vb ** 2 / (len(b) - 1))", "vb ** 2 / len(b))",
     "tests/test_stats.py::test_welch_matches_the_textbook_example_and_its_own_definition"),
    ("results.md: a table's number typed over", "docs/results.md",
     "| method=bgpo | 5 | 46.1 +- 2.0 |", "| method=bgpo | 5 | 46.2 +- 2.0 |",
     "tests/test_tables.py::test_every_generated_table_in_results_md_is_printed_from_its_json"),
    ("--collect --upto: the step itself left out", "docs/tables.py",
     'records = [r for r in records if r["step"] <= upto]',
     'records = [r for r in records if r["step"] < upto]',
     "tests/test_tables.py::test_collect_upto_cuts_each_run_after_the_step"),
    ("grad_angle: BGPO's gradient compared with itself", "docs/grad_angle.py",
     'LOSS_BACKWARD(*call, "two_pass", *args, **kwargs)',
     'LOSS_BACKWARD(*call, "bgpo", *args, **kwargs)',
     OBJ + "test_gradient_angle_matches_two_backward_passes_the_obvious_way"),
    ("grad_angle: the difference relative to the bound's norm", "docs/grad_angle.py",
     "rel=float((bound - exact).norm() / exact.norm()))",
     "rel=float((bound - exact).norm() / bound.norm()))",
     OBJ + "test_gradient_angle_matches_two_backward_passes_the_obvious_way"),
    ("seeds_needed: one seed too many in the standard error", "docs/stats.py",
     "se, df = math.sqrt((va + vb) / n), (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)",
     "se, df = math.sqrt((va + vb) / (n - 1)), (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)",
     "tests/test_stats.py::test_seeds_needed_is_the_fewest_seeds_whose_welch_detects_the_difference"),
    ("the sweep: equal updates read at the last step", "docs/tables.py",
     'return [("equal updates", lambda mu: last // mu), ("equal rollouts", lambda mu: last)]',
     'return [("equal updates", lambda mu: last), ("equal rollouts", lambda mu: last)]',
     "tests/test_tables.py::test_every_generated_table_in_results_md_is_printed_from_its_json"),
    ("countdown: the numbers used not checked", "toy_dllm.py",
     'if not re.fullmatch(r"[0-9+\\-*/() ]+", text) or used != sorted(numbers):',
     'if not re.fullmatch(r"[0-9+\\-*/() ]+", text):',
     "tests/test_rewards.py::test_countdown_reward_takes_each_branch_of_the_rule"),
    ("countdown: division by zero not caught", "toy_dllm.py",
     "except (SyntaxError, ValueError, ZeroDivisionError):", "except (SyntaxError, ValueError):",
     "tests/test_rewards.py::test_countdown_reward_takes_each_branch_of_the_rule"),
    ("sudoku: every cell counted, not the blanks", "toy_dllm.py",
     'blanks = [i for i, cell in enumerate(puzzle) if cell == "0"]', "blanks = list(range(16))",
     "tests/test_rewards.py::test_sudoku_reward_is_the_share_of_blanks_right"),
    ("uniform_t weight L/l, not (L+1)/l", "bgpo.py",
     "(L + 1) / m.clamp(min=1), 0.0)", "L / m.clamp(min=1), 0.0)",
     OBJ + "test_monte_carlo_elbo_matches_exact_enumeration"),
    ("uniform_t: an empty mask weighted L + 1 and computed", "bgpo.py",
     "torch.where(m > 0, (L + 1) / m.clamp(min=1), 0.0)", "(L + 1) / m.clamp(min=1)",
     OBJ + "test_uniform_t_masks_follow_the_forward_process"),
    ("elbo_terms: a pass with no row to compute runs the model on nothing", "bgpo.py",
     "rows = rows if len(rows) else rows.new_zeros(1)  # none: one of weight 0, to have a graph",
     "pass", OBJ + "test_a_sample_whose_masks_are_all_empty_adds_nothing"),
    ("sudoku split: test puzzles drawn from every grid", "toy_dllm.py",
     "torch.randperm(held_out, generator=g)[:n_test, None]",
     "torch.randperm(len(records), generator=g)[:n_test, None]",
     TASKS + "test_sudoku_split_by_solution_with_unique_puzzles"),
    ("countdown split: a problem once per order of its numbers", "toy_dllm.py",
     'solutions.setdefault((numbers, int(value)), f"({a}{o}{b}){p}{c}")',
     'solutions.setdefault(((a, b, c), int(value)), f"({a}{o}{b}){p}{c}")',
     TASKS + "test_countdown_problems_are_reachable_and_split_without_leaks"),
    ("jsonl: the split keys ignored", "toy_dllm.py",
     "if not any(\"split\" in r for r in records):", "if True:",
     TASKS + "test_a_jsonl_file_trains_on_the_toy"),
    ("jsonl: errors name the line before", "toy_dllm.py",
     "records.append(dict(r, line=n))", "records.append(dict(r, line=n - 1))",
     TASKS + "test_a_bad_jsonl_file_is_one_line_naming_the_file_and_line"),
    ("explain: the decoding order given the whole batch's padding mask", "bgpo.py",
     "cfg.sampler_steps, prompt_mask=first.prompt_mask, order=order)",
     "cfg.sampler_steps, prompt_mask=batch.prompt_mask, order=order)",
     TASKS + "test_explain_shows_the_decoding_order_of_a_padded_prompt"),
    ("accuracy: any reward above 0 counts as solved", "toy_dllm.py",
     "acc = task.solved(rewards).float().mean().item()", "acc = (rewards > 0).float().mean().item()",
     TASKS + "test_accuracy_is_the_share_solved_and_the_mean_reward_counts_the_rest"),
]


def copy_project(source, to):
    shutil.copytree(source, to, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "__pycache__", ".pytest_cache", "*.png"))


def pytest(where, tests, env):
    """The exit status of pytest on these tests in the copy `where`."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *tests], cwd=where, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode


def main(words):
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    with tempfile.TemporaryDirectory(prefix="bgpo-mutations-") as tmp:
        env = dict(os.environ, BGPO_TEST_CACHE=os.path.join(tmp, "cache"))
        clean = os.path.join(tmp, "clean")
        copy_project(ROOT, clean)  # a snapshot: the working tree may change meanwhile
        tests = sorted({m[4] for m in chosen})
        print(f"{len(tests)} tests on the unbroken code ...", flush=True)
        if pytest(clean, tests, env) != 0:
            sys.exit("mutations.py: a test fails on the unbroken code; fix that first")
        rows = []
        for name, path, line, broken, test in chosen:
            where = os.path.join(tmp, "mutant")
            shutil.rmtree(where, ignore_errors=True)
            copy_project(clean, where)
            with open(os.path.join(where, path)) as f:
                source = f.read()
            if source.count(line) != 1:
                rows.append((name, "STALE: the line is not in the code once", test))
            else:
                with open(os.path.join(where, path), "w") as f:
                    f.write(source.replace(line, broken))
                status = pytest(where, [test], env)
                rows.append((name, {0: "NOT CAUGHT", 1: "caught"}.get(status, f"error {status}"),
                             test))
            print(f"  {rows[-1][1]:<10} {name}", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'result':<10}  test")
    for name, result, test in rows:
        print(f"{name:<{width}}  {result:<10}  {test.split('::')[1]}")
    return 0 if all(r[1] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
