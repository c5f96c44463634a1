"""qrun: an experiment runner for neural-network quantization research on image classification."""

__version__ = "0.1.0"

# Resolvers the configs use (`${qrun_bits:...}`, `${qrun_milestones:...}`): registered on any qrun import, so that
# every tool reading a run's saved .hydra config (qrun-report, scripts) can resolve it.
from qrun.naming import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
