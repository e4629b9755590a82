"""The tables of docs/results.md, printed from the JSON under docs/data/, never typed.

    python docs/tables.py               # rewrite every generated block of docs/results.md
    python docs/tables.py --check       # exit 1, naming the block, where one differs
    python docs/tables.py NAME          # print docs/data/NAME.json's tables

A generated block in results.md sits between `<!-- tables NAME -->` (or
`<!-- tables NAME compare="X vs Y; ..." -->`) and `<!-- end tables -->`; tests/test_tables.py regenerates every block and fails on any
difference. Every comparison carries its statistics (docs/stats.py): the difference
against the block's bgpo (or first) setting, its 95% interval, p, and the smallest difference
those seeds could have detected (80% power, 5% level). The standard library only.
"""
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402

DOCS = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(DOCS, "results.md")
PARTS = ("rollout", "loss", "update", "eval")  # a step's time split, as metrics.jsonl keeps it
BLOCK = re.compile(r"(<!-- tables (\S+)(.*?) -->\n)(.*?)(<!-- end tables -->)", re.S)
PAIRS = re.compile(r'compare="([^"]*)"')  # "X vs Y; ...": X minus Y, in place of against bgpo

def read(name):
    with open(os.path.join(DOCS, "data", name)) as f:
        return json.load(f)

def spread(v):
    """'mean +- std' of a setting's seeds, in %; one seed: its value alone (no spread)."""
    return f"{statistics.mean(v):.1f} +- {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

def summary_table(runs, key="acc"):
    """Markdown: mean +- std over seeds at each evaluation step shared by every run, and the
    seconds per step (a mean over seeds, as every column here), then every seed's end."""
    every = [{s for s, _ in run[key]} for seeds in runs.values() for run in seeds.values()]
    steps = sorted(set.intersection(*every))  # evaluated in every run
    lines = ["| setting | seeds | " + " | ".join(f"step {s}" for s in steps) + " | s/step |",
             "|---" * (len(steps) + 3) + "|"]
    for label, seeds in runs.items():
        cells = [spread([100 * dict(run[key])[s] for run in seeds.values()]) for s in steps]
        timed = [run["seconds"] / run["steps"] for run in seeds.values() if "seconds" in run]
        per_step = f"{statistics.mean(timed):.2f}" if timed else "-"  # older runs kept none
        lines.append(f"| {label} | {len(seeds)} | " + " | ".join(cells) + f" | {per_step} |")
    return "\n".join(lines)

def before_after_table(runs):
    """Markdown: greedy test accuracy and mean reward before RL and after, mean +- std."""
    def cell(seeds, key, i):  # the i-th record of key
        return spread([100 * run[key][i][1] for run in seeds.values()])
    def gain(seeds):  # after - before, its 95% interval and p (one-sample t over the seeds)
        d = [100 * (run["acc"][-1][1] - run["acc"][0][1]) for run in seeds.values()]
        if len(d) < 2:
            return f"{d[0]:+.1f} | - | -"
        r = stats.one_sample(d)
        return f"{r['mean']:+.1f} | {r['low']:+.1f} to {r['high']:+.1f} | {r['p']:.2g}"
    lines = ["| setting | seeds | accuracy before | after | after - before | 95% interval | p "
             "| mean reward before | after |", "|---" * 9 + "|"]
    for label, seeds in runs.items():
        lines.append(f"| {label} | {len(seeds)} | {cell(seeds, 'acc', 0)} | {cell(seeds, 'acc', -1)}"
                     f" | {gain(seeds)} | {cell(seeds, 'reward', 0)} | {cell(seeds, 'reward', -1)} |")
    return "\n".join(lines) + "\n\n(mean reward in %: the share of the reward's maximum)"

def final(seeds, key="acc"):
    """Each seed's last evaluation, in %, in the seeds' order."""
    return [100 * seeds[seed][key][-1][1] for seed in sorted(seeds, key=int)]

def seeds_line(runs, key="acc"):
    return "Final accuracy per seed: " + "; ".join(
        f"{label}, seeds {', '.join(sorted(seeds, key=int))}: "
        + ", ".join(f"{x:.1f}" for x in final(seeds, key)) for label, seeds in runs.items()) + "."

def comparison_table(runs, pairs=None, key="acc"):
    """Final accuracy, X minus Y (Welch), for each pair; by default every setting against
    method=bgpo, or against the first setting."""
    if pairs is None:
        first = "method=bgpo" if "method=bgpo" in runs else next(iter(runs))
        pairs = [(label, first) for label in runs if label != first]
    lines = ["| final accuracy, X - Y | difference | 95% interval | p | detectable |",
             "|---|---|---|---|---|"]
    for x, y in pairs:
        r = stats.welch(final(runs[x], key), final(runs[y], key))
        lines.append(f"| {x} - {y} | {r['diff']:+.1f} | {r['low']:+.1f} to {r['high']:+.1f} | "
                     f"{r['p']:.2g} | {r['detectable']:.1f} |")
    return "\n".join(lines)

def diagnostics_table(runs):
    """The off-policy updates' gap, |d| per token and clipped share, averaged over every step
    and seed, and each part of a step's time, a mean over seeds."""
    lines = ["| setting | gap R - R_lb | mean abs d per token | clipped share | "
             "s/step rollout | loss | update | eval |", "|---" * 8 + "|"]
    for label, seeds in runs.items():
        def mean_of(key):
            v = [x for run in seeds.values() for _, x in run.get(key, [])]
            return f"{statistics.mean(v):.2e}" if v else "-"
        split = [statistics.mean(run["time_split"][part] / run["steps"] for run in seeds.values())
                 for part in PARTS]
        lines.append(f"| {label} | {mean_of('gap')} | {mean_of('abs_d')} | {mean_of('clipped')} | "
                     + " | ".join(f"{t:.3f}" for t in split) + " |")
    return "\n".join(lines)

def label_settings(label):
    """'method=bgpo samples=4 length_norm' -> {"method": "bgpo", "samples": "4", "length_norm": True}"""
    return dict(kv.split("=", 1) if "=" in kv else (kv, True) for kv in label.split())

def sweep_setting(label):
    """(mu, method) of a sweep run's label, which names only what differs between runs."""
    s = {"method": "bgpo", "updates_per_batch": "1", **label_settings(label)}
    return int(s["updates_per_batch"]), s["method"]

def sweep_regimes(last):
    """[(name, step at which a run of updates_per_batch mu is read)]: equal updates
    (mu * step = last) and equal rollouts (step = last)."""
    return [("equal updates", lambda mu: last // mu), ("equal rollouts", lambda mu: last)]

def sweep_tables(runs):
    """Section 4c's sweep over mu = updates_per_batch, every run to the same last step S:
    accuracy at equal updates (mu * step = S: step S / mu) and at equal rollouts (step S),
    each method against bgpo at its mu; then the off-policy updates' diagnostics per mu."""
    rows = sorted(runs, key=lambda label: (sweep_setting(label)[0],
                                           METHOD_ORDER.index(sweep_setting(label)[1])))
    last = min(run["steps"] for seeds in runs.values() for run in seeds.values())
    parts = []
    for name, at in sweep_regimes(last):
        each = []
        lines = [f"| {name}, {last} each: mu | method | seeds | step | accuracy | - bgpo | "
                 f"95% interval | p | detectable | seeds for {FIVE} |", "|---" * 10 + "|"]
        for label in rows:
            mu, method = sweep_setting(label)
            def acc(lab):  # each seed's accuracy at the regime's step, seeds in order
                return [100 * dict(runs[lab][seed]["acc"])[at(mu)]
                        for seed in sorted(runs[lab], key=int)]
            bgpo = label.replace(f"method={method}", "method=bgpo")
            test = "- | - | - | - | -"
            if method != "bgpo" and len(runs[label]) > 1 and bgpo in runs:
                r = stats.welch(acc(label), acc(bgpo))
                test = (f"{r['diff']:+.1f} | {r['low']:+.1f} to {r['high']:+.1f} | {r['p']:.2g} | "
                        f"{r['detectable']:.1f} | {stats.seeds_needed(acc(label), acc(bgpo), FIVE)}")
            lines.append(f"| {mu} | {method} | {len(runs[label])} | {at(mu)} | "
                         f"{spread(acc(label))} | {test} |")
            each.append(f"mu={mu} {method}: " + ", ".join(f"{x:.1f}" for x in acc(label)))
        parts.append("\n".join(lines) + "\n\nPer seed, seeds 0, 1, ... in order: "
                     + "; ".join(each) + ".")
    lines = ["| mu | method | gap R - R_lb | mean abs d per token | cos(grad R_lb, grad R) | "
             "rel. difference | seeds measured |", "|---" * 7 + "|"]
    for label in rows:
        seeds = runs[label].values()
        def mean_of(key, fmt="{:.2e}"):
            v = [x for run in seeds for _, x in run.get(key, [])]
            return fmt.format(statistics.mean(v)) if v else "-"
        lines.append(f"| {' | '.join(map(str, sweep_setting(label)))} | "
                     f"{mean_of('gap')} | {mean_of('abs_d')} | {mean_of('cos', '{:.4f}')} | "
                     f"{mean_of('rel', '{:.3f}')} | {sum(bool(run.get('cos')) for run in seeds)} |")
    return "\n\n".join(parts + ["\n".join(lines)]) + "\n"

METHOD_ORDER = ("bgpo", "two_pass", "naive", "tangent", "jensen")
FIVE = 5.0  # points: the difference the sweep's seeds are sized for

def timesplit_table(runs):
    """Section 4d: seconds per step in each part of a step (a mean over seeds), one row per
    setting, and the loss's time over the rollout's from the unrounded totals."""
    def order(label):
        s = label_settings(label)
        return (int(s.get("response_length", 3)), s["updates_per_batch"],
                ("bgpo", "naive", "two_pass").index(s["method"]), int(s["samples"]),
                s["scheme"] != "stratified")

    lines = ["| answer | method, n_t | rollout | loss | update | eval | loss / rollout |",
             "|---|---|---|---|---|---|---|"]
    for label in sorted(runs, key=order):
        s, seeds = label_settings(label), runs[label].values()
        part = {p: statistics.mean(run["time_split"][p] / run["steps"] for run in seeds)
                for p in PARTS}
        name = "one_step" if s["scheme"] == "one_step" else s["method"]
        lines.append(f"| {s.get('response_length', 3)} tokens | {name}, {s['samples']}"
                     + (", x2" if s["updates_per_batch"] == "2" else "") + " | "
                     + " | ".join(f"{part[p]:.3f}" for p in part)
                     + f" | {part['loss'] / part['rollout']:.1f} |")
    return "\n".join(lines) + "\n"

THREE = "{:.3f}".format
MEASURED = {  # the columns of a list of rows, as bgpo.py --compare --json and docs/grad_stats.py --json
    "compare": [("method", "method", str), ("samples", "n_t", str), ("mc_batch", "K", str),
                ("merged", "merged", lambda v: "yes" if v else "no"),
                ("objective", "objective", "{:+.6f}".format),
                ("grad_max_abs_diff", "max|grad-naive|", "{:.1e}".format),
                ("peak_activation_bytes", "act. MB", lambda v: f"{v / 2**20:.2f}"),
                ("seconds", "ms/call", lambda v: f"{1000 * v:.0f}"),
                ("time_vs_naive", "time/naive", "{:.2f}".format)],
    "grad_stats": [("scheme", "scheme", str), ("samples", "n_t", str), ("masks", "masks", THREE)]
    + [(key, head, THREE) for key, head in [
        ("elbo_bias", "ELBO bias"), ("elbo_std", "ELBO std"), ("elbo_floor", "ELBO floor"),
        ("rel_std", "rel. std"), ("rel_bias", "rel. bias"), ("bias_floor", "bias floor"),
        ("rel_error", "rel. error")]]}

def rows_table(rows):
    """A list of measured rows as the program prints it, in a code block; --compare's
    time/naive: each row's seconds over the naive row's at its n_t."""
    kind = "grad_stats" if "rel_std" in rows[0] else "compare"
    naive = {r["samples"]: r["seconds"] for r in rows if r.get("method") == "naive"}
    rows = [dict(r, time_vs_naive=r["seconds"] / naive[r["samples"]]) if kind == "compare" else r
            for r in rows]
    table = [[head for _, head, _ in MEASURED[kind]]]
    table += [[fmt(r[key]) for key, _, fmt in MEASURED[kind]] for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "```\n" + "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths))
                               for row in table) + "\n```\n"

def tables(name, pairs=None):
    """Every table of docs/data/NAME.json, as one markdown block; pairs: [(X, Y)] to compare."""
    data = read(name + ".json")
    if isinstance(data, list):  # measured rows
        return rows_table(data)
    runs = data["runs"]
    if name == "timesplit":
        return timesplit_table(runs)
    if name.startswith("offpolicy_sweep"):
        return sweep_tables(runs)
    parts = [summary_table(runs), seeds_line(runs)]
    every = [run for seeds in runs.values() for run in seeds.values()]
    if all(run.get("reward") for run in every) and any(  # a reward that is not accuracy
            run["reward"][-1][1] != run["acc"][-1][1] for run in every):
        parts.insert(0, before_after_table(runs))
    seeded = sum(len(seeds) > 1 for seeds in runs.values())  # one seed has no spread to test
    if seeded > 1 and pairs != []:  # compare="": none
        parts.append(comparison_table(runs, pairs))
    if any(run.get("gap") for seeds in runs.values() for run in seeds.values()):
        parts.append(diagnostics_table(runs))
    return "\n\n".join(parts) + "\n"

SETTING_IGNORED = ("seed", "out", "resume", "save_every", "steps", "eval_every", "device", "json",
                   "sample_counts", "mc_batches")  # the last two repeat samples, mc_batch


def load_runs(dirs, upto=None):
    """Run directories (each with run.json, metrics.jsonl, summary.json) ->
    {label: {seed: run}}: label names the settings in which the runs differ
    (seed aside), run = dict(acc=[[step, acc]...], gap, abs_d, clipped (of the
    later updates of each step, if any), time_split, seconds, steps). upto: each
    run as it stood after that step, its time split and seconds from metrics.jsonl."""
    found = []
    for d in dirs:
        paths = [os.path.join(d, name) for name in ("run.json", "metrics.jsonl", "summary.json")]
        if not all(os.path.isfile(p) for p in paths):
            print(f"skipped {d}: not a finished run (run.json, metrics.jsonl, summary.json)")
            continue
        with open(paths[0]) as f, open(paths[1]) as g, open(paths[2]) as h:
            settings, records, summary = json.load(f), [json.loads(line) for line in g], json.load(h)
        if upto is not None:  # the step's own evaluation is in its time_eval, not its seconds
            records = [r for r in records if r["step"] <= upto]
            summary = dict(summary, steps=records[-1]["step"],
                           seconds=records[-1]["seconds"] + records[-1].get("time_eval", 0),
                           time_split={part: sum(r.get("time_" + part, 0) for r in records)
                                       for part in PARTS})
        found.append((settings, records, summary))
    keys = sorted({k for settings, _, _ in found for k in settings} - set(SETTING_IGNORED))
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s, _, _ in found}) > 1]
    runs = {}
    for settings, records, summary in found:
        label = " ".join(k if settings.get(k) is True else f"{k}={settings.get(k)}" for k in differ
                         if settings.get(k) not in (None, False)) or "all"
        before = [[0, summary["acc_before"]]] if "acc_before" in summary else []  # step 0: before RL
        run = dict(acc=before + [[r["step"], r["acc"]] for r in records if "acc" in r],
                   time_split=summary.get("time_split"), seconds=summary["seconds"],
                   steps=summary["steps"])
        if summary.get("reward_after") is not None:  # greedy mean reward, before RL and after
            run["reward"] = [[0, summary["reward_before"]], [summary["steps"], summary["reward_after"]]]
        for key in ("gap", "abs_d", "clipped", "cos", "rel"):  # mean of a step's off-policy updates
            later = [(r["step"], [u[key] for u in r.get("updates", [])[1:] if key in u])
                     for r in records]
            run[key] = [[step, statistics.mean(v)] for step, v in later if v]
        runs.setdefault(label, {})[str(settings["seed"])] = run
    return runs

def collect(name, dirs, command, upto=None):
    """Run directories -> docs/data/NAME.json: {"command": ..., "runs": load_runs(dirs, upto)}."""
    data = {"command": command, "runs": load_runs(dirs, upto)}
    with open(os.path.join(DOCS, "data", name + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote docs/data/{name}.json from {len(dirs)} directories")

def regenerate(text):
    """text with every generated block printed again from its JSON."""
    def block(m):
        found = PAIRS.search(m.group(3))
        pairs = found and [tuple(p.strip() for p in pair.split(" vs "))
                           for pair in found.group(1).split(";") if pair.strip()]
        return m.group(1) + tables(m.group(2), pairs) + m.group(5)
    return BLOCK.sub(block, text)

def main(argv):
    if argv and argv[0] != "--check":
        return print("\n\n".join(tables(name) for name in argv))
    with open(RESULTS) as f:
        text = f.read()
    new = regenerate(text)
    if argv:  # --check
        stale = [m.group(2) for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new))
                 if m.group(4) != n.group(4)]
        if stale:
            sys.exit(f"tables.py: docs/results.md differs from its data in: {', '.join(stale)}")
        return
    with open(RESULTS, "w") as f:
        f.write(new)

if __name__ == "__main__":
    main(sys.argv[1:])
