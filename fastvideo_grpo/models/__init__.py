"""Model adapters, one file per family; importing this package registers them all in ADAPTERS.

Adapter modules import diffusers lazily inside their factories, so importing this is cheap.
"""

from .base import ADAPTERS, PolicyAdapter, index_cond  # noqa: F401
from . import toy  # noqa: F401
# --- adapters for real model families (one import per file) ---
from . import sd  # noqa: F401
from . import flux  # noqa: F401
from . import hunyuan_video  # noqa: F401
from . import hunyuan_i2v  # noqa: F401
from . import wan  # noqa: F401
from . import sd3  # noqa: F401
from . import qwen_image  # noqa: F401
from . import qwen_image_edit  # noqa: F401


def build_policy(cfg, device):
    """The adapter named by ``model.name`` with ``model.kwargs`` (plus ``device`` unless given there)."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("device", str(device))
    return ADAPTERS.build(cfg.model.name, **kwargs)
