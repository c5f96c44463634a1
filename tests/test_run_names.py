"""Runs easy to find: folder names that say what ran and type back as resume=, HParams, --help, sweep exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from qrun.config import register_configs
from qrun.naming import encode_value, job_name

register_configs()
QRUN = str(Path(sys.executable).parent / "qrun")
FAKE = ["dataset=fake", "dataset.train_samples=32", "dataset.val_samples=32", "epochs=1", "batch_size=16",
        "progress=false", "quant.init_batches=1"]
OVERRIDES = "+quant.layer_overrides={features.0:{w_bits:8}},{classifier:{skip:true}}"


def qrun(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([QRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


@pytest.mark.parametrize("overrides, suffix", [
    ([], "_cnn_bn_none_fp32"),
    (["bits=2"], "_cnn_bn_none_fp32"),  # quant=none is full precision whatever bits says
    (["quant=dsq", "bits=4", "quantize_input=true"], "_cnn_bn_dsq_w4a4"),
    (["quant=lsq", "w_bits=2", "a_bits=8", "quantize_input=true", "model=nin"], "_nin_lsq_w2a8"),
    (["quant=dsq", "bits=4"], "_cnn_bn_dsq_w4a32"),  # weights only
    (["quant=dsq", "+quant.layer_overrides={classifier:{w_bits:8}}"], "_cnn_bn_dsq_w4a32_mixed"),
])
def test_run_folder_names_say_what_ran(overrides: list[str], suffix: str) -> None:
    with initialize_config_module(config_module="qrun.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    run_dir = str(cfg.hydra.run.dir)
    assert run_dir.startswith("outputs/") and run_dir.endswith(suffix), run_dir
    assert len(Path(run_dir).name) == len("10-00-00") + len(suffix)


def test_job_names_keep_safe_values_and_encode_the_rest() -> None:
    assert job_name(["quant=dsq", "bits=4"], []) == "bits-4+quant-dsq"  # what Hydra's override_dirname gives
    assert job_name(["bits=4", "resume=x", "device=cpu"], ["resume", "device"]) == "bits-4"
    encoded = encode_value("{features.4:{w_bits:8}}")
    assert encoded.startswith("features.4_w_bits_8-") and len(encoded.rsplit("-", 1)[1]) == 8
    assert encode_value("{features.4:{w_bits:2}}") != encoded
    assert encode_value("[30,60]").startswith("30_60-")
    assert encode_value("0.001") == "0.001" and encode_value("-1") == "-1"


def test_help_lists_groups_options_and_main_keys(tmp_path: Path) -> None:
    done = qrun("--help", cwd=tmp_path, timeout=60)
    assert done.returncode == 0
    assert "quant: affine, dorefa, dsq, lsq, none, pact, twn, uniform, xnor" in done.stdout
    assert "model: cnn, cnn_bn, nin, resnet18" in done.stdout
    assert "hydra/launcher: local" in done.stdout
    for key in ("mode ", "resume ", "bits ", "quantize_input ", "epochs ", "optimizer.lr ", "dataset.root "):
        assert f"\n  {key}" in done.stdout, key
    assert "--cfg job --resolve" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_names_every_job_so_it_types_back_and_fails_loudly(tmp_path: Path) -> None:
    """4 jobs: DSQ trains, XNOR at 4 bits fails; per-layer overrides in the names; every folder is resume=-able."""
    done = qrun("-m", "sweep=names", *FAKE, "quant=dsq,xnor", OVERRIDES, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "2 job(s) of the sweep did not finish" in done.stderr
    assert "Traceback" not in done.stderr
    jobs = sorted(p for p in (tmp_path / "multirun" / "names").iterdir() if p.is_dir())
    assert len(jobs) == 4, jobs
    for job in jobs:
        assert not set(job.name) & set("{}[]:,=' \""), job.name
        assert job.name.startswith("+quant.layer_overrides-")
    # Every folder passes back as resume=<path>, unquoted, through the real command line.
    checks = [(job, subprocess.Popen([QRUN, f"resume={job}", "--cfg", "job"], cwd=tmp_path, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for job in jobs]
    for job, process in checks:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert f"resume: {job}\n" in out
    # The finished DSQ jobs registered their hyper-parameters with TensorBoard's HParams dashboard.
    finished = [job for job in jobs if job.name.endswith("quant-dsq")]
    assert len(finished) == 2 and all((job / "results.json").is_file() for job in finished)
    assert_hparams(finished[0] / "tb", {"quant.name": "dsq", "w_bits": 4.0, "a_bits": 4.0, "model.name": "cnn_bn"})


def assert_hparams(tb_dir: Path, expected: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: (v.string_value or v.number_value) for k, v in start.hparams.items()}
    for key, value in expected.items():
        assert values[key] == value, (key, values.get(key))
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/top1", "val/loss", "train/loss"}
    assert "val/top1" in events.Tags()["scalars"]
