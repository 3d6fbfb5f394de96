"""GRPOVI: reward variance increase before GRPO ("Accelerating RLHF Training with Reward Variance Increase").

Problem (one prompt group of n samples)
---------------------------------------
Rewards r in [m, M]^n, weights p (p_i >= 0, sum p = 1; in reflow p = softmax over the group of the
reference model's sequence log-probs). Replace r by the z that solves

    maximise   sum_i p_i z_i^2                    (= p-weighted variance + c^2, c fixed)
    subject to m <= z_i <= M,
               sum_i p_i z_i = c := sum_i p_i r_i (the weighted mean is kept),
               z keeps the order of r:  r_i > r_j  =>  z_i >= z_j,
               and ties are kept:       r_i = r_j  =>  z_i  = z_j.

GRPO advantages are then computed on z elsewhere; this module only produces z.
r itself is feasible, so the weighted variance never decreases (equality iff z = r).

Ties: tied rewards get equal z
------------------------------
Breaking ties "in a fixed order" (e.g. by index) would, by the letter, let two samples with the same
reward be pushed apart: r = (0.5, 0.5), p uniform, [0, 1] would become z = (1, 0). That invents a
preference between answers the reward model scored identically, gives an all-equal group (which
carries no signal and must keep zero GRPO advantage) a non-zero advantage, and makes z depend on the
arbitrary order of samples within the batch (the map would not be permutation-equivariant). So we
keep ties: samples with equal rewards form one *block* that gets a single value. The problem is then
the same problem over the K distinct reward values (blocks b = 1..K in descending reward order) with
block weights P_b = sum of p over the block, and the order constraint w_1 >= w_2 >= ... >= w_K.
Example: r = (0.7, 0.7, 0.1), p uniform, [0, 1] gives z = (0.75, 0.75, 0) (the letter would give (1, 0.5, 0)).

Three-level structure
---------------------
The feasible set is a polytope and sum P_b w_b^2 is convex, so the maximum is attained at a vertex.
At a vertex K linearly independent constraints are active. Split w into its L runs of equal values
("levels"): the order constraints that hold with equality inside runs supply K - L equations, the
mean constraint one, and bounds at most two more (one for a run at M, one for a run at m). Hence
L <= 3 and a vertex reads, in block order,

    w = (M, ..., M,  alpha, ..., alpha,  m, ..., m)      k blocks at M, j blocks at m, m <= alpha <= M,

with alpha fixed by the mean constraint. A middle run that is empty can always be re-labelled as a
non-empty one (alpha = M on the k-th block, or alpha = m), so take Q := weight of the middle > 0.

Single-pass search (which split points need checking)
-----------------------------------------------------
Let A_k = P_1 + ... + P_k (weight at M) and B_j = P_{K-j+1} + ... + P_K (weight at m), Q = 1 - A - B > 0:

    alpha = (c - M A_k - m B_j) / Q.

1. Feasibility decouples. alpha >= m  <=>  c - M A - m(1 - A) >= 0  <=>  A_k <= a* := (c - m) / (M - m),
   and alpha <= M  <=>  c - m B - M(1 - B) <= 0  <=>  B_j <= b* := (M - c) / (M - m).
   The first involves only k, the second only j (and a* + b* = 1).
2. Pushing more blocks to the bounds never hurts. Going from (k, j) to (k + 1, j) (both feasible) moves
   block k + 1 from alpha up to M and the rest of the middle from alpha down to alpha' <= alpha with the
   same mean: a mean-preserving spread, so by Jensen sum P w^2 does not decrease, and it strictly
   increases unless alpha = M already (then both are the same vector). Symmetrically for j.
3. Hence the optimum takes the largest feasible k and the largest feasible j, independently:

       k* = max{k : A_k <= a*},     j* = max{j : B_j <= b*}.

   They are compatible: A_{k*} + B_{j*} <= a* + b* = 1. If the sum is < 1 the middle is non-empty and
   alpha is as above; if it is = 1 the middle is empty and (M^{k*}, m^{j*}) has mean exactly c.
   (Viewed as "for each k, which j": the best j is j* for every k, and the objective then increases
   in k over the feasible range, so a scan over k would only confirm k*.)
4. Uniqueness (all p_i > 0). Any feasible vertex is some (k, j) with k <= k*, j <= j*; the chain
   (k, j) -> (k+1, j) -> ... -> (k*, j) -> ... -> (k*, j*) stays feasible and each step strictly increases
   the objective unless it leaves the vector unchanged. So every other vertex is strictly worse, and a
   strictly convex function is maximised over a polytope only at vertices: z is unique.

Because A_k and B_j are monotone, k* and j* are threshold counts over the prefix/suffix sums: after
one sort, one O(n) pass. Total O(n log n) time, O(n) memory. The pass runs in float64; thresholds
get a slack of the size of the rounding error (4 eps (n + 1) (1 + max(|m|, |M|) / (M - m)), ~1e-14 for
small groups) so that exactly-tight cases (e.g. r = (1, 0, 0, 0), p uniform) come out exact, and alpha
is clipped to [m, M]. The solution is continuous in (r, p), so rounding near a threshold only moves z
by O(rounding); only a block lighter than the slack can land on the wrong side of a threshold.

Batches: `variance_increase_groups` solves all groups of a batch of B samples in one vectorised pass
(sort by (group, -r); per-group prefix/suffix sums in a zero-padded [groups, Kmax] layout, groups
bucketed by power-of-two size so the padding stays <= 2x): O(B log B) time, O(B) memory.

Zero weights (a softmax that underflows in float64) are accepted: such samples do not enter the
objective or the mean, so their z is not unique; they get the value of the level their block falls
in under the same thresholds (a maximiser; ties and order are still kept).

Worked examples (p uniform, [m, M] = [0, 1])
--------------------------------------------
r = (1, 0, 0, 0):          c = 1/4, a* = 1/4, b* = 3/4; A_1 = 1/4, B = 3/4 -> z = r (already extreme).
r = (0.8, 0.5, 0.2):       c = 1/2; k* = 1 (A_1 = 1/3), j* = 1, alpha = (1/2 - 1/3) / (1/3) = 1/2 -> z = (1, 0.5, 0).
r = (0.9, 0.6, 0.3, 0.0):  c = 0.45; k* = 1, j* = 2 (B_2 = 1/2 <= 0.55), alpha = 0.2 / 0.25 -> z = (1, 0.8, 0, 0).
"""

from __future__ import annotations

import torch

from reflow.algorithms.advantages import grpo
from reflow.algorithms.registry import register_advantage

_EPS = torch.finfo(torch.float64).eps


def _slack(n, low: float, high: float):
    """Slack on the thresholds a*, b* (weight units): a bound on the float64 rounding of the prefix sums
    (n terms <= 1) and of a* = (c - m) / (M - m) with c a sum of n terms <= max(|m|, |M|)."""
    return 4 * _EPS * (n + 1) * (1 + max(abs(low), abs(high)) / (high - low))


def _check_bounds(low: float, high: float) -> tuple[float, float]:
    low, high = float(low), float(high)
    if not (low <= high):  # also rejects NaN
        raise ValueError(f"GRPOVI needs low <= high, got [low, high] = [{low}, {high}]")
    return low, high


def _check_rewards(rewards: torch.Tensor, low: float, high: float) -> None:
    if rewards.numel() == 0:
        return
    if torch.isnan(rewards).any():
        raise ValueError("GRPOVI rewards contain NaN")
    lo, hi = rewards.min().item(), rewards.max().item()
    if lo < low or hi > high:
        raise ValueError(
            f"GRPOVI rewards must lie in the bounds [low, high] = [{low}, {high}]; got min {lo}, max {hi}"
        )


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _solve_groups(r: torch.Tensor, p: torch.Tensor, g: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Vectorised core. r, p float64 [N]; g long [N] group index in 0..G-1 (every index present);
    p sums to 1 within each group. Returns z float64 [N].
    Memory O(G * Kmax), Kmax = most blocks in a group (callers bucket groups by size)."""
    N = r.numel()
    dev = r.device
    G = int(g.max()) + 1
    # 1. Sort once: by group, then reward descending (stable, so ties keep index order; irrelevant for z).
    o1 = torch.sort(r, descending=True, stable=True).indices
    o2 = torch.sort(g[o1], stable=True).indices
    perm = o1[o2]
    rs, ps, gs = r[perm], p[perm], g[perm]
    # 2. Blocks of tied rewards within a group.
    new = torch.ones(N, dtype=torch.bool, device=dev)
    new[1:] = (gs[1:] != gs[:-1]) | (rs[1:] != rs[:-1])
    blk = torch.cumsum(new.long(), 0) - 1  # [N] block id (global)
    nb = int(blk[-1]) + 1
    Wb = torch.zeros(nb, dtype=torch.float64, device=dev).index_add_(0, blk, ps)  # block weights
    bg = gs[new]  # [nb] group of each block
    K = torch.bincount(bg, minlength=G)  # blocks per group
    first = torch.cumsum(K, 0) - K  # first block id of each group
    pos = torch.arange(nb, device=dev) - first[bg]  # position of the block within its group
    Kmax = int(K.max())
    # 3. Dense [G, Kmax] layout (zero padding at the end) -> exact per-group prefix / suffix sums.
    W = torch.zeros(G, Kmax, dtype=torch.float64, device=dev)
    W[bg, pos] = Wb
    valid = torch.arange(Kmax, device=dev)[None, :] < K[:, None]
    A = torch.cumsum(W, 1)  # A[g, b] = weight of blocks 0..b
    B = torch.flip(torch.cumsum(torch.flip(W, [1]), 1), [1])  # B[g, b] = weight of blocks b..K-1
    c = torch.zeros(G, dtype=torch.float64, device=dev).index_add_(0, g, p * r)
    span = high - low
    a_star = (c - low) / span
    b_star = (high - c) / span
    # 4. Threshold counts (A, B monotone): k* = #{k >= 1 : A_k <= a*}, j* = #{j >= 1 : B_j <= b*}.
    tol = _slack(torch.bincount(g, minlength=G).to(torch.float64), low, high)
    k_star = ((A <= (a_star + tol)[:, None]) & valid).sum(1)
    j_star = ((B <= (b_star + tol)[:, None]) & valid).sum(1)
    j_star = torch.minimum(j_star, K - k_star)  # only rounding can make them overlap
    # 5. alpha on the middle blocks k*..K-j*-1.
    zero = torch.zeros(G, 1, dtype=torch.float64, device=dev)
    Apad = torch.cat([zero, A], 1)  # Apad[g, k] = weight of the first k blocks
    Ak = Apad.gather(1, k_star[:, None]).squeeze(1)
    Aend = Apad.gather(1, (K - j_star)[:, None]).squeeze(1)
    Bj = Apad.gather(1, K[:, None]).squeeze(1) - Aend
    Q = Aend - Ak
    num = c - high * Ak - low * Bj
    alpha = torch.where(Q > 0, num / torch.where(Q > 0, Q, torch.ones_like(Q)), torch.full_like(Q, high))
    alpha = alpha.clamp(low, high)
    # 6. Levels per block, scattered back to samples.
    zb = torch.where(pos < k_star[bg], torch.full_like(Wb, high),
                     torch.where(pos >= (K - j_star)[bg], torch.full_like(Wb, low), alpha[bg]))
    z = torch.empty(N, dtype=torch.float64, device=dev)
    z[perm] = zb[blk]
    return z


def variance_increase(rewards: torch.Tensor, weights: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """One group: rewards [n], weights [n] (>= 0, sum 1) -> z [n] (the optimum, see the module docstring).

    O(n log n) (one sort + one pass in float64); returns rewards' dtype and device. Tied rewards get
    equal z. Raises ValueError for rewards outside [low, high] or weights that are negative, non-finite
    or do not sum to 1 (within 1e-6; they are then renormalised in float64).
    """
    if rewards.dim() != 1 or weights.shape != rewards.shape:
        raise ValueError(
            f"rewards and weights must both be [n]; got {tuple(rewards.shape)} and {tuple(weights.shape)}")
    low, high = _check_bounds(low, high)
    _check_rewards(rewards, low, high)
    n = rewards.numel()
    if n == 0 or low == high:
        return rewards.clone()
    p = weights.to(torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("GRPOVI weights must be finite and non-negative")
    s = p.sum()
    if abs(s.item() - 1.0) > 1e-6:
        raise ValueError(f"GRPOVI weights must sum to 1, got {s.item()}")
    r = rewards.to(torch.float64)
    g = torch.zeros(n, dtype=torch.long, device=rewards.device)
    return _solve_groups(r, p / s, g, low, high).to(_out_dtype(rewards))


def variance_increase_groups(rewards: torch.Tensor, log_weights: torch.Tensor, group_ids: torch.Tensor,
                             low: float, high: float) -> torch.Tensor:
    """All groups of a batch: rewards [B], log_weights [B], group_ids [B] (any integer labels, groups need
    not be contiguous) -> z [B] in rewards' dtype.

    Within each group p = softmax(log_weights) (log_weights = the reference model's sequence log-probs),
    computed in float64; entries that underflow to 0 (or log_weights = -inf) get zero weight. Groups are
    solved together, vectorised: groups of similar size (same power-of-two bucket) share one padded pass.
    """
    if not (rewards.dim() == 1 and log_weights.shape == rewards.shape and group_ids.shape == rewards.shape):
        raise ValueError("rewards, log_weights and group_ids must all be [B]")
    low, high = _check_bounds(low, high)
    _check_rewards(rewards, low, high)
    if rewards.numel() == 0 or low == high:
        return rewards.clone()
    lw = log_weights.to(torch.float64)
    if torch.isnan(lw).any() or (lw == float("inf")).any():
        raise ValueError("GRPOVI log_weights must not be NaN or +inf")
    _, g = torch.unique(group_ids, return_inverse=True)
    G = int(g.max()) + 1
    gmax = torch.full((G,), -float("inf"), dtype=torch.float64, device=lw.device).scatter_reduce(
        0, g, lw, reduce="amax")
    if (gmax == -float("inf")).any():
        raise ValueError("GRPOVI: a group has all log_weights = -inf (no weight to normalise)")
    e = torch.exp(lw - gmax[g])
    p = e / torch.zeros(G, dtype=torch.float64, device=lw.device).index_add_(0, g, e)[g]
    r = rewards.to(torch.float64)
    # Bucket groups by size (power of two) so the padded [groups, Kmax] layout stays O(B) in memory.
    size = torch.bincount(g, minlength=G)
    bucket = torch.ceil(torch.log2(size.to(torch.float64))).long()[g]
    z = torch.empty_like(r)
    for b in torch.unique(bucket).tolist():
        idx = (bucket == b).nonzero(as_tuple=True)[0]
        _, gl = torch.unique(g[idx], return_inverse=True)
        z[idx] = _solve_groups(r[idx], p[idx], gl, low, high)
    return z.to(_out_dtype(rewards))


def variance_increase_bruteforce(rewards: torch.Tensor, weights: torch.Tensor, low: float, high: float,
                                 tol: float | None = None) -> torch.Tensor:
    """Reference for tests and benchmarks only: O(n^2) enumeration of ALL split points, no cleverness.

    Sort r descending (stable). For every k in 0..n samples at M and j in 0..n-k samples at m (split
    points at the *sample* level, not blocks), the middle samples get alpha from the mean constraint.
    A candidate is kept when it is feasible: m <= alpha <= M, checked as m Q <= alpha Q <= M Q on the
    weight scale with slack tol * (M - m) (tol defaults to the fast pass's rounding slack; with an empty
    middle this says the mean holds), and ties are kept (a split between two equal rewards needs equal
    values on both sides). The best objective sum p z^2 wins. Returns z in rewards' dtype.
    O(n^2) time, O(n) memory beyond ~1M-pair chunks of the (k, j) grid.
    """
    low, high = _check_bounds(low, high)
    _check_rewards(rewards, low, high)
    n = rewards.numel()
    if n == 0 or low == high:
        return rewards.clone()
    r = rewards.to(torch.float64)
    p = weights.to(torch.float64)
    p = p / p.sum()
    order = torch.sort(r, descending=True, stable=True).indices
    rs, ps = r[order], p[order]
    c = (p * r).sum()
    span = high - low
    slack = (_slack(n, low, high) if tol is None else tol) * span
    P = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ps, 0)])  # P[i] = weight of first i
    tie = torch.zeros(n + 1, dtype=torch.bool)  # tie[i]: split before sorted position i cuts a tie
    tie[1:n] = rs[1:] == rs[:-1]
    best_val, best = -float("inf"), None
    idx = torch.arange(n + 1)
    rows = max(1, (1 << 20) // (n + 1))  # the (k, j) grid in chunks of ~1M pairs
    for k0 in range(0, n + 1, rows):
        k = idx[k0:k0 + rows, None]  # samples at M
        j = idx[None, :]  # samples at m
        pair = k + j <= n
        end = (n - j).clamp(min=0).expand(k.shape[0], -1).maximum(k)  # middle = sorted positions k..end-1
        A = P[k]
        Q = P[end] - A
        Bw = P[n] - P[end]
        num = c - high * A - low * Bw  # = alpha * Q by the mean constraint
        has_mid = end > k
        # m <= alpha <= M written as  m Q <= num <= M Q  (no division, so tiny Q is judged fairly;
        # with an empty middle this is num = 0, i.e. the mean holds)
        gap_hi, gap_lo = high * Q - num, num - low * Q
        ok = pair & (gap_hi >= -slack) & (gap_lo >= -slack)
        alpha = num / torch.where(Q > 0, Q, torch.ones_like(Q))
        # within the slack of a bound means at the bound (rounding must not fake a tie violation)
        # (a middle tied to the m block prefers m when both bounds are within the slack, i.e. Q ~ 0)
        at_hi, at_lo = gap_hi.abs() <= slack, gap_lo.abs() <= slack
        tie_top, tie_bot = tie[k] & has_mid, tie[end] & has_mid & (j > 0)
        to_lo = at_lo & (tie_bot | ~at_hi)
        alpha = torch.where(to_lo, torch.full_like(alpha, low),
                            torch.where(at_hi, torch.full_like(alpha, high), alpha))
        alpha = alpha.clamp(low, high)
        # a zero-weight middle is the same vector as a relabelled split; skip it (alpha undefined)
        ok &= ~(has_mid & (Q <= 0))
        # ties across the M | middle split and across the middle | m split: equal values on both sides
        ok &= ~(tie_top & (alpha != high)) & ~(tie_bot & (alpha != low))
        ok &= ~(~has_mid & tie[k])  # M | m split through a tie (M > m here)
        obj = high**2 * A + low**2 * Bw + torch.where(has_mid, alpha**2 * Q, torch.zeros_like(Q))
        obj = torch.where(ok, obj, torch.full_like(obj, -float("inf")))
        i = int(torch.argmax(obj))  # first maximum in (k, j) row-major order
        ki, ji = divmod(i, obj.shape[1])
        if obj[ki, ji] > best_val:
            best_val, best = float(obj[ki, ji]), (k0 + ki, int(end[ki, ji]), float(alpha[ki, ji]))
    k, end, a = best
    zs = torch.full((n,), low, dtype=torch.float64)
    zs[:k] = high
    zs[k:end] = a
    z = torch.empty(n, dtype=torch.float64)
    z[order] = zs
    return z.to(_out_dtype(rewards))


@register_advantage("grpovi")
def grpovi(*, rewards, group_ids, seqlens, action_mask, ref_seq_logprobs=None, reward_low=None, reward_high=None,
           norm_std: bool = True, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPOVI: GRPO advantages on the variance-increased rewards z of each group.

    z = variance_increase_groups(rewards, ref_seq_logprobs, group_ids, low, high), weights p = softmax over the
    group of the reference model's sequence log-probs [B]; then A_{i,t} = (z_i - mean_g z) / std_g z.
    """
    if ref_seq_logprobs is None:
        raise ValueError("grpovi needs the reference model's sequence log-probs (ref_seq_logprobs [B])")
    if reward_low is None or reward_high is None:
        raise ValueError("grpovi needs reward bounds reward_low / reward_high")
    # rewards arrive in float32: a value that rounds just past a bound (e.g. -0.05) is snapped onto it
    tol = 1e-6 * max(1.0, abs(reward_low), abs(reward_high))
    r = rewards.double()
    r = torch.where((r < reward_low) & (r >= reward_low - tol), torch.full_like(r, reward_low), r)
    r = torch.where((r > reward_high) & (r <= reward_high + tol), torch.full_like(r, reward_high), r)
    z = variance_increase_groups(r, ref_seq_logprobs.double(), group_ids, reward_low, reward_high).float()
    return grpo(rewards=z, group_ids=group_ids, seqlens=seqlens, action_mask=action_mask, norm_std=norm_std)
