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


def test_report_table_csv_and_plots(sweep: Path) -> None:
    report = build_report(sweep)
    text = report.markdown.read_text()
    lines = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[1:-1]]
             for line in text.splitlines() if line.startswith("| `")}
    assert set(lines) == {"quant-none", "bits-2+quant-dsq", "bits-4+quant-dsq", "bits-4+quant-xnor",
                          "bits-2+quant-lsq"}
    header = [c.strip() for c in text.split("\n| job |")[1].splitlines()[0].split("|")[:-1]]
    header = ["job", *header]
    row = dict(zip(header, lines["bits-2+quant-dsq"]))
    assert row["W/A bits"] == "2/2" and row["top-1"] == "80.00" and row["best top-1"] == "80.50"
    assert row["gap to FP"] == "-10.00" and row["BOPs"] == "15.48M" and row["MACs"] == "3.87M"
    assert row["epochs"] == "2/2" and row["status"] == "finished"
    assert dict(zip(header, lines["quant-none"]))["gap to FP"] == "baseline"
    assert dict(zip(header, lines["quant-none"]))["W/A bits"] == "32/32"
    assert dict(zip(header, lines["bits-4+quant-xnor"]))["status"].startswith("failed: QrunError: quantizer 'xnor'")
    lsq = dict(zip(header, lines["bits-2+quant-lsq"]))
    assert (lsq["status"], lsq["top-1"], lsq["W/A bits"]) == ("incomplete", "-", "2/2")
    assert text.index("`quant-none`") < text.index("`bits-2+quant-dsq`")  # baseline row first
    assert "2 jobs" not in text and "5 jobs: 1 failed, 3 finished, 1 incomplete." in text

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


def test_report_reads_a_real_training_run(tmp_path: Path, fashion_mnist_available: None) -> None:
    job = tmp_path / "sweep" / "bits-2+quant-dsq"
    results = run_training(["dataset.train_samples=256", "dataset.val_samples=128", "epochs=2", "batch_size=64",
                            "quant=dsq", "bits=2", "quantize_input=true"], job)
    scalars = read_scalars(job / "tb")
    assert [step for step, _ in scalars["val/top1"]] == [1, 2]
    assert scalars["val/top1"][-1][1] == pytest.approx(results["top1"])
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
