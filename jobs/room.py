"""Whether the Ray cluster has room for a job's workers, asked of Ray before the job starts them.

Ray waits for resources other work holds (the stack's Serve replicas, a fine-tune, another job): Ray Data for ever
for an actor pool none of whose actors it can place, Ray Train a minute per try for a worker group, then tries
again. Checked against the cluster's total alone, such a job hung without a word. So a job first asks Ray to place
what it needs now, as a placement group of its workers' resources removed at once: Ray knows which node could
hold which worker (free CPUs summed over nodes may be too few on each node for one). It waits `PLACEMENT_WAIT_S`
for that, as a job that just finished releases its workers a moment after it returns. The check is a moment's:
other work may take the room between it and the job's start, and the job then waits as Ray makes it.
"""

from __future__ import annotations

import math

from cytoloop.errors import UsageError

PLACEMENT_WAIT_S = 30.0  # how long a job waits for CPUs or GPUs that other work holds to be freed


def check_room(
    workers: int, cpus: float, gpus: float, *, together: bool, asked: str, fewer: str, smaller: str = ""
) -> int:
    """Raise UsageError unless the Ray cluster could hold `workers` workers of `cpus` CPUs and `gpus` GPUs each (0:
    none of that kind) and can place now (waiting up to `PLACEMENT_WAIT_S`) all of them (`together`: a worker group
    that trains in step) or at least one (an actor pool, which runs on what it gets). Returns about how many fit
    what is free after that: `workers` when `together`.

    `asked` names the request in the errors ("2 workers of 1 CPU(s) and 0 GPU(s) each"), `fewer` what the caller
    can ask for instead when the cluster is too small ("ask for fewer workers or threads"), `smaller` what else
    than waiting would let it be placed now ("with fewer threads per worker"; none: only waiting).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    total = ray.cluster_resources()
    if workers * cpus > total.get("CPU", 0) or workers * gpus > total.get("GPU", 0):
        raise UsageError(
            f"{asked} do not fit the Ray cluster ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs): {fewer}"
        )
    bundle = {kind: need for kind, need in (("CPU", cpus), ("GPU", gpus)) if need}  # one worker's ask
    group = placement_group([bundle] * (workers if together else 1), strategy="PACK")
    try:
        placed = group.wait(PLACEMENT_WAIT_S)
        # read while the group holds its bundle, which is then added back: Ray removes a group asynchronously,
        # and read after the removal its bundle could still count as taken ("1 of 2 workers fit" an idle cluster)
        free = ray.available_resources()
    finally:
        remove_placement_group(group)
    if not placed:
        short = [f"{free.get(kind, 0):g} of {total.get(kind, 0):g} {kind}s free" for kind in bundle]
        which = f"the {asked} cannot all" if together else f"not one of {asked} can"
        raise UsageError(
            f"{which} be placed on the Ray cluster after {PLACEMENT_WAIT_S:g} s ({', '.join(short)}; the rest held "
            f"by other work: Serve replicas, a fine-tune, another job): run it when that work is done"
            f"{', or ' + smaller if smaller else ''}"
        )
    if together:
        return workers
    return min([workers] + [1 + math.floor(free.get(kind, 0) / need + 1e-9) for kind, need in bundle.items()])
