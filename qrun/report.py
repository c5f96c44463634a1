"""`qrun-report DIR`: every job under a sweep (or outputs) folder -> report.md, report.csv and PNG plots.

A job is a folder holding a results.json (finished or failed) or Hydra's .hydra/config.yaml (a job that never
finished: interrupted, still running or not started). Numbers come from results.json; what a job was (model,
quantizer, bits) falls back to its saved config, so failed and incomplete jobs still get a labelled row.
Training curves and learned quantizer values are read back from the TensorBoard event files each job wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from qrun.errors import QrunError

RESULTS_FILE = "results.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
FULL_PRECISION = "none"
FP_BITS = 32
COLUMNS = ("job", "model", "dataset", "quant", "w_bits", "a_bits", "quantize_input", "top1", "top5", "best_top1",
           "gap_top1", "params", "macs", "bops", "size_bytes", "epochs", "wall_time_s", "status", "error")
PLOT_TOP1_VS_BITS = "top1_vs_bits.png"
PLOT_CURVES = "training_curves.png"
PLOT_DSQ_ALPHA = "dsq_alpha.png"
VAL_TOP1_TAG = "val/top1"
# Job-name keys that the top-1 plot's axis or line label already shows (quantize_input as "(W only)"); any
# other key that varies between jobs splits lines.
SERIES_FREE_KEYS = {"bits", "w_bits", "a_bits", "quant", "model", "dataset", "quantize_input"}
OVERRIDE_ITEM = re.compile(r"([A-Za-z_][\w.]*)-(.+)")  # `key-value` in a sweep job's folder name


@dataclass
class Job:
    """One job folder and what it says about itself."""

    path: Path
    name: str
    results: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.results.get("status"):
            return str(self.results["status"])
        # No results.json: a checkpoint means the job trained at least one epoch and stopped (or still runs).
        return "incomplete" if (self.path / "checkpoints" / "last.pt").is_file() else "not started"

    def setting(self, key: str, config_path: Sequence[str]) -> Any:
        """A value from results.json, else from the job's saved config."""
        if self.results.get(key) is not None:
            return self.results[key]
        node: Any = self.config
        for part in config_path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


# ------------------------------------------------------------------------------------------------- collecting
def find_job_dirs(root: Path) -> list[Path]:
    """Folders under root (root included) holding results.json or .hydra/config.yaml, in name order."""
    found = {p.parent for p in root.rglob(RESULTS_FILE)}
    found |= {p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"}
    return sorted(found, key=lambda p: str(p))


def _load_config(path: Path) -> dict[str, Any]:
    config_file = path / HYDRA_CONFIG
    if not config_file.is_file():
        return {}
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_file)
    try:
        return OmegaConf.to_container(config, resolve=True)  # w_bits: ${bits} and the like
    except Exception:  # an interpolation this process cannot resolve: keep what is literal
        return OmegaConf.to_container(config, resolve=False)


def load_job(path: Path, root: Path) -> Job:
    results: dict[str, Any] = {}
    results_file = path / RESULTS_FILE
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except json.JSONDecodeError as error:
            results = {"status": "failed", "error": f"unreadable {RESULTS_FILE}: {error}"}
    name = str(path.relative_to(root)) if path != root else path.name
    return Job(path=path, name=name, results=results, config=_load_config(path))


def collect_jobs(root: Path) -> list[Job]:
    root = Path(root)
    if not root.is_dir():
        raise QrunError(f"{root} is not a directory; qrun-report takes a sweep or outputs folder")
    return [load_job(path, root) for path in find_job_dirs(root)]


# ------------------------------------------------------------------------------------------------------ rows
def job_row(job: Job) -> dict[str, Any]:
    """The report's columns for one job (raw values; formatting happens per output)."""
    quant = job.setting("quant", ("quant", "name"))
    full_precision = quant == FULL_PRECISION
    w_bits = FP_BITS if full_precision else job.setting("w_bits", ("w_bits",))
    a_bits = FP_BITS if full_precision else job.setting("a_bits", ("a_bits",))
    quantize_input = bool(job.setting("quantize_input", ("quantize_input",))) and not full_precision
    if not quantize_input and not full_precision and a_bits is not None:
        a_bits = FP_BITS  # activations stay float when inputs are not quantized
    configured_epochs = job.config.get("epochs")
    trained = job.results.get("epoch")
    epochs = f"{trained if trained is not None else '-'}/{configured_epochs if configured_epochs else '-'}"
    return {"job": job.name, "model": job.setting("model", ("model", "name")),
            "dataset": job.setting("dataset", ("dataset", "name")), "quant": quant, "w_bits": w_bits,
            "a_bits": a_bits, "quantize_input": quantize_input, "top1": job.results.get("top1"),
            "top5": job.results.get("top5"), "best_top1": job.results.get("best_top1"), "gap_top1": None,
            "params": job.results.get("params"), "macs": job.results.get("macs"), "bops": job.results.get("bops"),
            "size_bytes": job.results.get("size_bytes"), "epochs": epochs,
            "wall_time_s": job.results.get("wall_time_s"), "status": job.status, "error": job.results.get("error")}


def baselines(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, Any], float]:
    """Mean final top-1 of the finished full-precision jobs of each (model, dataset)."""
    values: dict[tuple[Any, Any], list[float]] = defaultdict(list)
    for row in rows:
        if row["quant"] == FULL_PRECISION and row["status"] == "finished" and row["top1"] is not None:
            values[(row["model"], row["dataset"])].append(float(row["top1"]))
    return {key: sum(v) / len(v) for key, v in values.items()}


def build_rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Rows with the gap to the full-precision baseline; baselines first, then by model, quantizer and bits."""
    rows = [job_row(job) for job in jobs]
    reference = baselines(rows)
    for row in rows:
        base = reference.get((row["model"], row["dataset"]))
        if base is not None and row["top1"] is not None and row["status"] == "finished":
            row["gap_top1"] = float(row["top1"]) - base

    def order(row: dict[str, Any]) -> tuple:
        return (str(row["model"]), str(row["dataset"]), row["quant"] != FULL_PRECISION, str(row["quant"]),
                row["w_bits"] or 0, row["a_bits"] or 0, row["quantize_input"], row["job"])

    return sorted(rows, key=order)


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Job names without the `key-value` items every job shares (`epochs-2+quant-dsq` -> `quant-dsq` when all
    jobs ran 2 epochs): the table shows what varies; the CSV keeps the full folder names."""
    items = {name: name.rsplit("/", 1)[-1].split("+") for name in names}
    common = set.intersection(*(set(parts) for parts in items.values())) if len(items) > 1 else set()
    short = {}
    for name, parts in items.items():
        kept = [part for part in parts if part not in common]
        short[name] = "+".join(kept) if kept else name
    return short


# --------------------------------------------------------------------------------------------------- tables
def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _scaled(value: Any, units: Sequence[tuple[float, str]]) -> str:
    if value is None:
        return "-"
    for scale, suffix in units:
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


_COUNT_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BYTE_UNITS = ((2 ** 30, " GiB"), (2 ** 20, " MiB"), (2 ** 10, " KiB"))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("job", "model", "dataset", "quant", "W/A bits", "quant. input", "top-1", "top-5", "best top-1",
              "gap to FP", "params", "MACs", "BOPs", "size", "epochs", "wall time", "status")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * 2 + "---:|" * 10 + "---|"]
    names = short_names([row["job"] for row in rows]) if rows else {}
    for row in rows:
        baseline = row["quant"] == FULL_PRECISION
        gap = "baseline" if baseline else (f"{row['gap_top1']:+.2f}" if row["gap_top1"] is not None else "-")
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        bits = f"{row['w_bits'] if row['w_bits'] is not None else '-'}/{row['a_bits'] if row['a_bits'] is not None else '-'}"
        cells = [f"`{names[row['job']]}`", str(row["model"]), str(row["dataset"]), str(row["quant"]), bits,
                 "yes" if row["quantize_input"] else "no", _number(row["top1"]), _number(row["top5"]),
                 _number(row["best_top1"]), gap, _scaled(row["params"], _COUNT_UNITS),
                 _scaled(row["macs"], _COUNT_UNITS), _scaled(row["bops"], _COUNT_UNITS),
                 _scaled(row["size_bytes"], _BYTE_UNITS), row["epochs"],
                 f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] is not None else "-",
                 status.replace("|", "\\|").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in COLUMNS})


# ------------------------------------------------------------------------------------------ TensorBoard data
def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from every event file in tb_dir; a resumed run's re-logged steps keep the last value."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    series: dict[str, list[tuple[int, float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        series[tag] = sorted(by_step.items())
    return series


def learned_alphas(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, float]]:
    """{layer: {'weight': alpha, 'act': alpha}} from the last logged `quant/<layer>/<side>/alpha` values."""
    alphas: dict[str, dict[str, float]] = {}
    for tag, points in scalars.items():
        parts = tag.split("/")
        if len(parts) >= 4 and parts[0] == "quant" and parts[-1] == "alpha" and points:
            layer, side = "/".join(parts[1:-2]), parts[-2]
            alphas.setdefault(layer, {})[side] = points[-1][1]
    return alphas


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, also on machines without a display
    import matplotlib.pyplot as plt

    return plt


def top1_series(quantized: Sequence[dict[str, Any]], several_datasets: bool) -> dict[str, list[tuple[int, float]]]:
    """(weight bits, top-1) points per line: one line per quantizer and per value of every other swept key
    (`quant.first_last-fp`, ...), so jobs that differ in more than bits never share a line."""
    short = short_names([str(row["job"]) for row in quantized])
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in quantized:
        overrides = [OVERRIDE_ITEM.fullmatch(item) for item in short[str(row["job"])].split("+")]
        others = [m.group(0) for m in overrides if m and m.group(1) not in SERIES_FREE_KEYS]
        label = " ".join([str(row["quant"]), *others]) + ("" if row["quantize_input"] else " (W only)")
        label += f" {row['model']}/{row['dataset']}" if several_datasets else ""
        lines[label].append((int(row["w_bits"]), float(row["top1"])))
    for points in lines.values():
        points.sort()
    return dict(sorted(lines.items()))


def plot_top1_vs_bits(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Final top-1 against weight bits, one line per quantizer (and other swept keys), FP baselines dashed."""
    finished = [r for r in rows if r["status"] == "finished" and r["top1"] is not None]
    quantized = [r for r in finished if r["quant"] != FULL_PRECISION]
    if not quantized:
        return False
    plt = _pyplot()
    several = len({(r["model"], r["dataset"]) for r in finished}) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in top1_series(quantized, several).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for (model, dataset), value in baselines(finished).items():
        ax.axhline(value, linestyle="--", color="grey", label=f"full precision{f' {model}/{dataset}' if several else ''}")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("val top-1 (%)")
    ax.set_xticks(sorted({int(r["w_bits"]) for r in quantized}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Top-1 vs bit width")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_training_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """Validation top-1 per epoch of every job that logged it."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in sorted(curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not 1.2, 1.4, ...
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_dsq_alpha(alphas_by_job: dict[str, dict[str, dict[str, float]]], path: Path) -> bool:
    """Learned DSQ alpha per layer (weight and activation side by side), one panel per DSQ job."""
    alphas_by_job = {name: alphas for name, alphas in alphas_by_job.items() if alphas}
    if not alphas_by_job:
        return False
    plt = _pyplot()
    count = len(alphas_by_job)
    fig, axes = plt.subplots(count, 1, figsize=(7.0, 2.6 * count + 0.6), squeeze=False)
    for ax, (name, alphas) in zip(axes[:, 0], sorted(alphas_by_job.items())):
        layers = list(alphas)
        for offset, side in ((-0.2, "weight"), (0.2, "act")):
            values = [alphas[layer].get(side, float("nan")) for layer in layers]
            ax.bar([i + offset for i in range(len(layers))], values, width=0.4, label=side)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("alpha")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Learned DSQ alpha per layer (smaller: the layer tolerates coarser quantization)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    markdown: Path
    csv: Path
    plots: list[Path]
    rows: list[dict[str, Any]]


def build_report(root: Path, out: Optional[Path] = None) -> Report:
    """Read every job under root and write report.md, report.csv and the plots into out (default: root)."""
    root = Path(root)
    jobs = collect_jobs(root)
    if not jobs:
        raise QrunError(f"no qrun jobs under {root}: no {RESULTS_FILE} or {HYDRA_CONFIG} found")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(jobs)
    names = short_names([job.name for job in jobs])  # plot legends and titles: what varies between jobs
    scalars = {names[job.name]: read_scalars(job.path / "tb") for job in jobs}
    curves = {name: series.get(VAL_TOP1_TAG, []) for name, series in scalars.items()}
    alphas = {names[job.name]: learned_alphas(scalars[names[job.name]]) for job in jobs
              if job.setting("quant", ("quant", "name")) == "dsq"}
    plots = []
    for made, filename in ((plot_top1_vs_bits(rows, out / PLOT_TOP1_VS_BITS), PLOT_TOP1_VS_BITS),
                           (plot_training_curves(curves, out / PLOT_CURVES), PLOT_CURVES),
                           (plot_dsq_alpha(alphas, out / PLOT_DSQ_ALPHA), PLOT_DSQ_ALPHA)):
        if made:
            plots.append(out / filename)
    write_csv(rows, out / "report.csv")
    markdown = out / "report.md"
    markdown.write_text(render_markdown(root, rows, alphas, [p.name for p in plots]))
    return Report(markdown=markdown, csv=out / "report.csv", plots=plots, rows=rows)


def render_markdown(root: Path, rows: Sequence[dict[str, Any]], alphas: dict[str, dict[str, dict[str, float]]],
                    plot_names: Sequence[str]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    parts = [f"# qrun report: {root}\n", f"{len(rows)} jobs: {summary}.\n",
             "top-1/top-5: validation accuracy (%) after the last epoch; gap: top-1 minus the mean top-1 of the "
             "finished full-precision (quant=none) jobs of the same model and dataset. MACs for one input; BOPs = "
             "sum over layers of MACs x weight bits x activation bits (float layers 32 x 32); size at the "
             "quantized weight widths. Wall time: the job's last invocation.\n", markdown_table(rows)]
    for alpha_job, layers in sorted(alphas.items()):
        if layers:
            parts.append(f"## Learned DSQ alpha: `{alpha_job}`\n")
            parts.append("| layer | weight | activation |\n|---|---:|---:|\n" + "".join(
                f"| {layer} | {_number(v.get('weight'), 4)} | {_number(v.get('act'), 4)} |\n"
                for layer, v in layers.items()))
    for name in plot_names:
        parts.append(f"![{name}]({name})\n")
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="qrun-report", description=(
        "Summarise every qrun job under DIR (a multirun sweep or outputs folder) into report.md, report.csv "
        "and PNG plots."))
    parser.add_argument("dir", type=Path, help="sweep or outputs folder to read")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR)")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dir, args.out)
    except QrunError as error:
        print(f"qrun-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(report.rows)} jobs -> {report.markdown}, {report.csv}" +
          "".join(f", {p}" for p in report.plots))


if __name__ == "__main__":
    main()
