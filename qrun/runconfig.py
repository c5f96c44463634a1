"""A run's checkpoint carries its config: what a resume or an evaluation takes from it, and what may change.

Three cases, by how the checkpoint was named:
- `resume=<run or checkpoint>` (train, evaluate, export): the stored config is the run's config. The user types
  only what changes; every key they did not type comes from the checkpoint. A typed key that contradicts the
  checkpoint is refused in one line naming it: in train mode anything but `epochs` and the keys that do not
  change the result (FREE_KEYS); in evaluate/export mode the architecture (model, dataset, quantizer, bits,
  options, layer policy). Evaluate scores the full test split unless dataset.val_samples is typed.
- the run folder's own checkpoints/last.pt (auto_resume: a re-run command, a requeued SLURM job, a re-run
  sweep): the requested config must equal the stored one in every key that changes the result, except `epochs`;
  otherwise one line names the differing keys.
- no checkpoint: the config as composed.

Which keys the user typed: Hydra's task overrides under the CLI, the `overrides` list given to trainer.run(),
or, for run(cfg) alone, the keys whose value differs from the composed defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from qrun import checkpoint
from qrun.config import mode_name
from qrun.errors import QrunError

# Keys that change where or how fast a job runs, not what it computes: they may differ anywhere. The first eight
# are the ones sweep folder names leave out (configs/config.yaml, hydra.job.config.override_dirname.exclude_keys).
FREE_KEYS = frozenset({
    "resume", "progress", "workers", "device", "auto_resume", "sweep", "output_dir", "dataset.root",
    "threads", "compile", "channels_last", "eval_batch_size", "dataset.download", "dist_backend", "mode",
    "deterministic", "checkpoint_every_steps", "calib_batches", "log_every_percent", "log_every_s",
})
FREE_PREFIXES = ("preempt", "hydra")
# On resume, besides FREE_KEYS, only these may change (with the schedule rule of qrun.schedule).
RESUME_MAY_CHANGE = frozenset({"epochs"})
GROUPS = ("model", "dataset", "quant", "optimizer", "scheduler")
# Dict-valued fields compared (and inherited) whole.
DICT_FIELDS = ("model.options", "quant.options", "quant.layer_overrides")
ARCHITECTURE_KEYS = frozenset({"bits", "w_bits", "a_bits", "quantize_input", "dataset.name", "dataset.num_classes",
                               "dataset.in_channels", "dataset.image_size", "dataset.mean", "dataset.std"})
NOT_ARCHITECTURE = frozenset({"quant.init_batches", "quant.lr_scale"})
# Keys without effect on a full-precision run.
FP_IRRELEVANT = frozenset({"bits", "w_bits", "a_bits", "quantize_input"})
_ABSENT = object()


def shown(key: str) -> str:
    """A group choice is shown as the user types it: `model`, not `model.name`."""
    group, _, field = key.partition(".")
    return group if group in GROUPS and field == "name" else key


def is_free(key: str) -> bool:
    return key in FREE_KEYS or key.split(".")[0] in FREE_PREFIXES


def is_architecture(key: str) -> bool:
    if key in NOT_ARCHITECTURE:
        return False
    return key in ARCHITECTURE_KEYS or key.split(".")[0] in ("model", "quant")


def _irrelevant(key: str, stored: dict) -> bool:
    full_precision = _select(stored, "quant.name") == "none"
    return full_precision and (key in FP_IRRELEVANT or (key.startswith("quant.") and key != "quant.name"))


# ------------------------------------------------------------------------------------------------ dotted keys
def _select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _assign(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = copy.deepcopy(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys; DICT_FIELDS stay whole values."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key not in DICT_FIELDS:
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


# ---------------------------------------------------------------------------------------- what the user typed
def explicit_keys(cfg: DictConfig, overrides: Optional[Iterable[str]] = None) -> set[str]:
    """Keys the user typed: group choices count as `<group>.name`; Hydra's own keys are left out."""
    if overrides is None:
        overrides = _hydra_task_overrides()
    if overrides is None:
        return _keys_differing_from_defaults(cfg)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra":
            continue
        keys.add(f"{key}.name" if key in GROUPS else key)
    return keys


def _hydra_task_overrides() -> Optional[list[str]]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def _keys_differing_from_defaults(cfg: DictConfig) -> set[str]:
    """For run(cfg) without overrides: keys whose value is not the default one (a group counts by its name)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        defaults = compose("config")
    else:
        with initialize_config_module(config_module="qrun.configs", version_base="1.3"):
            defaults = compose("config")
    given, default = flatten(plain(cfg)), flatten(plain(defaults))
    changed_groups = {g for g in GROUPS if given.get(f"{g}.name") != default.get(f"{g}.name")}
    keys = set()
    for key, value in given.items():
        group = key.split(".")[0]
        if group in changed_groups:
            keys.add(f"{group}.name")
        elif default.get(key, _ABSENT) != value:
            keys.add(key)
    return keys


# ----------------------------------------------------------------------------------------------------- rules
def differences(stored: dict, requested: dict, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, stored, requested) for every result-changing key that differs; keys the stored config predates
    (absent there, a newer schema) are not compared."""
    ignored = set(ignore)
    old, new = flatten(stored), flatten(requested)
    found = []
    for key in sorted(set(old) | set(new)):
        if is_free(key) or key in ignored or _irrelevant(key, stored) or key not in old:
            continue
        if old[key] != new.get(key, _ABSENT):
            found.append((key, old[key], new.get(key, "<absent>")))
    return found


def check_same_run(stored: dict, requested: DictConfig, folder: Path, explicit: set[str]) -> DictConfig:
    """auto_resume into a folder that already holds a run: it must be the same run (epochs may grow).

    An untyped key that the config derives by interpolation (multistep milestones follow `epochs`) keeps the
    stored value: growing `epochs` must not move the schedule the run was started with.
    """
    found = differences(stored, plain(requested), ignore=RESUME_MAY_CHANGE)
    derived = [(key, old) for key, old, _ in found if key not in explicit and _interpolated(requested, key)]
    if derived:
        requested = copy.deepcopy(requested)
        for key, old in derived:
            OmegaConf.update(requested, key, old, merge=False)
        found = [entry for entry in found if entry[0] not in dict(derived)]
    if found:
        listed = "; ".join(f"{shown(key)}: {old!r} there, {new!r} requested" for key, old, new in found)
        raise QrunError(f"{folder} already holds a run with other settings ({listed}); its results are not this "
                        f"config's: use another folder (hydra.run.dir=..., or another sweep=), or continue that "
                        f"run as it was with resume={folder}")
    return requested


def _interpolated(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    return OmegaConf.is_config(node) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def inherit(cfg: DictConfig, stored: dict, explicit: set[str], mode: str, source: Path) -> DictConfig:
    """The run's config from its checkpoint, with the typed keys that are allowed to change applied."""
    requested = plain(cfg)
    refuse_contradictions(stored, requested, explicit, mode, source)
    merged = copy.deepcopy(requested)
    for unit in _units(requested):
        value = _select(stored, unit)
        if is_free(unit) or unit in explicit or value is _ABSENT:
            continue
        value = copy.deepcopy(value)
        for key in explicit:  # a typed sub-key inside an inherited dict field (quant.options.alpha=...)
            if key.startswith(f"{unit}.") and isinstance(value, dict):
                _assign(value, key[len(unit) + 1:], _select(requested, key))
        _assign(merged, unit, value)
    if mode != "train" and "dataset.val_samples" not in explicit:
        merged["dataset"]["val_samples"] = None  # evaluate scores the full test split unless told otherwise
    result = copy.deepcopy(cfg)
    for unit in _units(requested):
        value = _select(merged, unit)
        if value == _select(requested, unit):
            continue
        node = OmegaConf.select(result, unit, throw_on_missing=False)
        structured = OmegaConf.is_dict(node) and OmegaConf.get_type(node) not in (dict, None)
        OmegaConf.update(result, unit, value, merge=structured)  # a typed node merges; a plain dict is replaced
    return result


def _units(tree: dict) -> list[str]:
    """The keys inherited as a whole: top-level values, and each field of a group."""
    units = []
    for name, value in tree.items():
        if name in GROUPS and isinstance(value, dict):
            units += [f"{name}.{field}" for field in value]
        else:
            units.append(name)
    return units


def refuse_contradictions(stored: dict, requested: dict, explicit: set[str], mode: str, source: Path) -> None:
    """A typed key that the checkpoint's config overrules (its architecture; in training, anything but epochs and
    free keys) is one error naming it; qrun.preflight runs this before torch builds anything."""
    conflicts = []
    for key in sorted(explicit):
        old, new = _select(stored, key), _select(requested, key)
        if is_free(key) or old is _ABSENT or new is _ABSENT or old == new or _irrelevant(key, stored):
            continue
        if mode == "train" and key in RESUME_MAY_CHANGE:
            continue
        if mode != "train" and not is_architecture(key):
            continue
        conflicts.append((key, old, new))
    if not conflicts:
        return
    listed = "; ".join(f"{shown(key)}: checkpoint has {old!r}, config has {new!r}" for key, old, new in conflicts)
    if all(is_architecture(key) for key, _, _ in conflicts):
        raise QrunError(f"checkpoint {source} does not match the config ({listed}); the architecture comes from "
                        "the checkpoint: drop the override, or pass a checkpoint of that architecture")
    raise QrunError(f"resume={source}: {listed}; a resumed run keeps the config it was started with (only epochs "
                    "and keys that do not change the result, like device or workers, may change): drop the "
                    "override, or start a new run from these weights with init_from=")


# ------------------------------------------------------------------------------------------------ entry point
def for_run(cfg: DictConfig, output_dir: Path, overrides: Optional[Iterable[str]] = None) -> DictConfig:
    """The config this invocation runs with (see the module docstring)."""
    mode = mode_name(cfg)
    if mode in ("evaluate", "export"):
        source, inherited = checkpoint.resolve(cfg.resume, prefer=checkpoint.BEST), True
    elif mode == "train":
        source, inherited = train_source(cfg, output_dir)
    else:
        return cfg
    if source is None:
        return cfg
    stored = checkpoint.load(source, mmap=True).get("config")
    if not isinstance(stored, dict):
        raise QrunError(f"checkpoint {source} has no stored config; pass a checkpoint written by qrun train")
    if not inherited:
        return check_same_run(stored, cfg, output_dir, explicit_keys(cfg, overrides))
    return inherit(cfg, stored, explicit_keys(cfg, overrides), mode, source)


def train_source(cfg: DictConfig, output_dir: Path) -> tuple[Optional[Path], bool]:
    """The checkpoint a training run continues from, and whether it takes that checkpoint's config.

    The folder's own last.pt comes first (auto_resume): it is this run's newest state, also when the run was
    started with resume=<another run> (re-running that command, or a requeue, continues here, not there).
    """
    own = output_dir / "checkpoints" / checkpoint.LAST
    if cfg.auto_resume and own.is_file():
        return own, bool(cfg.resume)
    if cfg.resume:
        return checkpoint.resolve(cfg.resume, prefer=checkpoint.LAST), True
    return None, False
