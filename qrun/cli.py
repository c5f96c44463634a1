"""The `qrun` command: checks the input, Hydra composes the config, the trainer runs it.

Bad input ends in one line `qrun: error: ...` and exit code 2, before Hydra creates a folder; a sweep whose
jobs failed exits 1 after its summary.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qrun import callbacks
from qrun.config import register_configs
from qrun.errors import QrunError

register_configs()
log = logging.getLogger("qrun")
# Disk full, permission denied, read-only filesystem, quota: the user's to fix, so one line naming the path.
WRITE_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT)
RESULTS_FILE = "results.json"  # = qrun.trainer.RESULTS_FILE, without importing torch
# Run folders that existed before this command (from preflight): a refusal removes only folders it created.
_EXISTING_RUN_DIRS: set[str] = set()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _job(cfg: DictConfig) -> Optional[dict[str, Any]]:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun:
        from qrun.watchdog import die_with_parent

        die_with_parent()
    try:
        from qrun.trainer import run  # imported here so that refusals and `qrun --help` stay fast

        results = run(cfg)
    except QrunError as error:
        return _job_failed(error, str(error), multirun)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        return _job_failed(error, write_error(error), multirun)
    except Exception as error:
        if not multirun:
            raise
        log.exception("job failed")
        _record_failure(_run_dir() / RESULTS_FILE, error)
        return None
    log.info("top1 %s  best %s  (%s)", _percent(results.get("top1")), _percent(results.get("best_top1")),
             results.get("output_dir"))
    return results


def _percent(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"  # a diverged run has no top-1


def _job_failed(error: BaseException, message: str, multirun: bool) -> None:
    if not multirun:
        if getattr(error, "record_in_folder", True):  # qrun.lock.FolderLocked: the folder belongs to a live run
            remove_if_unused(_run_dir())
        refuse(message)
    # In a sweep, one bad job is recorded and the others go on; the sweep exits non-zero at the end.
    log.error("job failed: %s", message)
    try:
        _record_failure(_run_dir() / RESULTS_FILE, error, message)
    except OSError as record_error:  # the disk that made the job fail may refuse this file too
        log.error("could not record the failure: %s", write_error(record_error))
    return None


def write_error(error: OSError) -> str:
    """`cannot write <path>: <reason>`; torch.save into an open file reports no name, then the run folder."""
    where = error.filename or (f"into {_run_dir()}" if HydraConfig.initialized() else "a file")
    return f"cannot write {where}: {error.strerror or error}"


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def remove_if_unused(folder: Path) -> None:
    """A refused run leaves no folder: remove Hydra's run dir when it holds only what Hydra itself wrote."""
    if not folder.is_dir() or str(folder.resolve()) in _EXISTING_RUN_DIRS:
        return
    cwd = Path.cwd().resolve()
    if folder.resolve() == cwd or folder.resolve() in cwd.parents:
        return
    entries = list(folder.iterdir())
    hydra_only = all(e.name == ".hydra" and e.is_dir() or e.suffix == ".log" and e.is_file() for e in entries)
    if hydra_only and all(p.suffix == ".yaml" for p in (folder / ".hydra").glob("*")):
        shutil.rmtree(folder, ignore_errors=True)
        # Then outputs/<date>/ and outputs/ when this run made them: empty folders below the working directory.
        for parent in folder.resolve().parents:
            if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def _record_failure(path: Path, error: BaseException, message: Optional[str] = None) -> None:
    if not getattr(error, "record_in_folder", True):  # qrun.lock.FolderLocked: the folder belongs to a live run
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    status = getattr(error, "status", "failed")  # "diverged" for qrun.guard.Diverged
    text = message or f"{type(error).__name__}: {error}"
    path.write_text(json.dumps({"status": status, "error": text}, indent=2))


def refuse(message: str) -> NoReturn:
    print(f"qrun: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """Console entry point: preflight checks, then Hydra; exit 1 when a sweep had failed jobs."""
    from qrun.preflight import preflight

    try:
        _EXISTING_RUN_DIRS.clear()
        _EXISTING_RUN_DIRS.update(preflight(sys.argv[1:]))
    except QrunError as error:
        refuse(str(error))
    callbacks.reset_sweep_outcome()
    _job()
    failed = callbacks.failed_jobs()
    if failed:
        print(f"qrun: {len(failed)} job(s) of the sweep did not finish: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
