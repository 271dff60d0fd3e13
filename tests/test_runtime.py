"""The local Ray instance `ensure_ray` starts: actors can ask the State API about this cluster's actors.

Ray Train's placement-group cleaner (an actor) asks the State API whether its training controller is alive and
removes the training's placement group when the answer is no. Without a dashboard it cannot ask and logs a warning
every second; unpinned, it may ask another Ray instance on the machine, hear "no such actor" and kill a healthy
run (it did, by hand: a local distill lost a student while a second Ray instance with a dashboard started)."""
import pytest

pytestmark = pytest.mark.ray


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
