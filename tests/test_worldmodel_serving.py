"""World-model serving: Triton `dream`/`reward` and the Imagination gRPC API, with real Triton, Redis and gRPC."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from wmpo.common.grpc_server import GrpcServer
from wmpo.common.net import free_port
from wmpo.common.tensors import from_proto, to_proto
from wmpo.common.triton import TritonPorts
from wmpo.v1 import imagination_pb2, imagination_pb2_grpc
from wmpo.worldmodel.checkpoint import save_world_model
from wmpo.worldmodel.model import make_world_model, to_model_frames, to_uint8_frames
from wmpo.worldmodel.reward.checkpoint import save_reward_model
from wmpo.worldmodel.reward.model import RewardModel
from wmpo.worldmodel.serving.client import RewardClient, WorldModelClient
from wmpo.worldmodel.serving.imagination import ImaginationServicer, SessionLimits
from wmpo.worldmodel.serving.triton import ServedModels, serve_models

SIZE = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonPorts, ServedModels, Path]]:
    root = tmp_path_factory.mktemp("worldmodel")
    torch.manual_seed(0)
    save_world_model(make_world_model("tiny", image_size=SIZE), root / "wm", {"steps": 0})
    save_reward_model(RewardModel.create("tiny", SIZE, 8), root / "reward")
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    triton, models, _watcher = serve_models(root / "wm", root / "reward", ports, max_batch_size=16,
                                            max_queue_delay_us=20_000, bind_address="127.0.0.1")  # fmt: skip
    try:
        yield ports, models, root
    finally:
        triton.stop()


def _inputs(seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8), rng.uniform(-1, 1, (8, 4)).astype(np.float32)


@pytest.mark.triton
def test_world_model_over_grpc_matches_in_process(served: tuple[TritonPorts, ServedModels, Path]) -> None:
    ports, models, _root = served
    client = WorldModelClient(ports.grpc_url)
    spec = client.spec()
    assert (spec.context_frames, spec.future_frames, spec.image_size, spec.action_dim, spec.clip_len) == (
        4,
        8,
        SIZE,
        4,
        8,
    )
    context, actions = _inputs()
    frames, version = client.imagine(context, actions, seed=7)
    assert frames.shape == (8, SIZE, SIZE, 3) and frames.dtype == np.uint8 and version == 1
    model = models.world.model
    local = model.sample(to_model_frames(torch.from_numpy(context))[None], torch.from_numpy(actions)[None],
                         steps=models.sampler_steps, generator=[torch.Generator().manual_seed(7)])  # fmt: skip
    np.testing.assert_array_equal(to_uint8_frames(local)[0].numpy(), frames)
    probs = RewardClient.beside(client).probability(np.stack([frames, frames]))
    assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
    client.close()


@pytest.mark.triton
def test_concurrent_requests_are_batched_by_triton(served: tuple[TritonPorts, ServedModels, Path]) -> None:
    ports, _models, _root = served
    before = _triton_counts(ports)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            with_client = WorldModelClient(ports.grpc_url)
            with_client.imagine(*_inputs(i), seed=i)
            with_client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _triton_counts(ports)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert not errors and inferences == 12
    assert executions < inferences, (executions, inferences)  # several requests per model execution


def _triton_counts(ports: TritonPorts) -> tuple[int, int]:
    """(inferences, executions) of `dream` from Triton's Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(ports.metrics_url, timeout=5) as response:
        body = response.read().decode()
    values = {}
    for line in body.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{") and 'model="dream"' in line:
                values[name] = int(float(line.rsplit(" ", 1)[1]))
    return values.get("nv_inference_count", 0), values.get("nv_inference_exec_count", 0)


@contextlib.contextmanager
def _imagination_api(
    served: tuple[TritonPorts, ServedModels, Path],
    redis_url: str,
    grpc_server: Callable[..., GrpcServer],
    limits: SessionLimits,
) -> Iterator[imagination_pb2_grpc.ImaginationStub]:
    ports, _models, _root = served
    servicer = ImaginationServicer(WorldModelClient(ports.grpc_url), redis_url, limits)
    server = grpc_server([lambda s: imagination_pb2_grpc.add_ImaginationServicer_to_server(servicer, s)])
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield imagination_pb2_grpc.ImaginationStub(channel)
    finally:
        server.stop(grace=0.5)
        servicer.close()


@pytest.fixture
def imagination(
    served: tuple[TritonPorts, ServedModels, Path], redis_url: str, grpc_server: Callable[..., GrpcServer]
) -> Iterator[imagination_pb2_grpc.ImaginationStub]:
    with _imagination_api(served, redis_url, grpc_server, SessionLimits(ttl_s=2, default_horizon=12)) as stub:
        yield stub


def _reset(stub: imagination_pb2_grpc.ImaginationStub, frames: int = 1, **kw: Any) -> imagination_pb2.ResetResponse:
    request = imagination_pb2.ResetRequest(instruction="reach the red goal", **kw)
    to_proto(_inputs()[0][:frames], out=request.frames)
    response: imagination_pb2.ResetResponse = stub.Reset(request, timeout=30)
    return response


def _step(
    stub: imagination_pb2_grpc.ImaginationStub, session: str, actions: Any = None
) -> imagination_pb2.StepResponse:
    request = imagination_pb2.StepRequest(session_id=session)
    to_proto(_inputs()[1] if actions is None else actions, out=request.actions)
    response: imagination_pb2.StepResponse = stub.Step(request, timeout=30)
    return response


@pytest.mark.triton
@pytest.mark.redis
def test_sessions_reset_step_until_the_horizon_and_close(imagination: imagination_pb2_grpc.ImaginationStub) -> None:
    started = _reset(imagination, frames=2, seed=5, success_threshold=1.0)
    assert from_proto(started.frame, dtype=np.uint8).shape == (SIZE, SIZE, 3) and started.horizon == 12
    first = _step(imagination, started.session_id)
    assert from_proto(first.frames).shape == (8, SIZE, SIZE, 3) and not first.done
    assert from_proto(first.success_probs).shape == (8,) and first.elapsed_frames == 8
    second = _step(imagination, started.session_id)
    assert second.done and second.truncated and not second.success and from_proto(second.frames).shape[0] == 4
    with pytest.raises(grpc.RpcError) as done:
        _step(imagination, started.session_id)
    assert done.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert imagination.Close(imagination_pb2.CloseRequest(session_id=started.session_id)).existed
    assert not imagination.Close(imagination_pb2.CloseRequest(session_id=started.session_id)).existed
    with pytest.raises(grpc.RpcError) as closed:
        _step(imagination, started.session_id)
    assert closed.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.triton
@pytest.mark.redis
def test_success_ends_the_episode_at_the_first_success_frame(imagination: imagination_pb2_grpc.ImaginationStub) -> None:
    started = _reset(imagination, success_threshold=1e-6)  # any probability counts as success
    step = _step(imagination, started.session_id)
    assert step.success and step.done and step.reward == 1.0 and from_proto(step.frames).shape[0] == 1


@pytest.mark.triton
@pytest.mark.redis
def test_sessions_expire_and_bad_input_is_rejected(imagination: imagination_pb2_grpc.ImaginationStub) -> None:
    started = _reset(imagination)
    cases = [
        (np.zeros((7, 4), np.float32), grpc.StatusCode.INVALID_ARGUMENT, "actions: expected shape (8, 4)"),
        (np.full((8, 4), 1.5, np.float32), grpc.StatusCode.INVALID_ARGUMENT, "values must lie in [-1, 1]"),
        (np.full((8, 4), np.nan, np.float32), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    ]
    for actions, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            _step(imagination, started.session_id, actions)
        assert info.value.code() == code and message in (info.value.details() or "")
    cases_reset: list[tuple[dict[str, Any], str]] = [
        ({"success_threshold": 2.0}, "success_threshold"),
        ({}, "give 1 to 4 frames"),
    ]
    for kwargs, message in cases_reset:
        request = imagination_pb2.ResetRequest(instruction="reach", **kwargs)
        to_proto(_inputs()[0][:1] if kwargs else np.zeros((5, SIZE, SIZE, 3), np.uint8), out=request.frames)
        with pytest.raises(grpc.RpcError) as info:
            imagination.Reset(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (info.value.details() or "")
    request = imagination_pb2.ResetRequest(instruction="reach", dataset=imagination_pb2.DatasetStart(episode_id="x"))
    with pytest.raises(grpc.RpcError) as no_data:
        imagination.Reset(request, timeout=30)
    assert no_data.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(2.5)  # the TTL is 2 s
    with pytest.raises(grpc.RpcError) as expired:
        _step(imagination, started.session_id)
    assert expired.value.code() == grpc.StatusCode.NOT_FOUND
    served = imagination.GetWorldModelInfo(imagination_pb2.GetWorldModelInfoRequest())
    assert (served.frames_per_step, served.context_frames, served.image_height) == (8, 4, SIZE)


@pytest.mark.triton
def test_a_published_world_model_is_swapped_in_without_restarting_triton(
    served: tuple[TritonPorts, ServedModels, Path], tmp_path: Path
) -> None:
    from wmpo.common.registry import Registry
    from wmpo.worldmodel.serving.triton import WorldModelWatcher

    ports, models, root = served
    original = models.world
    registry = Registry(tmp_path / "registry", "worldmodel")
    registry.publish(root / "wm")
    torch.manual_seed(1)
    save_world_model(make_world_model("tiny", image_size=SIZE), tmp_path / "wm2", {"steps": 0})
    registry.publish(tmp_path / "wm2")
    watcher = WorldModelWatcher(models, registry, "cpu")
    try:
        assert watcher.refresh() and models.world.version == 2
        client = WorldModelClient(ports.grpc_url)
        _frames, version = client.imagine(*_inputs(), seed=7)
        assert version == 2
        client.close()
        broken = registry.publish(tmp_path / "wm2")
        (Path(broken.path) / "config.json").write_text("{}")
        assert not watcher.refresh() and 3 in watcher.refused and models.world.version == 2
    finally:
        models.swap(original.model, original.version)


@pytest.mark.triton
def test_async_client_for_rollout_workers(served: tuple[TritonPorts, ServedModels, Path]) -> None:
    import asyncio

    from wmpo.worldmodel.serving.client import AsyncWorldModelClient

    ports, _models, _root = served

    async def run() -> tuple[list[tuple[np.ndarray[Any, Any], int]], Any]:
        client = AsyncWorldModelClient(ports.grpc_url)
        try:
            spec = await client.spec()
            results = await asyncio.gather(*(client.imagine(*_inputs(i), seed=i) for i in range(4)))
            return list(results), spec
        finally:
            await client.close()

    results, spec = asyncio.run(run())
    assert spec.future_frames == 8 and all(frames.shape == (8, SIZE, SIZE, 3) for frames, _v in results)
    sync = WorldModelClient(ports.grpc_url)
    np.testing.assert_array_equal(sync.imagine(*_inputs(2), seed=2)[0], results[2][0])
    sync.close()


@pytest.mark.triton
@pytest.mark.redis
def test_reset_from_a_dataset_start_state(
    served: tuple[TritonPorts, ServedModels, Path],
    redis_url: str,
    grpc_server: Callable[..., GrpcServer],
    tmp_path: Path,
) -> None:
    from wmpo.data import TrajectoryDataset
    from wmpo.sim.rollout import run_many
    from wmpo.sim.sources import SourceSpec
    from wmpo.sim.tasks import get_task

    ports, _models, _root = served
    list(run_many(get_task("reach"), SourceSpec("expert"), [3], image_size=SIZE, out_dir=tmp_path / "data"))
    episode = TrajectoryDataset(tmp_path / "data").episode(0)
    servicer = ImaginationServicer(
        WorldModelClient(ports.grpc_url), redis_url, SessionLimits(), dataset=tmp_path / "data"
    )
    server = grpc_server([lambda s: imagination_pb2_grpc.add_ImaginationServicer_to_server(servicer, s)])
    with grpc.insecure_channel(server.address) as channel:
        stub = imagination_pb2_grpc.ImaginationStub(channel)
        start = imagination_pb2.DatasetStart(episode_id=episode.episode_id, step=3)
        reset = stub.Reset(imagination_pb2.ResetRequest(instruction="reach the red goal", dataset=start), timeout=30)
        np.testing.assert_array_equal(from_proto(reset.frame), episode.frames[3])
        assert from_proto(_step(stub, reset.session_id).frames).shape == (8, SIZE, SIZE, 3)
        for bad in (imagination_pb2.DatasetStart(episode_id="nope"),
                    imagination_pb2.DatasetStart(episode_id=episode.episode_id, step=10_000)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                stub.Reset(imagination_pb2.ResetRequest(instruction="reach", dataset=bad), timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.triton
@pytest.mark.redis
def test_a_session_from_a_simulator_reset_is_audited_in_the_real_simulator(
    served: tuple[TritonPorts, ServedModels, Path],
    redis_url: str,
    grpc_server: Callable[..., GrpcServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reset from a sim seed, step past the horizon, Audit: the real frames and success are `replay_actions` of the
    executed actions (the horizon-cut chunk's kept ones only) from the same seed; bad starts are refused."""
    with _imagination_api(served, redis_url, grpc_server, SessionLimits(default_horizon=12)) as imagination:
        _audit_a_sim_session(imagination, monkeypatch)


def _audit_a_sim_session(imagination: imagination_pb2_grpc.ImaginationStub, monkeypatch: pytest.MonkeyPatch) -> None:
    from wmpo.sim.replay import replay_actions
    from wmpo.sim.tasks import EVAL_SEED_OFFSET, get_task
    from wmpo.worldmodel.metrics import psnr

    start = imagination_pb2.SimStart(task="reach", seed=7)
    started = imagination.Reset(imagination_pb2.ResetRequest(sim=start, seed=3, success_threshold=1.0), timeout=60)
    assert started.instruction == get_task("reach").instruction and started.horizon == 12
    chunks = [np.random.default_rng(i).uniform(-1, 1, (8, 4)).astype(np.float32) for i in range(2)]
    steps = [_step(imagination, started.session_id, chunk) for chunk in chunks]
    assert steps[1].done and steps[1].truncated and from_proto(steps[1].frames).shape[0] == 4  # 8 + 4 = horizon
    request = imagination_pb2.AuditRequest(session_id=started.session_id, return_frames=True)
    audit = imagination.Audit(request, timeout=120)
    replay = replay_actions("reach", 7, np.concatenate(chunks)[:12], image_size=SIZE)
    np.testing.assert_array_equal(from_proto(started.frame), replay.frames[0])  # imagination began at the reset
    np.testing.assert_array_equal(from_proto(audit.real_frames), replay.frames)
    np.testing.assert_array_equal(from_proto(audit.real_step_success), replay.success)
    assert (audit.start.task, audit.start.seed, audit.actions, audit.done) == ("reach", 7, 12, True)
    assert not audit.imagined_success and audit.real_success == replay.solved and audit.agree == (not replay.solved)
    assert audit.HasField("first_real_success") == replay.solved
    probs = np.concatenate([from_proto(step.success_probs) for step in steps])
    np.testing.assert_array_equal(from_proto(audit.success_probs), probs)
    assert [f.horizon for f in audit.fidelity] == [1, 8]
    imagined = np.concatenate([from_proto(step.frames) for step in steps])
    assert audit.fidelity[0].psnr == pytest.approx(psnr(imagined[0], replay.frames[1]), rel=1e-5)
    assert audit.fidelity[1].copy_psnr == pytest.approx(psnr(replay.frames[0], replay.frames[8]), rel=1e-5)
    assert not imagination.Audit(imagination_pb2.AuditRequest(session_id=started.session_id)).HasField("real_frames")

    for task, seed, message in [("fly", 1, "unknown task 'fly'"), ("reach", EVAL_SEED_OFFSET, "held out")]:
        with pytest.raises(grpc.RpcError) as info:
            sim = imagination_pb2.SimStart(task=task, seed=seed)
            imagination.Reset(imagination_pb2.ResetRequest(sim=sim), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (info.value.details() or "")
    for session, code in [(_reset(imagination).session_id, grpc.StatusCode.FAILED_PRECONDITION),
                          ("nope", grpc.StatusCode.NOT_FOUND)]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            imagination.Audit(imagination_pb2.AuditRequest(session_id=session), timeout=30)
        assert info.value.code() == code

    monkeypatch.setitem(sys.modules, "metaworld", None)  # a world-model server without the simulator
    for call in (lambda: imagination.Audit(imagination_pb2.AuditRequest(session_id=started.session_id), timeout=30),
                 lambda: imagination.Reset(imagination_pb2.ResetRequest(sim=imagination_pb2.SimStart(task="push")),
                                           timeout=30)):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "has no simulator" in (info.value.details() or "")
