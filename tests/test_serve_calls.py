"""The ingress's calls to the model replicas (serve/calling.py) on a fake handle, and how the service scales: the
demand metric and its policy (serve/autoscale.py), room for surge replicas (serve/launch.py). No Ray cluster, no
model."""
import asyncio
import time

import pytest


class FakeHandle:
    """A model deployment handle whose calls raise or return the given outcomes in turn."""

    def __init__(self, *outcomes, delay: float = 0.0):
        self.outcomes, self.delay, self.calls, self.cancelled = list(outcomes), delay, [], 0
        self.score = self

    def remote(self, pairs, deadline):
        self.calls.append(deadline)
        handle = self

        class Response:
            def __await__(self):
                return self._reply().__await__()

            async def _reply(self):
                await asyncio.sleep(handle.delay)
                outcome = handle.outcomes.pop(0) if len(handle.outcomes) > 1 else handle.outcomes[0]
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

            def cancel(self):
                handle.cancelled += 1

        return Response()


def caller(handle, **settings):
    from serve.calling import ModelCaller
    from serve.config import ServeConfig

    return ModelCaller(handle, ServeConfig(**settings))


def run(coro):
    return asyncio.run(coro)


def test_the_ingress_retries_a_request_whose_replica_died_or_became_unreachable():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from serve.http import HTTPError

    ok = {"results": ["ok"]}
    c = caller(FakeHandle(ActorDiedError(), ActorUnavailableError("node lost", None), ok))
    assert run(c.score([("q", "t")], time.perf_counter())) == ok
    assert (len(c.handle.calls), c.counts["retried_replica_died"], c.counts["unavailable"]) == (3, 2, 0)
    c = caller(FakeHandle(ActorDiedError()))
    with pytest.raises(HTTPError) as err:
        run(c.score([("q", "t")], time.perf_counter()))
    assert err.value.status == 503 and "died 3 times" in err.value.message
    assert (len(c.handle.calls), c.counts["retried_replica_died"], c.counts["unavailable"]) == (3, 2, 1)


def test_model_failures_become_json_errors_that_name_no_internals():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from serve.http import HTTPError

    failed = RayTaskError("score", "Traceback ... /srv/secret/model.py", ValueError("boom"))
    cases = [(failed, 500, "failed while scoring"), (BackPressureError(num_queued_requests=3, max_queued_requests=2), 503, "serve.max_queued_requests"),
             (DeploymentUnavailableError("ray internal detail"), 503, "not available")]
    for exc, status, message in cases:
        c = caller(FakeHandle(exc))
        with pytest.raises(HTTPError) as err:
            run(c.score([("q", "t")], time.perf_counter()))
        assert err.value.status == status and message in err.value.message, err.value.message
        assert "secret" not in err.value.message and "internal detail" not in err.value.message


def test_the_deadline_counts_from_arrival_and_a_slow_model_gets_a_503_before_the_proxy_timeout():
    from serve.http import HTTPError

    c = caller(FakeHandle({"results": []}, delay=5.0), latency_budget_ms=100, request_timeout_s=1.0)
    t0 = time.perf_counter() - 0.05  # arrived 50 ms ago
    start = time.perf_counter()
    with pytest.raises(HTTPError) as err:
        run(c.score([("q", "t")], t0))
    took = time.perf_counter() - start
    assert err.value.status == 503 and err.value.extra["reason"] == "unavailable" and c.counts["timed_out"] == 1
    assert took < 1.0 and c.handle.cancelled == 1  # 0.75 s after arrival (1 s proxy timeout less 0.25), then cancelled
    assert c.handle.calls[0] - time.time() == pytest.approx(0.05 - took, abs=0.1)  # the deadline sent: t0 + 100 ms


def test_a_refusal_is_tried_once_more_only_where_another_replica_and_the_time_allow():
    from serve.http import HTTPError

    refusal = {"refused": {"reason": "latency_budget", "error": "overloaded", "retry_after_s": 0.3, "idle_s": 0.01}}
    ok = {"results": ["ok"]}
    c = caller(FakeHandle(refusal, ok), latency_budget_ms=500)
    with pytest.raises(HTTPError) as err:  # one replica: no retry
        run(c.score([("q", "t")], time.perf_counter()))
    assert err.value.status == 503 and "idle_s" not in err.value.extra and len(c.handle.calls) == 1
    c = caller(FakeHandle(refusal, ok), latency_budget_ms=500)
    c.replicas = 2
    assert run(c.score([("q", "t")], time.perf_counter())) == ok and c.counts["retried_refusal"] == 1
    c = caller(FakeHandle(refusal), latency_budget_ms=500)
    c.replicas = 2
    with pytest.raises(HTTPError):  # refused twice: answered with the second refusal
        run(c.score([("q", "t")], time.perf_counter()))
    assert len(c.handle.calls) == 2 and c.counts["refused_latency_budget"] == 1
    slow = {"refused": dict(refusal["refused"], idle_s=0.4)}
    c = caller(FakeHandle(slow, ok), latency_budget_ms=500)
    c.replicas = 2
    with pytest.raises(HTTPError):  # 0.5 s left would not score it twice over (0.8 s) on an idle replica
        run(c.score([("q", "t")], time.perf_counter()))
    assert len(c.handle.calls) == 1


def test_demand_counts_busy_time_and_refused_work_and_the_policy_scales_on_it():
    from types import SimpleNamespace

    from serve.autoscale import DemandPolicy, demand

    # 2 s: the forward thread busy 1.9 s, and 300 items refused at 10 ms each would have needed 3 s more
    assert demand(1.9, 300, 0.01, 2.0) == pytest.approx(2.45)
    policy = DemandPolicy(target_utilisation=0.7)
    ctx = SimpleNamespace(aggregated_metrics={"demand": {"r1": 2.45}}, target_num_replicas=1)
    assert policy(ctx)[0] == pytest.approx(3.5)  # Ray Serve then caps it at max_replicas
    ctx = SimpleNamespace(aggregated_metrics={"demand": {"r1": 0.2, "r2": 0.1}}, target_num_replicas=2)
    assert policy(ctx)[0] < 1  # idle: down to min_replicas (after downscale_delay_s)
    assert policy(SimpleNamespace(aggregated_metrics={}, target_num_replicas=2))[0] == 2  # no reports yet: keep


def test_surge_replicas_must_fit_on_one_node_for_every_resource_they_ask_for(monkeypatch):
    import ray._private.state as state

    from serve.config import ServeConfig
    from serve.launch import surge_fits

    gpu = ServeConfig(replicas=2, num_cpus=1, num_gpus=1, max_surge_percent=100)
    nodes = {"a": {"CPU": 16.0, "GPU": 0.0}, "b": {"CPU": 0.5, "GPU": 2.0}}  # 16 CPUs here, free GPUs there
    monkeypatch.setattr(state, "available_resources_per_node", lambda: nodes)
    fits, why = surge_fits(gpu)
    assert not fits and "room for 0" in why
    nodes["b"]["CPU"] = 4.0
    assert surge_fits(gpu)[0]  # node b takes both
    assert not surge_fits(gpu.model_copy(update={"replicas": 3}))[0]  # 3 extra, room for 2
    assert surge_fits(ServeConfig(num_cpus=0, max_surge_percent=100))[0]  # asks for nothing
