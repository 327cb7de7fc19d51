"""One command line for every entry point: "did you mean" on unknown keys (also across sections) and flags,
``--print-config`` with each value's source, the toy scripts' ``--check`` and shared flags, one ``error:`` line
(no traceback) from the demo and data_prep scripts, and prompts straight in (``data.prompts``: the content-hash
cache, the ``hf:`` route with a fake ``datasets`` module, and the message when it is not installed)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from fastvideo_grpo.config import config_sources, load_config, source_of, to_dict
from support.scripts import ROOT, TINY_TOY_PRETRAIN, load_script


@pytest.mark.parametrize("override,meant", [
    ("--train.lr=1e-4", "optim.lr"),  # another section
    ("--grpo.group_sise=4", "grpo.group_size"),  # a typo in the section
    ("--trian.seed=1", "train"),  # a section name
    ("--optim.learning_rate=1e-4", "optim.lr"),  # the name diffusers' scripts use
    ("--train.watchdog.patiense=3", "train.watchdog.patience"),  # nested
    ("--rewards=[{name: toy_geneval, wieght: 1}]", "rewards[0].weight"),  # inside a list
])
def test_unknown_keys_say_which_was_meant(override, meant):
    with pytest.raises(ValueError, match=r"unknown config key.*did you mean '" + meant.replace("[", r"\[")
                       .replace("]", r"\]") + "'"):
        load_config(None, [override])


def test_nothing_close_gives_no_guess():
    with pytest.raises(ValueError) as e:
        load_config(None, ["--train.zzzzqq=1"])
    assert "did you mean" not in str(e.value) and "known:" in str(e.value)


def test_print_config_shows_each_value_and_where_it_came_from(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  name: toy\n  kwargs: {shift: 2.0}\noptim:\n  lr: 0.002\ntrain:\n  seed: 3\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: base.yaml\ntrain:\n  seed: 5\n  num_iterations: 7\n")
    mod = load_script("train_scripts", "train_toy_grpo")
    res = mod.main(["--config", str(recipe), "--print-config", "--grpo.tau=0.5", "--model.kwargs.balance_grad=true",
                    "--output-dir", str(tmp_path / "o")])
    assert res == {"printed": True} and not (tmp_path / "o").exists()
    text = capsys.readouterr().out
    overrides = ["--grpo.tau=0.5", "--model.kwargs.balance_grad=true", f"--train.output_dir={tmp_path / 'o'}"]
    assert yaml.safe_load(text) == to_dict(load_config(str(recipe), overrides))  # the resolved config, loadable
    lines, path = {}, []
    for ln in text.splitlines():  # dotted key -> its line (two spaces of indent per level)
        depth = (len(ln) - len(ln.lstrip())) // 2
        path = path[:depth] + [ln.strip().split(":")[0]]
        lines[".".join(path)] = ln
    assert lines["train.seed"].endswith(f"# recipe file {recipe}")  # the recipe overrides its base
    assert lines["train.num_iterations"].endswith(f"# recipe file {recipe}")
    assert lines["eval.seed"].endswith("# default")
    assert lines["optim.lr"].endswith(f"# base recipe {base.resolve()}")
    assert lines["grpo.tau"].endswith("# command line") and lines["train.output_dir"].endswith("# command line")
    assert lines["sampling.eta"].endswith("# default")
    assert lines["model.kwargs"].endswith(f"# base recipe {base.resolve()}; balance_grad: command line")
    src = config_sources(str(recipe), overrides)
    assert source_of(src, "sampling.num_steps") == "default" and source_of(src, "model.kwargs.shift").startswith("base")


def test_toy_scripts_share_the_flags_and_check(tmp_path, capsys):
    demo = load_script("train_scripts", "train_toy_grpo")
    out = tmp_path / "demo"
    assert demo.main(["--check", "--output-dir", str(out)]) == {"checked": True}
    said = capsys.readouterr().out
    assert f"starts fresh in {out}" in said and str(tmp_path / "toy_pretrained") in said  # the cache beside the run
    assert not out.exists() and not (tmp_path / "toy_pretrained").exists()  # --check writes nothing
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")
    with pytest.raises(ValueError, match="holds a run already.*--resume latest.*--overwrite"):
        demo.main(["--check", "--output-dir", str(out), "--train.overwrite=false"])  # the demo recipe overwrites
    assert demo.main(["--check", "--output-dir", str(out), "--overwrite", "--pretrain-cache", str(tmp_path / "c")]) \
        == {"checked": True}
    assert str(tmp_path / "c") in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        demo.main(["--check", "--output-dir", str(out), "--resume", "latest"])
    dist = load_script("train_scripts", "train_toy_distributed")
    with pytest.raises(ValueError, match="did you mean --config"):
        dist.main(["--confg", "x"])


def test_scripts_end_user_errors_in_one_line(tmp_path, capsys):
    """Exit status 2, one ``error:`` line, no traceback: the demo through its real command line, data_prep's
    wrapper (the same ``cli_entry``) in this process."""
    r = subprocess.run([sys.executable, str(ROOT / "train_scripts" / "train_toy_grpo.py"), "--train.num_iteration=3"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: unknown config key") and "did you mean 'train.num_iterations'?" in lines[0]
    prep = load_script("data_prep", "prep_flux")
    with pytest.raises(SystemExit) as e:
        prep.cli_entry(prep.main, ["--model-path", str(tmp_path), "--prompts", str(tmp_path), "--out",
                                   str(tmp_path / "o")], "flux")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "has neither train.txt nor" in err[0]


def test_data_prep_check_reads_without_loading(tmp_path, capsys):
    from fastvideo_grpo.data.prep import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    with pytest.raises(FileNotFoundError, match=r"lacks \['text_encoder'"):
        main(["--model-path", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--check"],
             family="flux")
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (tmp_path / "m" / sub).mkdir(parents=True)
    assert main(["--model-path", str(tmp_path / "m"), "--prompts", str(prompts), "--output-dir", str(tmp_path / "o"),
                 "--check"], family="flux") == {"checked": True}
    assert "2 prompt(s)" in capsys.readouterr().out and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def flux_encoders(tmp_path_factory):
    from support.tiny_encoders import build_tiny_components

    root = tmp_path_factory.mktemp("flux_enc")
    build_tiny_components("flux", root)
    return root


def test_prompts_straight_in_are_embedded_once_and_cached_by_content(flux_encoders, tmp_path, capsys):
    from fastvideo_grpo.data.dataset import PromptEmbeddingDataset
    from fastvideo_grpo.data.encoders import load_family_encoder
    from fastvideo_grpo.data.prompt_cache import prepare_prompt_embeddings

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog"}\n{"prompt": "one green circle"}\n')

    def cfg(*extra):
        return load_config(None, ["--model.name=flux", f"--model.kwargs.model_path={flux_encoders}",
                                  f"--data.prompts={prompts}", f"--data.embedding_cache={tmp_path / 'cache'}",
                                  "--data.encoding={dtype: float32, batch_size: 2}"] + list(extra))

    c = cfg()
    first = prepare_prompt_embeddings(c, progress=False)
    assert first["train"]["encoded"] and Path(c.data.manifest).is_file()
    ds = PromptEmbeddingDataset(c.data.manifest, split="all")
    assert ds.prompts == ["a red cat", "a blue dog", "one green circle"]
    # the family's own encoding of the same batch (rows 0-1: batch_size 2), as data_prep computes it
    want = load_family_encoder("flux", flux_encoders).encode_text(["a red cat", "a blue dog"])
    got = ds[1]["cond"]
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v[1])  # same batch, same kernels, same process: the same bits
    c2 = cfg()
    again = prepare_prompt_embeddings(c2, progress=False)
    assert not again["train"]["encoded"] and c2.data.manifest == c.data.manifest  # a cache hit: nothing loaded
    c3 = cfg("--data.encoding={dtype: float32, batch_size: 2, t5_max_length: 16}")
    assert prepare_prompt_embeddings(c3, progress=False)["train"]["encoded"]  # another setting: another entry
    assert c3.data.manifest != c.data.manifest
    # --check: an entry not computed yet is reported, not computed
    c4 = cfg("--data.encoding={dtype: float32, t5_max_length: 8}")
    assert prepare_prompt_embeddings(c4, check_only=True)["train"]["cached"] is False and c4.data.manifest is None
    with pytest.raises(ValueError, match="data.encoding does not take \\['t5_len'\\]"):
        prepare_prompt_embeddings(cfg("--data.encoding={t5_len: 3}"))
    with pytest.raises(ValueError, match="is a folder"):
        prepare_prompt_embeddings(cfg(f"--data.prompts={tmp_path}"))


def test_hugging_face_prompts_need_datasets(flux_encoders, tmp_path, monkeypatch):
    from fastvideo_grpo.data.prompt_cache import prepare_prompt_embeddings, read_prompt_source

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the Hugging Face `datasets` package, which is not installed"):
        read_prompt_source("hf:org/prompts:test")
    fake = types.ModuleType("datasets")
    asked = []

    class Table:
        column_names = ["text", "id"]
        _fingerprint = "fp1"

        def __getitem__(self, col):
            return {"text": ["a red cat", "a blue dog"], "id": [1, 2]}[col]

    def load_dataset(name, split):
        asked.append((name, split))
        return Table()

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"no column 'prompt' \(columns: \['text', 'id'\]\); set data.prompt_field"):
        read_prompt_source("hf:org/prompts")
    records, source = read_prompt_source("hf:org/prompts:test", field="text")
    assert [r.prompt for r in records] == ["a red cat", "a blue dog"] and asked[-1] == ("org/prompts", "test")
    assert source == {"dataset": "org/prompts", "split": "test", "prompt_field": "text", "fingerprint": "fp1"}
    c = load_config(None, ["--model.name=flux", f"--model.kwargs.model_path={flux_encoders}",
                           "--data.prompts=hf:org/prompts", "--data.prompt_field=text",
                           f"--data.embedding_cache={tmp_path}", "--data.encoding={dtype: float32}"])
    prepare_prompt_embeddings(c, progress=False)
    assert asked[-1] == ("org/prompts", "train")  # the default split
    from fastvideo_grpo.data.dataset import PromptEmbeddingDataset

    assert PromptEmbeddingDataset(c.data.manifest, split="all").prompts == ["a red cat", "a blue dog"]
