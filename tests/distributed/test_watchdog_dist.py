"""The reward-hacking watchdog under torchrun (2 gloo processes): every rank acts on the main rank's decision."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import torchrun  # noqa: E402


def test_the_watchdog_decides_alike_on_two_ranks(tmp_path):
    """Each rank sees the same gathered evaluation; the main rank decides (diversity is measured there) and
    broadcasts: both ranks stop after the alarm's iteration with exit status 5, after one checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    torchrun("w_watchdog.py", out)
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    # evaluations at 0, 1, 2, 3: gold 0.9 .. 0.6, trained 0.5 .. 0.8: the drop exceeds 0.15 at 2 and 3
    assert ranks == [{"code": 5, "stopped_at": [3]}] * 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fired = [r for r in rows if "watchdog/alarm_message" in r]
    assert [r["step"] for r in fired] == [3] and all("eval/diversity/within_group" in r for r in rows
                                                      if "eval/gold/gold" in r)
    assert json.loads((out / "best" / "best.json").read_text())["iteration"] == 0
    assert (out / "checkpoints" / "step_00000003").is_dir()
