"""The `thinkbroad serve` process: deploy, say "ready" once the app answers, redeploy on SIGHUP, drain and stop on
SIGTERM (or Ctrl-C).

- The signal handlers are in place before the first deploy; they only record the signal, and the main thread acts
  on it between deploys (a SIGHUP during the first deploy redeploys after it).
- "ready" is printed once GET /readyz answers 200 through the HTTP proxy: a model replica has run its warm-up
  forwards (Ray Serve routes to a replica only after its constructor, which times forwards, returned).
- A reload that fails (the run's student cannot be found or loaded, or its replicas fail to start) is logged,
  counted in GET /v1/model (`reloads`), and leaves the student that served before serving: the app is deployed again
  with it (the same version: its running replicas stay).
- SIGTERM/SIGINT: the ingress refuses new requests (503 shutting_down, /readyz 503) while those in flight finish, up
  to serve.graceful_shutdown_s; then the app is deleted (its replicas finish what they hold) and, when this
  process started Ray itself, Serve and Ray are shut down. The process exits 0. A second signal skips the drain;
  while the first deploy still runs, a second one stops at once (KeyboardInterrupt).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

from serve.config import ServeConfig


def check_student(student_dir: Path) -> None:
    """What a replica needs from the folder, checked here so a broken student fails before any replica is touched."""
    student_dir = Path(student_dir)
    cfg = json.loads((student_dir / "student_config.json").read_text())
    missing = [k for k in ("labels", "perspectives", "max_length", "extractor", "mode") if k not in cfg]
    if missing:
        raise ValueError(f"{student_dir}/student_config.json lacks {missing}")
    if not (student_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{student_dir} has no model.safetensors")
    if not (student_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{student_dir} has no tokenizer.json (serving needs a fast tokenizer)")


def _say(message: str, err: bool = False) -> None:
    print(f"[thinkbroad] {message}", file=sys.stderr if err else sys.stdout, flush=True)


class Supervisor:
    def __init__(self, student_dir: Path, settings: ServeConfig, reload=None, name: str = "thinkbroad",
                 route_prefix: str = "/"):
        self.student_dir, self.settings, self.reload_fn = Path(student_dir), settings, reload
        self.name, self.route_prefix = name, route_prefix
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        self.url = f"http://{settings.host}:{settings.port}"
        self.probe = f"http://{host}:{settings.port}{route_prefix.rstrip('/')}/readyz"
        self.signals: list[str] = []
        self.looping = False  # past the first deploy: a second stop signal then skips the drain

    def install_signals(self) -> None:
        def note(what):
            def handler(*_):
                if what == "stop" and "stop" in self.signals and not self.looping:
                    raise KeyboardInterrupt  # asked twice while still starting (a deploy that cannot place): give up
                self.signals.append(what)  # list.append is atomic: safe in a handler

            return handler

        signal.signal(signal.SIGHUP, note("reload"))
        signal.signal(signal.SIGTERM, note("stop"))
        signal.signal(signal.SIGINT, note("stop"))

    def start(self) -> tuple:
        from serve.launch import deploy

        path = deploy(self.student_dir, self.settings, self.name, self.route_prefix)
        self.wait_ready()
        _say(f"ready: serving {self.student_dir} on {path[1]} {path[2]} ({path[0]}) at {self.url}  (POST "
             f"{self.url}/v1/relevance, docs at {self.url}/docs; kill -HUP {os.getpid()} redeploys, kill -TERM "
             f"{os.getpid()} or Ctrl-C drains and stops)")
        return path

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        end = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.probe, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{self.probe} did not answer 200 within {timeout_s:g} s")
            time.sleep(0.2)

    def loop(self) -> None:
        """Until SIGTERM/SIGINT: act on each recorded signal in turn."""
        self.looping = True
        while True:
            if not self.signals:
                time.sleep(0.2)
                continue
            what = self.signals.pop(0)
            if what == "stop":
                return self.stop(drain=not self.signals.count("stop"))
            self.reload()

    def _ingress(self):
        from ray import serve

        return serve.get_app_handle(self.name)

    def reload(self) -> None:
        from serve.launch import deploy

        tried = False
        try:
            new = Path(self.reload_fn()) if self.reload_fn else self.student_dir
            check_student(new)
            _say(f"redeploying {new} ...")
            tried = True
            path = deploy(new, self.settings, self.name, self.route_prefix)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            if tried:  # its replicas may have failed to start: back to the version that served
                try:
                    deploy(self.student_dir, self.settings, self.name, self.route_prefix)
                except Exception as again:
                    _say(f"redeploying {self.student_dir} failed too: {type(again).__name__}: {again}", err=True)
            self._report(failure)  # counted in /v1/model before it is said
            _say(f"reload failed, still serving {self.student_dir}: {failure}", err=True)
            return
        self.student_dir = new
        self._report(None)
        _say(f"serving {new} on {path[1]} {path[2]} ({path[0]})")

    def _report(self, failure: str | None) -> None:
        try:
            self._ingress().note_reload.remote(failure).result(timeout_s=10)
        except Exception as exc:
            _say(f"could not count the reload in /v1/model: {type(exc).__name__}: {exc}", err=True)

    def stop(self, drain: bool = True) -> None:
        from ray import serve

        s = self.settings
        if drain:
            _say(f"stopping: new requests get 503, those in flight finish (up to {s.graceful_shutdown_s:g} s) ...")
            end = time.monotonic() + s.graceful_shutdown_s
            try:
                ingress = self._ingress()
                while ingress.drain.remote().result(timeout_s=10) > 0 and time.monotonic() < end:
                    if "stop" in self.signals:  # asked twice: stop now
                        break
                    time.sleep(0.1)
            except Exception as exc:
                _say(f"could not drain the ingress ({type(exc).__name__}: {exc}); deleting the app", err=True)
        serve.delete(self.name)  # the replicas finish what they hold (graceful_shutdown_timeout_s)
        _say("stopped")


def run_local(student_dir: Path, settings: ServeConfig, block: bool = True, reload=None, name: str = "thinkbroad",
              route_prefix: str = "/") -> str:
    """Start Serve on the current Ray (local unless RAY_ADDRESS is set) and return the base URL. With `block`, the
    signal handlers are installed first and this returns after SIGTERM/SIGINT has drained and stopped the app (and
    Ray, when it started Ray); SIGHUP redeploys the student folder `reload()` returns (default: the same one)."""
    import ray
    from ray import serve

    from serve.launch import check_api_key, http_options
    from hardware.runtime import ensure_ray

    check_api_key(settings)
    owned = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray()  # before the handlers: ray.init installs a SIGTERM handler of its own (sys.exit)
    sup = Supervisor(student_dir, settings, reload, name, route_prefix)
    if block:
        sup.install_signals()
    serve.start(http_options=http_options(settings))
    sup.start()
    if block:
        sup.loop()
        if owned:
            serve.shutdown()
            ray.shutdown()
    return sup.url
