"""The GPU acceptance check: one command from a fresh checkout, at most 8 minutes on one H100 / H200.

    python bench/gpu_check.py --out outputs/gpu_check.json            # on a GPU machine (= make gpu-check)
    python bench/gpu_check.py --dry-run --out outputs/gpu_check.json  # on a CPU machine: every check at tiny size
    python bench/gpu_check.py --list                                  # what is checked, nothing run

Checks, in order. Each runs on its own (a failure is recorded with its traceback and the next check
runs) and the JSON file is rewritten after every check, so a run cut short keeps what it measured.

  environment         versions of python / torch / CUDA / diffusers / transformers / peft, the GPU; says
                      which wheels to bring when a package is missing (GPU machines are often offline)
  extension_build     builds fastvideo_grpo._C in place (setup.py build_ext --inplace; the CUDA kernel
                      with nvcc) and checks that the CUDA kernel is what the op dispatches to
  kernel_correctness  the compiled kernel against the PyTorch reference, forward (rollout and re-scoring)
                      and backward, fp32 and bf16, odd shapes, batch > 1 with per-sample coefficients;
                      errors measured against a float64 reference, the kernel's within 2x the eager
                      reference's own error (+ a float32 rounding floor); the schedules' table path
                      (coefficient rows by value, by a device copy for > 64 samples, by a device step
                      index) bit-identical to the per-sample path
  grpo_flux           one full GRPO iteration (bench/iteration.py's ``run_case``) on a ~1.1B FLUX-like
  grpo_hunyuan        transformer at 720 px / a ~1.1B HunyuanVideo-like one at 480 x 480 x 17 frames:
                      bf16 autocast, FSDP2 over a one-GPU NCCL group (fp32 master weights), fused AdamW;
                      |ratio - 1| at the first micro-step (rollout at the full batch, training at the
                      micro-batch; and rollout in chunks of the micro-batch, decode one sample at a time),
                      finite loss, seconds split into rollout / decode / reward / training, samples/s, peak
                      memory overall and per phase (torch.cuda.max_memory_allocated reset at each phase),
                      overhead against the bare model work, and the real-scale planner's estimate of the peak
                      (planned_over_measured_peak; meaningful on a GPU only)
  learning            20 iterations on a brightness reward (the same 1.1B FLUX-like model at 256 px):
                      the training reward's slope and the held-out reward (fixed prompts and noise,
                      before vs after) must rise
  checkpoint_dcp      DCP save of the FSDP2 trainer with CUDA tensors, load into a fresh trainer, one more
                      iteration on each: identical weights and metrics
  cpu_offload         parallel.cpu_offload (FSDP2 CPUOffloadPolicy): one iteration on the GPU with the
                      parameters, gradients and optimiser state in host memory
  cuda_tests          the test suite's CUDA tests (pytest -k cuda on the files that hold them)
  attention_backends  one training step of the 1.1B FLUX-like model with each parallel.attention_backend
                      (torch's SDPA kernels, FlashAttention 2 when flash-attn is installed): time per step
  kernel_speed        bench/logprob_kernel.py's cases: fused kernel vs eager formula vs torch.compile of
                      it vs a plain device copy (achieved bandwidth), and its host cost at a tiny latent in
                      units of one torch.mul; last, as the least critical

Opt-in with ``--only`` (bench/real_size.py; about 8 minutes together on one H100 / H200, not in a plain run):

  real_flux_lora      FLUX.1-dev's real architecture (configs/arch), random-init bf16 straight on the GPU,
                      LoRA, one GRPO iteration of configs/flux_hps.yaml at 720 px (4 samples, 16 steps)
  real_hunyuan_lora   HunyuanVideo T2V, LoRA, the recipe's 480 x 480 x 53 frames (2 samples, 8 steps)
  real_wan_full       Wan 2.1 T2V 1.3B, full fine-tuning, FSDP2 on one GPU, 480 x 480 x 53 frames (2, 8 steps)
  real_flux_offload   the FLUX LoRA case with parallel.cpu_offload (FSDP2; 2 samples, 6 steps)
                      each: seconds per iteration, peak memory, first-micro-step |ratio - 1|, overhead ratio
                      against the bare model work, next to the planner's prediction for the same settings

``--dry-run`` runs all of them on the CPU at tiny sizes (gloo instead of NCCL; no build: the installed
extension is checked; no CUDA tests), which is what CI runs. ``--only a,b`` runs a subset; ``--budget-s``
skips the checks not yet started after that many seconds (the JSON then says so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

CHECKS = ["environment", "extension_build", "kernel_correctness", "fsdp_probe", "grpo_flux", "grpo_hunyuan",
          "learning", "checkpoint_dcp", "cpu_offload", "cuda_tests", "attention_backends", "kernel_speed"]
# the recipes' real architectures (bench/real_size.py): opt-in with --only, ~8 minutes together on one GPU
REAL_CHECKS = ["real_flux_lora", "real_hunyuan_lora", "real_wan_full", "real_flux_offload"]
PROBES = ["plain_fp32", "plain_bf16_autocast", "fsdp_bf16", "plain_bf16_autocast_cudnn"]
# what each check runs at: (GPU, dry run)
SIZES = {
    "grpo_flux": ("flux_1b_720px", "flux_tiny"),
    "grpo_hunyuan": ("hunyuan_1b_480p_17f", "hunyuan_tiny"),
}
REQUIRED = {"diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors",
            "yaml": "pyyaml"}
OPTIONAL = {"peft": "peft", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class Skip(Exception):
    """A check that does not apply here (reason in the message)."""


def _version(mod: str):
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - any import failure means "missing" here
        return None
    return getattr(m, "__version__", "present")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- checks


def check_environment(ctx):
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "dry_run": ctx["dry"]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
    out["packages"] = {name: _version(mod) for mod, name in {**REQUIRED, **OPTIONAL}.items()}
    missing = [name for mod, name in REQUIRED.items() if _version(mod) is None]
    if missing:
        out["missing"] = missing
        out["how_to_fix"] = (
            "on a machine with internet: python3 -m pip download --no-deps --only-binary=:all: --python-version "
            f"{sys.version_info.major}.{sys.version_info.minor} -d wheels " + " ".join(missing) +
            "; copy wheels/ over, then: pip install --no-index --no-deps wheels/*.whl (see docs/performance.md)")
        raise RuntimeError(f"missing packages: {missing}. {out['how_to_fix']}")
    return out


def check_extension_build(ctx):
    out = {}
    if not ctx["dry"]:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=str(ROOT), env=env,
                           capture_output=True, text=True, timeout=600)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        out["build_log_tail"] = (p.stdout + p.stderr)[-1500:]
        if p.returncode != 0:
            raise RuntimeError(f"setup.py build_ext failed (exit {p.returncode}): {out['build_log_tail']}")
    from fastvideo_grpo.sde.ops import extension_available, kernel_supports
    from fastvideo_grpo.sde.ops import fused

    out["extension_loaded"] = extension_available()
    out["has_cuda_kernel"] = bool(extension_available() and fused._C.has_cuda())
    dev = ctx["device"]
    out["kernel_dispatched_on_" + dev.type] = kernel_supports(torch.empty(0, device=dev))
    if not out["extension_loaded"]:
        raise RuntimeError("fastvideo_grpo._C did not load: the PyTorch reference would run instead")
    if dev.type == "cuda" and not out["has_cuda_kernel"]:
        raise RuntimeError("the extension was built without its CUDA kernel (nvcc or a CUDA torch missing at build)")
    return out


def _kernel_inputs(shape, dtype, device, g):
    B = shape[0]
    u = torch.randn(shape, generator=g).to(device, dtype)
    z = torch.randn(shape, generator=g).to(device, dtype)
    noise = torch.randn(shape, generator=g).to(device, torch.float32)
    sigma = torch.rand(B, generator=g, dtype=torch.float64) * 0.7 + 0.25
    sigma_next = sigma - torch.rand(B, generator=g, dtype=torch.float64) * 0.1 - 0.01
    eta = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.1
    return u, z, noise, sigma, sigma_next, eta


def _err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def check_kernel_correctness(ctx):
    from fastvideo_grpo.sde.ops import flow_coefficients, fused_sde_step, kernel_supports
    from fastvideo_grpo.sde.ops.reference import reference_sde_step

    dev = ctx["device"]
    if not kernel_supports(torch.empty(0, device=dev)):
        raise RuntimeError(f"the compiled kernel does not serve {dev}: nothing to compare")
    shapes = [(1, 3, 5, 7), (3, 16, 45, 45), (2, 16, 5, 30, 31), (4, 7, 13, 17)]
    if not ctx["dry"]:
        shapes.append((8, 16, 90, 90))
    g = torch.Generator().manual_seed(0)
    rows, worst = [], 0.0
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            u, z, noise, s, sn, e = _kernel_inputs(shape, dtype, dev, g)
            A, C, S = flow_coefficients(s, sn, e, batch_size=shape[0], device=dev)
            # truth: the reference in float64 on the same (rounded) inputs
            A64, C64, S64 = (t.to(torch.float64) for t in (A, C, S))
            prev64, lp64, _ = reference_sde_step(u.double(), z.double(), A64, C64, S64, noise=noise.double())
            prev_k, lp_k = fused_sde_step(u, z, A, C, S, noise=noise)
            prev_r, lp_r, _ = reference_sde_step(u, z, A, C, S, noise=noise)
            # re-scoring a stored transition and its gradient w.r.t. the model output
            stored = prev64.to(dtype)
            uk = u.detach().clone().requires_grad_()
            lpk2 = fused_sde_step(uk, z, A, C, S, prev_sample=stored)[1]
            lpk2.sum().backward()
            ur = u.detach().clone().requires_grad_()
            lpr2 = reference_sde_step(ur, z, A, C, S, prev_sample=stored)[1]
            lpr2.sum().backward()
            u64 = u.detach().double().requires_grad_()
            lp642 = reference_sde_step(u64, z.double(), A64, C64, S64, prev_sample=stored.double())[1]
            lp642.sum().backward()
            floor = 4 * torch.finfo(torch.float32).eps
            row = {"dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
            ok = True
            for what, k, r, t in (("prev", prev_k, prev_r, prev64), ("log_prob", lp_k, lp_r, lp64),
                                  ("rescore_log_prob", lpk2, lpr2, lp642), ("grad_u", uk.grad, ur.grad, u64.grad)):
                ek, er = _err(k, t), _err(r, t)
                row[what] = {"kernel_err": ek, "reference_err": er}
                ok &= ek <= 2 * er + floor
                worst = max(worst, ek / (2 * er + floor))
            row["ok"] = bool(ok)
            rows.append(row)
    bad = [r for r in rows if not r["ok"]]
    out = {"cases": rows, "worst_error_over_bound": worst, "num_cases": len(rows),
           "table_path": _table_path_identical(dev, g)}
    if bad:
        raise RuntimeError(f"kernel error above 2x the reference's on {len(bad)} case(s): {bad[:2]}")
    if not all(out["table_path"].values()):
        raise RuntimeError(f"the table path differs from the per-sample path: {out['table_path']}")
    return out


def _table_path_identical(dev, g):
    """The schedules' hot path (a CPU coefficient table looked up by step index; on a GPU the rows travel by
    value, by a device copy beyond 64 samples, or are gathered on the device for a device index) gives
    bit-identical results to the per-sample path with the same coefficients (same float32 values)."""
    from fastvideo_grpo.sde.ops import flow_coefficient_table, fused_sde_step, sde_step_at
    from fastvideo_grpo.sde import FlowSchedule

    sched = FlowSchedule.create(16, eta=0.7, shift=3.0)
    table = flow_coefficient_table(sched.sigmas, sched.eta)
    res = {}
    for name, B, index_dev in (("by_value", 3, "cpu"), ("device_copy_65_samples", 65, "cpu"),
                               ("device_index", 3, dev)):
        u, z = (torch.randn((B, 4, 6, 5), generator=g).to(dev) for _ in range(2))
        idx = torch.randint(0, 16, (B,), generator=g)
        A, C, S = (table[idx, k].to(dev) for k in range(3))
        noise = torch.randn(z.shape, generator=g).to(dev)
        prev, lp = fused_sde_step(u, z, A, C, S, noise=noise)
        uu, uk = u.clone().requires_grad_(), u.clone().requires_grad_()
        _, lp_t, _, _ = sde_step_at(uu, z, table.to(dev) if index_dev != "cpu" else table, idx.to(index_dev),
                                    prev_sample=prev)
        _, lp_k = fused_sde_step(uk, z, A, C, S, prev_sample=prev)
        lp_t.sum().backward()
        lp_k.sum().backward()
        res[name] = bool(torch.equal(lp_t, lp_k) and torch.equal(uu.grad, uk.grad) and torch.equal(lp_k, lp))
    return res


def check_attention_backends(ctx):
    from fastvideo_grpo.distributed.fsdp import set_attention_backend
    from fastvideo_grpo.utils.dtypes import autocast_context

    dev = ctx["device"]
    backends = ["native", "_native_math"] if ctx["dry"] else ["native", "_native_flash", "_native_efficient", "flash"]
    model, kw = _probe_model(dev, tiny=ctx["dry"])
    out = {}
    for name in backends:
        try:
            set_attention_backend(model, name)
            times = []
            for _ in range(3):
                _sync()
                t0 = time.perf_counter()
                with autocast_context(dev, torch.bfloat16):
                    y = model(**kw)[0]
                y.float().square().mean().backward()
                _sync()
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            out[name] = {"ms_per_step": round(1000 * min(times[1:]), 2)}
        except Exception as e:  # noqa: BLE001 - an unavailable backend is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if "ms_per_step" not in out.get("native", {}):
        raise RuntimeError(f"the native attention backend failed: {out['native']}")
    return {"backends": out}


def check_kernel_speed(ctx):
    import logprob_kernel as lk

    dev = ctx["device"]
    cases = []
    if ctx["dry"]:
        cases += lk.run_case("tiny", (4, 8, 8), 2, dev, torch.float32, reps=1, compiled=False)
    else:
        for dtype in (torch.float32, torch.bfloat16):
            for name, shape in lk.SHAPES.items():
                cases += lk.run_case(name, shape, 8, dev, dtype, reps=5)
    out = {"cases": cases, "geomean_speedup_vs_eager": lk._geomean(c["speedup_vs_eager"] for c in cases)}
    comp = [c["speedup_vs_compiled"] for c in cases if c["speedup_vs_compiled"]]
    if comp:
        out["geomean_speedup_vs_compiled"] = lk._geomean(comp)
        out["min_speedup_vs_compiled"] = min(comp)
    out["max_fraction_of_copy_bw"] = max(c["fraction_of_copy_bw"] for c in cases)
    out["host_cost"] = lk.host_cost(dev, torch.float32, **({"rounds": 3, "calls": 100} if ctx["dry"] else {}))
    out["host_cost_aten_calls"] = out["host_cost"]["host_cost_aten_calls"]
    return out


def _probe_model(device, tiny=False):
    """The 1.1B FLUX-like transformer of ``flux_1b_720px`` (random init on ``device``) and the inputs of one
    training micro-batch (4 samples, 2025 image + 512 text tokens); ``tiny``: a 2-block model for the dry run."""
    import diffusers

    from fastvideo_grpo.models.flux import image_ids

    torch.manual_seed(0)
    width, hd, layers, text, txt_len, h = (4, 16, 1, 64, 16, 8) if tiny else (16, 128, 4, 4096, 512, 90)
    with torch.device(device):
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers, attention_head_dim=hd,
            num_attention_heads=width, joint_attention_dim=text, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
        B = 4
        kw = dict(hidden_states=torch.randn(B, (h // 2) ** 2, 64), timestep=torch.full((B,), 0.5),
                  guidance=torch.full((B,), 3.5), pooled_projections=torch.randn(B, 768),
                  encoder_hidden_states=torch.randn(B, txt_len, text), txt_ids=torch.zeros(txt_len, 3),
                  img_ids=image_ids(h, h, device, torch.float32), return_dict=False)
    return model, kw


def run_probe(variant, ctx):
    """One forward + backward + clip + AdamW step of the 1.1B model in one configuration."""
    from fastvideo_grpo.utils.dtypes import autocast_context

    from fastvideo_grpo.utils.cuda_settings import configure_attention

    dev = ctx["device"]
    configure_attention(variant.endswith("cudnn"))
    model, kw = _probe_model(dev, tiny=ctx["dry"])
    if variant.startswith("fsdp"):
        from fastvideo_grpo.config import ParallelConfig
        from fastvideo_grpo.distributed.fsdp import parallelize
        from fastvideo_grpo.distributed.parallel_dims import ParallelDims

        class _Holder:  # the adapter protocol parallelize needs
            def trainable_module(self):
                return model

            def set_compute_device(self, d):
                pass

        _ensure_process_group(ctx)
        dims = ParallelDims(world_size=1)
        dims.build_mesh(dev.type, one_process=True)
        parallelize(_Holder(), dims, ParallelConfig(), dev)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-6, fused=dev.type == "cuda")
    t0 = time.perf_counter()
    with autocast_context(dev, None if variant == "plain_fp32" else torch.bfloat16):
        out = model(**kw)[0]
    out.float().square().mean().backward()
    gn = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
    opt.step()
    _sync()
    return {"variant": variant, "grad_norm": float(gn), "seconds": round(time.perf_counter() - t0, 2),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev.type == "cuda" else None}


def check_fsdp_probe(ctx):
    """Each configuration of the 1.1B model's training step in its own process (CUDA_LAUNCH_BLOCKING=1, so
    a device fault names the kernel): tells a fault of FSDP2 from one of the model or the GRPO code."""
    results = {}
    for variant in PROBES:
        results[variant] = _run_child(["--probe", variant], ctx, env={"CUDA_LAUNCH_BLOCKING": "1"}, timeout=240)
    ctx["fsdp_ok"] = results.get("fsdp_bf16", {}).get("status") == "ok"
    out = {"variants": results, "fsdp_ok": ctx["fsdp_ok"]}
    if any(r.get("status") == "failed" for k, r in results.items() if not k.endswith("cudnn")):
        raise RuntimeError("probe failures: " + json.dumps({k: v.get("error", "")[:600] for k, v in results.items()
                                                              if v.get("status") == "failed"}))
    return out


def _run_child(args, ctx, env=None, timeout=600):
    """Run ``gpu_check.py <args>`` in a fresh process; returns its JSON result (status failed on a crash)."""
    with tempfile.TemporaryDirectory() as tmp:
        res_file = Path(tmp) / "res.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--child-out", str(res_file),
               "--fsdp", "on" if ctx.get("fsdp_ok", True) else "off"]
        if ctx["dry"]:
            cmd.append("--dry-run")
        try:
            p = subprocess.run(cmd, cwd=str(ROOT), env=dict(os.environ, **(env or {})), capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout} s"}
        if res_file.is_file():
            return json.loads(res_file.read_text())
        tail = (p.stdout + p.stderr)[-3000:]
        return {"status": "failed", "error": f"process died (exit {p.returncode}): {tail}"}


def _ensure_process_group(ctx):
    """One-process group (NCCL + gloo on CUDA, gloo on CPU) through the package's own set-up."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # MASTER_PORT=0: the one process's store binds a port the OS picks at bind time (a port found free
    # and released first could be taken by another process before the store binds it)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    from fastvideo_grpo.distributed.init import init_distributed

    env = init_distributed(ctx["device"].type)
    ctx["backend"] = env.backend


def _grpo_case(ctx, key):
    import iteration as it

    _ensure_process_group(ctx)
    it._WALL = ctx["device"].type == "cuda"
    name = SIZES[key][1 if ctx["dry"] else 0]
    res = it.run_case(name, reps=1, device=str(ctx["device"]), fsdp=ctx.get("fsdp_ok", True), keep_trainer=True)
    trainer = res.pop("trainer")
    # the ratio at the first micro-step when the rollout batch equals the training micro-batch too
    mb = trainer.cfg.grpo.micro_batch_size
    trainer.cfg.grpo.micro_batch_size = 0
    m = trainer.train_iteration()
    res["first_ratio_dev_microbatch_eq_rollout_batch"] = m["train/first_ratio_dev"]
    # the memory settings of the video recipes: rollout in chunks of the training micro-batch, one sample per
    # decode; same kernel shapes in rollout and re-scoring, so the ratio must be 1 again; peaks per phase
    trainer.cfg.grpo.micro_batch_size = mb or 1
    trainer.memory.update(rollout_batch_size=mb or 1, decode_batch_size=1)
    it._PhaseClock.run(trainer)
    m = it._PhaseClock.last_metrics
    res["first_ratio_dev_rollout_chunk_eq_microbatch"] = m["train/first_ratio_dev"]
    res["phase_peak_mem_mib_chunked"] = dict(it._PhaseClock.last_peaks, rollout_batch_size=mb or 1,
                                             decode_batch_size=1)
    res["backend"] = ctx.get("backend")
    try:  # the real-scale planner's estimate of this run's peak (python -m fastvideo_grpo.cli.plan)
        planned = it.plan_case(it.CASES[name], 141.0).memory_gib["peak"]
        res["planned_peak_gib"] = planned
        res["planned_over_measured_peak"] = planned / (res["peak_mem_mib"] / 1024)
    except Exception as e:  # noqa: BLE001 - a planner failure is reported, not fatal to the GPU check
        res["planned_peak_error"] = f"{type(e).__name__}: {e}"[:500]
    first = res["first_iteration"]
    res["ratio_within_1e-6"] = first["train/first_ratio_dev"] is not None and first["train/first_ratio_dev"] <= 1e-6
    res["loss_finite"] = first["train/loss"] is not None and math.isfinite(first["train/loss"])
    del trainer
    _free()
    if not res["loss_finite"]:
        raise RuntimeError(f"non-finite loss in the first iteration: {first}")
    return res


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_grpo_flux(ctx):
    return _grpo_case(ctx, "grpo_flux")


def check_grpo_hunyuan(ctx):
    return _grpo_case(ctx, "grpo_hunyuan")


def _learning_case(ctx):
    import iteration as it

    base = dict(it.CASES["flux_1b_720px"]) if not ctx["dry"] else dict(it.CASES["flux_tiny"])
    base.update(resolution=256 if not ctx["dry"] else 32, text_len=64 if not ctx["dry"] else 16, prompts=2, group=8,
                steps=10, tau=0.6, updates=1, micro_batch=0)
    return base


@torch.no_grad()
def _condition_vae(adapter, target_std=0.5):
    """Scale the random VAE decoder's last convolution so decoded pixels spread over the range
    (std ``target_std`` in [-1, 1] units): a default-initialised decoder maps every latent to almost
    the same grey, which leaves a pixel reward nothing to learn. Returns the std before scaling."""
    vae = adapter.vae
    z = torch.randn((4,) + tuple(adapter.latent_shape()), generator=torch.Generator().manual_seed(0))
    z = z.to(adapter.device, vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", 0) or 0)
    x = vae.decode(z, return_dict=False)[0].float()
    std = float(x.std())
    conv = vae.decoder.conv_out
    conv.weight.mul_(target_std / max(std, 1e-6))
    if conv.bias is not None:
        conv.bias.zero_()
    return std


def check_learning(ctx):
    """Train on the brightness reward; the reward must rise on the training batches (slope) and on
    fixed held-out prompts and noise (ODE sampler, the same samples before and after: a paired
    comparison, free of the iteration-to-iteration noise of the training curve)."""
    import iteration as it

    from fastvideo_grpo.training.evaluate import evaluate_policy

    _ensure_process_group(ctx)
    n = ctx["iterations"]
    case = _learning_case(ctx)
    lr = "1e-3" if ctx["dry"] else "1e-4"
    overrides = [f"--optim.lr={lr}", "--grpo.clip_range=1e-3", "--sampling.eta=0.7"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = it.make_trainer(case, Path(tmp), overrides, device=str(ctx["device"]),
                                     fsdp=ctx.get("fsdp_ok", True))
    vae_std = _condition_vae(trainer.adapter)
    held = [f"prompt_{i}" for i in range(100, 104)]

    def held_out():
        ev = evaluate_policy(trainer.adapter, held, trainer.reward_fns, case["steps"], encode=trainer.prompts.encode,
                             samples_per_prompt=4, seed=7, autocast_dtype=trainer.autocast_dtype)
        return ev["mean"]["bench_mean_brightness"]

    before = held_out()
    rewards, secs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        m = trainer.train_iteration()
        _sync()
        secs.append(time.perf_counter() - t0)
        rewards.append(m["reward/bench_mean_brightness/mean"])
        if not math.isfinite(m["train/loss"]):
            raise RuntimeError(f"non-finite loss at iteration {len(rewards)}")
    after = held_out()
    xs = list(range(n))
    mx, my = sum(xs) / n, sum(rewards) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, rewards)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    out = {"iterations": n, "rewards": rewards, "slope_per_iteration": slope, "held_out_before": before,
           "held_out_after": after, "rising": bool(after > before and slope > 0),
           "seconds_per_iteration": sorted(secs)[len(secs) // 2],
           "settings": {"case": case, "overrides": overrides, "vae_pixel_std_before_conditioning": vae_std}}
    del trainer
    _free()
    if not out["rising"]:
        raise RuntimeError(f"the brightness reward did not rise over {n} iterations: held-out {before:.4f} -> "
                           f"{after:.4f}, training slope {slope:.2e} per iteration")
    return out


def _small_trainer(ctx, tmp, extra=()):
    import iteration as it

    case = dict(it.CASES["flux_small" if not ctx["dry"] else "flux_tiny"])
    return it.make_trainer(case, Path(tmp), list(extra), device=str(ctx["device"]), fsdp=ctx.get("fsdp_ok", True))[0]


def check_checkpoint_dcp(ctx):
    from torch.distributed.tensor import DTensor

    from fastvideo_grpo.training.checkpoint import load_trainer_checkpoint, save_trainer_checkpoint

    _ensure_process_group(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        a = _small_trainer(ctx, Path(tmp) / "m")
        a.train_iteration()
        t0 = time.perf_counter()
        path = save_trainer_checkpoint(a, Path(tmp) / "ckpt")
        save_s = time.perf_counter() - t0
        torch.manual_seed(123)  # a different initialisation for the fresh trainer
        b = _small_trainer(ctx, Path(tmp) / "m2")
        t0 = time.perf_counter()
        exact_rng = load_trainer_checkpoint(b, path)
        load_s = time.perf_counter() - t0

    def full(p):
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach()

    pa = [full(p) for p in a.adapter.trainable_module().parameters()]
    pb = [full(p) for p in b.adapter.trainable_module().parameters()]
    on_cuda = all(p.device.type == ctx["device"].type for p in pb)
    same_weights = all(torch.equal(x, y) for x, y in zip(pa, pb))
    ma, mb = a.train_iteration(), b.train_iteration()
    keys = ["train/loss", "train/grad_norm", "reward/bench_mean_brightness/mean"]
    diff = {k: abs(ma[k] - mb[k]) for k in keys}
    out = {"save_s": round(save_s, 2), "load_s": round(load_s, 2), "rng_restored": exact_rng,
           "weights_identical_after_load": same_weights, "params_on_device": on_cuda,
           "next_iteration_abs_diff": diff, "next_iteration_identical": all(v == 0 for v in diff.values())}
    del a, b
    _free()
    if not same_weights:
        raise RuntimeError("weights differ after a DCP save / load round trip")
    return out


def check_cpu_offload(ctx):
    if ctx["dry"]:
        raise Skip("CPU offload keeps parameters on the host while computing on the GPU: needs CUDA")
    _ensure_process_group(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _small_trainer(ctx, tmp, ["--parallel.cpu_offload=true"])
    param_dev = next(trainer.adapter.trainable_module().parameters()).device.type
    m = trainer.train_iteration()
    out = {"param_device": param_dev, "compute_device": str(trainer.adapter.device), "loss": m["train/loss"],
           "first_ratio_dev": m["train/first_ratio_dev"]}
    del trainer
    _free()
    if not math.isfinite(out["loss"]):
        raise RuntimeError(f"non-finite loss with CPU offload: {out}")
    return out


def _real_case(ctx, name):
    """One real-size case (bench/real_size.py); FSDP2 cases over a one-process group (NCCL on a GPU)."""
    import real_size

    _ensure_process_group(ctx)
    gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    res = real_size.run(name, ctx["device"], ctx["dry"], gpu_mem)
    _free()
    if res["first_loss"] is None or not math.isfinite(res["first_loss"]):
        raise RuntimeError(f"non-finite loss in the first iteration: {res['first_loss']}")
    return res


def check_real_flux_lora(ctx):
    return _real_case(ctx, "real_flux_lora")


def check_real_hunyuan_lora(ctx):
    return _real_case(ctx, "real_hunyuan_lora")


def check_real_wan_full(ctx):
    return _real_case(ctx, "real_wan_full")


def check_real_flux_offload(ctx):
    return _real_case(ctx, "real_flux_offload")


def check_cuda_tests(ctx):
    if ctx["dry"]:
        raise Skip("the CUDA tests skip themselves without a GPU")
    files = ["tests/unit/test_device_draws.py", "tests/unit/test_ops.py"]
    t0 = time.perf_counter()
    # (the nvcc compile-only test is left out: extension_build has built the real thing)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                        "-k", "cuda and not nvcc"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    out = {"files": files, "exit_code": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "tail": p.stdout[-1500:]}
    if p.returncode != 0:
        raise RuntimeError(f"CUDA tests failed: {p.stdout[-1500:]}")
    return out


# ----------------------------------------------------------------------------- driver


IN_PARENT = ("environment", "extension_build", "fsdp_probe")  # the rest run in a child each on a GPU


def _run_check(name, ctx, budget_left=None) -> dict:
    """One check in this process: its entry (status ok / skipped / failed)."""
    t0 = time.perf_counter()
    try:
        if budget_left is not None and budget_left <= 0:
            raise Skip("the time budget (--budget-s) was spent before this check")
        entry = {"status": "ok", **globals()["check_" + name](ctx)}
    except Skip as e:
        entry = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - every failure is recorded and the next check runs
        entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:3000],
                 "traceback": traceback.format_exc()[-3000:]}
        _free()
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def _shutdown_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/gpu_check.json", help="JSON report (rewritten after every check)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: every check at tiny size, no build, no CUDA tests")
    ap.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    ap.add_argument("--iterations", type=int, default=0, help="iterations of the learning check (default 20)")
    ap.add_argument("--list", action="store_true", help="print the checks and exit")
    ap.add_argument("--budget-s", type=float, default=0, help="skip the checks not started after this many seconds")
    ap.add_argument("--isolate", default="auto", choices=["auto", "on", "off"],
                    help="run the checks after the build each in a fresh process, so that a device fault in one "
                         "cannot poison the next (auto: on a GPU)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--probe", default="", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", default="on", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))  # what a plain run runs; the real_* checks only with --only
        return 0
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CHECKS) - set(REAL_CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {CHECKS + REAL_CHECKS}")
    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device: run with --dry-run on a CPU machine")
    if args.iterations < 0:
        raise ValueError("--iterations must be >= 0")
    ctx = {"dry": args.dry_run, "device": torch.device("cpu" if args.dry_run else "cuda"),
           "iterations": args.iterations or 20, "fsdp_ok": args.fsdp == "on"}
    if args.dry_run:
        torch.set_num_threads(1)
    from fastvideo_grpo.utils.io import atomic_write_json

    if args.child or args.probe:  # a child process: one check (or probe), its entry to --child-out
        if args.probe:
            try:
                entry = {"status": "ok", **run_probe(args.probe, ctx)}
            except Exception as e:  # noqa: BLE001
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:3000],
                         "traceback": traceback.format_exc()[-3000:]}
        else:
            entry = _run_check(args.child, ctx)
        atomic_write_json(args.child_out, entry)
        _shutdown_group()
        return 0
    isolate = args.isolate == "on" or (args.isolate == "auto" and not args.dry_run)
    out_path = Path(args.out)
    report = {"bench": "gpu_check", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run,
              "isolated_processes": isolate, "checks": {}}
    t_all = time.perf_counter()
    for name in CHECKS + REAL_CHECKS:
        if (only and name not in only) or (not only and name in REAL_CHECKS):
            continue
        left = args.budget_s - (time.perf_counter() - t_all) if args.budget_s else None
        if isolate and name not in IN_PARENT and (left is None or left > 0):
            t0 = time.perf_counter()
            entry = _run_child(["--child", name, "--iterations", str(ctx["iterations"])], ctx)
            entry["seconds"] = round(time.perf_counter() - t0, 1)
        else:
            entry = _run_check(name, ctx, left)
        report["checks"][name] = entry
        report["wall_s"] = round(time.perf_counter() - t_all, 1)
        report["summary"] = {k: v["status"] for k, v in report["checks"].items()}
        atomic_write_json(out_path, report)
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s)"
              + (f" -- {entry.get('error', entry.get('reason', ''))[:300]}" if entry["status"] != "ok" else ""),
              flush=True)
    _shutdown_group()
    failed = [k for k, v in report["checks"].items() if v["status"] == "failed"]
    print(json.dumps({"summary": report["summary"], "wall_s": report["wall_s"], "out": str(out_path)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
