"""Start a model from weights made elsewhere: torchvision's pretrained ImageNet weights or a plain state-dict file.

qrun's own checkpoints go through qrun.checkpoint; this module reads everything else the way people save weights
(torchvision's `.pth`, a DataParallel/DDP dict with `module.` prefixes, a training script's dict holding
`state_dict` or `model`), always with `weights_only=True`, and fits it into the model: a classifier whose shape
does not fit (1000 ImageNet classes into a 10-class head) keeps its fresh initialisation, anything else that
does not fit is one error naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qrun import checkpoint
from qrun.config import PRETRAINED_MODELS
from qrun.errors import QrunError
from qrun.quant import load_float_state

log = logging.getLogger(__name__)

# qrun model name -> torchvision weights enum; IMAGENET1K_V1 is the baseline the LSQ and DSQ papers compare to.
TORCHVISION_WEIGHTS = {name: f"ResNet{name[len('resnet'):]}_Weights.IMAGENET1K_V1" for name in PRETRAINED_MODELS}
WRAPPER_KEYS = ("state_dict", "model")  # what training scripts wrap their weights in
DATA_PARALLEL_PREFIX = "module."


def pretrained_file(name: str) -> tuple[Any, Path]:
    """The torchvision weights entry for a qrun model and where torch.hub caches its file (under TORCH_HOME)."""
    if name not in TORCHVISION_WEIGHTS:
        raise QrunError(f"model.pretrained=true has no torchvision weights for model={name}; accepted: "
                        f"{', '.join(TORCHVISION_WEIGHTS)}")
    from torchvision.models import get_weight

    weights = get_weight(TORCHVISION_WEIGHTS[name])
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def load_pretrained(model: nn.Module, name: str) -> None:
    """torchvision's ImageNet weights for `name`, from torch.hub's cache (downloaded there when a network allows)."""
    weights, path = pretrained_file(name)
    try:
        # The cached file is used as is (torch.hub checks the hash prefix of the name only when it downloads).
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as error:  # offline (URLError), a refused or corrupt file: one line, never a traceback
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise QrunError(f"model.pretrained=true needs torchvision's {path.name} in {path.parent} ({reason}); "
                        f"download {weights.url} into that folder (or point TORCH_HOME at a folder whose "
                        "hub/checkpoints holds it)") from None
    fit_state(model, state, path)
    log.info("weights from torchvision %s (%s)", TORCHVISION_WEIGHTS[name], path)


def read_initial(path: Path) -> dict[str, Any]:
    """A qrun checkpoint's payload, or {'model': state, 'architecture': None} for a plain state-dict file."""
    try:
        return checkpoint.load(path)
    except QrunError as qrun_error:
        payload = _load_plain(path)
        if payload is None:
            raise qrun_error from None
        return {"model": payload, "architecture": None}


def _load_plain(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise QrunError(f"cannot read {path} as weights (loaded with weights_only=True): "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(content, Mapping):
        return None
    for key in WRAPPER_KEYS:
        if isinstance(content.get(key), Mapping) and "format_version" not in content:
            content = content[key]
            break
    if not content or not all(isinstance(v, torch.Tensor) for v in content.values()):
        return None
    return strip_prefix(dict(content))


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP's `module.` prefix when every key has it."""
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return state


def classifier_prefix(model: nn.Module) -> str:
    """Module name of the classifier: the last Linear, or the last conv of an all-conv net (NIN)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = layers or [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return layers[-1] + "." if layers else ""


def fit_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Load `state` into `model`; a misfitting classifier keeps its fresh initialisation (logged), nothing else may
    misfit. Quantizer state absent from `state` keeps its defaults and is initialised from data later."""
    own = model.state_dict()
    head = classifier_prefix(model)
    misfit = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    head_keys = [k for k in misfit if head and k.startswith(head) and k.count(".") == head.count(".")]
    others = [f"{k} {misfit[k][0]} vs model {misfit[k][1]}" for k in misfit if k not in head_keys]
    if others:
        raise QrunError(f"weights in {source} do not fit this model: shape of {'; '.join(others)}")
    state = {k: v for k, v in state.items() if k not in head_keys}
    if head_keys:
        log.info("classifier %s re-initialised: %s has shape %s, this model %s (num_classes differs)",
                 head.rstrip("."), source, misfit[head_keys[0]][0], misfit[head_keys[0]][1])
    try:
        # The classifier's own fresh tensors stand in for the misfitting ones, so only foreign keys are reported.
        load_float_state(model, {**state, **{k: own[k] for k in head_keys}})
    except QrunError as error:
        raise QrunError(f"{source}: {error}") from None
