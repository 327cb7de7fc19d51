"""Model adapters end to end on CPU with tiny random-init diffusers models.

Each family's tiny denoiser + VAE is built from a config here, ``save_pretrained`` to a temporary
diffusers-format folder and loaded back through the adapter's real ``from_pretrained`` path. Then:
* a rollout (2 prompts x group 2 = batch 4) and one ``grpo_update``: shapes, ratio exactly 1 before
  the update, finite loss, parameters change;
* the deterministic sampler (``sample_ode``, eta = 0) against diffusers' own pipeline built from the
  same components, fed the same initial latents, embeddings and sigmas (``output_type="latent"``),
  and ``decode`` against the pipeline's own VAE decode (``output_type="pt"``);
* CFG: both branches receive gradients and the output is uncond + s (cond - uncond);
* LoRA: only LoRA parameters change; the merged export reproduces the LoRA model's output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastvideo_grpo.algorithms import grpo
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.models.diffusers_base import NEG
from fastvideo_grpo.algorithms.rollout import decode_latents, rollout, sample_ode
from fastvideo_grpo.algorithms.objectives.ppo_clip import grpo_update
from support.tiny_models import FAMILIES, TEXT_LEN, tiny_components

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

NUM_STEPS = 3


ALL = list(FAMILIES)
CFG_FAMILIES = ["sd", "hunyuan_i2v", "wan", "sd3", "wan22_a14b", "wan22_5b_i2v", "hunyuan15_t2v"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            comps, kw = tiny_components(name)
            for sub, m in comps.items():
                m.save_pretrained(str(root / sub))
            cache[name] = (root, kw)
        return cache[name]

    return get


def _build(folders, name, **extra):
    root, kw = folders(name)
    return ADAPTERS.build(name, model_path=str(root), **{**kw, **extra})


def _random_cond(adapter, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = {}
    for key, trailing in adapter.cond_spec().items():
        shape = (n,) + tuple(TEXT_LEN if d is None else d for d in trailing)
        if key.endswith("attention_mask"):
            m = torch.ones(shape, dtype=torch.int64)
            m[0, -2:] = 0  # a padded prompt
            cond[key] = m
        else:
            cond[key] = torch.randn(shape, generator=g)
    return cond


# ----------------------------------------------------------------------------- rollout + update


def _rollout_and_update(adapter, lr=1e-3):
    P, G = 2, 2
    B = P * G
    gen = torch.Generator().manual_seed(1)
    schedule = adapter.make_schedule(NUM_STEPS, eta=0.3)
    keep = grpo.subsample_timesteps(NUM_STEPS, 0.6, B, gen, window=adapter.trainable_steps(schedule))
    cond = _random_cond(adapter, P)
    traj = rollout(adapter, schedule, ["a", "b"], cond, G, keep, gen)
    # no window: all NUM_STEPS are candidates (a frozen expert's steps excepted: 2 of 3 for wan22_a14b)
    K = max(1, int(0.6 * NUM_STEPS))
    latent = adapter.latent_shape(cond)
    assert traj.latents_BK.shape == (B, K) + latent
    assert traj.next_latents_BK.shape == (B, K) + latent
    assert traj.log_probs_BK.shape == (B, K) and torch.isfinite(traj.log_probs_BK).all()
    assert traj.final_latents.shape == (B,) + latent
    assert traj.decoded.min() >= 0 and traj.decoded.max() <= 1
    module = adapter.trainable_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ratios = []
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    stats = grpo_update(adapter, schedule, traj, adv, opt, clip_range=1e-4, on_first_ratio=ratios.append)
    # exact by construction: rollout and re-scoring both run the whole batch (same shapes, same kernels)
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])), ratios[0]
    assert math.isfinite(stats["train/loss"]) and stats["train/grad_norm"] > 0
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    return traj, changed


def _image_or_video_shape(adapter, B):
    if getattr(adapter, "num_frames", 1) > 1:
        return (B, adapter.num_frames, 3, adapter.height, adapter.width)
    return (B, 3, adapter.height, adapter.width)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ALL)
def test_rollout_and_grpo_update(folders, name):
    adapter = _build(folders, name)
    traj, changed = _rollout_and_update(adapter)
    assert traj.decoded.shape == _image_or_video_shape(adapter, 4)
    assert changed, "no parameter changed"
    # frozen parts stay frozen
    assert not any(p.requires_grad for p in adapter.vae.parameters())


@pytest.mark.parametrize("name", ALL)
def test_rewarded_sample_is_the_released_codes(folders, name):
    """What the trainer rewards. Flow models (the released flux_step, FLUX / Hunyuan / SkyReels / Wan scripts):
    the last step is deterministic and the decoded latent is pred_original = z - sigma * model_output at the
    last step, re-derived here from the stored z_{T-1}. Stable Diffusion (released train_grpo_sd.py): the last
    DDIM step keeps its eta and the decoded latent is that stochastic sample."""
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.training.trainer import build_schedule

    adapter = _build(folders, name)
    cfg = load_config(None, ["--sampling.num_steps=%d" % NUM_STEPS, "--sampling.eta=0.3"])
    schedule = build_schedule(cfg, adapter)
    flow = adapter.prediction_type == "flow"
    assert schedule.eta[:-1].tolist() == [0.3] * (NUM_STEPS - 1)
    assert float(schedule.eta[-1]) == (0.0 if flow else 0.3)
    B, last = 2, NUM_STEPS - 1
    cond = _random_cond(adapter, 1)
    keep = torch.full((B, 1), last, dtype=torch.int64)  # store the last transition to re-derive it
    traj = rollout(adapter, schedule, ["a"], cond, B, keep, torch.Generator().manual_seed(3))
    z = traj.latents_BK[:, 0]
    with torch.no_grad():
        u = adapter.predict(z, schedule.model_timestep(last, z), traj.cond).float()
    if flow:
        sigma = float(schedule.sigmas[last])
        assert sigma > 0 and float(schedule.sigmas[-1]) == 0.0
        pred_original = z.float() - sigma * u
        torch.testing.assert_close(traj.final_latents.float(), pred_original, rtol=1e-5, atol=1e-5)
        assert torch.equal(traj.log_probs_BK, torch.zeros_like(traj.log_probs_BK))  # a point mass: nothing to train
    else:
        ode = schedule.step(last, u, z, eta=0.0)[0]
        assert (traj.final_latents.float() - ode).abs().max() > 1e-4  # noise was added at the last step
        assert (traj.log_probs_BK != 0).all()
    torch.testing.assert_close(traj.decoded, adapter.decode(traj.final_latents), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- against diffusers


def _flow_pipe_sigmas():
    return list(np.linspace(1.0, 0.0, NUM_STEPS + 1)[:-1])


def _pipeline_sd(adapter, cond, z0, output_type="latent"):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionPipeline(vae=adapter.vae, text_encoder=None, tokenizer=None, unet=adapter.model,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, height=adapter.height,
                width=adapter.width, latents=z0.clone(), eta=0.0, output_type=output_type).images


def _pipeline_flux(adapter, cond, z0, output_type="latent"):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift, use_dynamic_shifting=False)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=adapter.vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=adapter.model)
    packed = pipe._pack_latents(z0.clone(), *z0.shape[:2], *z0.shape[2:])
    out = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               guidance_scale=adapter.guidance_scale, num_inference_steps=NUM_STEPS, sigmas=_flow_pipe_sigmas(),
               height=adapter.height, width=adapter.width, latents=packed, output_type=output_type).images
    if output_type != "latent":
        return out
    return pipe._unpack_latents(out, adapter.height, adapter.width, pipe.vae_scale_factor)


def _pipeline_hunyuan(adapter, cond, z0, output_type="latent"):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift)
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=adapter.model,
                                          vae=adapter.vae, scheduler=sched, text_encoder_2=None, tokenizer_2=None)
    return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                prompt_attention_mask=cond["prompt_attention_mask"], guidance_scale=adapter.guidance_scale,
                num_inference_steps=NUM_STEPS, height=adapter.height, width=adapter.width,
                num_frames=adapter.num_frames, latents=z0.clone(), output_type=output_type).frames


def _patch_sigmas(sched):
    """WanPipeline calls set_timesteps(N) without sigmas: make it use linspace(1, 0, N + 1)[:-1] (then shifted)."""
    orig = sched.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **kw):
        return orig(sigmas=_flow_pipe_sigmas(), device=device)

    sched.set_timesteps = set_timesteps
    return sched


def _pipeline_wan(adapter, cond, z0, output_type="latent"):
    sched = _patch_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift))
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=adapter.model, vae=adapter.vae,
                                 scheduler=sched)
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, height=adapter.height,
                width=adapter.width, num_frames=adapter.num_frames, latents=z0.clone(), output_type=output_type).frames


def _pipeline_sd3(adapter, cond, z0, output_type="latent"):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=adapter.model, scheduler=sched, vae=adapter.vae,
                                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"],
                guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, sigmas=_flow_pipe_sigmas(),
                height=adapter.height, width=adapter.width, latents=z0.clone(), output_type=output_type).images


def _pipeline_qwen_image(adapter, cond, z0, output_type="latent", scheduler=None):
    sched = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift, use_dynamic_shifting=False)
    pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=adapter.vae, text_encoder=None, tokenizer=None,
                                       transformer=adapter.model)
    cfg = {}
    if adapter.uses_cfg:
        cfg = dict(negative_prompt_embeds=cond[NEG + "prompt_embeds"],
                   negative_prompt_embeds_mask=cond[NEG + "prompt_attention_mask"])
    packed = pipe._pack_latents(z0.clone(), *z0.shape[:2], *z0.shape[2:])
    out = pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_attention_mask"],
               true_cfg_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, sigmas=_flow_pipe_sigmas(),
               height=adapter.height, width=adapter.width, latents=packed, output_type=output_type, **cfg).images
    if output_type != "latent":
        return out
    return pipe._unpack_latents(out, adapter.height, adapter.width, pipe.vae_scale_factor)[:, :, 0]


def _pipeline_wan22_a14b(adapter, cond, z0, output_type="latent"):
    """WanPipeline with both experts and the folder's boundary: the 3 steps run high, high, low."""
    sched = _patch_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift))
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=adapter.model,
                                 transformer_2=adapter.low_noise_model, vae=adapter.vae, scheduler=sched,
                                 boundary_ratio=adapter.boundary_ratio)
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                guidance_scale=adapter.cfg_scale, guidance_scale_2=adapter.cfg_scale_2, num_inference_steps=NUM_STEPS,
                height=adapter.height, width=adapter.width, num_frames=adapter.num_frames, latents=z0.clone(),
                output_type=output_type).frames


def _pipeline_wan22_5b(adapter, cond, z0, output_type="latent"):
    """WanPipeline as the TI2V-5B folder configures it (expand_timesteps: per-token timesteps)."""
    sched = _patch_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift))
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=adapter.model, vae=adapter.vae,
                                 scheduler=sched, expand_timesteps=True)
    return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, height=adapter.height,
                width=adapter.width, num_frames=adapter.num_frames, latents=z0.clone(), output_type=output_type).frames


def _pipeline_hunyuan15(adapter, cond, z0, output_type="latent"):
    """HunyuanVideo15Pipeline with its CFG guider at the adapter's scale (no sigmas argument needed: the pipeline
    samples linspace(1, 0, T + 1)[:-1], shifted by the scheduler)."""
    from diffusers.guiders import ClassifierFreeGuidance

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift)
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=adapter.model,
                                            vae=adapter.vae, scheduler=sched, text_encoder_2=None, tokenizer_2=None,
                                            guider=ClassifierFreeGuidance(guidance_scale=adapter.cfg_scale))
    embeds = {f"{neg}{name}": cond[f"{neg}{key}"] for neg in ("", NEG)
              for name, key in (("prompt_embeds", "prompt_embeds"), ("prompt_embeds_mask", "prompt_attention_mask"),
                                ("prompt_embeds_2", "glyph_embeds"), ("prompt_embeds_mask_2", "glyph_attention_mask"))}
    return pipe(**embeds, num_inference_steps=NUM_STEPS, height=adapter.height, width=adapter.width,
                num_frames=adapter.num_frames, latents=z0.clone(), output_type=output_type).frames


def _flux2_to_ours(pipe, latents):
    """The pipeline's latent (the VAE's, unpatchified and denormalised) back to the adapter's space."""
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (pipe._patchify_latents(latents) - mean) / std


def _flux2_scheduler():
    """FLUX.2's scheduler: the pipeline passes BFL's empirical mu, used with dynamic (exponential) shifting."""
    return diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")


def _pipeline_flux2_klein(adapter, cond, z0, output_type="latent"):
    pipe = diffusers.Flux2KleinPipeline(scheduler=_flux2_scheduler(), vae=adapter.vae, text_encoder=None,
                                        tokenizer=None, transformer=adapter.model, is_distilled=not adapter.uses_cfg)
    neg = {"negative_prompt_embeds": cond[NEG + "prompt_embeds"]} if adapter.uses_cfg else {}
    out = pipe(prompt_embeds=cond["prompt_embeds"], guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS,
               height=adapter.height, width=adapter.width, latents=z0.clone(), output_type=output_type, **neg).images
    return _flux2_to_ours(pipe, out) if output_type == "latent" else out


def _pipeline_flux2_dev(adapter, cond, z0, output_type="latent"):
    pipe = diffusers.Flux2Pipeline(scheduler=_flux2_scheduler(), vae=adapter.vae, text_encoder=None, tokenizer=None,
                                   transformer=adapter.model)
    out = pipe(prompt_embeds=cond["prompt_embeds"], guidance_scale=adapter.guidance_scale,
               num_inference_steps=NUM_STEPS, height=adapter.height, width=adapter.width, latents=z0.clone(),
               output_type=output_type).images
    if output_type != "latent":
        return out
    return out.transpose(1, 2).reshape(z0.shape)  # the packed tokens, row-major


def _valid_rows(cond, key):
    return [e[m.bool()] for e, m in zip(cond[key + "prompt_embeds"], cond[key + "prompt_attention_mask"])]


def _pipeline_z_image(adapter, cond, z0, output_type="latent"):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift, use_dynamic_shifting=False)
    pipe = diffusers.ZImagePipeline(scheduler=sched, vae=adapter.vae, text_encoder=None, tokenizer=None,
                                    transformer=adapter.model)
    neg = _valid_rows(cond, NEG) if adapter.uses_cfg else None
    return pipe(prompt_embeds=_valid_rows(cond, ""), negative_prompt_embeds=neg, guidance_scale=adapter.guidance_scale,
                cfg_normalization=adapter.cfg_normalization, num_inference_steps=NUM_STEPS, height=adapter.height,
                width=adapter.width, latents=z0.clone(), output_type=output_type).images


PIPELINES = {"sd": _pipeline_sd, "flux": _pipeline_flux, "hunyuan_t2i": _pipeline_hunyuan,
             "hunyuan_t2v": _pipeline_hunyuan, "wan": _pipeline_wan, "sd3": _pipeline_sd3,
             "qwen_image": _pipeline_qwen_image, "wan22_a14b": _pipeline_wan22_a14b, "wan22_5b": _pipeline_wan22_5b,
             "hunyuan15_t2v": _pipeline_hunyuan15,
             "flux2_klein": _pipeline_flux2_klein, "flux2_dev": _pipeline_flux2_dev,
             "z_image": _pipeline_z_image}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_ode_sampling_matches_diffusers_pipeline(folders, name):
    adapter = _build(folders, name)
    cond = _random_cond(adapter, 2, seed=3)
    z0 = adapter.initial_noise(2, torch.Generator().manual_seed(4))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = PIPELINES[name](adapter, cond, z0)
        pixels = PIPELINES[name](adapter, cond, z0, output_type="pt")  # the pipeline's own VAE decode
        ours_pixels = adapter.decode(ours)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    assert not torch.allclose(ours, z0)
    torch.testing.assert_close(ours_pixels, pixels.float().reshape(ours_pixels.shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [("flux2_klein", dict(true_cfg_scale=4.0)),
                                         ("z_image", dict(guidance_scale=3.0)),
                                         ("z_image", dict(guidance_scale=3.0, cfg_normalization=1.0))],
                         ids=["flux2_klein_base_cfg", "z_image_cfg", "z_image_cfg_normalization"])
def test_cfg_of_the_2026_image_families_matches_their_pipelines(folders, name, kwargs):
    """FLUX.2 [klein] base (true CFG with an empty-prompt negative) and Z-Image base (pos + g (pos - neg), i.e.
    scale 1 + g, optionally the guided norm capped at cfg_normalization x the conditional one's) against their
    pipelines; both branches get gradients."""
    adapter = _build(folders, name, **kwargs)
    assert adapter.uses_cfg
    cond = _random_cond(adapter, 2, seed=51)
    z0 = adapter.initial_noise(2, torch.Generator().manual_seed(52))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = PIPELINES[name](adapter, cond, z0)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    if kwargs.get("cfg_normalization"):  # the cap really acts on these samples
        plain = _build(folders, name, guidance_scale=kwargs["guidance_scale"])
        assert (sample_ode(plain, plain.make_schedule(NUM_STEPS, eta=0.0), cond, z0) - ours).abs().max() > 1e-4
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        cond[k].requires_grad_(True)
    t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z0)
    adapter.predict(z0, t, cond).square().mean().backward()
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        assert cond[k].grad is not None and cond[k].grad.abs().sum() > 0, k


def test_flux2_and_z_image_settings_are_checked(folders):
    with pytest.raises(ValueError, match="no guidance embedding.*true_cfg_scale"):
        _build(folders, "flux2_klein", guidance_scale=3.5)
    with pytest.raises(ValueError, match="shift must be a number or 'dynamic'"):
        _build(folders, "flux2_klein", shift="auto")
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        _build(folders, "z_image", guidance_scale=-1.0)
    # a static shift is FlowSchedule's; the default is BFL's empirical mu at this image size and step count
    from fastvideo_grpo.models.flux2 import empirical_mu

    ad = _build(folders, "flux2_klein")
    sched = _flux2_scheduler()
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1 / 7, 7)), mu=empirical_mu(ad.image_seq_len, 7))
    torch.testing.assert_close(ad.make_schedule(7).sigmas.float(), sched.sigmas, rtol=1e-6, atol=1e-6)
    assert empirical_mu(4096 + 300, 10) == pytest.approx(0.00016927 * 4396 + 0.45666666)  # the 200-step fit


def test_z_image_prompt_mask_hides_padding(folders):
    """Masked-out text tokens never reach the transformer (the pipeline passes each prompt's valid tokens)."""
    adapter = _build(folders, "z_image")
    cond = _random_cond(adapter, 2, seed=53)  # row 0: last 2 tokens padded
    z = adapter.initial_noise(2, torch.Generator().manual_seed(54))
    t = adapter.make_schedule(NUM_STEPS).model_timestep(1, z)
    changed = {k: v.clone() for k, v in cond.items()}
    changed["prompt_embeds"][0, -2:] += 5.0
    with torch.no_grad():
        a, b = adapter.predict(z, t, cond), adapter.predict(z, t, changed)
        changed["prompt_embeds"][0, 0] += 5.0
        c = adapter.predict(z, t, changed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (c[0] - a[0]).abs().max() > 1e-4 and torch.equal(c[1], a[1])


def test_qwen_image_true_cfg_with_norm_rescale_matches_diffusers_pipeline(folders):
    """true_cfg_scale > 1: the pipeline's guided prediction rescaled to the conditional one's norm per token."""
    adapter = _build(folders, "qwen_image", true_cfg_scale=4.0)
    assert adapter.uses_cfg and set(adapter.cond_spec()) == {
        "prompt_embeds", "prompt_attention_mask", NEG + "prompt_embeds", NEG + "prompt_attention_mask"}
    cond = _random_cond(adapter, 2, seed=31)
    z0 = adapter.initial_noise(2, torch.Generator().manual_seed(32))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = _pipeline_qwen_image(adapter, cond, z0)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    # the rescale is what the pipeline does: without it the samples differ
    plain = _build(folders, "qwen_image", true_cfg_scale=4.0, cfg_renorm=False)
    assert (sample_ode(plain, plain.make_schedule(NUM_STEPS, eta=0.0), cond, z0) - ours).abs().max() > 1e-3
    # both branches get gradients through the rescaled combination
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        cond[k].requires_grad_(True)
    t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z0)
    adapter.predict(z0, t, cond).square().mean().backward()
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        assert cond[k].grad is not None and cond[k].grad.abs().sum() > 0, k


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_qwen_image_edit_matches_diffusers_pipeline(folders, monkeypatch, cfg_scale):
    """The reference image as QwenImageEditPipeline feeds it: VAE-encoded (posterior mode, normalised), packed,
    appended to the noisy tokens with img_shapes covering both, only the noisy tokens' velocity used; with
    CFG, the same reference in both branches and the norm rescaling. The reference has another size and
    aspect (24 x 32 pixels) than the generated 16 x 16 image, so img_shapes must name each."""
    from PIL import Image
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    ref_h, ref_w = 24, 32
    adapter = _build(folders, "qwen_image_edit", true_cfg_scale=cfg_scale, reference_resolution=[ref_h, ref_w])
    # the pipeline sizes the reference to about 1024 x 1024 pixels; shrunk to the tiny VAE's scale here
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: (ref_w, ref_h, None))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift, use_dynamic_shifting=False)
    pipe = diffusers.QwenImageEditPipeline(scheduler=sched, vae=adapter.vae, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=adapter.model)
    image = Image.fromarray((np.random.RandomState(0).rand(ref_h, ref_w, 3) * 255).astype("uint8"))
    B = 2
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image, ref_h, ref_w).unsqueeze(2)
        ref = pipe._encode_vae_image(pixels, generator=None)[:, :, 0]  # what data_prep stores
    cond = _random_cond(adapter, B, seed=41)
    cond["image_latents"] = ref.expand(B, -1, -1, -1)
    assert ref.shape == (1, 4, ref_h // 2, ref_w // 2)
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(42))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    neg = {}
    if adapter.uses_cfg:
        neg = dict(negative_prompt_embeds=cond[NEG + "prompt_embeds"],
                   negative_prompt_embeds_mask=cond[NEG + "prompt_attention_mask"])
    with torch.no_grad():
        packed = pipe._pack_latents(z0.clone(), *z0.shape[:2], *z0.shape[2:])
        theirs = pipe(image=image, prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_attention_mask"],
                      true_cfg_scale=cfg_scale, num_inference_steps=NUM_STEPS, sigmas=_flow_pipe_sigmas(),
                      height=adapter.height, width=adapter.width, latents=packed, output_type="latent", **neg).images
    theirs = pipe._unpack_latents(theirs, adapter.height, adapter.width, pipe.vae_scale_factor)[:, :, 0]
    assert ours.shape == theirs.shape == z0.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    # the reference image really conditions the sample
    other = dict(cond, image_latents=torch.randn_like(cond["image_latents"]))
    assert (sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), other, z0) - ours).abs().max() > 1e-3


def test_qwen_image_edit_rejects_a_missing_or_misshaped_reference(folders):
    adapter = _build(folders, "qwen_image_edit")  # 12 x 12-pixel references: (4, 6, 6) latents, 9 tokens
    assert adapter.cond_spec() == {"prompt_embeds": (None, 32), "prompt_attention_mask": (None,),
                                   "image_latents": (4, 6, 6)}
    assert adapter.extra_image_tokens == 9
    cond = _random_cond(adapter, 2)
    z = adapter.initial_noise(2, torch.Generator().manual_seed(43))
    t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z)
    cases = [
        ({k: v for k, v in cond.items() if k != "image_latents"}, "image_latents is missing"),
        (dict(cond, image_latents=cond["image_latents"][:, :, None]),  # the released code's (C, 1, h, w)
         r"image_latents has trailing shape \(4, 1, 6, 6\), expected \(4, 6, 6\)"),
        (dict(cond, image_latents=cond["image_latents"][:, :3]), r"trailing shape \(3, 6, 6\)"),
        (dict(cond, image_latents=cond["image_latents"][:1]), "image_latents has 1 rows, expected 2"),
        (dict(cond, image_latents=cond["image_latents"][:, :, :4]),
         r"\(4, 4, 6\).*12x12-pixel reference.*--height 12 --width 12.*reference_resolution"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            adapter.predict(z, t, bad)
    with pytest.raises(ValueError, match="reference_resolution must be divisible by 4"):
        _build(folders, "qwen_image_edit", reference_resolution=10)


def test_qwen_image_dynamic_shift_follows_the_folders_scheduler(folders, tmp_path):
    """shift: dynamic reads the scheduler config (mu from the image token count, exponential shift, terminal
    stretch) and samples as QwenImagePipeline with that scheduler."""
    root, kw = folders("qwen_image")
    folder = tmp_path / "qwen_dynamic"
    folder.mkdir()
    for sub in ("transformer", "vae"):
        (folder / sub).symlink_to(root / sub)
    sched_cfg = dict(use_dynamic_shifting=True, base_image_seq_len=8, max_image_seq_len=64, base_shift=0.5,
                     max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential")
    diffusers.FlowMatchEulerDiscreteScheduler(**sched_cfg).save_pretrained(str(folder / "scheduler"))
    adapter = ADAPTERS.build("qwen_image", model_path=str(folder), shift="dynamic", **kw)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    mu = calculate_shift(adapter.image_seq_len, 8, 64, 0.5, 0.9)
    ref.set_timesteps(sigmas=_flow_pipe_sigmas(), mu=mu)
    ours = adapter.make_schedule(NUM_STEPS)
    torch.testing.assert_close(ours.sigmas.float(), ref.sigmas, rtol=1e-6, atol=1e-6)
    assert abs(float(ours.sigmas[-2]) - 0.02) < 1e-6  # stretched to the terminal value
    cond = _random_cond(adapter, 2, seed=33)
    z0 = adapter.initial_noise(2, torch.Generator().manual_seed(34))
    mine = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = _pipeline_qwen_image(adapter, cond, z0, scheduler=ref)
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="dynamic"):
        ADAPTERS.build("qwen_image", model_path=str(folder), shift="auto", **kw)


def test_qwen_image_refuses_sequence_parallelism(folders):
    with pytest.raises(ValueError, match="parallel.sp: 1"):
        _build(folders, "qwen_image").sequence_parallel_plan()


def test_qwen_image_prompt_mask_hides_padding(folders):
    """Padded text tokens (mask 0) do not reach the prediction; unmasked ones do."""
    adapter = _build(folders, "qwen_image")
    cond = _random_cond(adapter, 2, seed=35)  # row 0: last 2 tokens padded
    z = adapter.initial_noise(2, torch.Generator().manual_seed(36))
    t = adapter.make_schedule(NUM_STEPS).model_timestep(1, z)
    changed = {k: v.clone() for k, v in cond.items()}
    changed["prompt_embeds"][0, -2:] += 5.0
    with torch.no_grad():
        a, b = adapter.predict(z, t, cond), adapter.predict(z, t, changed)
        changed["prompt_embeds"][0, 0] += 5.0
        c = adapter.predict(z, t, changed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # row 1's inputs are unchanged and the batch shape is the same: the same kernels give it the same bits
    assert (c[0] - a[0]).abs().max() > 1e-4 and torch.equal(c[1], a[1])


def test_skyreels_i2v_matches_diffusers_pipeline(folders):
    adapter = _build(folders, "hunyuan_i2v")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift)
    pipe = diffusers.HunyuanSkyreelsImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=adapter.model, vae=adapter.vae, scheduler=sched,
        text_encoder_2=None, tokenizer_2=None)
    B = 2
    image = torch.rand(B, 3, adapter.height, adapter.width)
    pre = pipe.video_processor.preprocess(image, height=adapter.height, width=adapter.width)
    with torch.no_grad():
        _, image_latents = pipe.prepare_latents(pre, B, 4, adapter.height, adapter.width, adapter.num_frames,
                                                torch.float32, "cpu", torch.Generator().manual_seed(7))
    cond = _random_cond(adapter, B, seed=5)
    cond["image_latents"] = image_latents[:, :, :1]
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(6))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = pipe(image=image, prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                      prompt_attention_mask=cond["prompt_attention_mask"],
                      negative_prompt_embeds=cond[NEG + "prompt_embeds"],
                      negative_pooled_prompt_embeds=cond[NEG + "pooled_prompt_embeds"],
                      negative_prompt_attention_mask=cond[NEG + "prompt_attention_mask"],
                      true_cfg_scale=adapter.cfg_scale, guidance_scale=adapter.guidance_scale,
                      num_inference_steps=NUM_STEPS, height=adapter.height, width=adapter.width,
                      num_frames=adapter.num_frames, latents=z0.clone(), generator=torch.Generator().manual_seed(7),
                      output_type="latent").frames
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)


def test_wan_i2v_matches_diffusers_pipeline(folders):
    adapter = _build(folders, "wan_i2v")
    sched = _patch_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=adapter.vae, scheduler=sched,
                                             image_processor=None, image_encoder=None, transformer=adapter.model)
    B = 2
    image = torch.rand(1, 3, adapter.height, adapter.width)  # WanImageToVideoPipeline takes one image per call
    pre = pipe.video_processor.preprocess(image, height=adapter.height, width=adapter.width)
    with torch.no_grad():
        _, condition = pipe.prepare_latents(pre, B, 16, adapter.height, adapter.width, adapter.num_frames,
                                            torch.float32, "cpu", None, latents=torch.zeros(B, 16, 1, 1, 1))
    cond = _random_cond(adapter, B, seed=8)
    cond["image_condition"] = condition
    cond["image_embeds"] = cond["image_embeds"][:1].expand(B, -1, -1)  # the pipeline repeats one image embedding
    pipe.encode_image = lambda *args, **kw: cond["image_embeds"][:1]  # stands in for the CLIP vision encoder
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(9))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = pipe(image=image, prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond[NEG + "prompt_embeds"],
                      guidance_scale=adapter.cfg_scale,
                      num_inference_steps=NUM_STEPS, height=adapter.height, width=adapter.width,
                      num_frames=adapter.num_frames, latents=z0.clone(), output_type="latent").frames
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- Wan 2.2


def test_wan22_5b_i2v_matches_diffusers_pipeline(folders):
    """TI2V-5B with a first frame, as WanImageToVideoPipeline with expand_timesteps: the reference latent replaces
    the first latent frame, whose tokens get timestep 0; the pipeline's final latent (first frame overwritten by
    the reference) is what sample_ode ends at. The reference really conditions the other frames."""
    adapter = _build(folders, "wan22_5b_i2v")
    sched = _patch_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(shift=adapter.shift))
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=adapter.vae, scheduler=sched,
                                             image_processor=None, image_encoder=None, transformer=adapter.model,
                                             expand_timesteps=True)
    B = 2
    image = torch.rand(1, 3, adapter.height, adapter.width)
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(51))
    with torch.no_grad():
        pre = pipe.video_processor.preprocess(image, height=adapter.height, width=adapter.width)
        _, reference, _ = pipe.prepare_latents(pre, B, adapter.vae.config.z_dim, adapter.height, adapter.width,
                                               adapter.num_frames, torch.float32, "cpu", None, latents=z0.clone())
    cond = _random_cond(adapter, B, seed=52)
    cond["image_latents"] = reference
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    with torch.no_grad():
        theirs = pipe(image=image, prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond[NEG + "prompt_embeds"],
                      guidance_scale=adapter.cfg_scale, num_inference_steps=NUM_STEPS, height=adapter.height,
                      width=adapter.width, num_frames=adapter.num_frames, latents=z0.clone(), output_type="latent").frames
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ours[:, :, :1], reference, rtol=0, atol=1e-5)  # the first frame is the reference
    other = dict(cond, image_latents=torch.randn_like(reference))
    moved = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), other, z0)
    assert (moved[:, :, 1:] - ours[:, :, 1:]).abs().max() > 1e-3
    # the first frame's velocity is parameter-free: no gradient reaches the model through it
    t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z0)
    v = adapter.predict(z0, t, cond)
    grads = torch.autograd.grad(v[:, :, :1].sum(), list(adapter.model.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_wan22_a14b_routes_steps_to_the_experts_and_trains_only_the_high_noise_one(folders):
    """Each sample goes to the expert of its timestep (t >= 875: high noise, below: low noise, each with its CFG
    scale) also in a mixed batch; only the high-noise expert is trainable, the low-noise one is declared for
    sharding; the steps training may pick are the high-noise ones and the trainer refuses a window past them."""
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.training.trainer import build_schedule

    adapter = _build(folders, "wan22_a14b")
    assert (adapter.cfg_scale, adapter.cfg_scale_2, adapter.boundary_timestep) == (4.0, 3.0, 875.0)
    assert adapter.frozen_denoisers() == [adapter.low_noise_model]
    assert not any(p.requires_grad for p in adapter.low_noise_model.parameters())
    assert all(p.requires_grad for p in adapter.trainable_module().parameters())
    cond = _random_cond(adapter, 3, seed=53)
    z = adapter.initial_noise(3, torch.Generator().manual_seed(54))
    t = torch.tensor([900.0, 500.0, 875.0])  # high, low, high (the boundary itself is high noise)
    mixed = adapter.predict(z, t, cond)
    with torch.no_grad():
        for i, (model, scale) in enumerate([(adapter.model, 4.0), (adapter.low_noise_model, 3.0),
                                            (adapter.model, 4.0)]):
            c = model(hidden_states=z[i:i + 1], timestep=t[i:i + 1], encoder_hidden_states=cond["prompt_embeds"][i:i + 1],
                      return_dict=False)[0]
            u = model(hidden_states=z[i:i + 1], timestep=t[i:i + 1],
                      encoder_hidden_states=cond[NEG + "prompt_embeds"][i:i + 1], return_dict=False)[0]
            torch.testing.assert_close(mixed[i:i + 1], u + scale * (c - u), rtol=1e-4, atol=1e-5)
    mixed.square().sum().backward()
    assert all(p.grad is None for p in adapter.low_noise_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.model.parameters())
    # the schedule's steps: t = 1000, 960 (high) | 857 (low)
    schedule = adapter.make_schedule(NUM_STEPS)
    assert adapter.trainable_steps(schedule) == (0, 2)
    base = ["--model.name=wan22_a14b", f"--sampling.num_steps={NUM_STEPS}", "--rewards=[{name: toy_geneval}]"]
    build_schedule(load_config(None, base), adapter)  # [0, 2): the last step is never trained
    with pytest.raises(ValueError, match=r"grpo.timestep_window: \[0, 2\]"):
        build_schedule(load_config(None, base + ["--grpo.train_last_step=true"]), adapter)
    with pytest.raises(ValueError, match="guidance_scale_2 > 1 needs guidance_scale > 1"):
        _build(folders, "wan22_a14b", guidance_scale=1.0)


def test_wan22_a14b_reads_its_boundary_and_needs_both_experts(folders, tmp_path):
    import json

    root, kw = folders("wan22_a14b")
    kw = {k: v for k, v in kw.items() if k != "boundary_ratio"}
    folder = tmp_path / "a14b"
    folder.mkdir()
    for sub in ("transformer", "vae"):
        (folder / sub).symlink_to(root / sub)
    with pytest.raises(FileNotFoundError, match="transformer_2/config.json"):
        ADAPTERS.build("wan22_a14b", model_path=str(folder), **kw)
    (folder / "transformer_2").symlink_to(root / "transformer_2")
    with pytest.raises(ValueError, match="boundary_ratio"):
        ADAPTERS.build("wan22_a14b", model_path=str(folder), **kw)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.9}))
    assert ADAPTERS.build("wan22_a14b", model_path=str(folder), **kw).boundary_timestep == 900.0
    missing = ADAPTERS.signature_of("wan22_a14b").missing_model_files({"model_path": str(tmp_path / "none")})
    assert missing and "transformer_2/" in missing[0]


# ----------------------------------------------------------------------------- HunyuanVideo 1.5


def test_hunyuan15_static_forward_is_the_models(folders):
    """The planner's replica of the transformer forward (static shapes: the text tokens put in the model's order --
    valid vision / ByT5 / Qwen tokens first -- by a stable sort instead of boolean masks) gives the diffusers
    forward's prediction for a batch whose rows have different padding (one without glyph text at all), with
    gradients; padded tokens reach neither; and it runs under fake tensors, where the diffusers forward cannot."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    adapter = _build(folders, "hunyuan15_t2v", guidance_scale=1.0)
    cond = _random_cond(adapter, 3, seed=61)
    cond["prompt_attention_mask"][1, 3:] = 0
    cond["glyph_attention_mask"][2] = 0  # a prompt without quoted text
    z = adapter.initial_noise(3, torch.Generator().manual_seed(62))
    t = torch.tensor([900.0, 500.0, 100.0])
    x = torch.cat([z, torch.zeros_like(z), torch.zeros_like(z[:, :1])], dim=1)
    ours = adapter._static_forward(x, t, cond)
    theirs = adapter.predict(z, t, cond)  # the model's own forward
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    params = [p for p in adapter.model.parameters()]
    g_ours = torch.autograd.grad(ours.square().sum(), params, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs.square().sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        changed = {k: v.clone() for k, v in cond.items()}
        changed["prompt_embeds"][1, 3:] += 7.0
        changed["glyph_embeds"][2] += 7.0
        for fwd in (lambda cc: adapter._static_forward(x, t, cc), lambda cc: adapter.predict(z, t, cc)):
            torch.testing.assert_close(fwd(changed), theirs.detach(), rtol=1e-5, atol=1e-6)
        changed["prompt_embeds"][1, 0] += 7.0
        assert (adapter._static_forward(x, t, changed)[1] - ours[1]).abs().max() > 1e-4
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = adapter.predict(torch.zeros_like(z), torch.zeros(3), cond)
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):  # why the replica exists
            adapter.model(hidden_states=torch.zeros_like(x), timestep=torch.zeros(3),
                          encoder_hidden_states=cond["prompt_embeds"],
                          encoder_attention_mask=cond["prompt_attention_mask"].float(),
                          encoder_hidden_states_2=cond["glyph_embeds"],
                          encoder_attention_mask_2=cond["glyph_attention_mask"].float(),
                          image_embeds=torch.zeros(3, 729, 16), return_dict=False)
    assert out.shape == z.shape


# ----------------------------------------------------------------------------- LTX-2


def test_ltx2_matches_diffusers_pipeline_video_and_audio(folders):
    """LTX2Pipeline on the same components (its text connectors fed the same raw text-encoder states; no STG, no
    modality guidance), the same video and audio noise and its own dynamic-shift sigmas: both streams of the
    deterministic sample, CFG in clean-prediction space with the std rescale and per-stream scales, the cross
    timestep; and the decoded video against the pipeline's own decode."""
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
    from support.tiny_models import tiny_ltx2_audio_vae, tiny_ltx2_connectors, tiny_ltx2_vocoder

    adapter = _build(folders, "ltx2", use_cross_timestep=True)
    assert adapter.uses_cfg and (adapter.cfg_scale, adapter.audio_cfg_scale, adapter.guidance_rescale) == (3.0, 7.0, 0.7)
    n = adapter.video_tokens
    assert (n, adapter.audio_tokens) == (3 * 4 * 4, 5) and adapter.latent_shape() == (n + 5, 4)
    torch.manual_seed(0)
    connectors = tiny_ltx2_connectors()
    g = torch.Generator().manual_seed(71)
    B, L = 2, 8
    raw = {p: torch.randn(B, L, 16 * 3, generator=g) for p in ("", NEG)}
    masks = {p: torch.ones(B, L, dtype=torch.int64) for p in ("", NEG)}
    masks[""][0, :3] = 0  # left padding
    masks[NEG][:, :5] = 0
    cond = {}
    with torch.no_grad():
        for p in ("", NEG):  # what data_prep stores: the connectors' outputs
            cond[p + "prompt_embeds"], cond[p + "audio_prompt_embeds"], cond[p + "prompt_attention_mask"] = \
                connectors(raw[p], masks[p], padding_side="left")
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(72))
    ours = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, z0)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                      base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTX2Pipeline(scheduler=sched, vae=adapter.vae, audio_vae=tiny_ltx2_audio_vae(), text_encoder=None,
                        tokenizer=None, connectors=connectors, transformer=adapter.model, vocoder=tiny_ltx2_vocoder())
    args = dict(prompt_embeds=raw[""], prompt_attention_mask=masks[""], negative_prompt_embeds=raw[NEG],
                negative_prompt_attention_mask=masks[NEG], height=adapter.height, width=adapter.width,
                num_frames=adapter.num_frames, frame_rate=adapter.frame_rate, num_inference_steps=NUM_STEPS,
                guidance_scale=3.0, guidance_rescale=0.7, audio_guidance_scale=7.0, audio_guidance_rescale=0.7,
                stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0,
                use_cross_timestep=True, latents=z0[:, :n].clone(), audio_latents=z0[:, n:].clone(), return_dict=False)
    with torch.no_grad():
        video, audio = pipe(**args, output_type="latent")
        pixels, _ = pipe(**args, output_type="pt")
        ours_pixels = adapter.decode(ours)
    f, h, w = adapter.latent_frames, adapter.latent_h, adapter.latent_w
    vae = adapter.vae
    ours_video = LTX2Pipeline._denormalize_latents(LTX2Pipeline._unpack_latents(ours[:, :n], f, h, w), vae.latents_mean,
                                                   vae.latents_std, vae.config.scaling_factor)
    torch.testing.assert_close(ours_video, video.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(LTX2Pipeline._unpack_audio_latents(ours[:, n:], 5, num_mel_bins=2), audio.float(),
                               rtol=1e-5, atol=2e-5)  # the audio VAE's mean 0 / std 1: no (de)normalisation
    assert (ours - z0).abs().max() > 1e-2
    torch.testing.assert_close(ours_pixels, pixels.float(), rtol=1e-4, atol=1e-4)
    # the audio tokens are part of the video's computation (audio-to-video attention), as in the pipeline
    other = torch.cat([z0[:, :n], torch.randn_like(z0[:, n:])], dim=1)
    moved = sample_ode(adapter, adapter.make_schedule(NUM_STEPS, eta=0.0), cond, other)
    assert (moved[:, :n] - ours[:, :n]).abs().max() > 1e-4


def test_ltx2_refuses_sequence_parallelism_and_bad_frame_counts(folders):
    adapter = _build(folders, "ltx2")
    with pytest.raises(ValueError, match="parallel.sp: 1"):
        adapter.sequence_parallel_plan()
    with pytest.raises(ValueError, match="num_frames must be 2k \\+ 1"):
        _build(folders, "ltx2", num_frames=4)


# ----------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("name", CFG_FAMILIES)
def test_cfg_trains_both_branches(folders, name):
    adapter = _build(folders, name)
    assert adapter.uses_cfg
    cond = _random_cond(adapter, 2, seed=11)
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        cond[k].requires_grad_(True)
    z = adapter.initial_noise(2, torch.Generator().manual_seed(12))
    t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z)
    out = adapter.predict(z, t, cond)
    out.square().mean().backward()
    for k in ("prompt_embeds", NEG + "prompt_embeds"):
        assert cond[k].grad is not None and cond[k].grad.abs().sum() > 0, f"no gradient reaches {k}"
    # the output is the CFG combination of the two branches
    with torch.no_grad():
        shared = {k: cond[k] for k in adapter.shared_keys}
        c = adapter._forward(z, t, {**{k: cond[k] for k in adapter.branch_keys}, **shared})
        u = adapter._forward(z, t, {**{k: cond[NEG + k] for k in adapter.branch_keys}, **shared})
    torch.testing.assert_close(out.detach(), u + adapter.cfg_scale * (c - u), rtol=1e-4, atol=1e-5)
    if "prompt_attention_mask" in adapter.branch_keys:  # negatives of another length: padded + masked
        short = dict(cond, **{NEG + k: cond[NEG + k][:, :3].detach() for k in ("prompt_embeds", "prompt_attention_mask")})
        with torch.no_grad():
            u_short = adapter._forward(z, t, {**{k: short[NEG + k] for k in adapter.branch_keys}, **shared})
            out_short = adapter.predict(z, t, short)
        torch.testing.assert_close(out_short, u_short + adapter.cfg_scale * (c - u_short), rtol=1e-4, atol=1e-5)
    # missing negatives are a user error that names the key
    bad = {k: v for k, v in cond.items() if not k.startswith(NEG)}
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        adapter.predict(z, t, bad)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_lora_trains_only_lora_and_merged_export_matches(folders, name, tmp_path):
    adapter = _build(folders, name, lora_rank=4, lora_alpha=8)
    module = adapter.trainable_module()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _, changed = _rollout_and_update(adapter, lr=1e-2)
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any(".lora_B." in n for n in changed)  # the update moved the model off the base weights

    # merged export: a plain diffusers folder / state dict, same output as the LoRA model
    sd = adapter.state_dict_for_export()
    assert not any("lora" in k or "base_layer" in k for k in sd)
    out_dir = adapter.save_pretrained(tmp_path / "export")
    merged = getattr(diffusers, adapter.model_class).from_pretrained(str(out_dir), local_files_only=True)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    cond = _random_cond(adapter, 2, seed=13)
    z = adapter.initial_noise(2, torch.Generator().manual_seed(14))
    t = adapter.make_schedule(NUM_STEPS).model_timestep(1, z)
    with torch.no_grad():
        lora_out = adapter.predict(z, t, cond)
        adapter.model = merged
        merged_out = adapter.predict(z, t, cond)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- user errors


def test_missing_model_folder_names_expected_subfolders(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/"):
        ADAPTERS.build("sd", model_path=str(tmp_path / "nope"))
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        ADAPTERS.build("flux", model_path=str(tmp_path))


def test_unknown_adapter_kwarg_is_a_value_error(folders):
    root, kw = folders("sd")
    with pytest.raises(ValueError, match="shift"):
        ADAPTERS.build("sd", model_path=str(root), shift=3.0, **kw)


def test_lora_target_typo_is_a_value_error(folders):
    with pytest.raises(ValueError, match="no_such_layer"):
        _build(folders, "flux", lora_rank=2, lora_target_modules=["no_such_layer"])


def test_sd_schedule_follows_the_folders_scheduler_config(folders, tmp_path):
    root, kw = folders("sd")
    folder = tmp_path / "sd_linear"
    folder.mkdir()
    for sub in ("unet", "vae"):
        (folder / sub).symlink_to(root / sub)
    cfg = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=1, set_alpha_to_one=False)
    diffusers.PNDMScheduler(**cfg).save_pretrained(str(folder / "scheduler"))  # SD v1.4 ships a PNDM config
    adapter = ADAPTERS.build("sd", model_path=str(folder), **kw)
    ours = adapter.make_schedule(10)
    ref = diffusers.DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    ref.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.alpha_t.float(), ref.alphas_cumprod[ref.timesteps])


def test_gradient_checkpointing_keeps_gradients(folders):
    grads = []
    for ckpt in (False, True):
        adapter = _build(folders, "wan", gradient_checkpointing=ckpt)
        adapter.trainable_module().train()
        cond = _random_cond(adapter, 2, seed=15)
        z = adapter.initial_noise(2, torch.Generator().manual_seed(16))
        t = adapter.make_schedule(NUM_STEPS).model_timestep(0, z)
        adapter.predict(z, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.trainable_module().parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_cond_spec_shapes(folders):
    adapter = _build(folders, "hunyuan_t2v")
    spec = adapter.cond_spec()
    assert spec == {"prompt_embeds": (None, 16), "prompt_attention_mask": (None,), "pooled_prompt_embeds": (8,)}
    cond = _random_cond(adapter, 2)
    cond["pooled_prompt_embeds"] = torch.zeros(2, 9)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        adapter.validate_cond(cond)


# ----------------------------------------------------------------------------- memory (issue 23)


def _record_sizes(adapter, method):
    """Wrap ``adapter.<method>`` to record the batch size of every call."""
    sizes, original = [], getattr(adapter, method)

    def wrapper(z, *args, **kwargs):
        sizes.append(z.shape[0])
        return original(z, *args, **kwargs)

    setattr(adapter, method, wrapper)
    return sizes


def _record_draws(monkeypatch):
    from fastvideo_grpo.utils import rng

    draws, original = [], rng.randn

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(rng, "randn", spy)
    return draws


@pytest.mark.numerics
@pytest.mark.parametrize("name", ALL)
def test_chunked_rollout_matches_the_whole_batch(folders, name, monkeypatch):
    """``rollout_batch_size`` / ``decode_batch_size``: every sample gets the same noise as in the whole
    batch and the same result up to the CPU kernels' batch-size-dependent rounding (MKL takes another
    GEMM path below 4 rows, oneDNN picks convolution algorithms by batch size, sigmoid / silu round a
    tensor's tail elements differently: docs/performance.md); the PPO ratio before the first update is
    exactly 1 when the training micro-batch equals the rollout chunk (same kernel shapes)."""
    adapter = _build(folders, name)
    P, G = 2, 2
    B = P * G
    cond = _random_cond(adapter, P)
    schedule = adapter.make_schedule(NUM_STEPS, eta=0.3)
    draws = _record_draws(monkeypatch)

    def run(rb, db):
        gen = torch.Generator().manual_seed(1)
        keep = grpo.subsample_timesteps(NUM_STEPS, 0.6, B, gen, window=adapter.trainable_steps(schedule))
        start = len(draws)
        traj = rollout(adapter, schedule, ["a", "b"], cond, G, keep, gen, rollout_batch_size=rb, decode_batch_size=db)
        return traj, draws[start:]

    ref, ref_draws = run(0, 0)
    sizes, dec_sizes = _record_sizes(adapter, "predict"), _record_sizes(adapter, "decode")
    got, got_draws = run(1, 3)
    assert sizes == [1] * (B * NUM_STEPS) and dec_sizes == [3, 1]  # the chunking really happened
    assert len(got_draws) == len(ref_draws) == 1 + NUM_STEPS
    assert all(torch.equal(a, b) for a, b in zip(ref_draws, got_draws))  # the same noise, bit for bit
    for f in ("latents_BK", "next_latents_BK", "final_latents", "decoded"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=0, atol=2e-5)
    torch.testing.assert_close(got.log_probs_BK, ref.log_probs_BK, rtol=0, atol=1e-4)
    # decoding in chunks: per-sample decodes (VAE slicing, on for the video VAEs) give the same pixels
    chunked = decode_latents(adapter, ref.final_latents, 3)
    if adapter.vae_slicing:  # both decode one sample at a time: the same shapes, hence the same bits
        assert torch.equal(chunked, ref.decoded)
    torch.testing.assert_close(chunked, ref.decoded, rtol=0, atol=1e-5)
    # evaluation sampler in chunks
    z0 = adapter.initial_noise(B, torch.Generator().manual_seed(4))
    cond_B = _random_cond(adapter, B, seed=5)
    ode_sched = adapter.make_schedule(NUM_STEPS, eta=0.0)
    torch.testing.assert_close(sample_ode(adapter, ode_sched, cond_B, z0, rollout_batch_size=3),
                               sample_ode(adapter, ode_sched, cond_B, z0), rtol=0, atol=2e-5)
    # PPO ratio exactly 1: micro-batch = rollout chunk
    opt = torch.optim.SGD([p for p in adapter.trainable_module().parameters() if p.requires_grad], lr=0.0)
    ratios = []
    stats = grpo_update(adapter, schedule, got, torch.tensor([1.0, -1.0, -1.0, 1.0]), opt, clip_range=1e-4,
                        micro_batch_size=1, on_first_ratio=ratios.append)
    assert torch.equal(ratios[0], torch.ones_like(ratios[0])) and stats["train/first_ratio_dev"] == 0.0


VIDEO_FAMILIES = ["hunyuan_t2i", "hunyuan_t2v", "hunyuan_i2v", "wan", "wan_i2v", "wan22_a14b", "wan22_5b",
                  "wan22_5b_i2v", "hunyuan15_t2v", "ltx2"]


@pytest.mark.parametrize("name", ALL)
def test_vae_tiling_and_slicing_are_on_by_default_for_the_video_vaes(folders, name):
    adapter = _build(folders, name)
    video = name in VIDEO_FAMILIES
    assert (adapter.vae_tiling, adapter.vae_slicing) == (video, video)
    assert (adapter.vae.use_tiling, adapter.vae.use_slicing) == (video, video)
    off = _build(folders, name, vae_tiling=False, vae_slicing=False)
    assert not off.vae.use_tiling and not off.vae.use_slicing
    on = _build(folders, name, vae_tiling=True, vae_slicing=True)
    assert on.vae.use_tiling and on.vae.use_slicing
    assert on.decoder_modules() == [on.vae]


# tiles small enough to cut the tiny models' 32 x 32 frames (diffusers' defaults: 256 px, stride 192)
SMALL_TILES = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                   tile_sample_stride_width=8)


@pytest.mark.parametrize("name", ["hunyuan_t2v", "wan"])
def test_vae_tile_sizes_reach_the_vae_and_slicing_keeps_pixels(folders, name):
    """Tiled decoding (dict of ``enable_tiling`` arguments) really runs: the pixels move. How far they
    move depends on tile size against the decoder's receptive field (global, through the mid-block
    attention of HunyuanVideo's VAE): bench/vae_tiling.py measures it at diffusers' default tiles,
    docs/performance.md states it. Sliced decoding is exactly the per-sample decode."""
    plain = _build(folders, name, vae_tiling=False, vae_slicing=False)
    tiled = _build(folders, name, vae_tiling=SMALL_TILES, vae_slicing=False)
    assert (tiled.vae.tile_sample_min_height, tiled.vae.tile_sample_stride_width) == (16, 8)
    z = plain.initial_noise(2, torch.Generator().manual_seed(21))
    with torch.no_grad():
        ref = plain.decode(z)
        out = tiled.decode(z)
        per_sample = torch.cat([plain.decode(z[i:i + 1]) for i in range(2)])
        sliced = _build(folders, name, vae_tiling=False, vae_slicing=True).decode(z)
    assert out.shape == ref.shape and out.min() >= 0 and out.max() <= 1
    assert (out - ref).abs().max() > 1e-3  # tiling ran
    assert torch.equal(sliced, per_sample)


def test_vae_tiling_options_are_checked(folders):
    with pytest.raises(ValueError, match="does not take"):
        _build(folders, "hunyuan_t2v", vae_tiling={"tile_size": 3})
    with pytest.raises(ValueError, match="accepted: nothing"):
        _build(folders, "flux", vae_tiling={"tile_sample_min_height": 16})
    with pytest.raises(ValueError, match="vae_tiling must be"):
        _build(folders, "flux", vae_tiling="yes")
    with pytest.raises(ValueError, match="vae_slicing must be"):
        _build(folders, "flux", vae_slicing=1)
