"""qrun-report on a sweep folder: table rows, gap to the full-precision baseline, CSV, and the three plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from conftest import run_training
from qrun.errors import QrunError
from qrun.report import build_report, learned_alphas, main, read_scalars, short_names, top1_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_job(root: Path, name: str, results: dict | None, config: dict, curve: list[float] = (),
             alphas: dict[str, tuple[float, float]] | None = None) -> Path:
    """A job folder as qrun leaves it: Hydra's saved config, maybe results.json, TensorBoard events."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if curve or alphas:
        writer = SummaryWriter(str(job / "tb"))
        for epoch, top1 in enumerate(curve, start=1):
            writer.add_scalar("val/top1", top1, epoch)
            for layer, (weight, act) in (alphas or {}).items():
                writer.add_scalar(f"quant/{layer}/weight/alpha", weight * epoch, epoch)
                writer.add_scalar(f"quant/{layer}/act/alpha", act * epoch, epoch)
        writer.close()
    return job


def config(quant: str, bits: int, quantize_input: bool = True) -> dict:
    return {"model": {"name": "cnn_bn"}, "dataset": {"name": "fashion_mnist"}, "quant": {"name": quant},
            "bits": bits, "w_bits": "${bits}", "a_bits": "${bits}", "quantize_input": quantize_input, "epochs": 2}


def finished(quant: str, bits: int, top1: float, **extra) -> dict:
    fp = quant == "none"
    return {"status": "finished", "mode": "train", "model": "cnn_bn", "dataset": "fashion_mnist", "quant": quant,
            "w_bits": 32 if fp else bits, "a_bits": 32 if fp else bits, "quantize_input": not fp, "top1": top1,
            "top5": 99.0, "best_top1": top1 + 0.5, "params": 50282, "macs": 3869824,
            "bops": 3869824 * (1024 if fp else bits * bits), "size_bytes": 201128 if fp else 30000, "epoch": 2,
            "wall_time_s": 12.5, **extra}


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "grid"
    fake_job(root, "quant-none", finished("none", 4, 90.0), config("none", 4), curve=[85.0, 90.0])
    fake_job(root, "bits-2+quant-dsq", finished("dsq", 2, 80.0), config("dsq", 2), curve=[70.0, 80.0],
             alphas={"features.4": (0.1, 0.2)})
    fake_job(root, "bits-4+quant-dsq", finished("dsq", 4, 88.0), config("dsq", 4), curve=[84.0, 88.0],
             alphas={"features.4": (0.05, 0.15)})
    fake_job(root, "bits-4+quant-xnor", {"status": "failed", "error": "QrunError: quantizer 'xnor' does not "
                                          "support weight bits=4; accepted: 1"}, config("xnor", 4))
    interrupted = fake_job(root, "bits-2+quant-lsq", None, config("lsq", 2), curve=[60.0])
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "last.pt").write_bytes(b"")
    return root


def tables(text: str) -> list[dict[str, dict[str, str]]]:
    """Every markdown table of a report: {job cell without backticks and seeds: {column: cell}}."""
    found, header = [], None
    for line in text.splitlines() + [""]:
        cells = [c.strip() for c in line.split("|")[1:-1]] if line.startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = cells
            found.append({})
        elif not set(line) <= set("|-: "):
            found[-1][cells[0].split("`")[1] if "`" in cells[0] else cells[0]] = dict(zip(header, cells))
    return found


def test_report_table_csv_and_plots(sweep: Path) -> None:
    report = build_report(sweep)
    text = report.markdown.read_text()
    results, without = [t for t in tables(text) if "job" in next(iter(t.values()), {})][:2]
    assert set(results) == {"quant-none", "bits-2+quant-dsq", "bits-4+quant-dsq"}
    row = results["bits-2+quant-dsq"]
    assert row["W/A bits"] == "2/2" and row["top-1"] == "80.00" and row["best top-1"] == "80.50 (test)"
    assert row["gap to FP"] == "-10.00" and row["BOPs"] == "15.48M" and row["MACs"] == "3.87M"
    assert row["epochs"] == "2/2" and row["n"] == "1" and row["FP baseline"] == "`quant-none`"
    assert results["quant-none"]["gap to FP"] == "baseline" and results["quant-none"]["W/A bits"] == "32/32"
    # Jobs without a result are listed apart, with their status.
    assert set(without) == {"bits-4+quant-xnor", "bits-2+quant-lsq"}
    assert without["bits-4+quant-xnor"]["status"].startswith("failed: QrunError: quantizer 'xnor'")
    lsq = without["bits-2+quant-lsq"]
    assert (lsq["status"], lsq["W/A bits"]) == ("incomplete", "2/2")
    assert text.index("`quant-none`") < text.index("`bits-2+quant-dsq`")  # baseline row first
    assert "5 jobs: 1 failed, 3 finished, 1 incomplete; 3 experiments." in text

    rows = {r["job"]: r for r in csv.DictReader(report.csv.open())}
    assert float(rows["bits-4+quant-dsq"]["gap_top1"]) == pytest.approx(-2.0)
    assert rows["bits-4+quant-dsq"]["bops"] == str(3869824 * 16)
    assert rows["bits-2+quant-lsq"]["status"] == "incomplete"

    assert {p.name for p in report.plots} == {"top1_vs_bits.png", "training_curves.png", "dsq_alpha.png"}
    for plot in report.plots:
        assert plot.read_bytes().startswith(PNG_MAGIC) and plot.stat().st_size > 5000
        assert f"![{plot.name}]({plot.name})" in text
    # The DSQ alpha table holds the last logged values (epoch 2 = 2 x the per-epoch factor).
    assert "| features.4 | 0.2000 | 0.4000 |" in text and "| features.4 | 0.1000 | 0.3000 |" in text


def test_learned_values_table_counts_layers_outside_the_valid_range(tmp_path: Path) -> None:
    root = tmp_path / "multirun" / "learned"
    logged = {"dsq": {"a.conv/weight/alpha": 0.5, "a.conv/act/alpha": 0.2, "b.conv/act/alpha": 0.0001,
                      "a.conv/weight/lower": -1.0, "a.conv/weight/upper": -1.5, "b.conv/weight/lower": -1.0,
                      "b.conv/weight/upper": 1.0},
              "lsq": {"a.conv/weight/step": 0.01, "b.conv/weight/step": -0.002, "a.conv/act/step": 0.1}}
    for quant, values in logged.items():
        job = fake_job(root, f"quant-{quant}", finished(quant, 4, 85.0), config(quant, 4))
        writer = SummaryWriter(str(job / "tb"))
        for tag, value in values.items():
            writer.add_scalar(f"quant/{tag}", value * 3, 1)  # overwritten by the last logged value
            writer.add_scalar(f"quant/{tag}", value, 2)
        writer.close()
    text = build_report(root).markdown.read_text()
    learned = tables(text.split("## Learned quantizer values")[1])[0]
    assert "## Learned quantizer values" in text
    lines = [line for line in text.splitlines() if line.startswith("| `quant-")]
    assert "| `quant-dsq` | act | alpha | 2 | 0.0001 | 0.1001 | 0.2000 | 1 (at a bound of [1e-4, 0.5]) |" in lines
    assert "| `quant-dsq` | weight | alpha | 1 | 0.5000 | 0.5000 | 0.5000 | 1 (at a bound of [1e-4, 0.5]) |" in lines
    assert "| `quant-dsq` | weight | upper | 2 | -1.5000 | -0.2500 | 1.0000 | 1 (u <= l) |" in lines
    assert "| `quant-lsq` | weight | step | 2 | -0.0020 | 0.0040 | 0.0100 | 1 (<= 0) |" in lines
    assert "| `quant-lsq` | act | step | 1 | 0.1000 | 0.1000 | 0.1000 | 0 (<= 0) |" in lines
    assert set(learned) == {"quant-dsq", "quant-lsq"}


def recipe_config(quant: str, bits: int, seed: int = 0, epochs: int = 2, lr: float = 0.001,
                  train_samples: int = 3000, overrides: dict | None = None) -> dict:
    """A saved config as Hydra writes it, with the keys a baseline must share."""
    return {"model": {"name": "cnn_bn", "options": {}},
            "dataset": {"name": "fashion_mnist", "train_samples": train_samples, "val_samples": 1000,
                        "val_split": None, "subset_seed": 0, "augment": False},
            "quant": {"name": quant, "first_last": "fp", "layer_overrides": overrides or {}, "options": {}},
            "optimizer": {"name": "adam", "lr": lr}, "scheduler": {"name": "cosine", "warmup_epochs": 0.0},
            "bits": bits, "w_bits": "${bits}", "a_bits": "${bits}", "quantize_input": quant != "none",
            "epochs": epochs, "batch_size": 128, "init_from": None, "seed": seed, "mode": "train"}


def test_baselines_share_the_recipe_and_seeds_are_aggregated(tmp_path: Path) -> None:
    root = tmp_path / "multirun" / "recipes"
    for seed, top1 in ((0, 90.0), (1, 92.0)):
        fake_job(root, f"quant-none+seed-{seed}", finished("none", 4, top1, seed=seed), recipe_config("none", 4, seed))
    # Same recipe, diverged: never part of the baseline (it would drag the mean to 64).
    fake_job(root, "quant-none+seed-2", finished("none", 4, 10.0, seed=2, train_loss=float("nan")),
             recipe_config("none", 4, 2))
    fake_job(root, "epochs-8+quant-none", finished("none", 4, 95.0, epoch=8), recipe_config("none", 4, epochs=8))
    fake_job(root, "optimizer.lr-0.01+quant-none", finished("none", 4, 70.0), recipe_config("none", 4, lr=0.01))
    for seed, top1 in ((0, 88.0), (1, 89.0), (2, 90.0)):
        fake_job(root, f"bits-4+quant-dsq+seed-{seed}", finished("dsq", 4, top1, seed=seed),
                 recipe_config("dsq", 4, seed))
    fake_job(root, "bits-4+epochs-8+quant-dsq", finished("dsq", 4, 94.0, epoch=8), recipe_config("dsq", 4, epochs=8))
    fake_job(root, "bits-4+dataset.train_samples-1000+quant-lsq", finished("lsq", 4, 85.0),
             recipe_config("lsq", 4, train_samples=1000))
    mixed_bops = 3869824 * 16 + 3612672 * 16
    fake_job(root, "bits-4+quant-dsq+quant.layer_overrides-features.4.w_bits.8",
             finished("dsq", 4, 89.5, layer_bits=["W8A4", "W4A4"], bops=mixed_bops),
             recipe_config("dsq", 4, overrides={"features.4": {"w_bits": 8}}))
    fake_job(root, "bits-4+quant-xnor", {"status": "failed", "error": "QrunError: no"}, recipe_config("xnor", 4))

    report = build_report(root)
    text = report.markdown.read_text()
    results, without = tables(text)[:2]
    fp = results["quant-none"]
    assert (fp["n"], fp["top-1"], fp["gap to FP"]) == ("2", "91.00 ± 1.41", "baseline")
    assert fp["job"] == "`quant-none` seeds 0, 1"
    dsq = results["bits-4+quant-dsq"]
    assert (dsq["n"], dsq["top-1"], dsq["gap to FP"], dsq["FP baseline"]) == ("3", "89.00 ± 1.00", "-2.00",
                                                                               "`quant-none` (n=2)")
    long = results["bits-4+epochs-8+quant-dsq"]
    assert (long["gap to FP"], long["FP baseline"]) == ("-1.00", "`epochs-8+quant-none`")
    lsq = results["bits-4+dataset.train_samples-1000+quant-lsq"]
    assert lsq["gap to FP"] == "-"
    assert lsq["FP baseline"] == "none: no full-precision run with the same model, data, epochs and recipe"
    mixed = results["bits-4+quant-dsq+quant.layer_overrides-features.4.w_bits.8"]
    assert mixed["W/A bits"] == "4/4 mixed (W8A4 W4A4)" and mixed["BOPs"] == f"{mixed_bops / 1e6:.2f}M"
    assert mixed["gap to FP"] == "-1.50"
    assert results["optimizer.lr-0.01+quant-none"]["gap to FP"] == "baseline"
    assert set(without) == {"quant-none+seed-2", "bits-4+quant-xnor"}
    assert without["quant-none+seed-2"]["status"] == "diverged"
    assert "12 jobs: 1 diverged, 1 failed, 10 finished; 7 experiments." in text

    rows = {r["job"]: r for r in csv.DictReader(report.csv.open())}
    assert float(rows["bits-4+quant-dsq+seed-0"]["gap_top1"]) == pytest.approx(88.0 - 91.0)
    assert rows["bits-4+quant-dsq+seed-2"]["baseline"] == "quant-none (n=2)"
    assert rows["quant-none+seed-2"]["gap_top1"] == "" and rows["quant-none+seed-2"]["status"] == "diverged"


def test_calibrated_runs_compare_with_the_float_run_they_read(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    float_job = fake_job(root, "float", finished("none", 8, 91.0), recipe_config("none", 8))
    ptq = {**recipe_config("affine", 8), "mode": "calibrate"}
    fake_job(root, "ptq", finished("affine", 8, 90.25, mode="calibrate", epoch=0,
                                   checkpoint=str(float_job / "checkpoints" / "best.pt")), ptq)
    summary = {row["job"]: row for row in build_report(root).summary}
    assert summary["ptq"]["gap_top1"] == pytest.approx(-0.75) and summary["ptq"]["baseline"] == "`float`"


def test_qat_from_a_float_run_compares_with_the_run_it_started_from(tmp_path: Path) -> None:
    """The two-step recipe: QAT jobs with another optimizer and epochs, init_from= the float run (absolute, or
    relative to where the sweep ran); one whose float run lives elsewhere says so."""
    root = tmp_path / "multirun" / "table"
    float_job = fake_job(root, "float", finished("none", 4, 92.0, epoch=8), recipe_config("none", 4, epochs=8))
    fake_job(root / "qat", "bits-4+quant-lsq", finished("lsq", 4, 91.5, epoch=3),
             {**recipe_config("lsq", 4, epochs=3, lr=0.01), "init_from": str(float_job)})
    fake_job(root / "qat", "bits-2+quant-lsq", finished("lsq", 2, 90.0, epoch=3),
             {**recipe_config("lsq", 2, epochs=3, lr=0.01), "init_from": "multirun/table/float/checkpoints/best.pt"})
    fake_job(root / "qat", "bits-1+quant-xnor", finished("xnor", 1, 70.0, epoch=3),
             {**recipe_config("xnor", 1, epochs=3, lr=0.01), "init_from": "multirun/elsewhere/float"})
    summary = {row["jobs"][0]: row for row in build_report(root).summary}
    assert summary["qat/bits-4+quant-lsq"]["gap_top1"] == pytest.approx(-0.5)
    assert summary["qat/bits-2+quant-lsq"]["gap_top1"] == pytest.approx(-2.0)
    assert summary["qat/bits-2+quant-lsq"]["baseline"] == "`float`"
    xnor = summary["qat/bits-1+quant-xnor"]
    assert xnor["gap_top1"] is None and "init_from=multirun/elsewhere/float) is not in this folder" in xnor["baseline"]


def test_report_reads_a_real_training_run(tmp_path: Path, fashion_mnist_available: None) -> None:
    job = tmp_path / "sweep" / "bits-2+quant-dsq"
    results = run_training(["dataset.train_samples=256", "dataset.val_samples=128", "epochs=2", "batch_size=64",
                            "quant=dsq", "bits=2", "quantize_input=true"], job)
    scalars = read_scalars(job / "tb")
    assert [step for step, _ in scalars["test/top1"]] == [1, 2]
    assert scalars["test/top1"][-1][1] == pytest.approx(results["top1"])
    alphas = learned_alphas(scalars)
    assert alphas and all(set(sides) == {"weight", "act"} for sides in alphas.values())
    report = build_report(tmp_path / "sweep", out=tmp_path / "report")
    assert report.rows[0]["top1"] == pytest.approx(results["top1"])
    assert report.rows[0]["bops"] == results["bops"]
    assert (tmp_path / "report" / "dsq_alpha.png").is_file()


def test_table_names_keep_only_what_varies() -> None:
    names = ["s/bits-2+epochs-2+quant-dsq", "s/bits-4+epochs-2+quant-dsq", "s/epochs-2+quant-none"]
    assert list(short_names(names).values()) == ["bits-2+quant-dsq", "bits-4+quant-dsq", "quant-none"]
    assert short_names(["epochs-2"]) == {"epochs-2": "epochs-2"}


def test_top1_lines_split_on_every_swept_key_but_bits() -> None:
    def row(job: str, quant: str, bits: int, top1: float) -> dict:
        return {"job": f"grid/{job}", "quant": quant, "w_bits": bits, "top1": top1, "quantize_input": True,
                "model": "cnn_bn", "dataset": "fashion_mnist"}

    rows = [row("bits-2+quant.first_last-fp+quant-dsq+quantize_input-True", "dsq", 2, 91.9),
            row("bits-4+quant.first_last-fp+quant-dsq+quantize_input-True", "dsq", 4, 92.1),
            row("bits-2+quant.first_last-quantize+quant-dsq+quantize_input-True", "dsq", 2, 88.3),
            row("bits-4+quant.first_last-quantize+quant-dsq+quantize_input-True", "dsq", 4, 91.0),
            row("bits-4+quant.first_last-fp+quant-lsq+quantize_input-True", "lsq", 4, 92.5)]
    assert top1_series(rows, several_datasets=False) == {
        "dsq quant.first_last-fp": [(2, 91.9), (4, 92.1)],
        "dsq quant.first_last-quantize": [(2, 88.3), (4, 91.0)],
        "lsq quant.first_last-fp": [(4, 92.5)]}
    # A swept quantize_input is already told by the "(W only)" suffix.
    weights_only = {**row("bits-4+quant-lsq+quantize_input-False", "lsq", 4, 92.0), "quantize_input": False}
    assert top1_series([weights_only, row("bits-4+quant-lsq+quantize_input-True", "lsq", 4, 91.5)],
                       several_datasets=False) == {"lsq": [(4, 91.5)], "lsq (W only)": [(4, 92.0)]}
    # Runs outside a sweep (timestamped folders) share one line per quantizer.
    plain = [row("2026-11-22/10-00-00", "lsq", 2, 90.0), row("2026-11-22/11-00-00", "lsq", 4, 91.0)]
    assert top1_series(plain, several_datasets=False) == {"lsq": [(2, 90.0), (4, 91.0)]}


def test_report_cli_refuses_a_folder_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"qrun-report: error: no qrun jobs under {tmp_path}" in capsys.readouterr().err
    with pytest.raises(QrunError, match="is not a directory"):
        build_report(tmp_path / "missing")
