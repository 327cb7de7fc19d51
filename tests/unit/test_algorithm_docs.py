"""The example settings in docs/algorithms.md load and validate over the FLUX and HunyuanVideo recipes."""

import re
from pathlib import Path

import pytest
import yaml

from fastvideo_grpo.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs/algorithms.md").read_text(), flags=re.S)


def _overrides(block):
    out = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and k != "sde_window":
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"--{prefix}{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")

    walk(yaml.safe_load(block), "")
    return out


@pytest.mark.parametrize("recipe", ["configs/flux_hps.yaml", "configs/hunyuan_t2v_videoalign.yaml"])
@pytest.mark.parametrize("i", range(4))
def test_doc_blocks_validate_over_the_recipes(recipe, i):
    assert len(BLOCKS) == 4
    cfg = load_config(str(ROOT / recipe), _overrides(BLOCKS[i]))
    flat = yaml.safe_load(BLOCKS[i])
    for section, values in flat.items():
        for k, v in values.items():
            got = getattr(getattr(cfg, section), k)
            assert (vars(got) if k == "sde_window" else got) == ({**vars(type(got)()), **v} if k == "sde_window" else v)
