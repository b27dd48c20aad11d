"""Resources per config from the plan: a sweep's runs in a few arrays by predicted time, each with its own --time.

The compound grid's configs differ ~65× in FLOPs per image; one ``--time`` for all lets a stuck small
run hold its GPUs for the longest run's limit and hides the short ones from backfill. Runs are sorted
by predicted wall time (longest first) and cut into at most ``n_groups`` contiguous groups so that the
GPU time reserved (sum over groups of tasks × --time) is smallest (exact, by dynamic programming).
Each group's ``--time`` is ``factor`` × its longest predicted run plus ``margin_min``, at most
``cap_min`` (the launcher's ``timeout_min``: the partition limit). A run that outlives its estimate is
not lost: USR2 makes it checkpoint and requeue (``max_num_timeout``). Inside an array, task index 0
is the costliest run, so the array's tail holds short runs and the makespan nears its lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp

T = tp.TypeVar("T")


@dataclasses.dataclass
class TimeGroup(tp.Generic[T]):
    name: str
    items: list[T]  # longest predicted first
    predicted_s: list[float]
    time_min: int
    parallelism: tp.Optional[int] = None  # this array's %N: a share of the launcher's array_parallelism


def share_parallelism(groups: list[TimeGroup], total: tp.Optional[int]) -> None:
    """Split ``array_parallelism`` over the arrays by their predicted work (each at least 1), so the whole
    sweep still runs at most ``total`` tasks at once (unless there are more arrays than that)."""
    if not total or not groups:
        return
    work = [max(sum(g.predicted_s), 1e-9) for g in groups]
    shares = [max(1, int(total * w / sum(work))) for w in work]
    while sum(shares) < total and any(s < len(g.items) for s, g in zip(shares, groups)):
        i = max((i for i in range(len(groups)) if shares[i] < len(groups[i].items)),
                key=lambda i: work[i] / shares[i])  # the array with the most work per slot gets the next one
        shares[i] += 1
    while sum(shares) > total and max(shares) > 1:
        shares[shares.index(max(shares))] -= 1
    for g, n in zip(groups, shares):
        g.parallelism = n


def predicted_seconds(flops: int, batch: int, iters: int, gpus: int, tflops_per_gpu: float) -> float:
    """Wall time of one run to the iteration cap: training ≈ 3× forward FLOPs per image, on ``gpus`` GPUs."""
    return 3.0 * flops * batch * iters / (tflops_per_gpu * 1e12 * max(1, gpus))


def time_limit_min(predicted_s: float, factor: float, margin_min: float, cap_min: int, floor_min: int = 1) -> int:
    return int(min(cap_min, max(floor_min, math.ceil(factor * predicted_s / 60.0 + margin_min))))


def group_by_time(items: tp.Sequence[T], predicted_s: tp.Sequence[float], n_groups: int, *, factor: float,
                  margin_min: float, cap_min: int, floor_min: int = 1) -> list[TimeGroup[T]]:
    """At most ``n_groups`` groups (fewer when limits coincide), longest first; ``n_groups=1``: one group at
    ``cap_min``, the launcher's single ``timeout_min`` as before."""
    order = sorted(range(len(items)), key=lambda i: -predicted_s[i])
    if not order:
        return []
    if n_groups <= 1:
        return [TimeGroup("all", [items[i] for i in order], [predicted_s[i] for i in order], int(cap_min))]
    limits = [time_limit_min(predicted_s[i], factor, margin_min, cap_min, floor_min) for i in order]
    n = len(order)
    k_max = min(n_groups, n)
    inf = float("inf")
    # best[k][i]: least reserved minutes for the first i runs (longest first) in k groups; a group's limit is its first run's.
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for i in range(1, n + 1):
            for j in range(k - 1, i):
                cost = best[k - 1][j] + limits[j] * (i - j)
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    k = min(range(1, k_max + 1), key=lambda kk: (best[kk][n], kk))
    bounds, i = [], n
    while k > 0:
        j = cut[k][i]
        bounds.append((j, i))
        i, k = j, k - 1
    groups = []
    for g, (a, b) in enumerate(reversed(bounds)):
        idx = order[a:b]
        groups.append(TimeGroup(f"t{g}", [items[i] for i in idx], [predicted_s[i] for i in idx], limits[a]))
    return groups


GROUP_KEYS = ("time_groups", "time_factor", "time_margin_min", "tflops_per_gpu")


def job_groups(jobs: tp.Sequence[T], params: tp.Mapping[str, tp.Any], rate: float = 1.0) -> list[TimeGroup[T]]:
    """Groups of sweep.orchestration.prepare.Job by the launcher's options (``time_groups``, ``time_factor``,
    ``time_margin_min``, ``tflops_per_gpu``, ``gpus_per_node``, ``timeout_min``); ``rate``: measured
    wall time over predicted, from FINISHED runs of the experiment (1: the TFLOPS assumption alone)."""
    gpus = int(params.get("gpus_per_node") or 1)
    tflops = float(params.get("tflops_per_gpu") or 30.0)
    pred = [rate * predicted_seconds(j.plan.flops, j.plan.settings.batch_size, j.plan.settings.max_iters, gpus, tflops)
            for j in jobs]
    groups = group_by_time(list(jobs), pred, int(params.get("time_groups") or 1),
                           factor=float(params.get("time_factor") or 2.0),
                           margin_min=float(params.get("time_margin_min") or 0.0), cap_min=int(params["timeout_min"]),
                           # USR2 comes signal_delay_s before the limit: leave the run a few minutes before it
                           floor_min=math.ceil(float(params.get("signal_delay_s") or 0) / 60.0) + 5)
    if len(groups) > 1:
        share_parallelism(groups, params.get("array_parallelism"))
    return groups


def measured_rate(finished: tp.Iterable[tuple[tp.Any, tp.Mapping[str, float]]], params: tp.Mapping[str, tp.Any]) -> float:
    """Median of wall_time_s / predicted seconds over FINISHED runs (job, metrics); 1.0 when there are none.

    Runs that stopped early make this an underestimate of a run to the cap; USR2 + requeue covers the rest.
    """
    gpus = int(params.get("gpus_per_node") or 1)
    tflops = float(params.get("tflops_per_gpu") or 30.0)
    ratios = []
    for j, m in finished:
        pred = predicted_seconds(j.plan.flops, j.plan.settings.batch_size, j.plan.settings.max_iters, gpus, tflops)
        iters = m.get("iterations") or j.plan.settings.max_iters
        if m.get("wall_time_s") and pred > 0:
            ratios.append(float(m["wall_time_s"]) / (pred * iters / j.plan.settings.max_iters))
    if not ratios:
        return 1.0
    ratios.sort()
    return ratios[len(ratios) // 2]
