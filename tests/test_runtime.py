"""The local Ray instance `ensure_ray` starts: actors can ask the State API about this cluster's actors.

Ray Train's placement-group cleaner (an actor) asks the State API whether its training controller is alive and
removes the training's placement group when the answer is no. Without a dashboard it cannot ask and logs a warning
every second; unpinned, it may ask another Ray instance on the machine, hear "no such actor" and kill a healthy
run (it did, by hand: a local distill lost a student while a second Ray instance with a dashboard started)."""
import pytest

@pytest.mark.ray
def test_actors_see_this_clusters_actors_through_the_state_api(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self):
            return "pong"

    controller = Controller.remote()
    assert ray.get(controller.ping.remote()) == "pong"
    actor_id = controller._actor_id.hex()

    @ray.remote(num_cpus=0)
    def ask(actor_id):
        # what the cleaner runs: no address given, so it must resolve to this cluster's dashboard
        from ray.util.state import get_actor

        state = get_actor(actor_id, timeout=30)
        return state and state.state

    assert ray.get(ask.remote(actor_id), timeout=120) == "ALIVE"
    ray.kill(controller)



@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_training_controllers_of_a_local_instance_poll_their_workers_often(monkeypatch, address):
    """Ray Train's controller notices finished workers at its next health check (Ray's default: every 2 s, twice per
    run): a local instance's actors get a shorter interval (the determinism test's three runs: 71 s -> 54 s); a
    cluster keeps its own setting unless the user set one."""
    import types

    import ray

    from hardware import runtime

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime, "_init", lambda ray, addr, **kw: seen.update(kw) or types.SimpleNamespace(dashboard_url=None))
    monkeypatch.setattr(runtime, "_reclaim_signals", lambda: None)
    monkeypatch.delenv(runtime.HEALTH_CHECK, raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.ensure_ray()
    assert seen["runtime_env"]["env_vars"].get(runtime.HEALTH_CHECK) == (None if address else runtime.LOCAL_HEALTH_CHECK_S)
    monkeypatch.setenv(runtime.HEALTH_CHECK, "1.5")
    runtime.ensure_ray()
    assert seen["runtime_env"]["env_vars"][runtime.HEALTH_CHECK] == "1.5"
