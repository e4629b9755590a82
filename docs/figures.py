"""Redraw the README's figures from the small JSON inputs in docs/data/.

    python docs/figures.py                  # docs/data/*.json -> docs/*.png
    python docs/figures.py --collect RUNS   # first rebuild docs/data/ablation_len16.json
                                            # from RUNS/n{n_t}-s{seed}/metrics.jsonl, and
                                            # estimators_len16.json from RUNS/{scheme}-...
    python docs/figures.py --table          # the two as tables (docs/results.md)

Only the standard library and matplotlib (docs/requirements.txt): re-plotting
needs neither torch nor the hour of runs. Each input names the command that
made it; docs/results.md has the tables behind the figures.
"""
import argparse
import json
import os
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

DOCS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(DOCS, "data")
COLORS = {"naive": "tab:red", "two_pass": "tab:orange", "bgpo": "tab:blue",
          "stratified": "tab:blue", "uniform_t": "tab:green", "complementary": "tab:purple",
          "one_step": "tab:red"}
SCHEMES = ("stratified", "uniform_t", "complementary", "one_step")


def read(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def memory(out):
    """Figure 1: activation memory of one loss call against n_t (--compare --json)."""
    data = read("compare_len3.json")  # python bgpo.py --compare --samples 1,2,...,64 --json
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    style = {"naive": dict(marker="o"), "bgpo": dict(marker="o"),  # two_pass lies on bgpo
             "two_pass": dict(marker="s", markersize=10, fillstyle="none", linestyle="--")}
    for method in ("naive", "bgpo", "two_pass"):
        rows = [r for r in data if r["method"] == method and r["mc_batch"] == 1
                and not r["merged"]]
        ax.plot([r["samples"] for r in rows], [r["peak_activation_bytes"] / 2**20 for r in rows],
                color=COLORS[method], label=method, **style[method])
    ax.set(xscale="log", yscale="log", xlabel="n_t, Monte-Carlo samples per response",
           ylabel="activation memory (MB)", title="Activation memory of one loss call")
    ax.set_xticks(sorted({r["samples"] for r in data}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    save(fig, out)


def ablation(out):
    """Figure 2: greedy test accuracy against RL step, mean and spread over seeds, per n_t."""
    data = read("ablation_len16.json")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    cmap = plt.get_cmap("viridis")
    counts = sorted(data["runs"], key=int)
    for k, n in enumerate(counts):
        seeds = data["runs"][n]
        steps = sorted({s for run in seeds.values() for s, _ in run})
        acc = [[100 * dict(run)[s] for run in seeds.values()] for s in steps]
        mean = [statistics.mean(a) for a in acc]
        std = [statistics.stdev(a) for a in acc]
        color = cmap(k / max(1, len(counts) - 1))
        ax.plot(steps, mean, "o-", color=color, label=f"n_t = {n}")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=color, alpha=0.15)
    ax.set(xlabel="RL step", ylabel="greedy test accuracy (%)",
           title=f"BGPO on 16-token answers, {len(next(iter(data['runs'].values())))} seeds")
    ax.legend()
    save(fig, out)


def gradient(out):
    """Figure 3: relative std of the BGPO gradient against n_t (--grad-stats --json)."""
    data = read("grad_stats_len16.json")  # python bgpo.py --grad-stats ... --json
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for scheme in SCHEMES:
        rows = [r for r in data if r["scheme"] == scheme]
        if rows:  # one_step's is 0: one fixed mask
            ax.plot([r["samples"] for r in rows], [r["rel_std"] for r in rows], "o-",
                    color=COLORS[scheme], label=scheme)
    ax.set(xscale="log", xlabel="n_t, Monte-Carlo samples per response",
           ylabel="relative std of the gradient", title="Gradient noise of BGPO")
    ax.set_xticks(sorted({r["samples"] for r in data}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.legend()
    save(fig, out)


def estimators(out):
    """Figure 4: the ELBO estimate's std against n_t per scheme, and one_step's
    bias, at 3-token answers (against the exact ELBO) and 16 (a reference)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (name, title) in zip(axes, (("grad_stats_len3.json", "3-token answers, exact ELBO"),
                                        ("grad_stats_len16.json", "16-token answers, 2,048-sample reference"))):
        data = read(name)
        for scheme in SCHEMES[:3]:
            rows = [r for r in data if r["scheme"] == scheme]
            ax.plot([r["samples"] for r in rows], [r["elbo_std"] for r in rows], "o-",
                    color=COLORS[scheme], label=f"{scheme}: std")
        bias = next(r["elbo_bias"] for r in data if r["scheme"] == "one_step")
        ax.axhline(bias, color=COLORS["one_step"], linestyle="--", label="one_step: bias (std 0)")
        ax.set(xscale="log", xlabel="n_t, Monte-Carlo samples per response",
               ylabel="nats (RMS over 128 responses)", title=title)
        ax.set_xticks(sorted({r["samples"] for r in data}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    save(fig, out)


def curves(runs):
    """{setting: {seed: [[step, acc], ...]}} -> (steps, {setting: (means, stds)}) in %."""
    steps = sorted({s for seeds in runs.values() for run in seeds.values() for s, _ in run})
    out = {}
    for name, seeds in runs.items():
        acc = [[100 * dict(run)[s] for run in seeds.values()] for s in steps]
        out[name] = ([statistics.mean(a) for a in acc], [statistics.stdev(a) for a in acc])
    return steps, out


def table():
    """The ablation's mean +- std over seeds at each evaluation, and every seed's end."""
    runs = read("ablation_len16.json")["runs"]
    steps = sorted({s for seeds in runs.values() for run in seeds.values() for s, _ in run})
    print("| n_t | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for n in sorted(runs, key=int):
        cells = []
        for s in steps:
            acc = [100 * dict(run)[s] for run in runs[n].values()]
            cells.append(f"{statistics.mean(acc):.1f} +- {statistics.stdev(acc):.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for n in sorted(runs, key=int):
        ends = ", ".join(f"{100 * runs[n][seed][-1][1]:.1f}" for seed in sorted(runs[n], key=int))
        print(f"n_t = {n}, seeds {', '.join(sorted(runs[n], key=int))}: {ends}")
    if os.path.exists(os.path.join(DATA, "estimators_len16.json")):
        data = read("estimators_len16.json")
        steps, stats = curves(data["runs"])
        print("\n| scheme, n_t | " + " | ".join(f"step {s}" for s in steps) + " | s/step |")
        print("|---" * (len(steps) + 2) + "|")
        for name, (mean, std) in stats.items():
            cells = [f"{m:.1f} +- {s:.1f}" for m, s in zip(mean, std)]
            print(f"| {name} | " + " | ".join(cells) + f" | {data['seconds_per_step'][name]:.2f} |")
        for name, seeds in data["runs"].items():
            print(f"{name}, seeds {', '.join(seeds)}: "
                  + ", ".join(f"{100 * run[-1][1]:.1f}" for run in seeds.values()))


def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, name), dpi=120)
    plt.close(fig)
    print(f"wrote docs/{name}")


def collect(runs):
    """RUNS/n{n_t}-s{seed}/metrics.jsonl -> docs/data/ablation_len16.json:
    {"runs": {n_t: {seed: [[step, accuracy], ...]}}}."""
    path = os.path.join(DATA, "ablation_len16.json")
    data = {"runs": {}}
    for name in sorted(os.listdir(runs)):
        if not (name.startswith("n") and "-s" in name
                and os.path.isfile(os.path.join(runs, name, "metrics.jsonl"))):
            continue
        n, seed = name[1:].split("-s")
        with open(os.path.join(runs, name, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        data["runs"].setdefault(n, {})[seed] = [[r["step"], r["acc"]] for r in records if "acc" in r]
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote docs/data/ablation_len16.json from {runs}")
    # the estimators: RUNS/{complementary-n2, complementary-n4, one_step}-s{seed}, beside
    # the stratified runs above; seconds per step from each run's summary.json
    estimators = {"runs": {}, "seconds_per_step": {}}
    for name in sorted(os.listdir(runs)):
        setting, _, seed = name.rpartition("-s")
        if not (os.path.isfile(os.path.join(runs, name, "summary.json")) and (
                setting.startswith(("complementary", "one_step")) or setting in ("n2", "n4", "n8"))):
            continue
        label = {"one_step": "one_step, 1"}.get(setting) or (
            f"stratified, {setting[1:]}" if setting.startswith("n") else f"complementary, {setting[-1]}")
        with open(os.path.join(runs, name, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        with open(os.path.join(runs, name, "summary.json")) as f:
            summary = json.load(f)
        estimators["runs"].setdefault(label, {})[seed] = [[r["step"], r["acc"]] for r in records
                                                          if "acc" in r]
        estimators["seconds_per_step"].setdefault(label, []).append(summary["seconds"] / summary["steps"])
    estimators["seconds_per_step"] = {k: statistics.median(v) for k, v in
                                      estimators["seconds_per_step"].items()}
    with open(os.path.join(DATA, "estimators_len16.json"), "w") as f:
        json.dump(estimators, f, indent=1)
    print(f"wrote docs/data/estimators_len16.json from {runs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", metavar="RUNS", help="rebuild the ablation input first")
    parser.add_argument("--table", action="store_true", help="print the ablation table only")
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
    if args.table:
        raise SystemExit(table())
    memory("memory.png")
    ablation("ablation_len16.png")
    gradient("grad_stats.png")
    estimators("elbo_estimators.png")
