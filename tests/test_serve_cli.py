"""`thinkbroad serve` without a server: the API key it asks for must be set, and `--print-config` carries the
`--set` overrides (replicas, autoscaling, the timeout) into the `serve deploy` config and the bound application."""
import pytest

from serve_helpers import tiny_student

pytestmark = pytest.mark.ray


def test_serving_with_an_api_key_variable_that_is_unset_is_refused(monkeypatch):
    from serve.config import ServeConfig
    from serve.launch import check_api_key

    monkeypatch.delenv("THINKBROAD_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="THINKBROAD_UNSET_KEY"):
        check_api_key(ServeConfig(api_key_env="THINKBROAD_UNSET_KEY"))
    check_api_key(ServeConfig())  # no key asked for: nothing to check


def test_serve_takes_set_and_its_print_config_carries_replicas_autoscaling_and_the_timeout(tmp_path, capsys):
    import yaml

    from serve.app import build_app
    from workflows.cli import main

    student = str(tiny_student(tmp_path / "s"))
    given = ["serve", student, "--print-config", "--backend", "torch", "--precision", "fp32", "--set",
             "serve.autoscaling={min_replicas: 1, max_replicas: 3}", "--set", "serve.latency_budget_ms=300",
             "--set", "serve.health_check_period_s=2", "--set", "serve.overload_status=429"]
    assert main(given) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 2.0}
    settings = config["applications"][0]["args"]["settings"]
    assert {k: settings["autoscaling"][k] for k in ("min_replicas", "max_replicas", "metric")} == \
        {"min_replicas": 1, "max_replicas": 3, "metric": "demand"}
    assert (settings["latency_budget_ms"], settings["overload_status"]) == (300, 429)
    # what Ray Serve gets from those settings (private attributes: Ray has no public view of a bound app's options)
    ingress = build_app(config["applications"][0]["args"])._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    autoscaling = model._deployment_config.autoscaling_config
    assert autoscaling.max_replicas == 3 and autoscaling.policy.policy_function == "serve.autoscale:DemandPolicy"
    assert model._deployment_config.health_check_period_s == 2
    assert model.max_queued_requests == 128 and ingress.backpressure_config.status_code == 429

    assert main(["serve", student, "--print-config", "--set", "serve.replica=2"]) == 2
    assert "--set serve.replica=2: serve.replica: unknown key" in capsys.readouterr().err
    assert main(["serve", student, "--print-config", "--set", "distill.seeds=[1]"]) == 2
    assert "without --config only serve.* keys apply" in capsys.readouterr().err
    assert main(["serve", student, "--print-config", "--set", "serve.autoscaling={min_replicas: 3, max_replicas: 2}"]) == 2
    assert "min_replicas (3) is above max_replicas (2)" in capsys.readouterr().err


def test_a_one_by_one_redeploy_keeps_the_versions_of_what_it_does_not_change(tmp_path):
    """serve/launch.py deploy falls back to max_surge_percent 0 where the surge replicas cannot be placed: the
    ingress, and the model of the same student (a failed reload's rollback), keep their versions, so Ray Serve
    replaces neither (before, the fallback gave both new versions: the ingress lost its counters)."""
    from serve.app import build_app
    from serve.config import ServeConfig

    student, other = str(tiny_student(tmp_path / "s")), str(tiny_student(tmp_path / "o", seed=1))

    def versions(folder, settings):
        ingress = build_app({"student_dir": folder, "settings": settings.model_dump()})._bound_deployment
        return ingress.version, ingress.init_args[0]._bound_deployment.version

    surge = ServeConfig()
    one_by_one = surge.model_copy(update={"max_surge_percent": 0, "surge_timeout_s": 5.0})
    assert versions(student, one_by_one) == versions(student, surge)
    assert versions(other, one_by_one)[0] == versions(student, surge)[0]  # a new student: the same ingress
    assert versions(other, one_by_one)[1] != versions(student, surge)[1]  # ... and a new model
    assert versions(student, surge.model_copy(update={"latency_budget_ms": 300}))[0] != versions(student, surge)[0]
