"""World-model serving: imagined frames/s through Triton (dynamic batching) at 1/4/16 concurrent clients vs
the same model in-process at batch 1/4/16, and the cost of each number of denoising steps.

    .venv/bin/python bench/bench_dream.py [--image-size 64] [--seconds 6]

Uses a tiny world model with random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from wmpo.common.net import free_port
from wmpo.common.triton import TritonPorts
from wmpo.worldmodel.checkpoint import save_world_model
from wmpo.worldmodel.model import make_world_model
from wmpo.worldmodel.reward.checkpoint import save_reward_model
from wmpo.worldmodel.reward.model import RewardModel
from wmpo.worldmodel.serving.client import WorldModelClient
from wmpo.worldmodel.serving.triton import serve_models


def in_process_fps(model: torch.nn.Module, size: int, batch: int, steps: int, seconds: float) -> float:
    context = torch.rand(batch, 4, 3, size, size) * 2 - 1
    actions = torch.rand(batch, 8, 4) * 2 - 1
    model.sample(context, actions, steps=steps)  # type: ignore[operator]
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.sample(context, actions, steps=steps)  # type: ignore[operator]
        frames += batch * 8
    return frames / (time.perf_counter() - start)


def triton_fps(url: str, size: int, clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        client = WorldModelClient(url)
        rng = np.random.default_rng(i)
        context = rng.integers(0, 255, (4, size, size, 3), dtype=np.uint8)
        actions = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
        while time.perf_counter() < stop:
            client.imagine(context, actions, seed=i)
            counts[i] += 8
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    size = args.image_size
    torch.manual_seed(0)
    model = make_world_model("tiny", image_size=size).eval()
    print(f"tiny world model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), {size}x{size}, CPU")
    print("denoising steps: in-process frames/s at batch 1")
    base = None
    for steps in (1, 2, 3, 4, 8):
        fps = in_process_fps(model, size, 1, steps, args.seconds / 2)
        base = base or fps
        print(f"  {steps} steps  {fps:7.1f} frames/s  (x{fps / base:.2f} of 1 step)")
    with tempfile.TemporaryDirectory() as tmp:
        save_world_model(model, Path(tmp) / "wm", {"steps": 0})
        save_reward_model(RewardModel.create("tiny", size, 8), Path(tmp) / "reward")
        ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
        triton, _models, _ = serve_models(Path(tmp) / "wm", Path(tmp) / "reward", ports, max_batch_size=16,
                                          max_queue_delay_us=5000, bind_address="127.0.0.1")  # fmt: skip
        try:
            print("3 steps: Triton (dynamic batching) at N clients vs in-process at batch N, frames/s")
            for n in (1, 4, 16):
                local = in_process_fps(model, size, n, 3, args.seconds)
                served = triton_fps(ports.grpc_url, size, n, args.seconds)
                print(f"  N={n:>2}  triton {served:7.1f}   in-process {local:7.1f}   ratio x{served / local:.2f}")
        finally:
            triton.stop()


if __name__ == "__main__":
    main()
