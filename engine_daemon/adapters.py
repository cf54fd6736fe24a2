"""LoRA adapters in three tiers: device slots (``max_loras``), host RAM (``max_cpu_loras``), disk.

The scheduler asks ``acquire(name)`` for a slot. A resident adapter answers at once; a missing
one is loaded by a background thread (disk → host → slot) while the batch keeps stepping, and
its requests wait. Slots are reused least-recently-used first; a slot whose adapter is used by a
running sequence, or that an operator pinned, is never taken. All bookkeeping happens on the
engine thread: the loader thread only fills a slot that nobody else may touch and reports back.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_daemon.lora import FUSED_PROJECTIONS
from engine_daemon.peft_format import (
    LORA_MODULES,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    ModelDescriptor,
    adapter_manifest_load,
)

# A failed load is tried again by a later request after 5 s, 10 s, 20 s ... at most 5 minutes.
LOAD_RETRY_FIRST_SECONDS = 5.0
LOAD_RETRY_MAX_SECONDS = 300.0

# A host copy: (module, layer) → (A [r, in], B·scaling [out, r]) in the pool's dtype (lora_dtype).
HostWeights = dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdapterStats:
    requests: int = 0
    gpu_hits: int = 0  # acquired while already in a slot
    host_hits: int = 0  # loaded into a slot from host RAM
    disk_loads: int = 0  # read from disk into host RAM
    slot_loads: int = 0  # copies into a device slot
    evictions: int = 0
    load_seconds: float = 0.0  # time of the slot loads (disk or host → device slot)
    prefetch_seconds: float = 0.0  # time of host-only prefetches (disk → host RAM)
    last_used: float | None = None  # wall-clock time


@dataclass
class AdapterRecord:
    name: str
    path: Path
    manifest: AdapterManifest
    slot: int | None = None
    loading: bool = False
    host: HostWeights | None = None
    error: str | None = None  # the last load's failure, until a retry (after retry_at) succeeds
    failures: int = 0  # loads failed in a row
    retry_at: float = 0.0  # monotonic time from which a request may try the load again
    in_use: int = 0  # running sequences holding the slot
    pinned: bool = False
    fresh_load: bool = False  # the next hold() is the request that caused the load, not a hit
    generation: int = field(default_factory=itertools.count().__next__)  # which registration this is
    stats: AdapterStats = field(default_factory=AdapterStats)

    @property
    def tier(self) -> str:
        if self.error:
            return "failed"
        if self.slot is not None and not self.loading:
            return "gpu"
        if self.loading:
            return "loading"
        return "host" if self.host is not None else "disk"


class SlotPool:
    """Stacked LoRA weights: a[module][layer] [S, R, in] and b[module][layer] [S, out, R] (views) on the device."""

    def __init__(self, descriptor: ModelDescriptor, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device):
        self.num_slots, self.max_rank = max_loras, max_rank
        shapes = {m: descriptor.projection_shape(m) for m in LORA_MODULES}
        self.in_features = {m: shape[0] for m, shape in shapes.items()}
        self.out_features = {m: shape[1] for m, shape in shapes.items()}
        layers = range(descriptor.num_layers)
        # Projections that read the same input share one A tensor, interleaved rank-major
        # ([S, R, parts, in]): a slot's first `rank` rows of every part are then one contiguous
        # [rank * parts, in] matrix, so one shrink serves q, k and v (and gate and up) at once.
        self.fused_a = {
            parts: [
                torch.zeros(max_loras, max_rank, len(parts), self.in_features[parts[0]], dtype=dtype, device=device)
                for _ in layers
            ]
            for parts in FUSED_PROJECTIONS
        }
        self.a = {
            m: [torch.zeros(max_loras, max_rank, self.in_features[m], dtype=dtype, device=device) for _ in layers]
            for m in LORA_MODULES
            if not any(m in parts for parts in FUSED_PROJECTIONS)
        }
        for parts, per_layer in self.fused_a.items():
            for i, part in enumerate(parts):
                self.a[part] = [fused[:, :, i] for fused in per_layer]  # [S, R, in] views
        # B is stored rank-major ([S, R, out] in memory) and exposed as the kernels' [S, out, R] view:
        # a slot's first `rank` rows are then one contiguous block, so a low-rank adapter reads only
        # its own bytes instead of a strided sliver of every R-wide row.
        self.b = {
            m: [
                torch.zeros(max_loras, max_rank, self.out_features[m], dtype=dtype, device=device).transpose(1, 2)
                for _ in layers
            ]
            for m in LORA_MODULES
        }
        # Each slot is computed at its adapter's own rank; scaling is folded into B. Kept on the host:
        # LoraMeta.build reads them there once per step without a device sync.
        self.ranks = torch.zeros(max_loras, dtype=torch.int32)
        self.scalings = torch.ones(max_loras, dtype=torch.float32)
        self.targets: list[frozenset[tuple[str, int]]] = [frozenset()] * max_loras

    def shrink_weights(self, parts: tuple[str, ...], layer: int) -> torch.Tensor:
        """A of several fused projections as one [S, R * parts, in] stack (rank r → r * parts rows)."""
        fused = self.fused_a[parts][layer]
        return fused.view(fused.shape[0], -1, fused.shape[-1])

    @property
    def nbytes(self) -> int:
        tensors = [t for per_module in (*self.a.values(), *self.b.values()) for t in per_module]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fill(self, slot: int, weights: HostWeights, rank: int, non_blocking: bool = False) -> None:
        """Write one adapter into a slot: zeros up to its rank wherever it has no weights."""
        for module in LORA_MODULES:
            for layer, (a_stack, b_stack) in enumerate(zip(self.a[module], self.b[module], strict=True)):
                a_stack[slot, :rank].zero_()
                b_stack[slot, :, :rank].zero_()
                pair = weights.get((module, layer))
                if pair is not None:
                    a, b = pair
                    r = a.shape[0]
                    a_stack[slot, :r].copy_(a, non_blocking=non_blocking)
                    b_stack[slot, :, :r].copy_(b, non_blocking=non_blocking)


@dataclass
class _LoadJob:
    name: str
    path: Path
    manifest: AdapterManifest
    slot: int | None  # None: only bring it into host RAM
    host: HostWeights | None  # None: read from disk first


@dataclass
class _LoadResult:
    name: str
    slot: int | None
    host: HostWeights | None
    seconds: float
    from_disk: bool
    error: str | None = None


class AdapterResidency:
    def __init__(
        self,
        descriptor: ModelDescriptor,
        *,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.descriptor = descriptor
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype, self.device = dtype, device
        self.pool = SlotPool(descriptor, max_loras, max_lora_rank, dtype, device)
        self.records: dict[str, AdapterRecord] = {}
        self.slot_owner: list[str | None] = [None] * max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        # (adapter, seconds, "disk" | "host") of each finished slot load, drained by the metrics exporter.
        self.load_events: deque[tuple[str, float, str]] = deque(maxlen=1024)
        self._jobs: queue.Queue[_LoadJob | None] = queue.Queue()
        self._results: queue.Queue[_LoadResult] = queue.Queue()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._worker = threading.Thread(target=self._load_loop, name="lora-loader", daemon=True)
        self._worker.start()

    # ---- registration -------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> AdapterRecord:
        """Register (or replace) an adapter: a staged folder by its manifest, else a PEFT folder validated here."""
        manifest = adapter_manifest_load(path, self.descriptor, max_lora_rank=self.max_lora_rank)
        old = self.records.get(name)
        if old is not None:
            if old.in_use:
                raise AdapterError(f"adapter {name!r} is serving running requests; add the new version under a new name")
            self.remove(name)
        record = AdapterRecord(name, Path(path), manifest)
        self.records[name] = record
        return record

    def remove(self, name: str) -> None:
        record = self.records.pop(name, None)
        if record is None:
            return
        if record.in_use:
            self.records[name] = record
            raise AdapterError(f"adapter {name!r} is serving running requests and cannot be removed now")
        if record.slot is not None and not record.loading:
            self.slot_owner[record.slot] = None
            self.pool.ranks[record.slot] = 0
            self._slot_lru.move_to_end(record.slot, last=False)  # reuse this slot first
        self._host_lru.pop(name, None)

    def identity(self, name: str) -> str:
        """What the prefix cache keys an adapter's blocks by: its name and which registration of it
        (a name added again with other weights must not find the old weights' blocks)."""
        return f"{name}\0{self.get(name).generation}"

    def get(self, name: str) -> AdapterRecord:
        record = self.records.get(name)
        if record is None:
            raise AdapterError(f"unknown adapter {name!r}; add it with add_adapter() first")
        return record

    def set_pinned(self, name: str, pinned: bool) -> None:
        self.get(name).pinned = pinned

    # ---- the scheduler's view ------------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """The slot of a ready adapter, or None while it loads (a load is started if a slot can be had)."""
        record = self.check_loadable(name)
        if record.slot is not None:
            if record.loading:
                return None
            self._slot_lru.move_to_end(record.slot)
            return record.slot
        slot = self._free_slot()
        if slot is None:
            return None  # every slot serves running requests; wait for one to finish
        self._evict_slot(slot)
        record.slot, record.loading = slot, True
        self.slot_owner[slot] = name
        self._jobs.put(_LoadJob(name, record.path, record.manifest, slot, record.host))
        return None

    def prefetch_to_host(self, name: str) -> None:
        """Read an adapter into host RAM in the background, so that its first request skips the disk."""
        record = self.get(name)
        if record.error and time.monotonic() < record.retry_at:
            return
        if record.host is None and not record.loading:
            record.loading = True
            self._jobs.put(_LoadJob(name, record.path, record.manifest, None, None))

    def check_loadable(self, name: str) -> AdapterRecord:
        """A failed adapter stays refused (AdapterError) until its back-off has passed; then it may load again."""
        record = self.get(name)
        if not record.error:
            return record
        wait = record.retry_at - time.monotonic()
        if wait > 0:
            raise AdapterError(f"{record.error} (the engine tries loading it again in {wait:.0f} s)")
        record.error = None
        return record

    def _load_failed(self, record: AdapterRecord, error: str) -> None:
        record.error = error
        record.failures += 1
        backoff = min(LOAD_RETRY_FIRST_SECONDS * 2 ** (record.failures - 1), LOAD_RETRY_MAX_SECONDS)
        record.retry_at = time.monotonic() + backoff

    def hold(self, name: str) -> None:
        """A sequence starts running on this adapter: its slot may not be reused until release()."""
        record = self.records[name]
        record.in_use += 1
        record.stats.requests += 1
        if record.fresh_load:
            record.fresh_load = False
        else:
            record.stats.gpu_hits += 1
        record.stats.last_used = time.time()

    def release(self, name: str) -> None:
        record = self.records.get(name)
        if record is not None and record.in_use > 0:
            record.in_use -= 1
            record.stats.last_used = time.time()

    def poll(self) -> list[tuple[str, str]]:
        """Apply finished loads; returns (adapter, error) for loads that failed."""
        failures = []
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return failures
            record = self.records.get(result.name)
            if result.slot is None:  # a host-only prefetch
                if record is not None:
                    record.loading = False
                    if result.error:
                        self._load_failed(record, result.error)
                        failures.append((result.name, result.error))
                    elif record.host is None:
                        record.failures = 0
                        record.stats.disk_loads += 1
                        record.stats.prefetch_seconds += result.seconds
                        self._keep_on_host(result.name, result.host)
                continue
            if record is None or record.slot != result.slot:
                if self.slot_owner[result.slot] == result.name:
                    self.slot_owner[result.slot] = None
                continue  # removed or replaced while loading
            record.loading = False
            if result.error:
                self._load_failed(record, result.error)
                record.slot = None
                self.slot_owner[result.slot] = None
                self._slot_lru.move_to_end(result.slot, last=False)
                failures.append((result.name, result.error))
                continue
            record.fresh_load, record.failures = True, 0
            self.load_events.append((result.name, result.seconds, "disk" if result.from_disk else "host"))
            record.stats.slot_loads += 1
            record.stats.load_seconds += result.seconds
            if result.from_disk:
                record.stats.disk_loads += 1
            else:
                record.stats.host_hits += 1
            self.pool.ranks[result.slot] = record.manifest.rank
            self.pool.targets[result.slot] = frozenset((m.module, m.layer) for m in record.manifest.modules)
            self._slot_lru.move_to_end(result.slot)
            if record.host is None and result.host is not None:
                self._keep_on_host(result.name, result.host)
            elif record.host is not None:
                self._host_lru.move_to_end(result.name)

    def _keep_on_host(self, name: str, host: HostWeights | None) -> None:
        self.records[name].host = host
        self._host_lru[name] = None
        self._trim_host()

    @property
    def busy(self) -> bool:
        """Whether a background load is queued or running (its result is applied by poll())."""
        return any(r.loading for r in self.records.values()) or not self._results.empty()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued loads are done (tests and warm-up; never called from the step loop)."""
        deadline = time.monotonic() + timeout
        while any(r.loading for r in self.records.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("adapter loads did not finish in time")
            time.sleep(0.005)
            self.poll()

    # ---- slots and host RAM ---------------------------------------------------------------

    def _free_slot(self) -> int | None:
        for slot in self._slot_lru:  # least recently used first
            owner = self.slot_owner[slot]
            if owner is None:
                return slot
            record = self.records.get(owner)
            if record is None or (not record.in_use and not record.pinned and not record.loading):
                return slot
        return None

    def _evict_slot(self, slot: int) -> None:
        owner = self.slot_owner[slot]
        if owner is None:
            return
        record = self.records.get(owner)
        if record is not None:
            record.slot = None
            record.stats.evictions += 1
        self.slot_owner[slot] = None
        self.pool.ranks[slot] = 0
        self.pool.targets[slot] = frozenset()

    def _trim_host(self) -> None:
        while len(self._host_lru) > self.max_cpu_loras:
            name, _ = self._host_lru.popitem(last=False)
            record = self.records.get(name)
            if record is not None:
                record.host = None

    # ---- the loader thread ----------------------------------------------------------------

    def _load_loop(self) -> None:
        run_torch_inline_on_this_thread()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            started = time.perf_counter()
            try:
                host = job.host if job.host is not None else read_adapter_weights(job.path, job.manifest, self.dtype)
                if job.slot is None:
                    pass
                elif self._copy_stream is not None:
                    with torch.cuda.stream(self._copy_stream):
                        self.pool.fill(job.slot, host, job.manifest.rank, non_blocking=True)
                    self._copy_stream.synchronize()
                else:
                    self.pool.fill(job.slot, host, job.manifest.rank)
                result = _LoadResult(job.name, job.slot, host, time.perf_counter() - started, job.host is None)
            except Exception as exc:  # reported to the requests waiting for this adapter
                message = str(exc) if isinstance(exc, AdapterError) else f"adapter {job.name!r} failed to load: {exc}"
                result = _LoadResult(job.name, job.slot, None, 0.0, False, error=message)
            self._results.put(result)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(timeout=5)

    # ---- what the ops dashboard shows --------------------------------------------------------

    def snapshot(self) -> list[dict]:
        rows = []
        for record in self.records.values():
            stats = record.stats
            rows.append(
                {
                    "name": record.name,
                    "tier": record.tier,
                    "slot": record.slot if record.tier == "gpu" else None,
                    "in_host": record.host is not None,
                    "rank": record.manifest.rank,
                    "bytes": record.manifest.bytes,
                    "pinned": record.pinned,
                    "in_use": record.in_use,
                    "requests": stats.requests,
                    "gpu_hits": stats.gpu_hits,
                    "host_hits": stats.host_hits,
                    "disk_loads": stats.disk_loads,
                    "slot_loads": stats.slot_loads,
                    "evictions": stats.evictions,
                    "mean_load_seconds": stats.load_seconds / stats.slot_loads if stats.slot_loads else None,
                    "last_used": stats.last_used,
                    "error": record.error,
                    # wall-clock time of the next try, for the ops page
                    "retry_at": time.time() + max(0.0, record.retry_at - time.monotonic()) if record.error else None,
                }
            )
        return rows


def read_adapter_weights(path: Path, manifest: AdapterManifest, dtype: torch.dtype) -> HostWeights:
    """Read a PEFT safetensors file (never a pickle) into host tensors, scaling folded into B.

    The fold happens in float32, then each tensor is rounded once to `dtype`: exact when `dtype`
    holds the file's values (a bfloat16 file into a bfloat16 pool, scaling a power of two)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / WEIGHTS_FILE), device="cpu")
    weights: HostWeights = {}
    for module in manifest.modules:
        a = tensors[module.a_name].float()
        b = tensors[module.b_name].float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(
                f"adapter weights for layer {module.layer} {module.module} hold NaN or Inf; the adapter is unusable"
            )
        a_host = a.to(dtype).contiguous()
        b_host = (b * module.scaling).to(dtype).contiguous()
        if torch.cuda.is_available():
            a_host, b_host = a_host.pin_memory(), b_host.pin_memory()
        weights[(module.module, module.layer)] = (a_host, b_host)
    return weights


def run_torch_inline_on_this_thread() -> None:
    """Make torch ops on the calling (background) thread run on it alone, with no OpenMP team.

    A second thread that runs torch ops gets its own OpenMP team. libgomp then manages more
    threads than there are CPUs and throttles its spin-wait, so the stepping thread's workers fall
    asleep between parallel regions and every region pays a wake-up (benchmarks/RESULTS.md, "CPU
    kernels"). The loader's copies and conversions are not worth a team.
    """
    torch.get_num_threads()  # ATen's per-thread lazy init first: it would reset the line below
    try:
        # Per-thread in OpenMP: the stepping thread and MKL keep their threads.
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)
    except (OSError, AttributeError):
        pass  # torch built on another OpenMP runtime, or none: there is no libgomp team to avoid
