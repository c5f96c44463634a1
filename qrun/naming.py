"""Folder names that say what ran and that can be typed back: OmegaConf resolvers used by configs/config.yaml.

A run folder ends in `<model>_<quant>_<bits>` (`cnn_bn_dsq_w4a4`, `cnn_bn_none_fp32`); a sweep job folder is
Hydra's override_dirname (`bits-4+quant-dsq`) except that a value which the override grammar would not read
back unquoted (`{features.4:{w_bits:8}}`, `[30,60]`) becomes a short readable stem plus a hash of the value.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

# What a folder name may hold so that `resume=<path>` parses without quotes: Hydra's unquoted value characters
# minus those with a meaning in the grammar ('=', ',', brackets, braces, ':', quotes, '$', spaces, ...).
_SAFE_VALUE = re.compile(r"[A-Za-z0-9._\-]+")
_MAX_VALUE = 40
KV_SEP, ITEM_SEP = "-", "+"


def bits_tag(quant_name: str, w_bits: int, a_bits: int, quantize_input: bool, layer_overrides: Any = None) -> str:
    """`w4a4`, `w4a32` (weights only), `fp32` (quant=none, whatever `bits` says); `_mixed` with per-layer bits."""
    if quant_name == "none":
        return "fp32"
    tag = f"w{w_bits}a{a_bits if quantize_input else 32}"
    return f"{tag}_mixed" if layer_overrides else tag


def encode_value(value: str) -> str:
    """The value itself when it is safe and short, else `<readable stem>-<8 hex digits of its sha1>`."""
    if _SAFE_VALUE.fullmatch(value) and len(value) <= _MAX_VALUE:
        return value
    stem = re.sub(r"[^A-Za-z0-9.]+", "_", value).strip("_.")[:24].rstrip("_.")
    digest = hashlib.sha1(value.encode()).hexdigest()[:8]
    return f"{stem}-{digest}" if stem else digest


def job_name(overrides: Iterable[str], exclude_keys: Iterable[str]) -> str:
    """Hydra's override_dirname (sorted `key-value` items joined by '+') with unsafe values encoded."""
    excluded = set(exclude_keys)
    lines = []
    for line in overrides:
        key, _, value = str(line).partition("=")
        if key.lstrip("+~") in excluded:
            continue
        lines.append((line, f"{key}{KV_SEP}{encode_value(value)}"))
    return ITEM_SEP.join(name for _, name in sorted(lines))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def register_resolvers() -> None:
    """Register once per process (Hydra and the tests may both call register_configs)."""
    if not OmegaConf.has_resolver("qrun_bits"):
        OmegaConf.register_new_resolver(
            "qrun_bits", lambda q, w, a, qi, lo=None: bits_tag(q, w, a, qi, _plain(lo)))
    if not OmegaConf.has_resolver("qrun_job"):
        OmegaConf.register_new_resolver("qrun_job", lambda overrides, exclude: job_name(_plain(overrides),
                                                                                      _plain(exclude)))
    if not OmegaConf.has_resolver("qrun_milestones"):
        # Multi-step milestones as fractions of the run, e.g. [0.5, 0.75] of epochs=200 -> [100, 150].
        OmegaConf.register_new_resolver(
            "qrun_milestones", lambda epochs, fractions: sorted({max(1, round(epochs * f)) for f in _plain(fractions)}))
