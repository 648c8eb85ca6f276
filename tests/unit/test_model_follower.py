"""ModelFollower's rules with a fake registry and clock: check interval, swaps, back-off, outages."""

from __future__ import annotations

import logging

import pytest

from anomaly.errors import RegistryError
from anomaly.model_follower import MAX_BACKOFF_S, ModelFollower


class FakeRegistry:
    def __init__(self, alias: str | None = "1", broken: set[str] = frozenset()) -> None:
        self.alias = alias
        self.broken = set(broken)
        self.down = False
        self.resolves = 0
        self.loads: list[str] = []

    def resolve(self, name: str, alias: str) -> str | None:
        self.resolves += 1
        if self.down:
            raise ConnectionError("registry down")
        return self.alias

    def load(self, name: str, version: str):
        self.loads.append(version)
        if version in self.broken:
            raise RegistryError(f"models:/{name}/{version} holds no detector artifact")
        return f"detector-v{version}", version


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def follower(reg: FakeRegistry, clock: Clock, interval: float = 30.0, **kwargs) -> ModelFollower:
    return ModelFollower("pump", "champion", interval, reg.load, resolver=reg.resolve, clock=clock, **kwargs)


def test_loads_at_start_and_checks_at_most_every_interval():
    reg, clock = FakeRegistry(), Clock()
    f = follower(reg, clock)
    assert f.current() == ("detector-v1", "1") and reg.loads == ["1"]
    reg.alias = "2"
    clock.now += 29
    assert f.poll() is None and reg.resolves == 1  # only the start's resolve
    clock.now += 1
    assert f.poll() == ("detector-v2", "2")
    assert f.current() == ("detector-v2", "2") and f.swaps == 1
    clock.now += 30
    assert f.poll() is None  # alias unchanged: nothing loaded
    assert reg.loads == ["1", "2"]


def test_a_rollback_is_followed_too():
    reg, clock = FakeRegistry(alias="5"), Clock()
    f = follower(reg, clock, interval=0)
    reg.alias = "4"
    assert f.poll() == ("detector-v4", "4")


def test_nothing_to_load_at_start_is_a_registry_error(tmp_path, monkeypatch):
    import mlflow

    # where it looked: a worker started from another folder read a relative sqlite path there (an empty store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: "sqlite:///mlruns/mlflow.db")
    with pytest.raises(RegistryError, match="points to no version") as info:
        follower(FakeRegistry(alias=None), Clock())
    assert f"registry at sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" in str(info.value)
    with pytest.raises(RegistryError, match="cannot load pump v1"):
        follower(FakeRegistry(broken={"1"}), Clock())
    reg = FakeRegistry()
    reg.down = True
    with pytest.raises(RegistryError, match="registry down"):
        follower(reg, Clock())


def test_broken_version_keeps_current_and_is_retried_with_backoff():
    reg, clock = FakeRegistry(broken={"2"}), Clock()
    reasons: list[str] = []
    f = follower(reg, clock, on_failure=reasons.append)
    reg.alias = "2"
    attempts = []
    for _ in range(200):  # 200 checks, 30 s apart: 100 minutes
        clock.now += 30
        assert f.poll() is None
        if reg.loads[-1] == "2" and len(reg.loads) - 1 > len(attempts):
            attempts.append(clock.now)
    assert f.current() == ("detector-v1", "1")
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps[:4] == [60, 120, 240, 480]  # doubling ...
    assert max(gaps) == MAX_BACKOFF_S  # ... up to the cap, never every check
    assert f.failures == len(attempts) == len(reasons)
    assert "v2, which failed to load" in reasons[0]
    assert "v2, which failed to load" in f.trouble  # the worker's health says degraded, and why
    # A newer good version is not held back by the broken one.
    reg.alias = "3"
    clock.now += 30
    assert f.poll() == ("detector-v3", "3") and f.trouble is None


def test_a_version_broken_for_weeks_keeps_its_backoff_at_the_cap():
    """A champion that never loads, retried at the cap for weeks: the back-off's doubling overflowed a
    float after 1,023 tries (10.7 days at 900 s), poll() raised and the worker died (and, the alias still
    on the broken version, could not start again)."""
    reg, clock = FakeRegistry(broken={"2"}), Clock()
    f = follower(reg, clock, interval=30.0)
    reg.alias = "2"
    for _ in range(1500):
        clock.now += MAX_BACKOFF_S
        assert f.poll() is None
    assert f.current() == ("detector-v1", "1") and f.failures == 1500
    assert "attempt 1500, next in 900 s" in f.trouble


def test_the_alias_back_on_a_version_in_backoff_is_trouble_again():
    """v2 fails, the alias goes back to v1 (trouble clears), then onto v2 again inside its back-off: the
    worker still serves v1, so health must say why (it said ok until the back-off ran out), without
    counting a new failure (no load was tried)."""
    reg, clock = FakeRegistry(broken={"2"}), Clock()
    f = follower(reg, clock, interval=30.0)
    reg.alias = "2"
    clock.now += 30
    assert f.poll() is None and f.trouble is not None and f.failures == 1
    clock.now += 60
    assert f.poll() is None and f.failures == 2  # tried again after 60 s; the next try is 120 s on
    reg.alias = "1"
    clock.now += 30
    assert f.poll() is None and f.trouble is None
    reg.alias = "2"
    clock.now += 30
    assert f.poll() is None and reg.loads == ["1", "2", "2"]  # inside the back-off: not loaded again
    assert "v2, which failed to load" in f.trouble and "keeping v1" in f.trouble
    assert f.failures == 2


def test_registry_outage_keeps_current_and_warns_once(caplog):
    reg, clock = FakeRegistry(), Clock()
    f = follower(reg, clock, interval=10)
    reg.down = True
    with caplog.at_level(logging.WARNING, logger="anomaly.model_follower"):
        for _ in range(5):
            clock.now += 10
            assert f.poll() is None
    assert f.failures == 5 and f.current()[1] == "1" and "registry down" in f.trouble
    assert len([r for r in caplog.records if "registry down" in r.getMessage()]) == 1
    reg.down, reg.alias = False, None  # back, but the alias was removed: still keep the model
    clock.now += 10
    assert f.poll() is None and f.failures == 6
    reg.alias = "2"
    clock.now += 10
    assert f.poll() == ("detector-v2", "2") and f.trouble is None
    clock.now += 10
    assert f.poll() is None and f.trouble is None


def test_a_failing_hook_does_not_break_polling():
    reg, clock = FakeRegistry(), Clock()

    def hook(reason: str) -> None:
        raise RuntimeError("metrics broke")

    f = follower(reg, clock, interval=0, on_failure=hook)
    reg.down = True
    assert f.poll() is None and f.failures == 1


def test_wait_for_follower_retries_until_a_version_appears():
    from anomaly.errors import RegistryError
    from anomaly.model_follower import wait_for_follower

    now = [0.0]
    tries, waits = [], []

    def make():
        tries.append(now[0])
        if len(tries) < 3:
            raise RegistryError("points to no version")
        return "follower"

    got = wait_for_follower(make, 60, retry_s=5, clock=lambda: now[0],
                            sleep=lambda s: now.__setitem__(0, now[0] + s), on_wait=waits.append)
    assert got == "follower" and tries == [0.0, 5.0, 10.0] and len(waits) == 2


def test_wait_for_follower_gives_up_at_its_deadline_and_zero_means_once():
    from anomaly.errors import RegistryError
    from anomaly.model_follower import wait_for_follower

    now = [0.0]
    calls = []

    def make():
        calls.append(now[0])
        raise RegistryError("no version")

    with pytest.raises(RegistryError):
        wait_for_follower(make, 12, retry_s=5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert calls == [0.0, 5.0, 10.0]
    calls.clear()
    with pytest.raises(RegistryError):
        wait_for_follower(make, 0, retry_s=5, clock=lambda: now[0], sleep=lambda s: None)
    assert len(calls) == 1


def test_waiting_for_a_first_model_ends_when_stopped():
    from anomaly.errors import RegistryError
    from anomaly.model_follower import wait_for_follower

    tries = []

    def make():
        tries.append(1)
        raise RegistryError("points to no version")

    got = wait_for_follower(make, -1, retry_s=5, sleep=lambda s: None, stopped=lambda: len(tries) >= 3)
    assert got is None and len(tries) == 3  # forever (-1), until stopped


def test_sigterm_while_the_worker_waits_for_a_first_model_exits_0(tmp_path):
    # worker.wait_for_model_s = -1 (Kubernetes before the first training): SIGTERM used to kill the process
    # (exit 143, the default action) because the worker's handlers came only after the wait.
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "ANOMALY_MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "ANOMALY_WORKER__WAIT_FOR_MODEL_S": "-1", "ANOMALY_WORKER__METRICS_PORT": "-1"}
    proc = subprocess.Popen([sys.executable, "-m", "anomaly.cli", "worker"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "waiting for a model" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert "waiting for a model" in output, output
    assert proc.returncode == 0, output
    assert "stopped while waiting for a model" in output


def test_a_version_that_loads_but_cannot_be_served_keeps_the_model_in_hand():
    # building the served model (moving it to the worker's device) raised out of follow_model: the worker
    # exited, and came back to the same version at start (a crash loop); now the current model serves on
    from anomaly.alerts import AlertPolicy
    from anomaly.scoring_step import ScoringStep
    from anomaly.step_runner import ThreadRunner
    from anomaly.window_state import WindowPolicy
    from tests.unit.test_scoring_step import FakeModel

    reg, clock = FakeRegistry(), Clock()
    reasons: list[str] = []
    f = follower(reg, clock, on_failure=reasons.append)

    def serving(detector, version):
        if version == "2":
            raise RuntimeError("CUDA out of memory")
        return FakeModel(window_size=4, version=version)

    step = ScoringStep(serving(*f.current()), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy())
    runner = ThreadRunner(step, f, serving, gc_freeze=False)
    try:
        reg.alias = "2"
        clock.now += 30
        assert runner.follow_model() == []
        assert step.model.version == "1" and f.current() == ("detector-v1", "1") and f.swaps == 0
        assert "v2, which cannot be served (attempt 1, next in 60 s): RuntimeError: CUDA out of memory" in reasons[0]
        assert "cannot be served" in f.trouble
        loads = len(reg.loads)
        clock.now += 30
        assert runner.follow_model() == [] and len(reg.loads) == loads  # backing off: not loaded again yet
        clock.now += 30
        assert runner.follow_model() == [] and reg.loads[loads:] == ["2"] and len(reasons) == 2  # tried again
        reg.alias = "3"
        clock.now += 30
        assert [s.version for s in runner.follow_model()] == ["3"] and step.model.version == "3"
        assert f.current() == ("detector-v3", "3") and f.trouble is None
    finally:
        runner.close()


def test_a_registry_that_hangs_does_not_hold_the_caller():
    # An MLflow server stopped mid-request held every check ≈ 33 s (the client's timeout and retries): the
    # worker's loop, which polls between batches, completed about one batch a minute. The check now runs
    # on its own thread, waited for briefly once; later polls only look whether it has answered.
    import threading
    import time

    reg, clock = FakeRegistry(), Clock()
    answer = threading.Event()
    f = follower(reg, clock, interval=30.0, check_wait_s=0.2)
    hanging = reg.resolve

    def slow(name, alias):
        answer.wait(20)
        return hanging(name, alias)

    f._resolver = slow
    reg.alias = "2"
    clock.now += 30
    started = time.monotonic()
    assert f.poll() is None
    assert f.trouble is None and f.version == "1"  # a registry a little slow is no trouble
    for _ in range(20):  # the worker's next rounds: no waiting at all
        assert f.poll() is None
    assert time.monotonic() - started < 1.5
    clock.now += 10  # unanswered for 10 s: trouble (/healthz degraded)
    assert f.poll() is None and "has not answered a check for 10 s" in f.trouble
    assert reg.resolves == 1  # one check at a time, none started while it hangs
    answer.set()
    deadline = time.monotonic() + 5
    swapped = None
    while swapped is None and time.monotonic() < deadline:
        swapped = f.poll()
        time.sleep(0.01)
    assert swapped == ("detector-v2", "2") and f.trouble is None
    clock.now += 29
    assert f.poll() is None and reg.resolves == 2  # the interval counts from the answer
