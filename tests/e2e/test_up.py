"""``anomaly up`` end to end, in a subprocess, as a newcomer runs it (on free ports and a temporary
registry, so it never touches the developer's own ``mlruns/``):

1. within a bounded time the registry has a champion and the events topic receives events that
   overlap the faults SKAB labels in the replayed experiments;
2. a real browser (headless Chromium) opens the MLflow UI that ``up`` started and finds the
   registered model with its ``champion`` alias (a screenshot is kept under results/test-artifacts/);
3. Ctrl-C (SIGINT) stops everything: exit code 0 and no child process left behind.

The three tests share one ``anomaly up`` (module fixture) and run in this order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anomaly import kafka_io
from anomaly.broker import free_ports
from tests.fixtures import missing_requirement

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("ANOMALY_DATASETS", ROOT.parent / "shared" / "datasets"))
ARTIFACTS = ROOT / "results" / "test-artifacts"
MODEL = "anomaly-detector"
READY_TIMEOUT_S = 600.0  # training a first model (8 epochs) + a replay round, on a loaded 2-core box
STOP_TIMEOUT_S = 300.0  # the longest orderly stop: a retrain in progress may finish first


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), found by parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    def __init__(self, proc: subprocess.Popen, out: Path, state: Path, env: dict[str, str], bootstrap: str,
                 ui: str, tracking_uri: str) -> None:
        self.proc, self.out, self.state, self.env = proc, out, state, env
        self.bootstrap, self.ui, self.tracking_uri = bootstrap, ui, tracking_uri

    def output(self) -> str:
        return self.out.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if not (DATASETS / "skab" / "data").is_dir():
        missing_requirement(f"SKAB not found under {DATASETS}")
    tmp = tmp_path_factory.mktemp("up")
    ports = dict(zip(("broker", "ui", "worker", "scheduler"), free_ports(4)))  # four distinct ones
    tracking_uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", MLFLOW_DISABLE_TELEMETRY="true",
               ANOMALY_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{ports['broker']}",
               ANOMALY_WORKER__METRICS_PORT=str(ports["worker"]),
               ANOMALY_SCHEDULER__METRICS_PORT=str(ports["scheduler"]),
               ANOMALY_MLFLOW__TRACKING_URI=tracking_uri,
               ANOMALY_MLFLOW__ARTIFACT_LOCATION=str(tmp / "mlruns" / "artifacts"),
               ANOMALY_SCHEDULER__JOB_STORE=str(tmp / "mlruns" / "scheduler.db"))
    state = tmp / "state"
    out = tmp / "up.out"
    command = [sys.executable, "-m", "anomaly.cli", "up", "--data-dir", str(DATASETS / "skab"), "--epochs", "8",
               "--speed", "40", "--ui-port", str(ports["ui"]), "--state-dir", str(state)]
    with open(out, "wb") as sink:
        # Its own session, like a terminal's foreground job: the SIGINT below reaches only `up`.
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    s = Stack(proc, out, state, env, f"127.0.0.1:{ports['broker']}", f"http://127.0.0.1:{ports['ui']}", tracking_uri)
    try:
        yield s
    finally:
        if proc.poll() is None:  # a failed test: stop it all the hard way
            for pid in _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()


def _champion(tracking_uri: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(
            MODEL, "champion").version)
    except MlflowException:
        return None


def _events_on_faults(stack: Stack) -> tuple[list[dict], list[dict]]:
    """Open events read from the events topic, split by whether SKAB labels a fault there (using the
    rounds ``up`` recorded in fleet.json and the labelled offsets)."""
    manifest_path = stack.state / "fleet.json"
    if not manifest_path.exists():
        return [], []
    manifest = json.loads(manifest_path.read_text())
    records = kafka_io.read_all(stack.bootstrap, manifest["events_topic"], timeout_s=10, idle_s=1.5)
    on, off = [], []
    for record in records:
        event = json.loads(record.value)
        if event.get("status") != "open":
            continue
        entity = manifest["entities"].get(event["entity"])
        assert entity is not None, f"an event for an entity nobody replays: {event['entity']}"
        slack = 10.0  # one window of the SKAB profile (W = 10 one-second readings)
        faults = [(r + a, r + b) for r in manifest["rounds"] for a, b in entity["fault_offsets_s"]]
        hit = any(a - slack <= event["start_ts"] <= b + slack for a, b in faults)
        (on if hit else off).append(event)
    return on, off


def test_up_trains_a_champion_and_catches_the_labelled_faults(stack: Stack):
    deadline = time.monotonic() + READY_TIMEOUT_S
    champion, on, off = None, [], []
    while time.monotonic() < deadline:
        assert stack.proc.poll() is None, f"anomaly up exited early:\n{stack.output()}"
        # Only once the stack runs (fleet.json is written when the replay starts): a second process
        # opening the fresh SQLite store while `up` creates its schema would collide in migrations.
        if (stack.state / "fleet.json").exists():
            champion = champion or _champion(stack.tracking_uri)
        if champion:
            on, off = _events_on_faults(stack)
            if len({e["entity"] for e in on}) >= 2:
                break
        time.sleep(5)
    assert champion == "1", f"no champion after {READY_TIMEOUT_S:.0f} s:\n{stack.output()}"
    entities = {e["entity"] for e in on}
    assert len(entities) >= 2, f"events on labelled faults for {entities} only; elsewhere: {len(off)}\n{stack.output()}"
    assert len(on) >= len(off), f"more events off the labelled faults ({len(off)}) than on them ({len(on)})"
    text = stack.out.read_text(errors="replace")  # all of it: output() is only the tail, for messages
    assert "model registry    http://127.0.0.1:" in text and "/#/models/anomaly-detector" in text
    assert "OPEN   pump-" in text, "the console view shows events as they open"


def test_mlflow_ui_shows_the_champion_in_a_real_browser(stack: Stack):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):  # under CI a failure, not a green skip
        missing_requirement("needs Debian's chromium and chromium-driver (make test installs them)")
    try:
        from selenium import webdriver
    except ImportError:
        missing_requirement("needs selenium (the test extra: make setup installs it)")
    from selenium.webdriver.chrome.service import Service

    assert stack.proc.poll() is None, f"anomaly up is not running:\n{stack.output()}"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{stack.ui}/#/models/{MODEL}")
        deadline = time.monotonic() + 90
        body = ""
        while time.monotonic() < deadline:
            body = driver.find_element("tag name", "body").text
            if MODEL in body and "champion" in body:
                break
            time.sleep(1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "mlflow-registry-champion.png"))
    finally:
        driver.quit()
    assert MODEL in body, f"the registry page does not show {MODEL}: {body[:500]!r}"
    assert "champion" in body, f"the registry page does not show the champion alias: {body[:800]!r}"
    assert (ARTIFACTS / "mlflow-registry-champion.png").stat().st_size > 10_000


def test_ctrl_c_stops_everything_and_leaves_no_process(stack: Stack):
    assert stack.proc.poll() is None, f"anomaly up is not running:\n{stack.output()}"
    family = _descendants(stack.proc.pid)
    assert len(family) >= 4, f"expected broker, MLflow, worker and scheduler under anomaly up, got {family}"
    stack.proc.send_signal(signal.SIGINT)
    code = stack.proc.wait(timeout=STOP_TIMEOUT_S)
    assert code == 0, f"exit code {code}:\n{stack.output()}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in family):
        time.sleep(0.2)
    left = sorted(pid for pid in family if _alive(pid))
    assert not left, f"processes left behind: {left}"
    summary = json.loads((stack.state / "summary.json").read_text())
    assert summary["opened_on_labelled_faults"] >= 1
    assert "stopping" in stack.out.read_text(errors="replace")
