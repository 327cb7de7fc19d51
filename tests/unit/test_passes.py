"""Model pass counters (passes.py) through one real trainer iteration against hand-computed counts.

B = 2 prompts x 2 samples = 4 samples, T = 4 steps, the last never trained: tau 1 keeps K = 3 steps. The
rollout runs B T = 16 forwards; GRPO re-scores and back-propagates the B K = 12 kept transitions (the KL
adds 12 reference forwards); DiffusionNFT adds 12 v_old forwards; a MixGRPO window of 2 steps keeps 8.
Best-of-N (G 4, k 1) rolls out 8 x 4 = 32 and trains 2 per group: 4 x 3 = 12. A tree branching into 2 at
step 1 runs 1 + 1 + 2 + 2 = 6 forwards per group (12) and trains its 2 edges at each of steps 1 and 2 once (8;
step 0 is the unbranched trunk, never trained). Flow-DPPO takes mu_old from the rollout's kept means and
trains the 12 kept transitions in each of 3 epochs: 36 forwards, 36 backwards. DGPO evaluates the reference and the rollout
policy once per kept step (24) and trains once (12). A forward hook on the network
counts the samples it really sees, as a second, independent reference; the planner's
``passes_per_iteration`` must project the same counts."""

import pytest
import torch

from fastvideo_grpo.config import load_config
from fastvideo_grpo.data.prompt_source import PromptSource
from fastvideo_grpo.algorithms.passes import PassCounter
from fastvideo_grpo.cli.plan import passes_per_iteration
from fastvideo_grpo.training.trainer import GRPOTrainer
from support.tiny_models import tiny_toy_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")  # the reference hook, on a module with no input grads

BASE = ["--sampling.num_steps=4", "--sampling.eta=1.0", "--grpo.tau=1.0", "--grpo.group_size=2",
        "--grpo.prompts_per_iteration=2", "--grpo.num_updates_per_iteration=2",
        "--rewards=[{name: toy_colour_fidelity}]", "--train.seed=3"]

# name -> (overrides, rollout forwards, update forwards, backwards)
CASES = {
    "dance_grpo": ([], 16, 12, 12),
    "micro_batch_1": (["--grpo.micro_batch_size=1"], 16, 12, 12),
    "kl_to_reference": (["--grpo.kl_coef=0.1"], 16, 24, 12),
    "mixgrpo_window_2": (["--grpo.sde_window={mode: sliding, size: 2}"], 16, 8, 8),
    "flow_grpo_fast_1": (["--grpo.sde_window={mode: random, size: 1}", "--sampling.eta_form=flow_grpo"], 16, 4, 4),
    "best_of_n_k_1": (["--grpo.group_size=4", "--grpo.best_of_n_k=1"], 32, 12, 12),  # 2 x 4 rolled out, 2 x 2 trained
    "diffusion_nft": (["--grpo.objective=nft", "--sampling.eta=0.0", "--grpo.shared_noise=false"], 16, 24, 12),
    "tree_branch_at_1": (["--sampling.rollout=tree", "--sampling.rollout_kwargs={branch_steps: [1]}"], 12, 8, 8),
    "flow_dppo_3_epochs": (["--grpo.objective=flow_dppo", "--grpo.num_epochs=3"], 16, 36, 36),
    "dgpo": (["--grpo.objective=dgpo", "--sampling.eta=0.0", "--grpo.shared_noise=false"], 16, 36, 12),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_iteration_pass_counts_match_hand_computed(name):
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts

    overrides, rollout_fwd, update_fwd, bwd = CASES[name]
    cfg = load_config(None, BASE + overrides)
    ad = tiny_toy_adapter()
    fns, weights = build_reward_fns(cfg.rewards)
    prompts, _ = split_prompts(seed=0)
    trainer = GRPOTrainer(cfg, ad, fns, weights, PromptSource(prompts, ad.encode_prompts, seed=2))
    seen = {"fwd": 0, "bwd": 0}  # samples through the network itself (policy and reference copies)
    for module in {id(m): m for m in (ad.model, getattr(trainer.ref_adapter, "model", None)) if m}.values():
        module.register_forward_hook(lambda m, a, o: seen.__setitem__("fwd", seen["fwd"] + a[0].shape[0]))
        module.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("bwd", seen["bwd"] + go[0].shape[0]))
    for _ in range(2):  # counts are per iteration, not cumulative
        seen.update(fwd=0, bwd=0)
        m = trainer.train_iteration()
        assert (m["passes/forward_rollout"], m["passes/forward_update"], m["passes/backward"]) == (
            rollout_fwd, update_fwd, bwd)
        assert m["passes/forward"] == rollout_fwd + update_fwd == seen["fwd"]
        assert m["passes/backward"] == seen["bwd"]
    assert "predict" not in vars(ad)  # the adapter's own predict is back after the iteration
    # the planner's projection counts the same passes (it prices them in FLOPs at real scale)
    planned = passes_per_iteration(cfg)
    assert (planned["forward_rollout"], planned["forward_update"], planned["backward"]) == (rollout_fwd, update_fwd, bwd)


def test_counter_counts_samples_and_gradients_reaching_the_output():
    ad = tiny_toy_adapter()
    counter = PassCounter()
    z = torch.randn(3, 3, 16, 16)
    t = torch.full((3,), 500.0)
    cond = ad.encode_prompts(["a red circle"] * 3)
    with counter.watch(ad, None, ad):  # None and repeats are ignored
        with torch.no_grad(), counter.phase("rollout"):
            ad.predict(z, t, cond)
        out = ad.predict(z[:2], t[:2], cond={"tokens": cond["tokens"][:2]})
        ad.predict(z[:1], t[:1], cond={"tokens": cond["tokens"][:1]})  # a forward never back-propagated
        out.sum().backward()
    ad.predict(z, t, cond)  # outside the block: not counted
    assert counter.metrics() == {"passes/forward": 6, "passes/forward_rollout": 3, "passes/forward_update": 3,
                                 "passes/backward": 2}
    with pytest.raises(ValueError, match="phase"):
        with counter.phase("eval"):
            pass
