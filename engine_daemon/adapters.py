"""LoRA adapters in three tiers: the device pool (``lora_pool_bytes``), host RAM (``max_cpu_loras``), disk.

The scheduler asks ``acquire(name)`` for an adapter's slot (its first row in the pool,
``adapter_pool``). A resident adapter answers at once; a missing one is given rows by its rank and
loaded by a background thread (disk → host → device) while the batch keeps stepping, and its
requests wait. Rows are taken from the least recently used adapters first; an adapter used by a
running sequence, loading, or pinned by an operator is never evicted. All bookkeeping happens on
the engine thread: the loader thread only fills rows that nobody else may touch and reports back.
"""

from __future__ import annotations

import ctypes
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine_daemon.adapter_pool import AdapterPool, HostWeights
from engine_daemon.peft_format import (
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    ModelDescriptor,
    adapter_manifest_load,
)

# A failed load is tried again by a later request after 5 s, 10 s, 20 s ... at most 5 minutes.
LOAD_RETRY_FIRST_SECONDS = 5.0
LOAD_RETRY_MAX_SECONDS = 300.0

# Loads per second are counted over this many seconds.
LOAD_RATE_SECONDS = 10.0


@dataclass
class AdapterStats:
    requests: int = 0
    gpu_hits: int = 0  # acquired while already in a slot
    host_hits: int = 0  # loaded into a slot from host RAM
    disk_loads: int = 0  # read from disk into host RAM
    slot_loads: int = 0  # copies into the device pool
    evictions: int = 0
    load_seconds: float = 0.0  # time of the device loads (disk or host → device)
    prefetch_seconds: float = 0.0  # time of host-only prefetches (disk → host RAM)
    last_used: float | None = None  # wall-clock time


@dataclass
class AdapterRecord:
    name: str
    path: Path
    manifest: AdapterManifest
    slot: int | None = None  # its first row in the device pool, which the kernels index it by
    loading: bool = False  # a device load runs (its rows are being filled)
    host_loading: bool = False  # a read from disk into host RAM runs
    host: HostWeights | None = None
    error: str | None = None  # the last load's failure, until a retry (after retry_at) succeeds
    failures: int = 0  # loads failed in a row
    retry_at: float = 0.0  # monotonic time from which a request may try the load again
    in_use: int = 0  # running sequences holding its rows
    pinned: bool = False
    touched: int = 0  # the residency's clock when last acquired, held or released (LRU)
    ready_at: float = 0.0  # monotonic time its last device load finished
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


@dataclass
class _LoadJob:
    name: str
    generation: int  # of the registration it loads: a result for an older one is dropped
    path: Path
    manifest: AdapterManifest
    slot: int | None  # None: only bring it into host RAM
    host: HostWeights | None  # None: read from disk first


@dataclass
class _LoadResult:
    name: str
    generation: int
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
        pool_bytes: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.descriptor = descriptor
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype, self.device = dtype, device
        self.pool = AdapterPool(descriptor, pool_bytes, max_lora_rank, dtype, device)
        self.records: dict[str, AdapterRecord] = {}
        self._clock = itertools.count(1)  # AdapterRecord.touched: higher = used more recently
        # The pool knows its rows' owners by registration (AdapterRecord.generation): a name added
        # again while its old weights still load must not pass for the old owner.
        self._owners: dict[int, AdapterRecord] = {}
        self._host_lru: OrderedDict[str, int] = OrderedDict()  # adapters with a host copy → its bytes
        # (adapter, seconds, "disk" | "host") of each finished device load, drained by the metrics exporter.
        self.load_events: deque[tuple[str, float, str]] = deque(maxlen=1024)
        self._load_times: deque[float] = deque(maxlen=4096)  # monotonic times of device loads (loads/s)
        self._jobs: queue.Queue[_LoadJob | None] = queue.Queue()
        self._results: queue.Queue[_LoadResult] = queue.Queue()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._worker = threading.Thread(target=self._load_loop, name="lora-loader", daemon=True)
        self._worker.start()

    # ---- registration -------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> AdapterRecord:
        """Register (or replace) an adapter: a staged folder by its manifest, else a PEFT folder validated here."""
        manifest = adapter_manifest_load(path, self.descriptor, max_lora_rank=self.max_lora_rank)
        if manifest.rank > self.pool.capacity:
            raise AdapterError(f"adapter {name!r} has rank {manifest.rank}, more rows than the device's adapter pool "
                               f"holds ({self.pool.capacity}); raise lora_pool_bytes")
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
            self._vacate(record, record.slot)
        # (Rows still being filled stay taken until poll() hears the load ended.)
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

    def ready(self, name: str) -> bool:
        """Whether the adapter is on the device, its load done: a request for it can run now."""
        record = self.records.get(name)
        return record is not None and record.tier == "gpu"

    def loading(self, name: str) -> bool:
        """Whether a load of the adapter runs, onto the device or into host RAM (which the device load follows)."""
        record = self.records.get(name)
        return record is not None and (record.loading or record.host_loading)

    def in_use(self, name: str) -> bool:
        record = self.records.get(name)
        return record is not None and record.in_use > 0

    def acquire(self, name: str, keep: Collection[str] = ()) -> int | None:
        """The slot of a ready adapter, or None while it loads: a load is started if rows can be had,
        evicting least recently used adapters that no running sequence holds and that are not in `keep`."""
        record = self.check_loadable(name)
        if record.slot is not None:
            if record.loading:
                return None
            record.touched = next(self._clock)
            return record.slot
        if record.host_loading:
            return None  # being read into host RAM: the device load starts from that copy, later
        rows = record.manifest.rank
        placement = self.pool.choose(rows, lambda owner: self._evictable(owner, keep), self._recency)
        if placement is None:
            return None  # the rows it needs serve running requests (or are pinned); wait for one to finish
        for victim in placement.victims:
            self._evict(self._owners[victim])
        self.pool.occupy(placement.start, rows, record.generation)
        self._owners[record.generation] = record
        record.slot, record.loading = placement.start, True
        record.touched = next(self._clock)
        self._jobs.put(_LoadJob(name, record.generation, record.path, record.manifest, placement.start, record.host))
        return None

    def holders(self, name: str) -> set[str] | None:
        """The adapters of running requests on the rows `name` would take once they let go; None
        when pinned adapters leave it no room however many others go."""
        def may_go(owner: int) -> bool:
            record = self._owners[owner]
            return self.records.get(record.name) is record and not record.pinned

        placement = self.pool.choose(self.get(name).manifest.rank, may_go, self._recency)
        if placement is None:
            return None
        return {self._owners[owner].name for owner in placement.victims if self._owners[owner].in_use}

    def prefetch(self, name: str, keep: Collection[str] = ()) -> None:
        """Bring an adapter toward the device ahead of its requests: onto it if rows can be had
        without evicting an adapter in `keep`, else into host RAM."""
        try:
            record = self.check_loadable(name)
        except AdapterError:
            return  # its requests are told when they are admitted
        if record.slot is not None or record.loading or record.host_loading:
            return
        if self.acquire(name, keep) is None and record.slot is None:
            self.prefetch_to_host(name)

    def prefetch_to_host(self, name: str) -> None:
        """Read an adapter into host RAM in the background, so that its first request skips the disk."""
        record = self.get(name)
        if record.host is not None:
            self._host_lru.move_to_end(name)
            return
        if record.error and time.monotonic() < record.retry_at:
            return
        if record.slot is None and not record.loading and not record.host_loading:  # (on the device: no need)
            record.host_loading = True
            self._jobs.put(_LoadJob(name, record.generation, record.path, record.manifest, None, None))

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
        record.touched = next(self._clock)
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
            record.touched = next(self._clock)
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
            if record is not None and record.generation != result.generation:
                record = None  # a load of a registration since removed (the name was added again)
            if result.slot is None:  # a host-only prefetch
                if record is not None:
                    record.host_loading = False
                    if result.error:
                        self._load_failed(record, result.error)
                        failures.append((result.name, result.error))
                    elif record.host is None:
                        record.failures = 0
                        record.stats.disk_loads += 1
                        record.stats.prefetch_seconds += result.seconds
                        self._keep_on_host(result.name, result.host)
                continue
            if record is None:  # removed or replaced while loading: its rows were kept until now
                self._vacate(self._owners[result.generation], result.slot)
                continue
            record.loading = False
            if result.error:
                self._load_failed(record, result.error)
                record.slot = None
                self._vacate(record, result.slot)
                failures.append((result.name, result.error))
                continue
            record.fresh_load, record.failures = True, 0
            record.ready_at = time.monotonic()
            self.load_events.append((result.name, result.seconds, "disk" if result.from_disk else "host"))
            self._load_times.append(time.monotonic())
            record.stats.slot_loads += 1
            record.stats.load_seconds += result.seconds
            if result.from_disk:
                record.stats.disk_loads += 1
            else:
                record.stats.host_hits += 1
            self.pool.activate(result.slot, record.manifest.rank,
                               frozenset((m.module, m.layer) for m in record.manifest.modules))
            if record.host is None and result.host is not None:
                self._keep_on_host(result.name, result.host)
            elif record.host is not None:
                self._host_lru.move_to_end(result.name)

    def _keep_on_host(self, name: str, host: HostWeights | None) -> None:
        self.records[name].host = host
        # Counted once here: tier_bytes() runs with every snapshot, which the metrics take each step.
        self._host_lru[name] = sum(a.nbytes + b.nbytes for a, b in host.values()) if host else 0
        self._trim_host()

    @property
    def busy(self) -> bool:
        """Whether a background load is queued or running (its result is applied by poll())."""
        return any(r.loading or r.host_loading for r in self.records.values()) or not self._results.empty()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued loads are done (tests and warm-up; never called from the step loop)."""
        deadline = time.monotonic() + timeout
        self.poll()
        while any(r.loading or r.host_loading for r in self.records.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("adapter loads did not finish in time")
            time.sleep(0.005)
            self.poll()

    # ---- the pool and host RAM ------------------------------------------------------------

    def _evictable(self, owner: int, keep: Collection[str]) -> bool:
        record = self._owners[owner]
        if self.records.get(record.name) is not record:
            return False  # removed while its load runs: the rows are freed when poll() hears it ended
        return not (record.in_use or record.pinned or record.loading or record.name in keep)

    def _recency(self, owner: int) -> int:
        return self._owners[owner].touched

    def _vacate(self, record: AdapterRecord, start: int) -> None:
        self.pool.vacate(start)
        self._owners.pop(record.generation, None)

    def _evict(self, record: AdapterRecord) -> None:
        self._vacate(record, record.slot)
        record.slot = None
        record.stats.evictions += 1

    def loads_per_second(self, seconds: float = LOAD_RATE_SECONDS) -> float:
        """Device loads finished over the last `seconds`."""
        since = time.monotonic() - seconds
        return sum(1 for at in self._load_times if at >= since) / seconds

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of adapter weights per tier: rows taken on the device, host copies, files on disk."""
        return {
            "gpu": self.pool.used_bytes,
            "host": sum(self._host_lru.values()),
            "disk": sum(r.manifest.bytes for r in self.records.values()),
        }

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
                    # After every kernel queued so far: a step launched before these rows were
                    # vacated may still read them.
                    self._copy_stream.wait_stream(torch.cuda.default_stream(self.device))
                    with torch.cuda.stream(self._copy_stream):
                        self.pool.fill(job.slot, host, job.manifest.rank, non_blocking=True)
                    self._copy_stream.synchronize()
                else:
                    self.pool.fill(job.slot, host, job.manifest.rank)
                result = _LoadResult(job.name, job.generation, job.slot, host, time.perf_counter() - started,
                                     job.host is None)
            except Exception as exc:  # reported to the requests waiting for this adapter
                message = str(exc) if isinstance(exc, AdapterError) else f"adapter {job.name!r} failed to load: {exc}"
                result = _LoadResult(job.name, job.generation, job.slot, None, 0.0, False, error=message)
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
                    "device_bytes": record.manifest.rank * self.pool.row_bytes if record.slot is not None else 0,
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
