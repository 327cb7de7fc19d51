"""Tree rollouts (samplers/tree.py) against independent references.

* One branch of G children at the first step is DanceGRPO's shared-noise rollout: the same draws from the same
  generator, so the tree must give ``rollout()``'s samples, kept transitions and log-probs (up to the GEMM
  rounding of one forward on P instead of B rows), with P + (T - 1) B forwards instead of T B (a spy on the model).
* A two-level tree: every leaf's path, recomputed without sharing (one forward per leaf row, no prefix reused),
  gives the same log-probs, step means (``keep_means``), steps and final sample; leaves under one node hold the same latents, siblings differ.
* Per-node advantages against BranchGRPO's definitions written out here on explicit nodes and plain floats:
  node value = mean of its leaves' rewards (or, per branch, the softmax-over-children's-edge-log-probs average),
  normalised among the nodes of the same depth of its tree, (v - mean) / (std_{n-1} + 1e-8); and the leaf
  normalisation (group advantages first, then the node means); width pruning keeps the best and worst leaves.
* The config checks refuse what the tree cannot draw or train with.
"""

import itertools
import math

import pytest
import torch

from fastvideo_grpo.algorithms.advantages import GroupAdvantage
from fastvideo_grpo.algorithms.objectives import build_objective
from fastvideo_grpo.algorithms.rollout import rollout
from fastvideo_grpo.algorithms.samplers import ROLLOUTS
from fastvideo_grpo.algorithms.samplers.tree import TreeTrajectory
from fastvideo_grpo.config import load_config
from fastvideo_grpo.sde import with_deterministic_last_step
from support.tiny_models import tiny_toy_adapter

EPS32 = torch.finfo(torch.float32).eps
PROMPTS = ["two red circles", "one blue square"]


def _spy_rows(model):
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    return seen


def test_one_branch_at_the_first_step_is_the_shared_noise_rollout_with_fewer_forwards():
    ad = tiny_toy_adapter()
    sched = with_deterministic_last_step(ad.make_schedule(4, 1.0))
    P, G, T = 2, 4, 4
    tree = ROLLOUTS.build("tree", branch_steps=[0], branch_factor=G)
    keep = tree.keep_steps(T, 1.0, P * G, G, None, (0, 3))
    assert keep.tolist() == [[0, 1, 2]] * (P * G)
    rows = _spy_rows(ad.model)
    a = tree(ad, sched, PROMPTS, ad.encode_prompts(PROMPTS), G, keep, torch.Generator().manual_seed(5))
    assert rows == [P] + [P * G] * (T - 1) and sum(rows) == P * tree.forwards_per_group(T, G)
    rows.clear()
    b = rollout(ad, sched, PROMPTS, ad.encode_prompts(PROMPTS), G, keep, torch.Generator().manual_seed(5),
                decode=False)
    assert rows == [P * G] * T
    # the same draws; only step 0's forward ran on P rows instead of B (float32 GEMM rounding, propagated
    # through T steps of latents of size ~3): a few dozen ulps of the largest latent
    tol = 64 * EPS32 * float(b.latents_BK.abs().max())
    for f in ("latents_BK", "next_latents_BK", "log_probs_BK", "final_latents"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=tol)
    # the root edges are shared by no two leaves here (G children at step 0): every slot is trained
    assert a.trained_BK.all()


def test_two_level_tree_equals_the_unshared_computation_of_every_leaf():
    ad = tiny_toy_adapter(1)
    sched = with_deterministic_last_step(ad.make_schedule(4, 1.0))
    P, G, T = 2, 4, 4
    tree = ROLLOUTS.build("tree", branch_steps=[0, 1], branch_factor=2)
    keep = tree.keep_steps(T, 1.0, P * G, G, None, (0, 3))
    cond = ad.encode_prompts(PROMPTS)
    rows = _spy_rows(ad.model)
    traj = tree(ad, sched, PROMPTS, cond, G, keep, torch.Generator().manual_seed(2), keep_means=True)
    assert rows == [P, 2 * P, 4 * P, 4 * P] and sum(rows) == P * tree.forwards_per_group(T, G) == 22
    B = P * G
    leaf_cond = {k: v.repeat_interleave(G, dim=0) for k, v in cond.items()}
    # the unshared computation: every leaf's own transition at each kept step, one forward per leaf
    with torch.no_grad():
        for k, step in enumerate([0, 1, 2]):
            z, z_next = traj.latents_BK[:, k], traj.next_latents_BK[:, k]
            outs = torch.cat([ad.predict(z[b:b + 1], sched.model_timestep(step, z[b:b + 1]),
                                         {n: v[b:b + 1] for n, v in leaf_cond.items()}) for b in range(B)])
            _, lp, mean, std = sched.step(step, outs, z, prev_sample=z_next)
            torch.testing.assert_close(traj.log_probs_BK[:, k], lp.float(), rtol=0, atol=1e-5)
            # the kept step means (keep_means: objectives comparing with the rollout policy's mean)
            torch.testing.assert_close(traj.means_BK[:, k], mean.to(traj.means_BK.dtype), rtol=0,
                                       atol=64 * EPS32 * float(mean.abs().max()))
            if k + 1 < 3:  # a path: the next kept step starts where this one ended (the same stored tensor)
                assert torch.equal(traj.latents_BK[:, k + 1], z_next)
        z = traj.next_latents_BK[:, 2]
        outs = torch.cat([ad.predict(z[b:b + 1], sched.model_timestep(3, z[b:b + 1]),
                                     {n: v[b:b + 1] for n, v in leaf_cond.items()}) for b in range(B)])
        final = sched.step(3, outs, z)[0]  # the deterministic last step
    torch.testing.assert_close(traj.final_latents, final.to(traj.final_latents.dtype), rtol=0,
                               atol=64 * EPS32 * float(final.abs().max()))
    # shared prefixes: leaves 0-1 and 2-3 of a group share their node after step 0; step 0's parent is the root
    lat = traj.latents_BK.reshape(P, G, 3, -1)
    assert all(torch.equal(lat[p, 0, 0], lat[p, l, 0]) for p in range(P) for l in range(G))  # one root
    assert torch.equal(lat[0, 0, 1], lat[0, 1, 1]) and not torch.equal(lat[0, 0, 1], lat[0, 2, 1])
    assert not torch.equal(lat[0, 0, 2], lat[0, 1, 2])  # siblings of the step-1 branch differ
    assert not torch.equal(lat[0, 0, 0], lat[1, 0, 0])  # another prompt, another root
    # each edge trained once: step 0 has 2 edges per group, steps 1-2 have 4
    assert traj.trained_BK.reshape(P, G, 3).sum(dim=1).tolist() == [[2, 4, 4]] * P
    assert tree.trained_per_group(T, G, (0, 3), 3) == 10


# ----------------------------------------------------------------------------- advantages on explicit nodes


def _branchgrpo_reference(rewards, factors, steps, kept, edge_log_probs=None, leaf_normalise=False):
    """BranchGRPO's node rewards and depth advantages on explicit nodes (one tree per prompt), plain floats.

    Nodes after step s are named by the digits of the branches done by then; a leaf is its full digit tuple.
    ``edge_log_probs[(p, prefix)]``: the log-prob of the edge into the node ``prefix`` at its branch step."""
    G = math.prod(factors)
    P = len(rewards) // G
    leaves = list(itertools.product(*[range(c) for c in factors]))  # tree order: first branch most significant

    def value(p, prefix, vals):
        depth = len(prefix)
        if depth == len(factors):
            return vals[p * G + leaves.index(prefix)]
        kids = [prefix + (d,) for d in range(factors[depth])]
        kv = [value(p, kid, vals) for kid in kids]
        if edge_log_probs is None:
            return sum(kv) / len(kv)
        w = [math.exp(edge_log_probs[(p, kid)]) for kid in kids]
        return sum(wi * vi for wi, vi in zip(w, kv)) / sum(w)

    def normalise(xs):
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        return [(x - m) / (sd + 1e-8) for x in xs]

    vals = list(rewards)
    if leaf_normalise:  # group-relative advantages of the leaves first
        vals = [a for p in range(P) for a in normalise(vals[p * G:(p + 1) * G])]
    out = [[0.0] * len(kept) for _ in range(P * G)]
    for k, s in enumerate(kept):
        depth = sum(1 for b in steps if b <= s)
        for p in range(P):
            nodes = list(itertools.product(*[range(c) for c in factors[:depth]]))
            v = [value(p, n, vals) for n in nodes]
            adv = v if leaf_normalise else normalise(v)
            for i, leaf in enumerate(leaves):
                out[p * G + i][k] = adv[nodes.index(leaf[:depth])]
    return out


def _tree_traj(P, G, kept, branch_log_probs=()):
    B = P * G
    return TreeTrajectory(prompts=[""] * B, cond={}, steps_BK=torch.tensor([kept] * B),
                          latents_BK=torch.zeros(B, len(kept), 1), next_latents_BK=torch.zeros(B, len(kept), 1),
                          log_probs_BK=torch.zeros(B, len(kept)), final_latents=torch.zeros(B, 1), group_size=G,
                          trained_BK=torch.ones(B, len(kept), dtype=torch.bool), branch_log_probs=list(branch_log_probs))


@pytest.mark.parametrize("node_value,normalise", [("mean", "depth"), ("prob_weighted", "depth"), ("mean", "leaf"),
                                                  ("prob_weighted", "leaf")])
def test_per_node_advantages_follow_branchgrpos_definitions(node_value, normalise):
    steps, factors, kept = [0, 2], [2, 3], [0, 1, 2, 3]
    P, G = 2, 6
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(P * G, generator=g, dtype=torch.float64)
    # edge log-probs of the two branches, tree order: (P x 2,) after step 0, (P x 6,) after step 2
    lp0, lp2 = torch.randn(P * 2, generator=g, dtype=torch.float64), torch.randn(P * 6, generator=g, dtype=torch.float64)
    edge = {(p, (a,)): float(lp0[p * 2 + a]) for p in range(P) for a in range(2)}
    edge.update({(p, (a, b)): float(lp2[p * 6 + a * 3 + b]) for p in range(P) for a in range(2) for b in range(3)})
    tree = ROLLOUTS.build("tree", branch_steps=steps, branch_factor=factors, node_value=node_value,
                          normalise=normalise)
    got = tree.step_advantages(_tree_traj(P, G, kept, [lp0, lp2]), {"r": rewards}, GroupAdvantage())
    want = _branchgrpo_reference(rewards.tolist(), factors, steps, kept,
                                 edge if node_value == "prob_weighted" else None, normalise == "leaf")
    # float32 results of float64 inputs: a few float32 ulps of values of order 1
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=8 * EPS32)


def test_several_rewards_are_normalised_apart_then_weighted_and_width_pruning_keeps_best_and_worst():
    steps, factors, kept = [0, 1], [2, 2], [0, 1, 2, 3]
    P, G = 2, 4
    r1 = torch.tensor([0.1, 0.9, 0.4, 0.3, 5.0, 1.0, 2.0, 3.0])
    r2 = torch.tensor([10.0, 0.0, 3.0, 7.0, 1.0, 1.0, 2.0, 8.0])
    tree = ROLLOUTS.build("tree", branch_steps=steps, branch_factor=factors, keep_leaves=1)
    traj = _tree_traj(P, G, kept)
    got = tree.step_advantages(traj, {"a": r1, "b": r2}, GroupAdvantage(), {"a": 1.0, "b": 0.5})
    want = torch.tensor(_branchgrpo_reference(r1.tolist(), factors, steps, kept)) + \
        0.5 * torch.tensor(_branchgrpo_reference(r2.tolist(), factors, steps, kept))
    torch.testing.assert_close(got, want, rtol=0, atol=8 * EPS32 * 2)
    # steps 2 and 3 come after the last branch (step 1): only the best and the worst leaf of each group train them
    late = got[:, 2].reshape(P, G)
    for p in range(P):
        best, worst = int(late[p].argmax()), int(late[p].argmin())
        assert traj.trained_BK[p * G:(p + 1) * G, 2].nonzero().flatten().tolist() == sorted([best, worst])
        assert torch.equal(traj.trained_BK[p * G:(p + 1) * G, 3], traj.trained_BK[p * G:(p + 1) * G, 2])
    assert traj.trained_BK[:, :2].all()  # the branch steps' edges are not width-pruned
    assert tree.trained_per_group(4, G, (0, 4), 4) == 2 + 4 + 2 + 2


TREE = ["--sampling.num_steps=6", "--sampling.eta=1.0", "--grpo.tau=1.0", "--grpo.group_size=4",
        "--sampling.rollout=tree", "--sampling.rollout_kwargs={branch_steps: [0, 2], branch_factor: 2}"]


def test_config_checks_refuse_what_the_tree_cannot_draw_or_train():
    cfg = load_config(None, TREE)
    build_objective(cfg)  # fine as is
    for extra, match in [
        (["--grpo.group_size=8"], "gives 4 leaves per group.*grpo.group_size is 8"),
        (["--grpo.tau=0.6"], "grpo.tau: 1.0"),
        (["--grpo.shared_noise=false"], "grpo.shared_noise: true"),
        (["--grpo.sde_window={mode: sliding, size: 2}"], "sde_window.mode: off"),
        (["--grpo.best_of_n_k=1"], "best_of_n_k: 0"),
        (["--grpo.advantage=global"], "grpo.advantage: group"),
        (["--sampling.eta_schedule=[0, 1, 0, 1, 1, 1]"], r"steps \[0, 2\] have eta = 0"),
        (["--grpo.timestep_window=[1, 5]"], r"branch_steps \[0\] lie outside the trainable steps \[1, 5\)"),
        (["--sampling.rollout_kwargs={branch_steps: [0, 2], keep_leaves: 1}", "--grpo.micro_batch_size=2",
          "--grpo.prompts_per_iteration=2"], "multiple of grpo.group_size"),
        (["--sampling.rollout_kwargs={branch_steps: [0, 2], brnch_factor: 2}"], "does not take.*brnch_factor"),
        (["--sampling.rollout_kwargs={branch_steps: [2, 0]}"], "increasing step indices"),
        (["--grpo.objective=dgpo"], "gives each trained step its own advantage, which grpo.objective: dgpo does not"),
        (["--grpo.objective=nft"], "does not read"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_objective(load_config(None, TREE + extra))
    # the tree's own check (an objective that needs log-probs refuses eta 0 in the window before it)
    with pytest.raises(ValueError, match=r"branch_steps \[0, 2\] have eta = 0: their children would be identical"):
        ROLLOUTS.build("tree", branch_steps=[0, 2]).check(load_config(None, TREE + [
            "--sampling.eta_schedule=[0, 1, 0, 1, 1, 1]"]))
