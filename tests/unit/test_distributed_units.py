"""Single-process tests of the distributed pieces: ParallelDims validation, the group-preserving
sampler, --resume resolution, block discovery, and an in-process kill-and-resume + export."""

import pytest
import torch

from fastvideo_grpo.training.checkpoint import resolve_resume
from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.distributed import ParallelDims, rank_seed
from fastvideo_grpo.distributed.fsdp import checkpointed_indices, find_blocks
from fastvideo_grpo.training.metrics import wall_clock_metric
from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig


# ----------------------------------------------------------------------------- ParallelDims


def test_parallel_dims_infers_and_validates():
    d = ParallelDims(dp_shard=-1, sp=2, world_size=8)
    assert (d.dp_replicate, d.dp_shard, d.sp, d.dp, d.fsdp) == (1, 4, 2, 4, 8)
    assert [d.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [d.sp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    d = ParallelDims(dp_replicate=2, dp_shard=2, sp=2, world_size=8)
    assert d.dp == 4


@pytest.mark.parametrize("kw,match", [
    (dict(dp_shard=2, sp=2, world_size=8), "= 4 but the world size is 8"),
    (dict(dp_shard=-1, sp=3, world_size=8), "not divisible by dp_replicate \\* sp"),
    (dict(dp_shard=0, world_size=2), "dp_shard must be >= 1 or -1"),
    (dict(sp=0, world_size=2), "parallel.sp must be an integer >= 1"),
    (dict(dp_replicate=2, dp_shard=-1, sp=2, world_size=6), "cannot infer parallel.dp_shard"),
])
def test_parallel_dims_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kw)


def test_parallel_config_section_loads():
    cfg = load_config(None, ["--parallel.sp=2", "--parallel.activation_checkpointing=0.5", "--train.resume=latest"])
    assert cfg.parallel.sp == 2 and cfg.parallel.activation_checkpointing == 0.5 and cfg.train.resume == "latest"


# ----------------------------------------------------------------------------- sampler


def test_sampler_gives_whole_disjoint_prompts_per_dp_rank():
    prompts = [f"p{i}" for i in range(12)]
    srcs = [PromptSource(prompts, list, seed=4, dp_rank=r, dp_size=3) for r in range(3)]
    seen = []
    for _ in range(8):
        batches = [s.next_batch(2)[0] for s in srcs]
        flat = [p for b in batches for p in b]
        # each prompt (hence its whole group of G samples) goes to exactly one dp rank
        assert len(set(flat)) == len(flat) == 6, batches
        seen += flat
    # the global stream is a sequence of epochs: every prompt once per 12 prompts handed out
    for e in range(4):
        assert sorted(seen[12 * e:12 * (e + 1)]) == sorted(prompts)
    assert srcs[0].state_dict()["position"] == 48


def test_sampler_state_is_world_size_free():
    prompts = [f"p{i}" for i in range(7)]
    two = [PromptSource(prompts, list, seed=1, dp_rank=r, dp_size=2) for r in range(2)]
    one = PromptSource(prompts, list, seed=1)
    for s in two:
        s.next_batch(2)
    one.next_batch(4)
    assert one.state_dict()["position"] == two[0].state_dict()["position"] == 4
    resumed = PromptSource(prompts, list, seed=99)
    resumed.load_state_dict(two[0].state_dict())
    assert resumed.next_batch(4)[0] == one.next_batch(4)[0]


def test_rank_seed_keeps_rank0_and_differs_per_rank():
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8


# ----------------------------------------------------------------------------- resume resolution


def test_resume_missing_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(tmp_path / "nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("auto", tmp_path) is None and resolve_resume(None, tmp_path) is None
    (tmp_path / "step_00000001.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete DCP checkpoint"):
        resolve_resume(tmp_path / "step_00000001.tmp", tmp_path)


# ----------------------------------------------------------------------------- blocks


def test_blocks_found_by_name_and_ac_fraction():
    m = TinyDiT(TinyDiTConfig(image_size=8, patch_size=4, hidden=16, depth=3, heads=2))
    assert find_blocks(m) == list(m.blocks)
    assert checkpointed_indices(4, 1.0) == [0, 1, 2, 3] and checkpointed_indices(4, 0.5) == [1, 3]
    assert checkpointed_indices(4, 0.0) == []
    with pytest.raises(ValueError, match="fraction"):
        checkpointed_indices(4, 2.0)


# ----------------------------------------------------------------------------- in-process resume


def test_single_process_stop_and_resume_and_export(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed" / "workers"))
    from common import PROMPTS, redness, run_config, tiny_adapter

    from fastvideo_grpo.training.metrics import read_jsonl
    from fastvideo_grpo.training.runner import PromptSets, run

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    rf = dict(reward_fns={"red": redness}, reward_weights={"red": 1.0})
    full = run(run_config(tmp_path / "full", 3, save_every=1), tiny_adapter, PromptSets(PROMPTS), **rf)
    part = run(run_config(tmp_path / "part", 3, save_every=1), tiny_adapter, PromptSets(PROMPTS), stop_after=1, **rf)
    assert part["iterations_run"] == 1 and not (tmp_path / "part" / "export").exists()
    rest = run(run_config(tmp_path / "part", 3, save_every=1, resume="latest"), tiny_adapter, PromptSets(PROMPTS), **rf)
    assert full["iterations_run"] == 3 and rest["iterations_run"] == 2
    drop = lambda m: {k: v for k, v in m.items() if not wall_clock_metric(k)}  # noqa: E731
    # bit for bit: the resumed iterations run in this process with the uninterrupted run's shapes and thread count
    assert [drop(m) for m in read_jsonl(tmp_path / "part" / "metrics.jsonl")] == \
        [drop(m) for m in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    exported = load_file(str(tmp_path / "part" / "export" / "model.safetensors"))
    ref = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    assert exported.keys() == ref.keys() and all(torch.equal(exported[k], ref[k]) for k in ref)


# ----------------------------------------------------------------------------- export of diffusers models


def _tiny_flux():
    pytest.importorskip("diffusers")
    from support.tiny_models import tiny_flux

    torch.manual_seed(0)
    return tiny_flux()


class _Stub:
    model_subfolder = "transformer"

    def __init__(self, model):
        self.model = model

    def trainable_module(self):
        return self.model


def test_export_diffusers_save_pretrained_and_lora(tmp_path):
    from safetensors.torch import load_file

    from fastvideo_grpo.training.checkpoint import export_weights
    from fastvideo_grpo.distributed.fsdp import apply_activation_checkpointing

    model = _tiny_flux()
    blocks = find_blocks(model)
    assert blocks == list(model.transformer_blocks) + list(model.single_transformer_blocks)
    apply_activation_checkpointing(model, blocks, 1.0)  # wrapper prefixes must not leak into the export
    out = export_weights(_Stub(model), tmp_path / "full")
    reloaded = type(model).from_pretrained(str(out))
    ref = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in model.state_dict().items()}
    got = reloaded.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    pytest.importorskip("peft")
    from fastvideo_grpo.models import lora

    lmodel = _tiny_flux()
    lora.add_lora(lmodel, rank=2)
    out = export_weights(_Stub(lmodel), tmp_path / "lora")
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") and ".lora_" in k and ".default" not in k for k in sd), list(sd)[:4]


def test_attention_backend_reaches_every_attention_call(monkeypatch):
    """parallel.attention_backend goes through diffusers' dispatcher to the attention calls; with sp > 1 it is
    handed to the Ulysses attention instead of the module."""
    pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch

    from fastvideo_grpo.distributed.fsdp import set_attention_backend

    model = _tiny_flux()
    seen = []
    original = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(str(getattr(backend, "value", backend)))
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", spy)
    # diffusers' set_attention_backend also sets the process-wide active backend; restore it after the test so
    # later tests (the planner's memory checks) attend with the default kernel again.
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    for mod in ("attention_processor", "transformers.transformer_flux"):
        target = __import__(f"diffusers.models.{mod}", fromlist=["x"])
        if hasattr(target, "dispatch_attention_fn"):
            monkeypatch.setattr(target, "dispatch_attention_fn", spy)
    set_attention_backend(model, "_native_math")
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    assert len(seen) == 2 and set(seen) == {"_native_math"}  # one double + one single block
    with pytest.raises(ValueError, match="not available here"):
        set_attention_backend(model, "no_such_backend")
    # sp > 1: checked and handed to the Ulysses attention (tests/distributed/test_sp_hunyuan.py); the module
    # keeps the native backend, whose SDPA call the Ulysses dispatch intercepts
    fresh = _tiny_flux()
    assert set_attention_backend(fresh, "_native_math", sp=2) == "_native_math"
    assert all(getattr(p, "_attention_backend", None) is None for p in fresh.attn_processors.values())
    with pytest.raises(ValueError, match="not available here"):
        set_attention_backend(fresh, "no_such_backend", sp=2)
