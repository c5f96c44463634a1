"""Hydra callbacks: a one-screen summary of a sweep when the multirun ends, and which of its jobs failed."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qrun.errors import QrunError

log = logging.getLogger("qrun")
# Job folders of the last multirun in this process that did not finish; the CLI exits 1 when there are any.
_FAILED: list[str] = []


def reset_sweep_outcome() -> None:
    _FAILED.clear()


def failed_jobs() -> list[str]:
    return list(_FAILED)


def sweep_job_dirs(config: DictConfig, started: float) -> list[Path]:
    """The folders of this invocation's jobs, not older jobs of the same sweep folder.

    With qrun's own job names they follow from the overrides; with a custom `hydra.sweep.subdir`, they are the
    folders whose Hydra config this sweep (re)wrote, since Hydra writes .hydra/ into every job it launches.
    """
    from qrun.naming import job_name
    from qrun.preflight import expand_sweep

    sweep_dir = Path(str(config.hydra.sweep.dir))
    if "qrun_job" in str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")):
        excluded = list(config.hydra.job.config.override_dirname.exclude_keys)
        return [sweep_dir / job_name(job, excluded) for job in expand_sweep(list(config.hydra.overrides.task))]
    return [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.stat().st_mtime >= started - 1]


class SweepSummary(Callback):
    """Guards a multirun's folder names before it starts; after it ends, reports each job's status."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse to sweep a key left out of the job folder names: its jobs would share (and skip) one folder."""
        self._started = time.time()
        from hydra.core.override_parser.overrides_parser import OverridesParser

        excluded = set(config.hydra.job.config.override_dirname.exclude_keys)
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        clashing = sorted(o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group in excluded)
        if clashing:
            error = QrunError(f"cannot sweep {', '.join(clashing)}: left out of job folder names, so its jobs would "
                              f"share one folder; accepted: sweep any key except {', '.join(sorted(excluded))}")
            # Hydra turns a callback's exceptions into warnings and goes on; leaving is the only way to stop it.
            print(f"qrun: error: {error}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qrun.report import build_rows, collect_jobs  # no plotting imports here

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = build_rows(collect_jobs(sweep_dir))
        mine = {str(path.relative_to(sweep_dir)) if path != sweep_dir else sweep_dir.name
                for path in sweep_job_dirs(config, getattr(self, "_started", 0.0))}
        by_job = {row["job"]: row["status"] for row in rows}
        _FAILED[:] = sorted(job for job in mine if by_job.get(job) != "finished")
        lines = []
        for row in rows:
            top1 = f"top1 {row['top1']:.2f}" if row["top1"] is not None else ""
            error = f" {row['error']}" if row["error"] else ""
            lines.append(f"  {row['status']:<11} {row['job']}  {top1}{error}")
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        log.info("sweep %s: %s\n%s\nreport: qrun-report %s", sweep_dir, summary, "\n".join(lines), sweep_dir)
