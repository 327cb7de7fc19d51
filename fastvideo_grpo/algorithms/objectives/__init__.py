"""The objectives (one file each, registered in ``OBJECTIVES``) and the builder that checks one against a
run's config. Importing this package registers the built-in ones: ``ppo_clip`` (alias ``grpo``) and
``diffusion_nft`` (alias ``nft``). A new objective is one file: a registered ``Objective`` subclass
(base.py) in this folder (imported, hence registered, with the package), or anywhere else imported before
the run is built."""

import importlib
import pkgutil

from .base import OBJECTIVES, Objective, TrainBatch  # noqa: F401
from .build import LAST_STEP_HINT, build_objective, check_stochastic_steps  # noqa: F401

# every other module of this folder is an objective: importing it registers it
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "build"):
        importlib.import_module(f"{__name__}.{_module.name}")
