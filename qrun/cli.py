"""The `qrun` command: Hydra composes the config, the trainer runs it; bad input ends in one line, not a traceback."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qrun.config import register_configs
from qrun.errors import QrunError

register_configs()
log = logging.getLogger("qrun")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _job(cfg: DictConfig) -> Optional[dict[str, Any]]:
    from qrun.trainer import RESULTS_FILE, run  # imported here so `qrun --help` stays fast

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        results = run(cfg)
    except QrunError as error:
        if not multirun:
            print(f"qrun: error: {error}", file=sys.stderr)
            sys.exit(2)
        # In a sweep, one bad job is recorded and the others go on.
        log.error("job failed: %s", error)
        _record_failure(Path(HydraConfig.get().runtime.output_dir) / RESULTS_FILE, error)
        return None
    except Exception as error:
        if not multirun:
            raise
        log.exception("job failed")
        _record_failure(Path(HydraConfig.get().runtime.output_dir) / RESULTS_FILE, error)
        return None
    log.info("top1 %.2f  best %.2f  (%s)", results["top1"], results["best_top1"], results["output_dir"])
    return results


def _record_failure(path: Path, error: BaseException) -> None:
    if not getattr(error, "record_in_folder", True):  # qrun.lock.FolderLocked: the folder belongs to a live run
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    status = getattr(error, "status", "failed")  # "diverged" for qrun.guard.Diverged
    path.write_text(json.dumps({"status": status, "error": f"{type(error).__name__}: {error}"}, indent=2))


def main() -> None:
    _job()


if __name__ == "__main__":
    main()
