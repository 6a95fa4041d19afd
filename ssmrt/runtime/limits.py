"""Checks of what a run will ask of the machine, made before it starts: thread counts, and whether a prefill's
arrays can fit in the memory there is. A request that cannot fit is refused in one line naming its size,
instead of failing deep inside a runtime with a traceback, or being killed by the kernel, minutes later."""

from __future__ import annotations

import os

from ..errors import SsmrtError


def cpu_count() -> int:
    return os.cpu_count() or 1


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """The physical cores among the CPUs this process may run on (ONNX Runtime's default intra-op pool is a thread
    a physical core; hyperthreads share one core's bandwidth), read from `sysfs`; 0 where it does not say."""
    try:
        cores = set()
        for cpu in os.sched_getaffinity(0):
            topology = f"{sysfs}/cpu{cpu}/topology/"
            with open(topology + "physical_package_id", encoding="ascii") as f, \
                    open(topology + "core_id", encoding="ascii") as g:
                cores.add((f.read().strip(), g.read().strip()))
        return len(cores)
    except (OSError, AttributeError):  # no /sys topology, or no sched_getaffinity (not Linux)
        return 0


def check_threads(threads, name: str = "threads (--threads)") -> int:
    """An integer from 0 (the runtime's default) to the machine's CPU count. More threads than cores only wait
    for each other: ONNX Runtime's spin, and 1024 of them on 2 cores turn milliseconds into minutes."""
    from .sampling import is_int

    n = cpu_count()
    if not is_int(threads) or not 0 <= threads <= n:
        raise SsmrtError(f"{name} must be an integer from 0 (the runtime's default) to {n} (this machine's CPUs), "
                         f"got {threads!r}")
    return int(threads)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What this process's cgroup still allows (v2, then v1); None where there is no limit or no cgroup."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            with open(limit, encoding="ascii") as f:
                text = f.read().strip()
            if text == "max":
                return None
            with open(usage, encoding="ascii") as f:
                used = int(f.read().strip())
            cap = int(text)
        except (OSError, ValueError):
            continue
        if cap >= 1 << 60:  # cgroup v1's "no limit"
            return None
        return max(cap - used, 0)
    return None


def available_memory(device_kind: str) -> int | None:
    """Bytes free for new arrays on the device: host memory (and the cgroup's limit) for "cpu", the GPU's free
    memory for "cuda" where PyTorch can see it; None where it cannot be known."""
    if device_kind == "cpu":
        known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
        return min(known) if known else None
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # no torch, or a driver that cannot answer: nothing is known
        pass
    return None


def prefill_bytes(config, dtype: str, logits_mode: str, batch: int, seqlen: int) -> int:
    """A lower bound on the memory a prefill of batch x seqlen tokens needs at once: the embedded tokens, and
    beside them the first layer's input projection or the logits (float32, every position for logits "all"),
    whichever is larger. The real peak is higher; what cannot hold even this cannot run."""
    from ..artifact import ITEMSIZE
    from ..bench import matmul_shapes

    item = ITEMSIZE.get(dtype, 4)
    layer, head = matmul_shapes(config)
    tokens = batch * seqlen
    embedded = tokens * config.d_model * item
    projected = tokens * layer[0][1] * item
    logits = (tokens if logits_mode == "all" else batch) * head[1] * 4
    return embedded + max(projected, logits)


# below this a prefill is not worth a look at the free memory (which reads /proc)
SMALL = 64 << 20


def _fmt(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def state_bytes(runner) -> int:
    """Bytes of one sequence's state on `runner` (numpy arrays and torch tensors alike)."""
    return sum(int(getattr(s, "nbytes", 0)) for s in runner.zero_state(1))


def _check(runner, need: int, what: str, doing: str) -> None:
    if need < SMALL:
        return
    device = getattr(runner, "device_kind", "cpu")
    free = available_memory(device)
    if free is not None and need > free:
        raise SsmrtError(f"{what}: {doing} needs at least {_fmt(need)}, and {device} memory has {_fmt(free)} free")


def check_prefill_fits(runner, batch: int, seqlen: int, what: str) -> None:
    """SsmrtError naming `what` when a prefill of batch x seqlen tokens on `runner` (its arrays, and the state
    in and out) needs more memory than its device has free (where that can be known)."""
    try:
        need = prefill_bytes(runner.config, getattr(runner, "dtype", "float32"),
                             getattr(runner, "logits_mode", "all"), batch, seqlen)
    except (AttributeError, TypeError):  # a Runner of the user's own over another kind of model: nothing to tell
        return
    if need < SMALL:  # a small prompt's state is small too: not worth building one to measure it
        return
    _check(runner, need + 2 * batch * state_bytes(runner), what, f"a prefill of {batch:,} x {seqlen:,} tokens")


def check_batch_fits(runner, batch: int, what: str) -> None:
    """SsmrtError naming `what` when the states (and last logits) of `batch` sequences cannot fit."""
    per = state_bytes(runner) + 4 * getattr(runner.config, "padded_vocab_size", 0)
    _check(runner, batch * per, what, f"a batch of {batch:,} sequences")
