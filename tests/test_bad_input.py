"""Bad input, table-driven: every case ends in exit code 2 and one stderr line `qrun: error: ...` naming it.

Cases run `qrun.cli.main` in-process (a fresh Hydra state each time), which is what the console script runs;
tests/test_cli.py and the subprocess cases below check the installed script itself. A refused run leaves no
folder behind.
"""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from qrun import checkpoint, cli
from qrun.config import MODEL_OPTIONS, QUANT_OPTIONS, LAYER_OVERRIDE_KEYS

MARKER = "executed-by-pickle"

# (arguments, fragment the single error line must hold). `{tmp}` is the test's folder, `{ck}` its checkpoints.
CASES: list[tuple[str, str]] = [
    # Unknown group options and wrong types: Hydra's several-line messages become one line.
    ("quant=bogus", "unknown quant option 'bogus' (no configs/quant/bogus.yaml); accepted: affine, dorefa, dsq"),
    ("model=resnet21", "unknown model option 'resnet21'"),
    ("dataset=svhn", "unknown dataset option 'svhn'"),
    ("optimizer=lion", "unknown optimizer option 'lion' (no configs/optimizer/lion.yaml); accepted: adam, adamw"),
    ("scheduler=step", "unknown scheduler option 'step' (no configs/scheduler/step.yaml); accepted: constant"),
    ("hydra/launcher=bogus", "unknown hydra/launcher option 'bogus'"),
    ("mode=bogus", "mode=bogus: Invalid value 'bogus', expected one of [train, evaluate, calibrate, export]"),
    ("device=tpu", "device=tpu: Invalid value 'tpu'"),
    ("bits=four", "bits=four: Value 'four' of type 'str' could not be converted to Integer"),
    ("epochs=1.5", "epochs=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    ("batch_size=abc", "batch_size=abc: Value 'abc'"),
    ("quantize_input=maybe", "quantize_input=maybe: Value 'maybe' is not a valid bool"),
    ("optimizer.lr=abc", "optimizer.lr=abc: Value 'abc'"),
    ("dataset.mean=[a]", "dataset.mean=[a]: Value 'a'"),
    ("bits=[1,2]", "bits=[1,2]"),
    ("resume=a{b", "cannot parse the overrides"),
    ("-m quant=dsq,bogus", "unknown quant option 'bogus'"),
    ("-m device=cpu,auto", "cannot sweep device: left out of job folder names"),
    ("--bogus-flag", "unrecognized arguments: --bogus-flag; accepted flags: see qrun --hydra-help"),
    ("--cfg jobs", "argument --cfg/-c: invalid choice: 'jobs'"),
    ("-m --cfg job bits=2,4", "--multirun and --cfg exclude each other; accepted: one of --run, --multirun (-m)"),
    ("-m bits=2,40", "bits=40 is out of range; accepted: an integer, 1 <= value <= 16 (job bits=40)"),
    # A closed schema: unknown keys, with or without '+'.
    ("foo=1", "unknown key 'foo' (the config schema is closed); accepted: a_bits, amp"),
    ("quant.bogus=1", "unknown key 'quant.bogus' (the config schema is closed); accepted in quant: first_last"),
    ("+foo=1", "unknown key 'foo' (the config schema is closed)"),
    ("+bits_w=4", "unknown key 'bits_w'"),
    ("+quant.bogus=1", "unknown key 'quant.bogus'"),
    ("+dataset.foo=1", "unknown key 'dataset.foo' (the config schema is closed); accepted in dataset: augment"),
    ("+optimizer.lrr=0.1", "unknown key 'optimizer.lrr'"),
    ("+scheduler.foo=1", "unknown key 'scheduler.foo'"),
    ("+model.foo=1", "unknown key 'model.foo'"),
    ("+model.options.bogus=1", "unknown model.options key(s) bogus for model cnn_bn; accepted: widths, image_size"),
    ("+model.options.width=[8,16]", "unknown model.options key(s) width for model cnn_bn"),
    ("model=resnet20 +model.options.widths=[8]", "unknown model.options key(s) widths for model resnet20; "
                                                  "accepted: shortcut"),
    ("model=nin +model.options.drop=0.1", "for model nin; accepted: dropout"),
    ("quant=dsq +quant.options.bogus=1", "unknown quant.options key(s) bogus for quantizer 'dsq'; accepted: alpha"),
    ("quant=lsq +quant.options.alpha=0.2", "for quantizer 'lsq'; accepted: none"),
    ("+quant.options.alpha=0.2", "for quantizer 'none'; accepted: none"),
    # Every ranged field of the schema, on each side it has.
    ("bits=0", "bits=0 is out of range; accepted: an integer, 1 <= value <= 16"),
    ("bits=17", "bits=17 is out of range"),
    ("w_bits=0", "w_bits=0 is out of range"),
    ("w_bits=17", "w_bits=17 is out of range"),
    ("a_bits=0", "a_bits=0 is out of range"),
    ("a_bits=33", "a_bits=33 is out of range"),
    ("epochs=0", "epochs=0 is out of range; accepted: a positive integer"),
    ("epochs=-3", "epochs=-3 is out of range"),
    ("batch_size=0", "batch_size=0 is out of range"),
    ("eval_batch_size=0", "eval_batch_size=0 is out of range"),
    ("calib_batches=0", "calib_batches=0 is out of range"),
    ("threads=0", "threads=0 is out of range; accepted: null (automatic) or a positive integer"),
    ("workers=-1", "workers=-1 is out of range; accepted: null (automatic) or an integer >= 0"),
    ("log_every_percent=150", "log_every_percent=150.0 is out of range; accepted: a finite number, 0 <= value <= 100"),
    ("log_every_s=-5", "log_every_s=-5.0 is out of range; accepted: a finite number, value >= 0"),
    ("seed=-1", "seed=-1 is out of range; accepted: an integer, 0 <= value <= 4294967295"),
    ("seed=4294967296", "seed=4294967296 is out of range"),
    ("label_smoothing=1.0", "label_smoothing=1.0 is out of range; accepted: a finite number, 0 <= value < 1"),
    ("label_smoothing=-0.1", "label_smoothing=-0.1 is out of range"),
    ("dataset.train_samples=0", "dataset.train_samples=0 is out of range; accepted: null (all) or a positive integer"),
    ("dataset.val_samples=-5", "dataset.val_samples=-5 is out of range"),
    ("dataset.subset_seed=-1", "dataset.subset_seed=-1 is out of range"),
    ("dataset=fake dataset.num_classes=0", "dataset.num_classes=0 is out of range"),
    ("dataset=fake dataset.in_channels=0", "dataset.in_channels=0 is out of range"),
    ("dataset=fake dataset.image_size=0", "dataset.image_size=0 is out of range"),
    ("quant.init_batches=-1", "quant.init_batches=-1 is out of range"),
    ("quant.lr_scale=0", "quant.lr_scale=0.0 is out of range; accepted: a finite number, value > 0"),
    ("quant.lr_scale=-1", "quant.lr_scale=-1.0 is out of range"),
    ("quant.lr_scale=inf", "quant.lr_scale=inf is out of range"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is out of range; accepted: a finite number, value > 0"),
    ("optimizer.lr=0", "optimizer.lr=0.0 is out of range"),
    ("optimizer.lr=nan", "optimizer.lr=nan is out of range"),
    ("optimizer.lr=inf", "optimizer.lr=inf is out of range"),
    ("optimizer=sgd optimizer.momentum=-0.5", "optimizer.momentum=-0.5 is out of range; accepted: a finite number, "
                                             "0 <= value < 1"),
    ("optimizer=sgd optimizer.momentum=1.0", "optimizer.momentum=1.0 is out of range"),
    ("optimizer.weight_decay=-1e-4", "optimizer.weight_decay=-0.0001 is out of range; accepted: a finite number, "
                                     "value >= 0"),
    ("optimizer.weight_decay=nan", "optimizer.weight_decay=nan is out of range"),
    ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs=-1.0 is out of range"),
    ("scheduler.warmup_epochs=20", "scheduler.warmup_epochs=20.0 exceeds epochs=8; accepted: 0..8"),
    ("scheduler=multistep scheduler.gamma=0", "scheduler.gamma=0.0 is out of range; accepted: a finite number, "
                                              "0 < value <= 1"),
    ("scheduler=multistep scheduler.gamma=-1", "scheduler.gamma=-1.0 is out of range"),
    ("scheduler=multistep scheduler.gamma=2", "scheduler.gamma=2.0 is out of range"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio=2.0 is out of range; accepted: a finite number, "
                                 "0 <= value <= 1"),
    ("scheduler.min_lr_ratio=-0.5", "scheduler.min_lr_ratio=-0.5 is out of range"),
    ("checkpoint_every_steps=0", "checkpoint_every_steps=0 is out of range; accepted: null (at epoch ends only) or "
                                 "a positive integer"),
    ("distill.weight=1.5", "distill.weight=1.5 is out of range; accepted: a finite number, 0 <= value <= 1"),
    ("distill.temperature=0", "distill.temperature=0.0 is out of range; accepted: a finite number, value > 0"),
    ("model=resnet20 model.pretrained=true", "model.pretrained=true has no torchvision weights for model=resnet20"),
    ("model=resnet20 model.options.block=bogus", "unknown model.options.block 'bogus'; accepted: basic, binary"),
    ("preempt.signals=[SIGKILL]", "preempt.signals: 'SIGKILL' is not a signal that can be caught"),
    ("preempt.signals=[SIGBOGUS]", "preempt.signals"),
    # Values that contradict each other or the dataset.
    ("dataset.num_classes=5", "dataset.num_classes=5 contradicts dataset fashion_mnist; accepted: 10"),
    ("dataset.in_channels=3", "dataset.in_channels=3 contradicts dataset fashion_mnist; accepted: 1"),
    ("dataset.image_size=32", "dataset.image_size=32 contradicts dataset fashion_mnist; accepted: 28"),
    ("dataset=cifar100 dataset.root={tmp} dataset.num_classes=10", "dataset.num_classes=10 contradicts dataset "
                                                                   "cifar100; accepted: 100"),
    ("dataset=cifar10 dataset.root={tmp} dataset.in_channels=1", "dataset.in_channels=1 contradicts dataset cifar10"),
    ("dataset=imagenet dataset.root={tmp} dataset.in_channels=1", "dataset.in_channels=1 contradicts dataset imagenet"),
    ("dataset.mean=[0.1,0.2]", "dataset.mean=[0.1,0.2] has 2 value(s); accepted: one per input channel (1 for"),
    ("dataset.std=[0.1,0.2,0.3]", "dataset.std=[0.1,0.2,0.3] has 3 value(s)"),
    ("dataset=cifar10 dataset.root={tmp} dataset.mean=[0.5]", "dataset.mean=[0.5] has 1 value(s)"),
    ("dataset.std=[0]", "dataset.std=[0.0] holds a value <= 0 (inputs are divided by it)"),
    ("dataset.std=[-0.3]", "dataset.std=[-0.3] holds a value <= 0"),
    ("dataset.mean=[nan]", "dataset.mean=[nan] is not finite"),
    ("dataset.train_samples=60001", "dataset.train_samples=60001 exceeds the 60000 training images of "
                                    "fashion_mnist; accepted: null (all) or 1..60000"),
    ("dataset.val_samples=10001", "dataset.val_samples=10001 exceeds the 10000 test images"),
    ("dataset=mnist dataset.root={tmp} dataset.train_samples=70000", "exceeds the 60000 training images of mnist"),
    ("dataset=cifar10 dataset.root={tmp} dataset.train_samples=50001", "exceeds the 50000 training images of cifar10"),
    ("dataset=cifar10", "dataset cifar10 needs dataset.root=<folder>; none was given"),
    ("dataset=imagenet", "dataset imagenet needs dataset.root=<folder>"),
    ("dataset.name=svhn", "unknown dataset 'svhn'; accepted: cifar10, cifar100, fake, fashion_mnist"),
    ("model.name=resnet21", "unknown model 'resnet21'; accepted: cnn, cnn_bn, nin"),
    ("quant.name=bogus", "unknown quantizer 'bogus'; accepted: affine"),
    ("optimizer.name=lion", "unknown optimizer.name 'lion'; accepted: adam, adamw, sgd"),
    ("scheduler.name=step", "unknown scheduler.name 'step'; accepted: constant, cosine, multistep"),
    ("quant.first_last=half", "unknown quant.first_last 'half'; accepted: 8bit, fp, quantize"),
    ("dist_backend=mpi", "unknown dist_backend 'mpi'; accepted: gloo, nccl"),
    ("optimizer=adam optimizer.betas=[0.9]", "optimizer.betas=[0.9] is invalid; accepted: two numbers in [0, 1)"),
    ("optimizer=adamw optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9,1.0] is invalid"),
    ("optimizer=adam optimizer.betas=[-0.1,0.99]", "optimizer.betas=[-0.1,0.99] is invalid"),
    ("optimizer=adam optimizer.betas=[0.9,0.99,0.999]", "optimizer.betas=[0.9,0.99,0.999] is invalid"),
    ("optimizer=sgd optimizer.momentum=0", "optimizer.nesterov=true needs optimizer.momentum > 0"),
    ("scheduler=multistep scheduler.milestones=[5,3]", "scheduler.milestones=[5,3] is not increasing"),
    ("scheduler=multistep scheduler.milestones=[3,3]", "scheduler.milestones=[3,3] is not increasing"),
    ("scheduler=multistep scheduler.milestones=[0,4]", "scheduler.milestones=[0,4] lies outside the run's epochs; "
                                                       "accepted: increasing epochs in 1..epochs=8"),
    ("scheduler=multistep scheduler.milestones=[4,9]", "scheduler.milestones=[4,9] lies outside the run's epochs"),
    ("mode=evaluate", "mode=evaluate needs resume=<checkpoint file or run directory>"),
    ("mode=export", "mode=export needs resume="),
    # Quantizer options with a range, and per-layer overrides.
    ("quant=dsq quant.options.alpha=5", "quant.options.alpha=5 is out of range; accepted: a finite number, "
                                        "0 < value <= 0.5"),
    ("quant=dsq quant.options.alpha=0", "quant.options.alpha=0 is out of range"),
    ("quant=pact quant.options.init_alpha=-1", "quant.options.init_alpha=-1 is out of range; accepted: null (from "
                                               "calibration data) or a finite number, value > 0"),
    ("quant=uniform quant.options.momentum=2", "quant.options.momentum=2 is out of range"),
    ("quant=dorefa quant.options.g_bits=0", "quant.options.g_bits=0 is out of range"),
    ("quant=dorefa quant.options.g_bits=33", "quant.options.g_bits=33 is out of range"),
    ("quant=affine quant.options.averaging_constant=0", "quant.options.averaging_constant=0 is out of range"),
    ("quant=affine quant.options.observer_epochs=-1", "quant.options.observer_epochs=-1 is out of range"),
    ("quant=affine quant.options.per_channel=maybe", "quant.options.per_channel=maybe is invalid; accepted: true or "
                                                     "false"),
    ("quant=xnor bits=1 quant.options.k_scaling=2", "quant.options.k_scaling=2 is invalid"),
    ("+quant.layer_overrides={features.0:{w_bits:x}}", "quant.layer_overrides.features.0.w_bits=x is invalid; "
                                                       "accepted: an integer, 1 <= value <= 16"),
    ("+quant.layer_overrides={features.0:{a_bits:0}}", "quant.layer_overrides.features.0.a_bits=0 is invalid"),
    ("+quant.layer_overrides={features.0:{w_bits:17}}", "quant.layer_overrides.features.0.w_bits=17 is invalid"),
    ("+quant.layer_overrides={features.0:{bits:8}}", "unknown key(s) bits in quant.layer_overrides.features.0; "
                                                     "accepted: w_bits, a_bits, quantize_input, skip"),
    ("+quant.layer_overrides={features.0:8}", "quant.layer_overrides.features.0=8 is invalid; accepted: a mapping"),
    ("+quant.layer_overrides={features.0:{skip:maybe}}", "quant.layer_overrides.features.0.skip=maybe is invalid; "
                                                         "accepted: true or false"),
    ("quant.layer_overrides={a:1}", "Could not override 'quant.layer_overrides'. To append to your config use "
                                    "+quant.layer_overrides={a:1}"),
    # Folders and launchers.
    ("output_dir={tmp}/a_file", "output_dir={tmp}/a_file is a file; accepted: a folder (existing or new)"),
    ("output_dir={tmp}/a_file/sub", "output_dir={tmp}/a_file/sub: {tmp}/a_file is a file, so the folder cannot be"),
    ("hydra.run.dir={tmp}/a_file", "hydra.run.dir={tmp}/a_file is a file"),
    ("-m hydra.sweep.dir={tmp}/a_file bits=2,4", "hydra.sweep.dir={tmp}/a_file is a file"),
    ("hydra/launcher=local hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0 is invalid; accepted: a positive "
                                                     "number of parallel jobs, or -1 (one per core)"),
    ("-m hydra/launcher=local hydra.launcher.n_jobs=0 bits=2,4", "hydra.launcher.n_jobs=0 is invalid"),
    ("hydra.launcher.n_jobs=2", "Could not override 'hydra.launcher.n_jobs'"),
    # Checkpoints: missing, and every kind of bad file.
    ("init_from={tmp}/missing.pt", "init_from={tmp}/missing.pt does not exist; init_from= takes a checkpoint"),
    ("resume={tmp}/missing", "resume={tmp}/missing does not exist; resume= takes a checkpoint"),
    ("init_from={tmp}/empty_dir", "no last.pt or best.pt in {tmp}/empty_dir; init_from= takes a checkpoint file"),
    ("resume={ck}/empty.pt", "resume: checkpoint {ck}/empty.pt is empty (0 bytes"),
    ("init_from={ck}/empty.pt", "init_from: checkpoint {ck}/empty.pt is empty"),
    ("resume={ck}/truncated.pt", "resume: cannot read checkpoint {ck}/truncated.pt, truncated or not a torch file"),
    ("mode=evaluate resume={ck}/truncated.pt", "cannot read checkpoint {ck}/truncated.pt"),
    ("resume={ck}/text.pt", "resume: {ck}/text.pt is not a checkpoint that a weights-only load accepts"),
    ("resume={ck}/malicious.pt", "resume: {ck}/malicious.pt is not a checkpoint that a weights-only load accepts "
                                 "(a foreign, damaged or malicious file; nothing in it was executed)"),
    ("init_from={ck}/malicious_raw.pkl", "init_from: {ck}/malicious_raw.pkl is not a checkpoint that a weights-only"),
    ("resume={ck}/foreign.pt", "resume: {ck}/foreign.pt is not a qrun checkpoint (format 1); it holds ['fc.bias'"),
    ("resume={ck}/tensor.pt", "is not a qrun checkpoint (format 1); it holds Tensor"),
    ("resume={ck}/future.pt", "{ck}/future.pt is not a qrun checkpoint (format 1)"),
    ("resume={ck}/no_architecture.pt", "resume: checkpoint {ck}/no_architecture.pt lacks 'architecture' (a partial"),
    ("mode=evaluate resume={ck}/no_architecture.pt", "lacks 'architecture'"),
    ("resume={ck}/no_rng.pt", "resume: checkpoint {ck}/no_rng.pt lacks 'rng'"),
    ("init_from={ck}/narrow.pt", "init_from: checkpoint {ck}/narrow.pt is a cnn_bn with model.options={widths:"
                                 "[8,16]}, the config has model.options={}; pass the same model.options"),
    ("mode=evaluate resume={ck}/narrow.pt +model.options.widths=[16,32]",
     "resume: checkpoint {ck}/narrow.pt is a cnn_bn with model.options={widths:[8,16]}, the config has "
     "model.options={widths:[16,32]}"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file per kind of bad checkpoint, built the way qrun (or an attacker) would write it."""
    from qrun.models import get_model

    folder = tmp_path_factory.mktemp("checkpoints")
    model = get_model("cnn_bn", num_classes=10, in_channels=1, widths=(8, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {"model": {"name": "cnn_bn", "options": {"widths": [8, 16]}}, "dataset": {"name": "fashion_mnist"}}
    good = checkpoint.build_payload(
        model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
        epoch=1, best_top1=50.0, metrics={"top1": 50.0}, config=config,
        architecture={"model": "cnn_bn", "dataset": "fashion_mnist", "quant": "none", "w_bits": 32, "a_bits": 32,
                      "quantize_input": False})
    checkpoint.atomic_save(good, folder / "narrow.pt")
    (folder / "empty.pt").write_bytes(b"")
    data = (folder / "narrow.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "text.pt").write_text("not a checkpoint\n")
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, folder / "foreign.pt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save({**good, "format_version": 99}, folder / "future.pt")
    torch.save({k: v for k, v in good.items() if k != "architecture"}, folder / "no_architecture.pt")
    torch.save({k: v for k, v in good.items() if k != "rng"}, folder / "no_rng.pt")
    marker = folder / MARKER
    torch.save(_Malicious(marker), folder / "malicious.pt")
    (folder / "malicious_raw.pkl").write_bytes(pickle.dumps(_Malicious(marker)))
    return folder


class _Malicious:
    """Unpickling this runs a shell command: a weights-only load must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_main(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) \
        -> tuple[object, str]:
    """`qrun <args>` in this process, in a fresh Hydra state: (exit code, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["qrun", *args])
    GlobalHydra.instance().clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


def assert_one_line_refusal(code: object, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("qrun: error: "), err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("args, fragment", CASES, ids=[args for args, _ in CASES])
def test_bad_input_is_refused_in_one_line_before_any_folder(args: str, fragment: str, bad_files: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{ck}", str(bad_files))

    code, err = run_main([fill(a) for a in args.split()], tmp_path, monkeypatch, capsys)
    assert_one_line_refusal(code, err, fill(fragment))
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    assert not (bad_files / MARKER).exists(), "a pickle in a checkpoint was executed"


def test_the_table_is_large_and_covers_every_ranged_key() -> None:
    from qrun.config import RANGES

    assert len(CASES) >= 100
    covered = " ".join(args for args, _ in CASES)
    missing = [rule.key for rule in RANGES if f"{rule.key}=" not in covered]
    assert not missing, f"ranged keys without a bad-input case: {missing}"


# ------------------------------------------------------------------------ refusals that happen inside the job
def test_missing_data_is_one_line_and_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["dataset.root=/missing/fmnist", "progress=false"], tmp_path, monkeypatch, capsys)
    assert_one_line_refusal(code, err, "Fashion-MNIST not found: no train-images-idx3-ubyte[.gz] in /missing/fmnist")
    assert not (tmp_path / "outputs").exists()


def test_download_without_a_network_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, err = run_main(["dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.download=true",
                          "progress=false"], tmp_path, monkeypatch, capsys)
    assert_one_line_refusal(code, err, "dataset.download=true could not fetch CIFAR10 into")
    assert "Temporary failure in name resolution" in err


@pytest.mark.parametrize("number, reason", [(errno.ENOSPC, "No space left on device"),
                                            (errno.EROFS, "Read-only file system"),
                                            (errno.EACCES, "Permission denied")])
def test_write_errors_are_one_line_naming_the_path(number: int, reason: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import qrun.trainer

    target = tmp_path / "run" / "checkpoints" / "last.pt"

    def failing_write(cfg):
        raise OSError(number, os.strerror(number), str(target))

    monkeypatch.setattr(qrun.trainer, "run", failing_write)
    code, err = run_main([f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert_one_line_refusal(code, err, f"cannot write {target}: {reason}")


def test_a_full_disk_under_torch_save_names_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """torch.save into an open file (checkpoint.atomic_save) raises ENOSPC without a file name: /dev/full shows it."""
    import qrun.trainer

    def save_to_full_disk(cfg):
        with open("/dev/full", "wb") as handle:
            torch.save({"weights": torch.zeros(100_000)}, handle)
            handle.flush()

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(qrun.trainer, "run", save_to_full_disk)
    code, err = run_main([f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert_one_line_refusal(code, err, f"cannot write into {tmp_path / 'run'}: No space left on device")


def test_corrupt_results_json_means_not_finished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from qrun.results import read_results

    for content in ("", "{\"status\": \"fini", "[1, 2]", "\xff\xfe"):
        path = tmp_path / "results.json"
        path.write_bytes(content.encode("latin-1"))
        assert read_results(path) is None
    assert read_results(tmp_path / "absent.json") is None
    (tmp_path / "results.json").write_text('{"status": "finished", "epoch": 3}')
    assert read_results(tmp_path / "results.json") == {"status": "finished", "epoch": 3}
    assert sum("treated as not finished" in r.getMessage() for r in caplog.records) == 4


# --------------------------------------------------------------------- the installed script, several at once
SCRIPT_CASES = [("quant=bogus", "unknown quant option 'bogus'"), ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
                ("+foo=1", "unknown key 'foo'"), ("seed=-1", "seed=-1 is out of range")]


def test_the_console_script_refuses_in_one_line(tmp_path: Path) -> None:
    qrun = Path(sys.executable).parent / "qrun"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    running = [(fragment, subprocess.Popen([str(qrun), args], cwd=tmp_path, env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE))
               for args, fragment in SCRIPT_CASES]
    for fragment, process in running:
        _, err = process.communicate(timeout=120)
        assert_one_line_refusal(process.returncode, err, fragment)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------- tables that stand in for torch imports
def test_option_tables_match_the_real_signatures() -> None:
    """config.py lists model and quantizer options so validation needs no torch; they must equal the code."""
    import inspect

    import torchvision

    from qrun.models import available_models
    from qrun.models.cnn import SmallCNN
    from qrun.models.nin import NIN
    from qrun.models.resnet_cifar import CifarResNet
    from qrun.quant import available_quantizers
    from qrun.quant.base import quantizer_class
    from qrun.quant.policy import OVERRIDE_KEYS

    def params(fn, skip) -> tuple[str, ...]:
        return tuple(p for p in inspect.signature(fn).parameters if p not in skip)

    assert set(MODEL_OPTIONS) == set(available_models())
    assert MODEL_OPTIONS["cnn"] == MODEL_OPTIONS["cnn_bn"] == params(SmallCNN, ("num_classes", "in_channels",
                                                                               "batch_norm"))
    assert MODEL_OPTIONS["nin"] == params(NIN, ("num_classes", "in_channels"))
    assert MODEL_OPTIONS["resnet20"] == params(CifarResNet, ("depth", "num_classes", "in_channels"))
    assert MODEL_OPTIONS["resnet18"] == params(torchvision.models.ResNet, ("block", "layers", "num_classes"))
    assert set(QUANT_OPTIONS) == {"none", *available_quantizers()}
    for name in available_quantizers():
        assert QUANT_OPTIONS[name] == params(quantizer_class(name).__init__, ("self", "bits", "kind")), name
    assert LAYER_OVERRIDE_KEYS == OVERRIDE_KEYS


def test_an_image_folder_subset_beyond_its_size_is_refused_at_load(tmp_path: Path) -> None:
    """ImageFolder sizes are known only once the folder is read: refused then, never silently clamped."""
    from PIL import Image

    from qrun.data import build_datasets
    from qrun.errors import QrunError
    from tests.conftest import compose_config

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.jpg")
    cfg = compose_config(["dataset=imagenet", f"dataset.root={tmp_path}", "dataset.train_samples=3"], tmp_path)
    with pytest.raises(QrunError, match=r"subset of 3 samples exceeds the 2 available; accepted: null \(all\) or 1..2"):
        build_datasets(cfg.dataset)


def test_validation_imports_no_torch() -> None:
    """Refusals are fast because the CLI, the preflight and the schema never import torch (2 s here) themselves."""
    probe = ("import sys\nimport qrun.cli, qrun.preflight, qrun.config, qrun.naming, qrun.callbacks\n"
             "try:\n    qrun.preflight.preflight(['optimizer.lr=-1'])\nexcept Exception as error:\n    print(error)\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["optimizer.lr=-1.0 is out of range; accepted: a finite number, value > 0",
                                        "False"]


@pytest.mark.parametrize("damage", ["", "{\"status\": \"finished\", \"top1\": 9"])
def test_a_damaged_results_json_does_not_jam_its_folder(damage: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Re-running into the folder warns, resumes from the surviving checkpoint and writes a valid results.json."""
    import json

    from tests.conftest import run_training

    tiny = ["dataset=fake", "dataset.train_samples=32", "dataset.val_samples=32", "epochs=1", "batch_size=16"]
    first = run_training(tiny, tmp_path)
    (tmp_path / "results.json").write_text(damage)
    again = run_training(tiny, tmp_path)
    assert any("treated as not finished" in r.getMessage() for r in caplog.records)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["status"] == "finished" and stored["top1"] == again["top1"] == first["top1"]
