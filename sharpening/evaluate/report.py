"""What `sharpen evaluate` writes: results.json, results.csv, the printed table and the PNG plots.

``results.json`` holds the table rows (one per method and N, each number as mean and standard error over
seeds, with the per-seed values, and the tokens each method spends per returned answer), the log-likelihood
histograms, the exact configuration and the model identity. The CSV has the same rows without the per-seed
lists. Plots need matplotlib (``pip install 'sharpening[plots]'``); without it they are skipped with a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os

from sharpening.checkpoint import write_atomically

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "method", "n", "accuracy", "accuracy_stderr", "lift_percent", "lift_percent_stderr",
    "lift_points", "lift_points_stderr", "chosen_loglik", "chosen_loglik_stderr", "tokens", "tokens_stderr",
)  # fmt: skip
LABELS = {
    "bon_loglik": "best-of-N, log-likelihood",
    "bon_loglik_norm": "best-of-N, length-normalized log-likelihood",
    "maj": "majority vote (maj@N)",
    "pass": "pass@N (oracle)",
}
STYLES = {  # distinct widths and markers, so coinciding curves (e.g. best-of-N = pass@N) stay visible
    "bon_loglik": dict(color="tab:blue", marker="o", ms=9, lw=3.5, alpha=0.75),
    "bon_loglik_norm": dict(color="tab:orange", marker="s", ms=4, lw=1.5),
    "maj": dict(color="tab:green", marker="^", ms=5, lw=1.5),
    "pass": dict(color="dimgray", marker="x", ms=6, lw=1.2, ls="--"),
}


EXTRA_STYLES = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")  # further --protocol.rewards rows


def n_methods(results: dict) -> list[str]:
    """The methods reported at every N, in the table's order: bon_<reward> per --protocol.rewards, maj, pass."""
    methods = (r["method"] for r in results["table"] if r["method"] not in ("greedy", "sample"))
    return list(dict.fromkeys(m for m in methods if not m.startswith("power_")))


def method_label(method: str) -> str:
    """A method's legend label: LABELS', else best-of-N by the reward the row is named after."""
    return LABELS.get(method) or f"best-of-N, {method.removeprefix('bon_')}"


def method_style(method: str, index: int) -> dict:
    """A method's line style: STYLES', else one of EXTRA_STYLES by its place ``index`` among the methods."""
    return STYLES.get(method) or dict(color=EXTRA_STYLES[index % len(EXTRA_STYLES)], marker="v", ms=5, lw=1.5)


def write_results(results: dict, out_dir: str) -> list[str]:
    """Write ``results.json`` (strict JSON: undefined numbers are null) and ``results.csv``; return both paths."""
    os.makedirs(out_dir, exist_ok=True)

    def write_json(f) -> None:
        json.dump(results, f, indent=2, allow_nan=False)
        f.write("\n")

    def write_csv(f) -> None:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["table"])

    return [write_atomically(os.path.join(out_dir, "results.json"), write_json),
            write_atomically(os.path.join(out_dir, "results.csv"), write_csv)]  # fmt: skip


def remove_plots(out_dir: str) -> list[str]:
    """Delete the PLOTS an earlier run wrote in ``out_dir`` (a rerun without plots must not leave them
    beside results they do not show); return the paths removed."""
    removed = [os.path.join(out_dir, name) for name in PLOTS if os.path.isfile(os.path.join(out_dir, name))]
    for path in removed:
        os.remove(path)
    return removed


def read_results(path: str) -> dict:
    """``results.json`` back as a dict (a directory is read as its results.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def find_row(results: dict, method: str, n: int = 1) -> dict:
    """The table row of ``method`` at ``n``."""
    return next(r for r in results["table"] if r["method"] == method and r["n"] == n)


def _cell(mean: float | None, stderr: float | None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")


def lift_kind(results: dict) -> str:
    """'lift_percent' when greedy accuracy is above 0, else 'lift_points' (percent is undefined)."""
    return "lift_percent" if find_row(results, "greedy")["accuracy"] else "lift_points"


def format_table(results: dict) -> str:
    """The protocol's numbers as a text table: one line per N, a column per method; then, when the run has
    power-sampling rows, accuracy against tokens spent for greedy, a single sample and each of them."""
    greedy, sample = find_row(results, "greedy"), find_row(results, "sample")
    lift = lift_kind(results)
    unit = "%" if lift == "lift_percent" else "points (% undefined: greedy is 0)"
    methods = n_methods(results)
    first = next(m for m in methods if m.startswith("bon_"))  # the first of --protocol.rewards (loglik by default)
    headers = [{"maj": "maj@N", "pass": "pass@N"}.get(m) or f"BoN {m[4:]}" for m in methods]
    engine = results.get("draws", {}).get("engine", "hf")  # results without an engine were drawn by hf
    lines = [
        f"{results['prompts']['count']} prompts, {len(results['seeds'])} seed(s), N_max {results['samples_per_prompt']}"
        + ("" if engine == "hf" else f", drawn by {engine}")
        + " (± is the standard error over seeds)",
        f"greedy accuracy {_cell(greedy['accuracy'], None)}   "
        f"single sample {_cell(sample['accuracy'], sample['accuracy_stderr'])}",
        f"lift over greedy in {unit}; loglik = mean log-likelihood of the chosen response; tokens = response tokens "
        f"spent per prompt by BoN {first[4:]}",
        f"{'N':>4}  "
        + "  ".join(f"{h:<15}" for h in headers)
        + f"  {'lift ' + first[4:]:<15}  {'loglik chosen':<15}  {'tokens':<8}",
    ]
    for n in results["n_values"]:
        rows = {m: find_row(results, m, n) for m in methods}
        cells = [_cell(rows[m]["accuracy"], rows[m]["accuracy_stderr"]) for m in methods]
        cells.append(_cell(rows[first][lift], rows[first][f"{lift}_stderr"], 1))
        cells.append(_cell(rows[first]["chosen_loglik"], rows[first]["chosen_loglik_stderr"], 2))
        cells.append(_cell(rows[first].get("tokens"), None, 1))
        lines.append(f"{n:>4}  " + "  ".join(f"{c:<15}" for c in cells))
    power = power_rows(results)
    if power:
        lines.append(f"{'method':<44}  {'accuracy':<15}  {'loglik':<15}  tokens per returned answer")
        for row in [greedy, sample, *power]:
            loglik = _cell(row["chosen_loglik"], row["chosen_loglik_stderr"], 2)
            accuracy = _cell(row["accuracy"], row["accuracy_stderr"])
            lines.append(f"{row['method']:<44}  {accuracy:<15}  {loglik:<15}  {_cell(row.get('tokens'), None, 1)}")
    return "\n".join(lines)


def power_rows(results: dict) -> list[dict]:
    """The table's power-sampling rows (method power_mcmc_... or power_smc_...), in the order of --protocol.power."""
    return [r for r in results["table"] if r["method"].startswith("power_")]


def _series(results: dict, method: str, key: str) -> tuple[list[int], list[float], list[float]]:
    """(N, mean, stderr or 0) of ``key`` for ``method``, skipping undefined values."""
    rows = [find_row(results, method, n) for n in results["n_values"]]
    rows = [r for r in rows if r[key] is not None]
    return [r["n"] for r in rows], [r[key] for r in rows], [r[f"{key}_stderr"] or 0.0 for r in rows]


def _new_axes(results: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=120)
    model = results["model"]
    name = model["model_name_or_path"] + (f" + adapter {model['adapter_path']}" if model["adapter_path"] else "")
    where = f"{results['prompts']['dataset']} ({results['prompts']['count']} prompts), {len(results['seeds'])} seed(s)"
    fig.suptitle(f"{title}\n{name} on {where}", fontsize=10)
    return fig, ax


def _finish(fig, ax, path: str) -> None:
    """Legend outside the axes (it never hides a curve), layout, save."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)


def _log2_n_axis(ax, n_values: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_values)
    ax.set_xticklabels([str(n) for n in n_values])
    ax.set_xlabel("N (samples per prompt; smaller N = first N of the same N_max draws)")
    ax.grid(True, alpha=0.3)


def plot_accuracy(results: dict, path: str) -> None:
    """Accuracy vs N per method, with the greedy and single-sample baselines."""
    fig, ax = _new_axes(results, "Accuracy vs N")
    for i, method in enumerate(n_methods(results)):
        n, mean, err = _series(results, method, "accuracy")
        ax.errorbar(n, mean, yerr=err, capsize=3, label=method_label(method), **method_style(method, i))
    greedy, sample = find_row(results, "greedy")["accuracy"], find_row(results, "sample")["accuracy"]
    ax.axhline(greedy, color="black", ls="--", lw=1.2, label=f"greedy ({greedy:.3f})")
    ax.axhline(sample, color="tab:purple", ls=":", lw=1.5, label=f"single sample ({sample:.3f})")
    _log2_n_axis(ax, results["n_values"])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    _finish(fig, ax, path)


def plot_lift(results: dict, path: str) -> None:
    """Lift over greedy vs N per method: percent, or accuracy points when greedy accuracy is 0."""
    kind = lift_kind(results)
    title = "Lift over greedy vs N" + ("" if kind == "lift_percent" else " (in accuracy points: greedy accuracy is 0)")
    fig, ax = _new_axes(results, title)
    for i, method in enumerate(n_methods(results)):
        n, mean, err = _series(results, method, kind)
        ax.errorbar(n, mean, yerr=err, capsize=3, label=method_label(method), **method_style(method, i))
    ax.axhline(0.0, color="black", lw=1)
    _log2_n_axis(ax, results["n_values"])
    if kind == "lift_percent":
        ax.set_ylabel("lift over greedy, % = 100 (acc - greedy) / greedy")
    else:
        ax.set_ylabel("lift over greedy, accuracy points\n= 100 (acc - greedy); % undefined (greedy = 0)")
    _finish(fig, ax, path)


def plot_loglik_histogram(results: dict, path: str) -> None:
    """Log-likelihood of correct vs incorrect draws (each group normalized to sum to 1)."""
    hist = results["loglik_histogram"]
    fig, ax = _new_axes(results, "Log-likelihood of correct vs incorrect responses (all draws)")
    edges = hist["edges"]
    for name, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
        counts, total = hist[name], max(hist[f"{name}_count"], 1)
        mean = hist[f"{name}_mean"]
        label = f"{name}: {hist[f'{name}_count']} draws" + ("" if mean is None else f", mean {mean:.2f}")
        ax.stairs([c / total for c in counts], edges, fill=True, alpha=0.45, color=color, label=label)
    ax.set_xlabel(
        f"log-likelihood of the response under the {results['model']['scored_by']} model"
        f" (values below {edges[0]:.1f} are counted in the first bin)"
    )
    ax.set_ylabel("share of the group's draws")
    ax.grid(True, alpha=0.3)
    _finish(fig, ax, path)


def plot_chosen_loglik(results: dict, path: str) -> None:
    """Mean log-likelihood of the chosen response vs N, with a random draw and greedy for reference."""
    fig, ax = _new_axes(results, "Log-likelihood of the chosen response vs N")
    for i, method in enumerate(n_methods(results)[:-1]):  # pass@N chooses nothing
        n, mean, err = _series(results, method, "chosen_loglik")
        ax.errorbar(n, mean, yerr=err, capsize=3, label=method_label(method), **method_style(method, i))
    baselines = (("greedy", "greedy", "--", "black"), ("sample", "single sample", ":", "tab:purple"))
    for method, label, style, color in baselines:
        value = find_row(results, method)["chosen_loglik"]
        if value is not None:
            ax.axhline(value, ls=style, color=color, label=f"{label} ({value:.2f})")
    _log2_n_axis(ax, results["n_values"])
    ax.set_ylabel(f"mean log-likelihood under the {results['model']['scored_by']} model")
    _finish(fig, ax, path)


def plot_accuracy_vs_tokens(results: dict, path: str) -> None:
    """Accuracy against response tokens spent per returned answer (log x): greedy, a single sample, best-of-N
    and maj@N at each N, and each power-sampling row, so methods compare at equal compute. pass@N is left out:
    an oracle spends the tokens but cannot pick its answer."""
    fig, ax = _new_axes(results, "Accuracy vs tokens spent per returned answer")
    for i, method in enumerate(n_methods(results)[:-1]):  # pass@N: left out (docstring)
        rows = [r for r in (find_row(results, method, n) for n in results["n_values"]) if r.get("tokens")]
        ax.errorbar([r["tokens"] for r in rows], [r["accuracy"] for r in rows],
                    yerr=[r["accuracy_stderr"] or 0.0 for r in rows], capsize=3, label=method_label(method),
                    **method_style(method, i))  # fmt: skip
    singles = [(find_row(results, "greedy"), "black", "D"), (find_row(results, "sample"), "tab:purple", "P")]
    singles += [(row, f"C{(5 + i) % 10}", "*") for i, row in enumerate(power_rows(results))]  # C4 is tab:purple
    for row, color, marker in singles:
        if row.get("tokens"):
            ax.errorbar([row["tokens"]], [row["accuracy"]], yerr=[row["accuracy_stderr"] or 0.0], capsize=3,
                        color=color, marker=marker, ms=10, ls="none", label=row["method"])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("response tokens spent per returned answer (generated, plus rescored; log scale)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.grid(True, which="both", alpha=0.3)
    _finish(fig, ax, path)


PLOTS = {
    "accuracy_vs_n.png": plot_accuracy,
    "accuracy_vs_tokens.png": plot_accuracy_vs_tokens,
    "lift_vs_n.png": plot_lift,
    "loglik_histogram.png": plot_loglik_histogram,
    "chosen_loglik_vs_n.png": plot_chosen_loglik,
}


OUTPUT_FILES = ("config.yaml", "results.json", "results.csv", *PLOTS)
"""What a run writes into its output directory (beside the cache)."""


def replaced_input_problems(out_dir: str, inputs: dict[str, str]) -> list[str]:
    """Inputs of the run ({option as typed: path}) that writing its files to ``out_dir`` would replace: --overwrite
    replaces earlier results, never the config or the prompts the run reads."""
    return [
        f"{option} is {target!r}, where the run writes its {name}: --overwrite replaces earlier results, never what "
        "the run reads; choose another --output_dir"
        for name in OUTPUT_FILES
        if os.path.isfile(target := os.path.join(out_dir, name))
        for option, path in inputs.items()
        if path and os.path.isfile(path) and os.path.samefile(target, path)
    ]


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Every plot in PLOTS as a PNG under ``out_dir``; [] (with a warning) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots written (pip install 'sharpening[plots]')")
        return []
    import matplotlib.pyplot as plt

    paths = []
    for name, plot in PLOTS.items():
        path = os.path.join(out_dir, name)
        plot(results, path)
        plt.close("all")
        paths.append(path)
    return paths
