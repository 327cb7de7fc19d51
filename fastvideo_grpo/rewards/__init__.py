"""Reward models behind one protocol (see base.py); importing this package registers them all.

Importing is cheap: each module imports transformers / safetensors only inside its factory.
Registered names: clip_score, hps, pickscore, aesthetic, video_align, binary, remote, vlm_judge,
image_reward, hpsv3, win_rate (group-level: a win rate within the group, judged by another reward).
"""

from . import base  # noqa: F401
from .base import REWARDS, RewardFn, check_scores, compute_rewards, validate_reward_inputs  # noqa: F401
from . import aesthetic, binary, clip_score, hps, hpsv3, image_reward, pickscore, video_align, vlm_judge  # noqa: F401
from . import win_rate  # noqa: F401
from .serving import remote  # noqa: F401

# --- rule-based rewards (owned by the lead): add `from . import rules  # noqa: F401` below ---
from . import rules  # noqa: F401
from . import toy_proxy  # noqa: F401  (the watchdog demonstration's hackable toy reward)
