"""Tree rollouts (``sampling.rollout: tree``): the G samples of a group share their denoising prefix and branch
at chosen steps, so a group costs fewer than G x T forwards (BranchGRPO, Li et al. 2025, arXiv 2509.06040;
TreeGRPO, Ding & Ye 2025, arXiv 2512.08153). Each transition of the tree (an edge) is trained once, with the
advantage of the node it leads to, computed from the rewards of that node's leaves.

The tree of one group. Its root is the group's initial noise. At each branch step ``b_j``
(``rollout_kwargs.branch_steps``) every node draws ``c_j`` children (``branch_factor``): one forward of the
model, ``c_j`` independent draws of the step's SDE noise around the same mean; at every other step each node
takes one step (SDE or ODE, as the schedule says). G = prod c_j leaves. Step i runs one forward per node
before it, ``n(i) = prod_{b_j < i} c_j``, so a group costs ``sum_i n(i)`` forwards instead of G T. The leaves
are laid out so that the leaves under one node are contiguous (the first branch is the most significant digit).

Per-node advantages. Leaf values are the rewards. A node's value is the mean of its leaves' values
(``node_value: mean``, BranchGRPO's default) or, going up one branch level at a time, the average of its
children's values weighted by softmax over the children's edge log-probs (``prob_weighted``, BranchGRPO's
``tree_prob_weighted``); a node on a non-branch step has its only child's value. The edge into a node after
step s is then trained with

* ``normalise: depth`` (BranchGRPO): the node's value normalised among the n nodes at that depth of its tree,
  with the run's estimator: (V - mean) / std over those n nodes (std as ``grpo.advantage_std``);
* ``normalise: leaf`` (our reading of TreeGRPO): the leaves' rewards are first normalised within the group
  (the run's estimator), and the node's value is computed from those leaf advantages.

With several rewards each is done separately and the advantages are summed with the reward weights, as for
whole samples. Steps before the first branch have one node per group (no relative signal: BranchGRPO's
advantage 0) and are never trained.

Pruning (BranchGRPO): ``prune_steps`` leaves the edges of those steps untrained (depth pruning, static);
``keep_leaves: k`` trains, at the steps after the last branch, only the edges of each group's k best and k
worst leaves by advantage (width pruning). A pruned edge costs no forward and no backward.

Trained steps. Every step of the trainable window (``grpo.timestep_window`` without the last step) after the
first branch, minus ``prune_steps``, is kept for every leaf (``grpo.tau`` must be 1); an edge shared by several
leaves is trained once (``Trajectory.trained_BK`` marks the other copies untrained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ... import sde
from ...models.base import index_cond
from .. import grpo
from ..rollout import Trajectory, predict_in_chunks
from .base import ROLLOUTS, RolloutSampler

NODE_VALUES = ("mean", "prob_weighted")
NORMALISATIONS = ("depth", "leaf")


@dataclass
class TreeTrajectory(Trajectory):
    """A tree rollout's trajectory (rows = the leaves) and the log-probs of its branch edges:
    ``branch_log_probs[j]`` holds, for branch ``j``, one entry per node after it (P x N_{j+1}, tree order)."""

    branch_log_probs: List[torch.Tensor] = field(default_factory=list)


def level_values(leaf_values_PG: torch.Tensor, factors: Sequence[int],
                 branch_log_probs: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The node values of every level of P trees: entry j (P, N_j) holds the nodes after j branches (N_0 = 1: the
    trunk, N_D = G: the leaves), from the leaves' values (P, G) up. Uniform weights over the children give the
    mean of the leaves; ``branch_log_probs`` (the edges' log-probs per branch, (P * N_{j+1},)) weights them by
    softmax over each node's children."""
    P = leaf_values_PG.shape[0]
    levels = [leaf_values_PG]
    for j in reversed(range(len(factors))):
        c = factors[j]
        child = levels[0].reshape(P, -1, c)
        if branch_log_probs is None:
            parent = child.mean(dim=-1)
        else:
            w = torch.softmax(branch_log_probs[j].to(child.dtype).reshape(P, -1, c), dim=-1)
            parent = (w * child).sum(dim=-1)
        levels.insert(0, parent)
    return levels


def expand_to_leaves(node_PN: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each leaf's ancestor value: (P, N) node values -> (P * G,) (the leaves under a node are contiguous)."""
    P, N = node_PN.shape
    return node_PN.repeat_interleave(group_size // N, dim=1).reshape(-1)


class _Shape:
    """Where a tree branches: branch step -> children, and the node counts per group it implies."""

    def __init__(self, steps: Sequence[int], factors: Sequence[int]):
        self.steps, self.factors = list(steps), list(factors)
        self.factor_at = dict(zip(self.steps, self.factors))
        self.group_size = math.prod(self.factors)

    def level_after(self, step: int) -> int:
        """Branches done after step ``step`` (the depth level of the nodes it leads to)."""
        return sum(1 for b in self.steps if b <= step)

    def nodes_after(self, step: int) -> int:
        return math.prod(self.factors[:self.level_after(step)])

    def nodes_before(self, step: int) -> int:
        return self.nodes_after(step - 1)


@ROLLOUTS.register("tree")
class TreeRollout(RolloutSampler):
    """Branching rollouts sharing prefixes; per-node advantages; optional depth / width pruning."""

    per_step_advantages = True

    def __init__(self, branch_steps: Sequence[int] = (0,), branch_factor: Union[int, Sequence[int]] = 2,
                 node_value: str = "mean", normalise: str = "depth", prune_steps: Sequence[int] = (),
                 keep_leaves: int = 0):
        where = "sampling.rollout_kwargs"
        steps = [int(b) for b in (branch_steps if isinstance(branch_steps, (list, tuple)) else [branch_steps])]
        if not steps or steps != sorted(set(steps)) or steps[0] < 0:
            raise ValueError(f"{where}.branch_steps must be increasing step indices >= 0, got {branch_steps}")
        factors = [int(branch_factor)] * len(steps) if not isinstance(branch_factor, (list, tuple)) \
            else [int(c) for c in branch_factor]
        if len(factors) != len(steps) or any(c < 2 for c in factors):
            raise ValueError(f"{where}.branch_factor must be an integer >= 2 or one per branch step ({len(steps)}), "
                             f"got {branch_factor}")
        if node_value not in NODE_VALUES:
            raise ValueError(f"{where}.node_value must be one of {NODE_VALUES}, got {node_value!r}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"{where}.normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        if int(keep_leaves) < 0:
            raise ValueError(f"{where}.keep_leaves must be >= 0 (0 = no width pruning), got {keep_leaves}")
        self.shape = _Shape(steps, factors)
        self.node_value, self.normalise = node_value, normalise
        self.prune_steps = {int(s) for s in prune_steps}
        self.keep_leaves = int(keep_leaves)

    # ------------------------------------------------------------------ declarations (planner, trainer, checks)

    def forwards_per_group(self, num_steps: int, group_size: int) -> int:
        return sum(self.shape.nodes_before(i) for i in range(num_steps))

    def kept(self, window: Tuple[int, int]) -> List[int]:
        """The trained steps: the window's steps after the first branch, without ``prune_steps``."""
        lo, hi = window
        return [s for s in range(lo, hi) if s not in self.prune_steps and self.shape.nodes_after(s) >= 2]

    def keep_steps(self, num_steps, tau, batch_size, group_size, generator, window, shared=False):
        return torch.tensor(self.kept(window), dtype=torch.int64).expand(batch_size, -1).contiguous()

    def kept_per_sample(self, num_steps, window, num_kept):
        return len(self.kept(window))

    def trained_per_group(self, num_steps, group_size, window, num_kept):
        return sum(self._trained_edges(s) for s in self.kept(window))

    def _trained_edges(self, step: int) -> int:
        """Edges trained per group at ``step``: one per node after it, or 2k after the last branch when pruned."""
        n = self.shape.nodes_after(step)
        return 2 * self.keep_leaves if self.keep_leaves and step > self.shape.steps[-1] else n

    def check(self, cfg) -> None:
        from ..advantages import build_estimator
        from ..sde_window import training_window

        g, s, where = cfg.grpo, cfg.sampling, "sampling.rollout_kwargs"
        shape = self.shape
        if shape.group_size != g.group_size:
            raise ValueError(f"{where}.branch_factor {shape.factors} gives {shape.group_size} leaves per group, but "
                             f"grpo.group_size is {g.group_size}; make the product of the branch factors the group size")
        if shape.steps[-1] >= s.num_steps:
            raise ValueError(f"{where}.branch_steps {shape.steps} must be below sampling.num_steps={s.num_steps}")
        etas = s.eta_per_step()
        flat = [b for b in shape.steps if etas[b] <= 0]
        if flat:
            raise ValueError(f"{where}.branch_steps {flat} have eta = 0: their children would be identical; branch at "
                             "stochastic steps (sampling.eta / sampling.eta_schedule)")
        lo, hi = training_window(cfg)
        outside = [b for b in shape.steps if not lo <= b < hi]
        if outside:
            raise ValueError(f"{where}.branch_steps {outside} lie outside the trainable steps [{lo}, {hi}) "
                             "(grpo.timestep_window without the last step): their branches would not be trained")
        refusals = [
            (not g.shared_noise, "shares each group's initial noise (its root): set grpo.shared_noise: true"),
            (g.tau != 1.0, "trains every step of the window after the first branch: set grpo.tau: 1.0 (leave steps "
                           f"out with {where}.prune_steps)"),
            (g.sde_window.mode != "off", "keeps the static window: set grpo.sde_window.mode: off"),
            (bool(g.best_of_n_k), f"prunes with {where}.keep_leaves instead of best-of-N: set grpo.best_of_n_k: 0"),
            (s.ode_solver != "euler", "takes Euler steps at its deterministic steps: set sampling.ode_solver: euler"),
            (build_estimator(cfg).needs_global_batch, "normalises within each tree: set grpo.advantage: group"),
            (g.drop_zero_advantage, "gives each edge the advantage of its node, not of a sample: set "
                                    "grpo.drop_zero_advantage: false"),
        ]
        for bad, why in refusals:
            if bad:
                raise ValueError(f"sampling.rollout: tree {why}")
        if not self.kept((lo, hi)):
            raise ValueError(f"sampling.rollout: tree has no step to train: the window [{lo}, {hi}) holds no step "
                             f"after the first branch ({shape.steps[0]}) that {where}.prune_steps leaves in")
        if self.keep_leaves:
            if self.keep_leaves > g.group_size // 2:
                raise ValueError(f"{where}.keep_leaves must be <= grpo.group_size // 2 = {g.group_size // 2}, "
                                 f"got {self.keep_leaves}")
            if g.micro_batch_size and g.micro_batch_size % g.group_size:
                # whole groups per micro-batch: every rank then trains the same number of rows in each micro-step
                raise ValueError(f"{where}.keep_leaves needs whole groups per micro-batch: set grpo.micro_batch_size "
                                 f"to a multiple of grpo.group_size={g.group_size} (or 0)")

    # ------------------------------------------------------------------ the rollout

    @torch.no_grad()
    def __call__(self, adapter, schedule, prompts, cond_P, group_size, keep_steps_BK, generator, *,
                 shared_noise: bool = True, autocast_dtype=None, rollout_batch_size: int = 0,
                 ode_solver: str = "euler", keep_means: bool = False) -> TreeTrajectory:
        shape = self.shape
        if group_size != shape.group_size or not shared_noise or ode_solver != "euler":
            raise ValueError(f"the tree of {shape.factors} children grows {shape.group_size} samples per group from one "
                             f"shared noise with Euler steps; got group_size={group_size}, shared_noise={shared_noise}, "
                             f"ode_solver={ode_solver!r}")
        P, G = len(prompts), group_size
        B = P * G
        kept = keep_steps_BK[0].tolist()
        if keep_steps_BK.shape[0] != B or not bool((keep_steps_BK == keep_steps_BK[0]).all()):
            raise ValueError("a tree keeps the same steps for every sample (TreeRollout.keep_steps)")
        device = adapter.device
        z = adapter.initial_noise(P, generator, device=device, cond=cond_P)  # one root per group
        slot = {s: k for k, s in enumerate(kept)}
        before, after, lps, means, branch_lps = {}, {}, {}, {}, []
        n = 1  # nodes per group before step i
        for i in range(schedule.num_steps):
            cond = index_cond(cond_P, torch.arange(P * n) // n)
            out = predict_in_chunks(adapter, z, schedule.model_timestep(i, z), cond, rollout_batch_size,
                                    autocast_dtype)
            c = shape.factor_at.get(i, 1)
            if c > 1:  # one forward, c independent draws of the step's noise around the same mean
                out, z_in = out.repeat_interleave(c, dim=0), z.repeat_interleave(c, dim=0)
            else:
                z_in = z
            z_next, lp, mean, _ = schedule.step(i, out, z_in, generator=generator, need_mean=keep_means)
            z_next = z_next.to(z.dtype)
            if i in slot:
                before[i], after[i], lps[i] = z, z_next, lp.to(torch.float32)
                if keep_means:
                    means[i] = mean
            if c > 1:
                branch_lps.append(lp.to(torch.float32))
            z, n = z_next, n * c
        leaf = torch.arange(B)
        p, l = leaf // G, leaf % G
        K = len(kept)
        latents = torch.empty((B, K) + tuple(z.shape[1:]), dtype=z.dtype, device=device)
        nexts = torch.empty_like(latents)
        log_probs = torch.empty((B, K), dtype=torch.float32, device=device)
        trained = torch.zeros((B, K), dtype=torch.bool)
        kept_mean = torch.empty(latents.shape, dtype=sde.compute_dtype(z), device=device) if keep_means else None
        for k, s in enumerate(kept):
            nb, na = shape.nodes_before(s), shape.nodes_after(s)
            src_b = (p * nb + l // (G // nb)).to(device)
            src_a = (p * na + l // (G // na)).to(device)
            latents[:, k], nexts[:, k], log_probs[:, k] = before[s][src_b], after[s][src_a], lps[s][src_a]
            trained[:, k] = l % (G // na) == 0  # the edge's first leaf trains it, once
            if keep_means:  # one mean per edge (the c children of a branch share their parent's)
                kept_mean[:, k] = means[s][src_a].to(kept_mean.dtype)
        return TreeTrajectory(
            prompts=[q for q in prompts for _ in range(G)], cond=index_cond(cond_P, p.to(device)),
            steps_BK=keep_steps_BK.cpu(), latents_BK=latents, next_latents_BK=nexts, log_probs_BK=log_probs,
            final_latents=z, decoded=None, group_size=G, trained_BK=trained, means_BK=kept_mean,
            branch_log_probs=branch_lps)

    # ------------------------------------------------------------------ per-node advantages

    def step_advantages(self, traj: TreeTrajectory, rewards: Mapping[str, torch.Tensor], estimator,
                        weights: Optional[Mapping[str, float]] = None) -> torch.Tensor:
        shape, G = self.shape, traj.group_size
        B = traj.batch_size
        P = B // G
        kept = traj.steps_BK[0].tolist()
        weighted = traj.branch_log_probs if self.node_value == "prob_weighted" else None
        per_reward: Dict[str, torch.Tensor] = {}
        for name, r in rewards.items():
            leaf = r.detach().to(torch.float32)
            if self.normalise == "leaf":
                leaf = estimator(leaf, G).to(torch.float32)
            levels = level_values(leaf.reshape(P, G), shape.factors, weighted)
            cols = []
            for s in kept:
                values = levels[shape.level_after(s)]  # (P, N): the nodes after step s
                N = values.shape[1]
                adv = estimator(values.reshape(-1), N).to(torch.float32).reshape(P, N) \
                    if self.normalise == "depth" else values
                cols.append(expand_to_leaves(adv, G))
            per_reward[name] = torch.stack(cols, dim=1)
        adv_BK = grpo.weighted_sum(per_reward, weights)
        if self.keep_leaves:
            self._prune_width(traj, adv_BK, kept)
        return adv_BK

    def _prune_width(self, traj: TreeTrajectory, adv_BK: torch.Tensor, kept: List[int]) -> None:
        """At the steps after the last branch, keep only each group's k best and k worst leaves' edges."""
        late = [k for k, s in enumerate(kept) if s > self.shape.steps[-1]]
        if not late:
            return
        G = traj.group_size
        late_adv = adv_BK[:, late].detach().cpu()  # one copy to the host
        for j, k in enumerate(late):
            keep = torch.zeros(traj.batch_size, dtype=torch.bool)
            keep[grpo.best_of_n_indices(late_adv[:, j], G, self.keep_leaves)] = True
            traj.trained_BK[:, k] &= keep
