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
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from qrun.errors import QrunError

RESULTS_FILE = "results.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
FULL_PRECISION = "none"
FP_BITS = 32
COLUMNS = ("job", "model", "dataset", "quant", "w_bits", "a_bits", "quantize_input", "mixed_bits", "layer_bits",
           "mode", "seed", "top1", "top5", "best_top1", "best_selected_on", "gap_top1", "baseline", "params", "macs",
           "bops", "size_bytes", "epochs", "wall_time_s", "status", "error")
PLOT_TOP1_VS_BITS = "top1_vs_bits.png"
PLOT_CURVES = "training_curves.png"
PLOT_DSQ_ALPHA = "dsq_alpha.png"
TEST_TOP1_TAG = "test/top1"
LEGACY_TOP1_TAG = "val/top1"  # runs from before the validation split logged the test split under val/
# Job-name keys that the top-1 plot's axis or line label already shows (quantize_input as "(W only)"); any
# other key that varies between jobs splits lines.
SERIES_FREE_KEYS = {"bits", "w_bits", "a_bits", "quant", "model", "dataset", "quantize_input", "seed"}
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
# What a baseline must share with a quantized run: the network, the data it saw and how it was trained. Paths
# into the saved config; a whole node (model, optimizer, scheduler) means every key in it.
RECIPE_KEYS: tuple[tuple[str, ...], ...] = (
    ("model",), ("dataset", "name"), ("dataset", "train_samples"), ("dataset", "val_samples"),
    ("dataset", "val_split"), ("dataset", "subset_seed"), ("dataset", "augment"), ("epochs",), ("batch_size",),
    ("optimizer",), ("scheduler",), ("init_from",), ("label_smoothing",), ("amp",))
# What else a quantized run must share with another to be the same experiment repeated with another seed.
# Distillation (a teacher) is part of it, not of the recipe: a distilled run's baseline is the plain float run.
QUANT_KEYS: tuple[tuple[str, ...], ...] = (("quant",), ("distill",))


def _config_value(config: dict[str, Any], path: Sequence[str]) -> Any:
    node: Any = config
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _key(values: Any) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def job_status(job: Job) -> str:
    """The job's own status, except that a finished job whose loss or top-1 is not a finite number diverged."""
    status = job.status
    loss = job.results.get("train_loss")
    if status == "finished" and (not _finite(job.results.get("top1")) or (loss is not None and not _finite(loss))):
        return "diverged"
    return status


def mixed_bits(job: Job, full_precision: bool) -> tuple[bool, list[str]]:
    """(mixed, per-layer widths): from results.json's layer_bits, else from the saved layer policy."""
    if full_precision:
        return False, []
    widths = job.results.get("layer_bits")
    if isinstance(widths, list):
        return len(widths) > 1, [str(w) for w in widths]
    overrides = _config_value(job.config, ("quant", "layer_overrides"))
    return bool(overrides) or _config_value(job.config, ("quant", "first_last")) == "8bit", []


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
    mixed, layer_widths = mixed_bits(job, full_precision)
    mode = job.setting("mode", ("mode",)) or "train"
    # Runs from before the validation split picked best_top1 on the test split.
    selected_on = job.results.get("best_selected_on", "test" if job.results.get("best_top1") is not None else None)
    recipe = _key([_config_value(job.config, path) for path in RECIPE_KEYS]) if job.config else None
    quant_identity = [quant, w_bits, a_bits, quantize_input, mode]
    if not full_precision:
        quant_identity += [_config_value(job.config, path) for path in QUANT_KEYS]
    return {"job": job.name, "path": str(job.path.resolve()), "model": job.setting("model", ("model", "name")),
            "dataset": job.setting("dataset", ("dataset", "name")), "quant": quant, "w_bits": w_bits,
            "a_bits": a_bits, "quantize_input": quantize_input, "mixed_bits": mixed,
            "layer_bits": " ".join(layer_widths), "seed": job.setting("seed", ("seed",)), "mode": mode,
            "top1": job.results.get("top1"), "top5": job.results.get("top5"),
            "best_top1": job.results.get("best_top1"), "best_selected_on": selected_on, "gap_top1": None,
            "baseline": None, "params": job.results.get("params"), "macs": job.results.get("macs"),
            "bops": job.results.get("bops"), "size_bytes": job.results.get("size_bytes"), "epochs": epochs,
            "wall_time_s": job.results.get("wall_time_s"), "status": job_status(job),
            "error": job.results.get("error"), "checkpoint": job.results.get("checkpoint"), "recipe": recipe,
            "init_from": _config_value(job.config, ("init_from",)) if job.config else None,
            # A job without a saved config cannot be matched: it is its own experiment.
            "experiment": _key([recipe, quant_identity]) if recipe is not None else _key(["job", job.name])}


def has_result(row: dict[str, Any]) -> bool:
    """Finished with a finite top-1: the only rows that give a value or serve as a baseline."""
    return row["status"] == "finished" and _finite(row["top1"])


def group_by_experiment(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows with a result, grouped when they differ only in seed (or in how fast they ran), in row order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if has_result(row):
            groups.setdefault(row["experiment"], []).append(row)
    return list(groups.values())


def _mean_std(values: Sequence[Any]) -> tuple[Optional[float], Optional[float]]:
    numbers = [float(v) for v in values if _finite(v)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else None)


def _baseline_of(group: list[dict[str, Any]], fp_groups: dict[str, list[dict[str, Any]]],
                 by_path: dict[str, list[dict[str, Any]]]) -> tuple[Optional[list[dict[str, Any]]], str]:
    """The full-precision group a quantized group is compared with, or why there is none."""
    first = group[0]
    if first["mode"] == "calibrate" and first.get("checkpoint"):
        # Post-training quantization: the baseline is the float run whose checkpoint was calibrated.
        source = by_path.get(str(Path(first["checkpoint"]).resolve().parent.parent))
        return (source, "") if source else (None, "none: the calibrated float run is not in this folder")
    if first["recipe"] is None:
        return None, f"none: no {HYDRA_CONFIG} to match a recipe"
    if first["mode"] != "train":
        return None, f"none: mode={first['mode']}"
    if first.get("init_from"):
        # QAT from a float run (the two-step recipe): the baseline is the run it started from.
        source = _run_at(str(first["init_from"]), by_path)
        if source is not None and source[0]["quant"] == FULL_PRECISION and source[0]["mode"] == "train":
            return source, ""
    base = fp_groups.get(first["recipe"])
    if base is None:
        if first.get("init_from"):
            return None, f"none: the float run it started from (init_from={first['init_from']}) is not in this folder"
        return None, "none: no full-precision run with the same model, data, epochs and recipe"
    return base, ""


def _run_at(location: str, by_path: dict[str, list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    """The group of the run at `location` (a run folder or a checkpoint in it), as a job saw the path: absolute,
    or relative to where it ran, matched then by its trailing folders."""
    path = Path(location)
    if path.suffix == ".pt":
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    found = by_path.get(str(path.resolve()))
    if found is not None:
        return found
    parts = tuple(part for part in path.parts if part not in (".", ""))
    matches = [group for key, group in by_path.items() if parts and Path(key).parts[-len(parts):] == parts]
    return matches[0] if len(matches) == 1 else None


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per experiment: mean and sample std over its seeds, gap to its own full-precision baseline.

    Sets each job row's `gap_top1` and `baseline` too (for the CSV).
    """
    groups = group_by_experiment(rows)
    short = short_names([row["job"] for row in rows]) if rows else {}
    fp_groups = {g[0]["recipe"]: g for g in groups
                 if g[0]["quant"] == FULL_PRECISION and g[0]["mode"] == "train" and g[0]["recipe"] is not None}
    by_path = {row["path"]: group for group in groups for row in group}
    labels = {id(group): group_label(group, short) for group in groups}
    summary = []
    for group in groups:
        first = group[0]
        top1, top1_std = _mean_std([r["top1"] for r in group])
        entry = {key: first[key] for key in ("model", "dataset", "quant", "w_bits", "a_bits", "quantize_input",
                                             "mixed_bits", "layer_bits", "mode", "params", "macs", "bops",
                                             "size_bytes", "epochs", "recipe")}
        entry.update(job=labels[id(group)], jobs=[r["job"] for r in group], n=len(group),
                     seeds=[r["seed"] for r in group], top1=top1, top1_std=top1_std,
                     top5=_mean_std([r["top5"] for r in group])[0],
                     best_top1=_mean_std([r["best_top1"] for r in group])[0],
                     best_selected_on="/".join(sorted({str(r["best_selected_on"]) for r in group})),
                     wall_time_s=_mean_std([r["wall_time_s"] for r in group])[0], gap_top1=None)
        if first["quant"] == FULL_PRECISION and first["mode"] == "train":
            entry["baseline"] = "is the baseline"
            for row in group:
                row["baseline"] = entry["baseline"]
        else:
            base, reason = _baseline_of(group, fp_groups, by_path)
            if base is None:
                entry["baseline"] = reason
            else:
                base_top1 = _mean_std([r["top1"] for r in base])[0]
                entry["baseline"] = f"`{labels[id(base)]}`" + (f" (n={len(base)})" if len(base) > 1 else "")
                entry["gap_top1"] = top1 - base_top1
                for row in group:
                    row["gap_top1"] = float(row["top1"]) - base_top1
            for row in group:
                row["baseline"] = entry["baseline"].replace("`", "")
        summary.append(entry)
    # Each baseline followed by the experiments compared with it; experiments without one last.
    return sorted(summary, key=lambda row: (row["recipe"] not in fp_groups, *_order(row)))


def group_label(group: Sequence[dict[str, Any]], short: dict[str, str]) -> str:
    """The jobs' common short name without their seed item (`bits-4+quant-dsq` for `bits-4+quant-dsq+seed-1`)."""
    names = []
    for row in group:
        kept = [item for item in short.get(row["job"], row["job"]).split("+")
                if not (len(group) > 1 and item.startswith("seed-"))]
        names.append("+".join(kept) if kept else row["job"].rsplit("/", 1)[-1])
    return names[0] if len(set(names)) == 1 else f"{names[0]} (+{len(group) - 1})"


def _order(row: dict[str, Any]) -> tuple:
    return (str(row["model"]), str(row["dataset"]), str(row["recipe"]), row["quant"] != FULL_PRECISION,
            str(row["quant"]), row["w_bits"] or 0, row["a_bits"] or 0, row["quantize_input"],
            bool(row.get("mixed_bits")), str(row["job"]))


def build_rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per job, by model, dataset and recipe, baselines first, then by quantizer and bits; gap_top1 and
    baseline come from `summarize` (a job's top-1 minus the mean top-1 of its full-precision baseline)."""
    rows = [job_row(job) for job in jobs]
    summarize(rows)
    return sorted(rows, key=_order)


def unfinished(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed, diverged, incomplete and never-started jobs: listed apart, never a value or a baseline."""
    return [row for row in rows if not has_result(row)]


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


def bits_label(row: dict[str, Any]) -> str:
    """`4/4`, or `4/4 mixed (W8A8 W4A4)` when layers run at different widths (the global bits are not the story)."""
    bits = "/".join(str(row[key]) if row[key] is not None else "-" for key in ("w_bits", "a_bits"))
    if not row.get("mixed_bits"):
        return bits
    return f"{bits} mixed" + (f" ({row['layer_bits']})" if row.get("layer_bits") else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """One line per experiment (seeds aggregated): mean ± sample std over its n runs."""
    header = ("job", "model", "dataset", "quant", "W/A bits", "quant. input", "n", "top-1", "top-5", "best top-1",
              "gap to FP", "FP baseline", "params", "MACs", "BOPs", "size", "epochs", "wall time")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 6 + "---:|" * 5 + "---|" + "---:|" * 6]
    for row in summary:
        top1 = _number(row["top1"]) + (f" ± {row['top1_std']:.2f}" if row["top1_std"] is not None else "")
        if row["baseline"] == "is the baseline":
            gap = "baseline"
        else:
            gap = f"{row['gap_top1']:+.2f}" if row["gap_top1"] is not None else "-"
        best = _number(row["best_top1"]) + (f" ({row['best_selected_on']})" if row["best_top1"] is not None else "")
        seeds = [str(seed) for seed in sorted({seed for seed in row["seeds"] if seed is not None})]
        cells = [f"`{row['job']}`" + (f" seeds {', '.join(seeds)}" if len(seeds) > 1 else ""), str(row["model"]),
                 str(row["dataset"]), str(row["quant"]), bits_label(row), "yes" if row["quantize_input"] else "no",
                 str(row["n"]), top1, _number(row["top5"]), best, gap,
                 "-" if row["baseline"] == "is the baseline" else row["baseline"],
                 _scaled(row["params"], _COUNT_UNITS), _scaled(row["macs"], _COUNT_UNITS),
                 _scaled(row["bops"], _COUNT_UNITS), _scaled(row["size_bytes"], _BYTE_UNITS), row["epochs"],
                 f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] is not None else "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def unfinished_table(rows: Sequence[dict[str, Any]]) -> str:
    names = short_names([row["job"] for row in rows]) if rows else {}
    lines = ["| job | quant | W/A bits | epochs | status |", "|---|---|---:|---:|---|"]
    for row in rows:
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        lines.append("| " + " | ".join(_cell(c) for c in (f"`{names[row['job']]}`", row["quant"], bits_label(row),
                                                           row["epochs"], status)) + " |")
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


# Learned values that must stay positive (a step, a clip level, a range), and DSQ's alpha interval (qrun.quant.dsq).
POSITIVE_VALUES = ("step", "alpha", "range", "scale")
DSQ_ALPHA_BOUNDS = (1e-4, 0.5)


def learned_values_by_layer(scalars: dict[str, list[tuple[int, float]]]) -> dict[tuple[str, str], dict[str, float]]:
    """{(side, value name): {layer: last logged value}} from the `quant/<layer>/<side>/<name>` scalars."""
    values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for tag, points in scalars.items():
        parts = tag.split("/")
        if len(parts) >= 4 and parts[0] == "quant" and points:
            values[(parts[-2], parts[-1])]["/".join(parts[1:-2])] = points[-1][1]
    return dict(values)


def learned_summary(quant: str, scalars: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """Per side and learned value: layers, min, median, max, and how many layers left the valid range (DSQ's
    alpha at a bound of (0, 0.5], bounds with u <= l, a non-positive step/alpha/range)."""
    by_layer = learned_values_by_layer(scalars)
    summary = []
    for (side, name), layers in sorted(by_layer.items()):
        values = list(layers.values())
        if quant == "dsq" and name == "alpha":
            low, high = DSQ_ALPHA_BOUNDS
            outside = sum(v <= low * (1 + 1e-6) or v >= high * (1 - 1e-6) for v in values)
            rule = "at a bound of [1e-4, 0.5]"
        elif quant == "dsq" and name == "upper":
            lower = by_layer.get((side, "lower"), {})
            outside = sum(layer in lower and v <= lower[layer] for layer, v in layers.items())
            rule = "u <= l"
        elif name in POSITIVE_VALUES:
            outside, rule = sum(not v > 0 for v in values), "<= 0"
        else:
            outside, rule = None, ""
        summary.append({"side": side, "name": name, "layers": len(values), "min": min(values),
                        "median": statistics.median(values), "max": max(values), "outside": outside, "rule": rule})
    return summary


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, also on machines without a display
    import matplotlib.pyplot as plt

    return plt


def series_labels(quantized: Sequence[dict[str, Any]], several_datasets: bool) -> list[str]:
    """The line of each row: one line per quantizer and per value of every other swept key
    (`quant.first_last-fp`, ...), so jobs that differ in more than bits never share a line."""
    short = short_names([str(row["job"]) for row in quantized])
    labels = []
    for row in quantized:
        overrides = [OVERRIDE_ITEM.fullmatch(item) for item in short[str(row["job"])].split("+")]
        others = [m.group(0) for m in overrides if m and m.group(1) not in SERIES_FREE_KEYS]
        label = " ".join([str(row["quant"]), *others]) + ("" if row["quantize_input"] else " (W only)")
        label += " mixed" if row.get("mixed_bits") and not others else ""
        label += f" {row['model']}/{row['dataset']}" if several_datasets else ""
        labels.append(label)
    return labels


def top1_series(quantized: Sequence[dict[str, Any]], several_datasets: bool) -> dict[str, list[tuple[int, float]]]:
    """(weight bits, top-1) points per line (see `series_labels`)."""
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for label, row in zip(series_labels(quantized, several_datasets), quantized):
        lines[label].append((int(row["w_bits"]), float(row["top1"])))
    for points in lines.values():
        points.sort()
    return dict(sorted(lines.items()))


def plot_top1_vs_bits(summary: Sequence[dict[str, Any]], path: Path) -> bool:
    """Mean top-1 against weight bits, one line per quantizer (and other swept keys), FP baselines dashed."""
    quantized = [r for r in summary if r["quant"] != FULL_PRECISION]
    if not quantized:
        return False
    plt = _pyplot()
    several = len({(r["model"], r["dataset"]) for r in summary}) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    spread = {(label, int(row["w_bits"]), float(row["top1"])): row.get("top1_std") or 0.0
              for label, row in zip(series_labels(quantized, several), quantized)}
    for label, points in top1_series(quantized, several).items():
        errors = [spread[(label, bits, top1)] for bits, top1 in points]  # sample std over seeds; 0 for one run
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, marker="o", capsize=3,
                    label=label)
    baselines = [r for r in summary if r["baseline"] == "is the baseline"]
    for row in baselines:
        name = f" `{row['job']}`" if len(baselines) > 1 else ""
        ax.axhline(row["top1"], linestyle="--", color="grey", label=f"full precision{name}")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("test top-1 (%)")
    ax.set_xticks(sorted({int(r["w_bits"]) for r in quantized}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Top-1 vs bit width (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_training_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """Test top-1 per epoch of every job that logged it."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in sorted(curves.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs, not 1.2, 1.4, ...
    ax.set_ylabel("test top-1 (%)")
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
    rows: list[dict[str, Any]]  # one per job
    summary: list[dict[str, Any]]  # one per experiment (seeds aggregated)


def build_report(root: Path, out: Optional[Path] = None) -> Report:
    """Read every job under root and write report.md, report.csv and the plots into out (default: root)."""
    root = Path(root)
    jobs = collect_jobs(root)
    if not jobs:
        raise QrunError(f"no qrun jobs under {root}: no {RESULTS_FILE} or {HYDRA_CONFIG} found")
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(jobs)
    summary = summarize(rows)
    names = short_names([job.name for job in jobs])  # plot legends and titles: what varies between jobs
    scalars = {names[job.name]: read_scalars(job.path / "tb") for job in jobs}
    curves = {name: series.get(TEST_TOP1_TAG, series.get(LEGACY_TOP1_TAG, [])) for name, series in scalars.items()}
    alphas = {names[job.name]: learned_alphas(scalars[names[job.name]]) for job in jobs
              if job.setting("quant", ("quant", "name")) == "dsq"}
    learned = {job.name: learned_summary(str(job.setting("quant", ("quant", "name"))), scalars[names[job.name]])
               for job in jobs}
    plots = []
    for made, filename in ((plot_top1_vs_bits(summary, out / PLOT_TOP1_VS_BITS), PLOT_TOP1_VS_BITS),
                           (plot_training_curves(curves, out / PLOT_CURVES), PLOT_CURVES),
                           (plot_dsq_alpha(alphas, out / PLOT_DSQ_ALPHA), PLOT_DSQ_ALPHA)):
        if made:
            plots.append(out / filename)
    write_csv(rows, out / "report.csv")
    markdown = out / "report.md"
    markdown.write_text(render_markdown(root, rows, summary, alphas, [p.name for p in plots], learned))
    return Report(markdown=markdown, csv=out / "report.csv", plots=plots, rows=rows, summary=summary)


EXPLANATION = (
    "One line per experiment: jobs that differ only in seed are one line, top-1 as mean ± sample standard "
    "deviation over its n jobs (other columns: means). top-1/top-5: test split after the last epoch; best top-1: "
    "the best epoch, selected on the split named in brackets (val: the held-out dataset.val_split; test: no "
    "validation split, so it is chosen on the data it is scored on). Gap: top-1 minus the mean top-1 of the "
    "full-precision (quant=none) experiment with the same model, dataset, data subset (train_samples, "
    "val_samples, val_split, subset_seed, augment), epochs and recipe (optimizer, scheduler, batch size, "
    "init_from, label smoothing, amp); a line trained from a float run in this folder (init_from=) is compared "
    "with that run, and a post-training (mode=calibrate) line with the float run it calibrated. W/A bits `mixed`: layers run at different widths (quant.layer_overrides, first_last=8bit), "
    "listed in brackets. MACs for one input; BOPs = sum over layers of MACs x weight bits x activation bits, "
    "each layer at its own widths, float layers 32 x 32 (a conv folded with its BatchNorm counts as the "
    "quantized conv it is); size at the quantized weight widths. Failed, diverged and unfinished jobs are listed "
    "apart and are never a line's value or a baseline. Wall time: the jobs' last invocation.\n")


def render_markdown(root: Path, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
                    alphas: dict[str, dict[str, dict[str, float]]], plot_names: Sequence[str],
                    learned: Optional[dict[str, list[dict[str, Any]]]] = None) -> str:
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    parts = [f"# qrun report: {root}\n", f"{len(rows)} jobs: {statuses}; {len(summary)} experiments.\n",
             EXPLANATION, markdown_table(summary)]
    without = unfinished(rows)
    if without:
        parts += ["## Jobs without a result\n", unfinished_table(without)]
    if learned and any(learned.values()):
        parts += ["## Learned quantizer values\n",
                  "The last logged value of every layer's learned quantities (TensorBoard `quant/<layer>/<side>/"
                  "<name>`), summarised over layers; the last column counts layers outside the valid range.\n",
                  learned_table(learned)]
    for alpha_job, layers in sorted(alphas.items()):
        if layers:
            parts.append(f"## Learned DSQ alpha: `{alpha_job}`\n")
            parts.append("| layer | weight | activation |\n|---|---:|---:|\n" + "".join(
                f"| {layer} | {_number(v.get('weight'), 4)} | {_number(v.get('act'), 4)} |\n"
                for layer, v in layers.items()))
    for name in plot_names:
        parts.append(f"![{name}]({name})\n")
    return "\n".join(parts)


def learned_table(learned: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| job | side | value | layers | min | median | max | outside the valid range |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for job, entries in sorted(learned.items()):
        for e in entries:
            outside = "" if e["outside"] is None else f"{e['outside']} ({e['rule']})"
            lines.append(f"| `{job}` | {e['side']} | {e['name']} | {e['layers']} | {_number(e['min'], 4)} | "
                         f"{_number(e['median'], 4)} | {_number(e['max'], 4)} | {outside} |")
    return "\n".join(lines) + "\n"


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
