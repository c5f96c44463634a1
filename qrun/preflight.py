"""Checks that run before Hydra starts a job: bad input is refused in well under a second, and leaves no folder.

`qrun` composes every job's config with Hydra's compose API (a sweep is expanded the way the basic sweeper
expands it), turns Hydra's and OmegaConf's multi-line composition errors into one line, and runs
`qrun.config.validate`. Only `resume=` and `init_from=` import torch here, to look inside the checkpoint.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qrun.config import check_writable_dir, mode_name, validate
from qrun.errors import QrunError

CONFIG_MODULE = "qrun.configs"
# Checkpoint entries each use needs: a training resume restores everything, the others only the weights.
NEEDED_KEYS = {"train": ("model", "architecture", "config", "epoch", "optimizer", "scheduler", "rng"),
               "weights": ("model", "architecture", "config")}


def parse_args(argv: list[str]) -> Any:
    """Hydra's own command-line parser, so qrun reads argv exactly as @hydra.main will."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> None:  # argparse would print its usage block first: several lines
        raise QrunError(f"{message}; accepted flags: see qrun --hydra-help")

    parser.error = refuse  # type: ignore[method-assign]
    return parser.parse_args(argv)


def preflight(argv: list[str]) -> set[str]:
    """Raise QrunError for the first bad job config in argv; return quietly when Hydra should take over.

    Returns the run folders that exist already (resolved paths), which a refusal must never remove.
    """
    args = parse_args(argv)
    modes = [flag for flag in ("run", "multirun", "cfg", "info", "shell_completion") if getattr(args, flag, None)]
    if len(modes) > 1:
        raise QrunError(f"{' and '.join('--' + m.replace('_', '-') for m in modes)} exclude each other; accepted: "
                        "one of --run, --multirun (-m), --cfg, --info, --shell-completion")
    flags = ("help", "hydra_help", "version", "shell_completion", "info", "config_path", "config_dir",
             "experimental_rerun")
    if any(getattr(args, flag, None) for flag in flags):
        return set()  # Hydra's informational flags, or a config tree other than qrun's own
    jobs = expand_sweep(args.overrides) if args.multirun else [list(args.overrides)]
    existing: set[str] = set()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for overrides in jobs:
            cfg = compose_or_refuse(args.config_name or "config", overrides)
            if args.cfg is None:  # --cfg only prints the config: composing is all it needs
                check_job(cfg, sweep=list(args.overrides) if args.multirun else None,
                          where=_job_label(overrides) if args.multirun else "")
                if not args.multirun and Path(str(cfg.hydra.run.dir)).is_dir():
                    existing.add(str(Path(str(cfg.hydra.run.dir)).resolve()))
    return existing


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job of `-m` as its own override list, in the order Hydra's basic sweeper would launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as error:
        raise QrunError(one_line(error)) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_or_refuse(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except MissingConfigException as error:
        raise QrunError(_missing_option(error, overrides)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise QrunError(_composition_error(error, overrides)) from None


def check_job(cfg: DictConfig, sweep: Optional[list[str]] = None, where: str = "") -> None:
    """validate(), Hydra's folders and launcher, and any checkpoint the job will read.

    `sweep`: the command line's overrides of a multirun, sweep syntax intact (the job itself sees one value).
    """
    try:
        job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
        validate(job)
        check_hydra(cfg, sweep)
        typed_options = explicit_model_options(cfg)
        if job.get("resume"):
            path, payload = check_checkpoint("resume", job.resume, job,
                                             "train" if mode_name(job) == "train" else "weights", typed_options)
            check_resume_overrides(cfg, job, path, payload)
        if job.get("init_from"):
            check_checkpoint("init_from", job.init_from, job, "weights", typed_options)
    except QrunError as error:
        raise QrunError(f"{error} (job {where})" if where else str(error)) from None
    except OmegaConfBaseException as error:  # an interpolation that does not resolve, a missing `???` value
        raise QrunError(one_line(error) + (f" (job {where})" if where else "")) from None


def check_hydra(cfg: DictConfig, sweep: Optional[list[str]]) -> None:
    if sweep is not None:
        check_swept_keys(cfg, sweep)
    launcher = cfg.hydra.get("launcher")
    if launcher is not None and "n_jobs" in launcher:
        n_jobs = launcher.n_jobs
        if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0):
            raise QrunError(f"hydra.launcher.n_jobs={n_jobs} is invalid; accepted: a positive number of parallel "
                            "jobs, or -1 (one per core), -2 (all cores but one), ...")
    if sweep is not None:
        check_writable_dir("hydra.sweep.dir", cfg.hydra.sweep.dir)
    elif not cfg.get("output_dir"):
        check_writable_dir("hydra.run.dir", cfg.hydra.run.dir)


def check_swept_keys(cfg: DictConfig, sweep: list[str]) -> None:
    """A key left out of the job folder names cannot be swept: its jobs would share (and skip) one folder."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    parsed = OverridesParser.create().parse_overrides(sweep)
    clashing = sorted(o.key_or_group for o in parsed if o.is_sweep_override() and o.key_or_group in excluded)
    if clashing:
        raise QrunError(f"cannot sweep {', '.join(clashing)}: left out of job folder names, so its jobs would "
                        f"share one folder; accepted: sweep any key except {', '.join(sorted(excluded))}")


# ---------------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint(key: str, value: str, cfg: DictConfig, use: str,
                     typed_options: bool = False) -> tuple[Path, dict]:
    """A checkpoint that cannot serve `use` is refused here in one line, before the model and data are built;
    returns its path and contents (memory-mapped)."""
    import torch

    from qrun import checkpoint

    try:
        path = checkpoint.resolve(str(value), prefer=checkpoint.LAST if key == "resume" and use == "train"
                                  else checkpoint.BEST)
    except QrunError as error:
        raise QrunError(str(error).replace("resume=", f"{key}=")) from None
    if path.stat().st_size == 0:
        raise QrunError(f"{key}: checkpoint {path} is empty (0 bytes, a write that never finished?); pass another")
    try:
        # mmap: a big checkpoint is not read twice (here and in the trainer); only zip-format files can be mapped.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        # torch's weights-only unpickler refuses any object it does not know, a shell command as much as text.
        raise QrunError(f"{key}: {path} is not a checkpoint that a weights-only load accepts (a foreign, damaged "
                        "or malicious file; nothing in it was executed); pass a checkpoint that qrun wrote") from None
    except Exception as error:  # zip or pickle damage: a truncated copy, a foreign file
        raise QrunError(f"{key}: cannot read checkpoint {path}, truncated or not a torch file "
                        f"({type(error).__name__}: {one_line(error)[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != checkpoint.FORMAT_VERSION:
        found = sorted(map(str, payload))[:6] if isinstance(payload, dict) else type(payload).__name__
        raise QrunError(f"{key}: {path} is not a qrun checkpoint (format {checkpoint.FORMAT_VERSION}); it holds "
                        f"{found}")
    missing = [k for k in NEEDED_KEYS[use] if k not in payload]
    if missing:
        raise QrunError(f"{key}: checkpoint {path} lacks {', '.join(map(repr, missing))} (a partial or hand-made "
                        "file); pass a checkpoint that qrun wrote")
    _check_same_network(key, path, payload, cfg, typed_options)
    return path, payload


def check_resume_overrides(cfg: DictConfig, job: DictConfig, path: Path, payload: dict) -> None:
    """The override rules of a resume (qrun.runconfig) against the checkpoint's stored config, here rather than
    in the job: a contradiction is then refused before torch builds the model or reads the data."""
    from qrun import runconfig

    mode = mode_name(job)
    stored = payload.get("config")
    if mode not in ("train", "evaluate", "export") or not isinstance(stored, dict):
        return  # calibrate starts from the weights only; a config-less checkpoint is the trainer's to refuse
    explicit = runconfig.explicit_keys(job, list(cfg.hydra.overrides.task))
    runconfig.refuse_contradictions(stored, runconfig.plain(job), explicit, mode, path)


def _check_same_network(key: str, path: Path, payload: dict, cfg: DictConfig, typed_options: bool) -> None:
    """Same model name but other widths (model.options) would fail deep inside load_state_dict: say it here."""
    saved = payload.get("config") or {}
    saved_model = saved.get("model") or {}
    if saved_model.get("name") != cfg.model.name:
        return  # another network altogether: the trainer names that difference
    ours = OmegaConf.to_container(cfg.model.options, resolve=True)
    theirs = saved_model.get("options") or {}
    # init_from= always builds the configured network; resume= may take the network from the checkpoint, so
    # only model.options typed on this command line can contradict it.
    if key == "init_from" or typed_options:
        if _normalised(ours) != _normalised(theirs):
            raise QrunError(f"{key}: checkpoint {path} is a {cfg.model.name} with model.options={_flow(theirs)}, "
                            f"the config has model.options={_flow(ours)}; pass the same model.options")


def explicit_model_options(cfg: DictConfig) -> bool:
    """Whether this command line sets model.options (cfg: composed with its hydra node)."""
    overrides = cfg.hydra.overrides.task if "hydra" in cfg else []
    return any(str(o).lstrip("+~").startswith("model.options") for o in overrides)


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_normalised(v) for v in value]
    return value


def _flow(value: Any) -> str:
    """A value as one would type it in an override: {widths:[8,16]}."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_flow(v) for v in value) + "]"
    return str(value)


# ------------------------------------------------------------------------------------------------ error messages
def one_line(error: BaseException) -> str:
    """An exception's message on one line: the first line plus the key OmegaConf names, if any."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else text
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    return f"{first} (key {key})" if key and key not in first else first


def _missing_option(error: MissingConfigException, overrides: list[str]) -> str:
    """Hydra's 'Could not find group/option' with its option list on several lines, as one line."""
    text = str(error)
    quoted = text.split("Could not find '", 1)[1].split("'", 1)[0] if "Could not find '" in text else ""
    group, _, option = quoted.rpartition("/")
    if group and error.options is not None:
        accepted = ", ".join(sorted(error.options))
        return f"unknown {group} option {option!r} (no configs/{group}/{option}.yaml); accepted: {accepted}"
    return one_line(error)


def _composition_error(error: BaseException, overrides: list[str]) -> str:
    cause = error.__cause__ or error.__context__
    text = str(error)
    if "Could not override '" in text or "Could not append to config" in text or "Could not delete" in text:
        key = text.split("'", 2)[1] if "'" in text else ""
        return _unknown_key(key, text)
    if text.startswith("Error merging override") and cause is not None:
        override = text[len("Error merging override"):].strip()
        return f"{override}: {one_line(cause)}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the overrides: {one_line(error)}; quote values holding spaces, ',' or braces"
    return one_line(cause if cause is not None and not str(error).strip() else error)


def _unknown_key(key: str, text: str) -> str:
    import dataclasses

    from qrun.config import QrunConfig

    parent, _, leaf = key.rpartition(".")
    schema: Optional[type] = QrunConfig
    for part in parent.split(".") if parent else []:
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
        made = fields[part].default_factory() if part in fields and \
            fields[part].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        schema = type(made) if made is not None and dataclasses.is_dataclass(made) else None
    if schema is None or leaf in {f.name for f in dataclasses.fields(schema)}:
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    accepted = ", ".join(sorted(f.name for f in dataclasses.fields(schema)))
    return f"unknown key {key!r} (the config schema is closed); accepted{' in ' + parent if parent else ''}: {accepted}"


def _job_label(overrides: list[str]) -> str:
    return " ".join(overrides) or "with no overrides"

