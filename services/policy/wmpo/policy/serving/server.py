"""The gRPC policy server: `wmpo.v1.Policy` over micro-batched VLA forward passes, with hot swap."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from wmpo.common.auth import BearerTokenInterceptor, load_tokens
from wmpo.common.grpc_server import GrpcServer
from wmpo.common.logs import get_logger
from wmpo.common.metrics import counter, histogram, serve_metrics
from wmpo.common.registry import Registry, VersionNotFoundError
from wmpo.common.tensors import TensorError, to_proto
from wmpo.policy.serving.batcher import MicroBatcher, QueueFullError
from wmpo.policy.serving.observation import DecodedObservation, decode_observation
from wmpo.policy.serving.versions import NoModelError, Resident, VersionManager, VersionUnavailableError
from wmpo.policy.settings import PolicyServiceSettings
from wmpo.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = get_logger(__name__)
SERVICE_NAME = "wmpo.v1.Policy"
LATENCY = histogram("policy_act_latency_seconds", "Act latency inside the server.", labels=["method"])
REQUESTS = counter("policy_requests", "Act requests by version and status.", labels=["version", "status"])


@dataclass
class _Job:
    observation: DecodedObservation
    temperature: float
    seed: int | None


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, VersionNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "version not found"
    if isinstance(exc, VersionUnavailableError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NoModelError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while the request was queued"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    """Implements `wmpo.v1.Policy` on a `VersionManager` and a `MicroBatcher`."""

    def __init__(
        self, versions: VersionManager, *, max_batch: int = 16, max_wait_s: float = 0.002, max_queue: int = 1024
    ):
        self.versions = versions
        self.batcher = MicroBatcher(self._run_batch, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue)

    # -- the batched forward -------------------------------------------------------------------------
    @staticmethod
    def _run_batch(resident: Resident, jobs: list[_Job]) -> list[tuple[Any, float, int]]:
        bundle = resident.bundle
        start = time.perf_counter()
        inputs = bundle.prepare(
            [j.observation.images for j in jobs],
            [j.observation.proprio for j in jobs],
            [j.observation.instruction for j in jobs],
        )
        out = bundle.act(inputs, [j.temperature for j in jobs], [j.seed for j in jobs])
        elapsed_ms = (time.perf_counter() - start) * 1000
        return [((out.tokens[i], out.actions[i], out.logprobs[i]), elapsed_ms, len(jobs)) for i in range(len(jobs))]

    def _act(self, request: policy_pb2.ActRequest, context: grpc.ServicerContext) -> policy_pb2.ActResponse:
        resident = self.versions.get(request.version)
        observation = decode_observation(request.observation, resident.bundle.spec())
        temperature = float(request.sampling.temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise TensorError("sampling.temperature", f"must be finite and >= 0, got {temperature}")
        seed = int(request.sampling.seed) if request.sampling.HasField("seed") else None
        future, item = self.batcher.submit(resident, _Job(observation, temperature, seed))
        remaining: float | None = context.time_remaining()  # huge (not None) when the client set no deadline
        if remaining is not None and remaining > 86_400:
            remaining = None
        try:
            (tokens, actions, logprobs), inference_ms, batch = future.result(timeout=remaining)
        except TimeoutError:
            future.cancel()
            raise
        queue_ms = (time.perf_counter() - item.enqueued) * 1000 - inference_ms
        chunk = common_pb2.ActionChunk(policy_version=resident.version, policy_sha256=resident.sha256)
        to_proto(np.asarray(actions, np.float32), out=chunk.actions)
        to_proto(np.asarray(tokens, np.int32), out=chunk.token_ids)
        if request.return_logprobs:
            to_proto(np.asarray(logprobs, np.float32), out=chunk.logprobs)
        response = policy_pb2.ActResponse(chunk=chunk, request_id=request.request_id)
        response.timing.queue_ms = max(0.0, queue_ms)
        response.timing.inference_ms = inference_ms
        response.timing.batch_size = batch
        return response

    # -- RPCs ----------------------------------------------------------------------------------------
    def _measured_act(
        self, request: policy_pb2.ActRequest, context: grpc.ServicerContext, method: str
    ) -> policy_pb2.ActResponse | tuple[grpc.StatusCode, str]:
        """`_act` with latency and request metrics; a failure comes back as (status code, message)."""
        start = time.perf_counter()
        try:
            response = self._act(request, context)
        except Exception as exc:
            code, message = _status(exc)
            REQUESTS.labels(version=request.version or "current", status=code.name).inc()
            if code == grpc.StatusCode.INTERNAL:
                log.exception(f"{method} failed")
            return code, message
        LATENCY.labels(method=method).observe(time.perf_counter() - start)
        REQUESTS.labels(version=str(response.chunk.policy_version), status="OK").inc()
        return response

    def Act(self, request: policy_pb2.ActRequest, context: grpc.ServicerContext) -> policy_pb2.ActResponse:
        result = self._measured_act(request, context, "Act")
        if isinstance(result, tuple):
            context.abort(*result)
        return result

    def StreamAct(
        self, request_iterator: Iterator[policy_pb2.ActRequest], context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.StreamActResponse]:
        for request in request_iterator:
            result = self._measured_act(request, context, "StreamAct")
            if isinstance(result, tuple):
                error = policy_pb2.StreamError(code=result[0].value[0], message=result[1])
                yield policy_pb2.StreamActResponse(request_id=request.request_id, error=error)
            else:
                yield policy_pb2.StreamActResponse(request_id=request.request_id, response=result)

    def ListVersions(
        self, request: policy_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> policy_pb2.ListVersionsResponse:
        response = policy_pb2.ListVersionsResponse(following=self.versions.follow)
        current = self.versions.current
        response.current_version = current.version if current else 0
        for info, aliases, resident in self.versions.versions():
            item = response.versions.add(version=info.version, sha256=info.sha256, aliases=aliases, resident=resident)
            item.created_at.FromNanoseconds(int(info.created_at * 1e9))
            item.metadata.update(info.metadata)
        return response

    def GetPolicyInfo(
        self, request: policy_pb2.GetPolicyInfoRequest, context: grpc.ServicerContext
    ) -> policy_pb2.PolicyInfo:
        try:
            resident = self.versions.get(request.version)
        except Exception as exc:
            context.abort(*_status(exc))
        info = policy_pb2.PolicyInfo(spec=policy_pb2.PolicySpec(**resident.bundle.spec()))
        info.version.version = resident.version
        info.version.sha256 = resident.sha256
        info.version.resident = True
        return info

    def close(self) -> None:
        self.batcher.close()


class PolicyServer:
    """Everything `wmpo policy serve` runs: versions, servicer, gRPC server, metrics, version watcher."""

    def __init__(self, settings: PolicyServiceSettings, *, poll_interval_s: float = 1.0) -> None:
        self.settings = settings
        registry = Registry(settings.registry, "policy", redis_url=settings.redis_url) if settings.registry else None
        self.versions = VersionManager(
            checkpoint=settings.checkpoint,
            registry=registry,
            follow=settings.version,
            device=settings.device,
            max_resident=settings.max_resident_versions,
            poll_interval_s=poll_interval_s,
        )
        self.servicer = PolicyServicer(
            self.versions,
            max_batch=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
        )
        interceptors = (
            [BearerTokenInterceptor(load_tokens(settings.auth_tokens_file))] if settings.auth_tokens_file else []
        )
        self.grpc = GrpcServer(
            [lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(self.servicer, s)],
            host=settings.host,
            port=settings.port,
            max_message_bytes=settings.max_message_mb * 1024 * 1024,
            interceptors=interceptors,
            service_names=[SERVICE_NAME],
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
        )
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return self.grpc.address

    def start(self) -> PolicyServer:
        """Start serving; health turns SERVING as soon as a version is loaded (maybe later, when published)."""
        if self.settings.metrics_port:
            self.metrics_port = serve_metrics(self.settings.metrics_port, host=self.settings.host)
        self.grpc.start()
        self.versions.load_initial()
        self._update_health()
        self.versions.start_watching(self.settings.redis_url)
        self._health_thread = threading.Thread(target=self._health_loop, daemon=True, name="policy-health")
        self._health_thread.start()
        log.info(
            "policy server listening",
            address=self.address,
            version=self.versions.current and self.versions.current.version,
        )
        return self

    def _update_health(self) -> None:
        self.grpc.set_serving(self.versions.current is not None)

    def _health_loop(self) -> None:
        while self.versions.current is None and not self.versions._stop.wait(0.5):
            self._update_health()
        self._update_health()

    def stop(self, grace: float = 5.0) -> None:
        self.versions.stop()
        self.grpc.stop(grace)
        self.servicer.close()

    def wait(self) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        log.info("policy server stopping")
        self.stop()
