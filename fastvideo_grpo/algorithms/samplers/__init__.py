"""The rollout samplers (one file each, registered in ``ROLLOUTS``; ``sampling.rollout``) and their protocol
(base.py). Importing this package registers the built-in ones: ``sde`` (DanceGRPO's, base.py) and ``tree``
(branching rollouts sharing prefixes, tree.py). A new sampler is one file in this folder (imported, hence
registered, with the package), or anywhere else imported before the run is built."""

import importlib
import pkgutil

from .base import ROLLOUTS, RolloutSampler, SDERollout, build_sampler  # noqa: F401

# every other module of this folder is a sampler: importing it registers it
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
