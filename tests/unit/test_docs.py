"""The docs hold what they claim: every YAML block in README.md and docs/ parses, every config it names
exists, and the small command-line promises hold (the per-family prep wrappers do not ask for --family;
the toy scripts find their default recipe from any folder)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_yaml_blocks_parse_and_named_configs_exist(doc):
    text = doc.read_text()
    for i, block in enumerate(BLOCK.findall(text)):
        try:
            yaml.safe_load(block)
        except yaml.YAMLError as e:
            pytest.fail(f"{doc.name}: YAML block {i} does not parse: {e}")
    for name in set(re.findall(r"configs/[\w./-]+\.yaml", text)):
        assert (ROOT / name).is_file(), f"{doc.name} names {name}, which does not exist"


def test_prep_wrapper_help_does_not_ask_for_the_family():
    out = subprocess.run([sys.executable, str(ROOT / "data_prep" / "prep_flux.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=str(ROOT)).stdout
    assert "--model-path" in out and "--family" not in out


def test_toy_script_finds_its_recipe_from_another_folder(tmp_path):
    code = ("import runpy, sys; sys.argv = ['x', '--help']; "
            f"runpy.run_path({str(ROOT / 'train_scripts' / 'train_toy_grpo.py')!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items()}
    env["COLUMNS"] = "1000"  # no line wrapping inside the path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                         env=env)
    assert f"default: {ROOT / 'configs' / 'toy_cpu.yaml'}" in out.stdout, out.stdout + out.stderr
