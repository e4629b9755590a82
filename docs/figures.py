"""Redraw the README's figures from the small JSON inputs in docs/data/.

    python docs/figures.py                          # docs/data/*.json -> docs/*.png
    python docs/figures.py --runs runs/mine/*       # your runs: runs.png and a table
    python docs/figures.py --collect NAME runs/x/*  # first docs/data/NAME.json from runs
    python docs/figures.py --table NAME ...         # docs/data/NAME.json as tables

--runs draws greedy test accuracy against step, one line per setting and a
band over seeds, the settings told apart by what differs in the runs' run.json.

Only the standard library and matplotlib (docs/requirements.txt): re-plotting
needs neither torch nor the hour of runs. Each input names the command that
made it; docs/results.md has the tables behind the figures.
"""
import argparse
import os
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

import tables  # noqa: E402 (docs/tables.py: the tables, printed from the same data)
from tables import label_settings, load_runs, read  # noqa: E402

DOCS = os.path.dirname(os.path.abspath(__file__))
COLORS = {"naive": "tab:red", "two_pass": "tab:orange", "bgpo": "tab:blue",
          "tangent": "tab:green", "jensen": "tab:purple",
          "stratified": "tab:blue", "uniform_t": "tab:green", "complementary": "tab:purple",
          "one_step": "tab:red"}
SCHEMES = ("stratified", "uniform_t", "complementary", "one_step")


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
    runs = read("ablation_len16.json")["runs"]  # labels "samples=N"
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    cmap = plt.get_cmap("viridis")
    labels = sorted(runs, key=lambda label: int(label.split("=")[1]))
    for k, label in enumerate(labels):
        band(ax, runs[label], "acc", cmap(k / max(1, len(labels) - 1)),
             f"n_t = {label.split('=')[1]}")
    ax.set(xlabel="RL step", ylabel="greedy test accuracy (%)",
           title=f"BGPO on 16-token answers, {len(runs[labels[0]])} seeds")
    ax.legend()
    save(fig, out)


def offpolicy(out):
    """Figure 5: two updates per rollout batch (four: right), per method: accuracy
    and the bound's gap R - R_lb of the later (off-policy) updates."""
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for col, (name, title) in enumerate((("offpolicy_len3", "3-token answers, n_t = 16"),
                                         ("offpolicy_len16", "16-token answers, n_t = 4"),
                                         ("offpolicy_len3x4", "3 tokens, 4 updates a batch"))):
        runs = read(name + ".json")["runs"]
        for label, seeds in runs.items():
            settings = label_settings(label)
            name = settings["method"] + (" --clip 0.2 --length-norm" if "clip" in settings else "")
            style = dict(color=COLORS[settings["method"]], label=name)
            band(axes[0, col], seeds, "acc", **style)
            band(axes[1, col], seeds, "gap", scale=1, low=0.0, **style)
            if "clip" in settings:
                for ax in axes[:, col]:
                    ax.get_lines()[-1].set_linestyle("--")
        axes[0, col].set(ylabel="greedy test accuracy (%)", title=title)
        axes[1, col].set(xlabel="RL step", ylabel="gap R - R_lb, off-policy updates")
        axes[0, col].legend(fontsize=7)
    save(fig, out)


def offpolicy_sweep(out):
    """Figure 6: accuracy against mu = updates per rollout batch, at equal updates and at
    equal rollouts (mean and 95% interval over seeds); under it, the off-policy updates'
    gap R - R_lb and |d| per token, and the cosine between BGPO's gradient and the exact one."""
    runs = read("offpolicy_sweep.json")["runs"]
    last = min(run["steps"] for seeds in runs.values() for run in seeds.values())
    by_method = {}  # method -> {mu: seeds}
    for label, seeds in runs.items():
        mu, method = tables.sweep_setting(label)
        by_method.setdefault(method, {})[mu] = seeds
    fig, axes = plt.subplots(3, 1, figsize=(6, 9), sharex=True)
    for method, per_mu in by_method.items():
        mus = sorted(mu for mu in per_mu if len(per_mu[mu]) > 1)  # an interval needs 2 seeds
        for (name, step), style in zip(tables.sweep_regimes(last), ("o-", "s--")):
            values = [[100 * dict(run["acc"])[step(mu)] for run in per_mu[mu].values()] for mu in mus]
            half = [r["high"] - r["mean"] for r in map(tables.stats.one_sample, values)]  # 95%
            axes[0].errorbar(mus, [statistics.mean(v) for v in values], yerr=half, fmt=style,
                             capsize=3, color=COLORS[method], label=f"{method}, {name}",
                             alpha=1 if name == "equal updates" else 0.5)
        if method in ("bgpo", "two_pass"):
            for ax, key, style in ((axes[1], "gap", "o-"), (axes[1], "abs_d", "s:"),
                                   (axes[2], "cos", "o-")):
                points = [(mu, statistics.mean(x for run in per_mu[mu].values()
                                               for _, x in run.get(key, [])))
                          for mu in mus if any(run.get(key) for run in per_mu[mu].values())]
                if points:
                    ax.plot(*zip(*points), style, color=COLORS[method], label=f"{method}: {key}")
    start = 100 * next(iter(next(iter(runs.values())).values()))["acc"][0][1]
    axes[0].axhline(start, color="gray", linestyle=":", label="before RL")
    axes[0].set(ylabel="greedy test accuracy (%)",
                title=f"3-token answers, n_t = 16: {last} updates or {last} rollout batches")
    axes[1].set(yscale="log", ylabel="gap R - R_lb (o), |d| per token (s)")
    axes[2].set(xscale="log", xlabel="mu, updates per rollout batch (disjoint mini-batches)",
                ylabel="cos(grad R_lb, grad R)")
    axes[2].set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, out)


def timesplit(out):
    """Figure 6: seconds per step in rollout, loss, update and evaluation, per
    method and n_t (x2: two updates per rollout batch), at 3 and 16 tokens."""
    runs = read("timesplit.json")["runs"]
    colors = dict(rollout="tab:gray", loss="tab:blue", update="tab:green", eval="tab:olive")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, length in zip(axes, ("3", "16")):
        bars = [(settings, next(iter(seeds.values()))) for settings, seeds in
                ((label_settings(label), seeds) for label, seeds in runs.items())
                if settings["response_length"] == length]
        bars.sort(key=lambda b: (b[0].get("updates_per_batch", "1"), b[0].get("scheme", ""),
                                 b[0]["method"], int(b[0]["samples"])))
        names = []
        for x, (settings, run) in enumerate(bars):
            bottom = 0.0
            for part, color in colors.items():
                height = run["time_split"][part] / run["steps"]
                ax.bar(x, height, bottom=bottom, color=color, label=part if x == 0 else None)
                bottom += height
            names.append(("one_step" if settings.get("scheme") == "one_step" else settings["method"])
                         + f"\n{settings['samples']}"
                         + (" x2" if settings.get("updates_per_batch") == "2" else ""))
        ax.set_xticks(range(len(bars)), names, fontsize=7)
        ax.set(ylabel="seconds per step", title=f"{length}-token answers: method, n_t")
    axes[0].legend(fontsize=8)
    save(fig, out)


def gradient(out):
    """Figure 3: relative std of the BGPO gradient against n_t (docs/grad_stats.py --json)."""
    data = read("grad_stats_len16.json")  # python docs/grad_stats.py ... --json
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


def table(names):
    """docs/data/NAME.json's tables (docs/tables.py, as in docs/results.md)."""
    for name in names:
        print(f"{name}: {read(name + '.json')['command']}\n{tables.tables(name)}")


def band(ax, runs, key, color=None, label=None, scale=100, low=None):
    """A line of the mean over seeds of runs' key against step, and a band of +- std, cut
    at low (the gap R - R_lb cannot go below 0)."""
    steps = sorted(set.intersection(*[{s for s, _ in run[key]} for run in runs.values()]))
    values = [[scale * dict(run[key])[s] for run in runs.values()] for s in steps]
    mean = [statistics.mean(v) for v in values]
    std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    line, = ax.plot(steps, mean, "o-", markersize=3, color=color, label=label)
    ax.fill_between(steps, [m - s if low is None else max(m - s, low) for m, s in zip(mean, std)],
                    [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)


def draw_runs(dirs, out):
    """--runs: accuracy against step, a line per setting and a band over seeds."""
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit("figures.py: no finished run among the directories given")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        band(ax, seeds, "acc", label=f"{label} ({len(seeds)} seeds)")
    ax.set(xlabel="RL step", ylabel="greedy test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(tables.summary_table(runs))
    print(f"wrote {out}")


def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, name), dpi=120)
    plt.close(fig)
    print(f"wrote docs/{name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", metavar="DIR", help="draw these runs, not the docs' figures")
    parser.add_argument("--to", default="runs.png", help="--runs: the figure's file (default: runs.png)")
    parser.add_argument("--collect", nargs="+", metavar=("NAME", "DIR"),
                        help="first write docs/data/NAME.json from these run directories")
    parser.add_argument("--command", default="", help="--collect: the command that made the runs")
    parser.add_argument("--upto", type=int, metavar="STEP", help="--collect: each run cut after STEP")
    parser.add_argument("--table", nargs="+", metavar="NAME", help="print docs/data/NAME.json's tables only")
    args = parser.parse_args()
    if args.runs:
        raise SystemExit(draw_runs(args.runs, args.to))
    if args.collect:
        tables.collect(args.collect[0], args.collect[1:], args.command, args.upto)
    if args.table:
        raise SystemExit(table(args.table))
    memory("memory.png")
    ablation("ablation_len16.png")
    gradient("grad_stats.png")
    estimators("elbo_estimators.png")
    offpolicy("offpolicy.png")
    offpolicy_sweep("offpolicy_sweep.png")
    timesplit("timesplit.png")
