"""Policy serving: Act latency through gRPC vs in-process, and throughput with micro-batching on vs off.

    .venv/bin/python bench/bench_policy.py [--config tiny] [--seconds 4] [--device cpu]

Starts real `wmpo policy serve` processes (batching on: max batch 16, 2 ms wait; off: max batch 1) on a
tiny random-weight VLA and drives them with 1, 4 and 16 concurrent clients (threads of this process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from wmpo.common.net import free_port, wait_until
from wmpo.policy.actions import ActionCodec
from wmpo.policy.checkpoint import PolicyBundle, load_policy, save_policy
from wmpo.policy.model import VLAPolicy, make_config
from wmpo.policy.tokenizer import build_byte_tokenizer
from wmpo.robot import PolicyClient

IMAGE = {"main": np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)}
PROPRIO = np.zeros(4, np.float32)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def in_process_latency(bundle: PolicyBundle, n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        inputs = bundle.prepare([IMAGE], [PROPRIO], ["press the button"])
        bundle.act(inputs, [1.0], [i])
        times.append((time.perf_counter() - start) * 1000)
    return times


def start_server(checkpoint: Path, batching: bool, device: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = os.environ | {"WMPO_POLICY_MAX_BATCH_SIZE": "16" if batching else "1", "WMPO_POLICY_MAX_BATCH_WAIT_MS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wmpo.common.cli", "--log-level", "WARNING", "policy", "serve", "--checkpoint",
         str(checkpoint), "--port", str(port), "--device", device],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    client = PolicyClient(f"grpc://{address}", retries=0)

    def ready() -> bool:
        try:
            client.act(IMAGE, "warm up", PROPRIO)
            return True
        except Exception:
            return False

    wait_until(ready, 120, "policy server", interval=0.3, alive=lambda: proc.poll() is None)
    client.close()
    return proc, address


def throughput(address: str, clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        with PolicyClient(f"grpc://{address}") as client:
            while time.perf_counter() < stop:
                client.act(IMAGE, "press the button", PROPRIO, temperature=1.0)
                done[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokenizer = build_byte_tokenizer()
    bundle = PolicyBundle(VLAPolicy(make_config(args.config, vocab_size=len(tokenizer))), tokenizer,
                          ActionCodec.identity(4, 4))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_policy(bundle, Path(tmp) / "policy")
        bundle = load_policy(checkpoint, device=args.device)
        in_process_latency(bundle, 5)
        local = in_process_latency(bundle, args.calls)
        results: dict[bool, dict[int, float]] = {}
        remote: list[float] = []
        for batching in (True, False):
            proc, address = start_server(checkpoint, batching, args.device)
            try:
                if batching:
                    with PolicyClient(f"grpc://{address}") as client:
                        for i in range(args.calls):
                            start = time.perf_counter()
                            client.act(IMAGE, "press the button", PROPRIO, temperature=1.0, seed=i)
                            remote.append((time.perf_counter() - start) * 1000)
                results[batching] = {n: throughput(address, n, args.seconds) for n in (1, 4, 16)}
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    lp50, lp99 = percentiles(local)
    rp50, rp99 = percentiles(remote)
    print(f"Act latency at batch 1, {args.config} VLA on {args.device}, {args.calls} calls")
    print(f"  in-process      p50 {lp50:7.2f} ms   p99 {lp99:7.2f} ms")
    print(f"  through gRPC    p50 {rp50:7.2f} ms   p99 {rp99:7.2f} ms   (x{rp50 / lp50:.2f} at p50)")
    print("throughput (Act/s), concurrent clients: batching on (max 16, 2 ms) vs off")
    for n in (1, 4, 16):
        on, off = results[True][n], results[False][n]
        print(f"  {n:>2} clients   on {on:7.1f}   off {off:7.1f}   ratio x{on / off:.2f}")


if __name__ == "__main__":
    main()
