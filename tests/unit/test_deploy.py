"""The deployment files under deploy/ agree with the code.

There is no container engine on the development machines, so the images are not built and the
stacks not run. What can be checked here is checked: every YAML/JSON/TOML file parses; every
``anomaly`` command line (Dockerfile CMD, compose commands, Kubernetes args) parses with the real
argument parser; every ``ANOMALY_*`` variable is a real configuration field (or a variable the CLI
reads) and its value loads; every configuration file loads through ``load_config``; every metric the
dashboard and the alert rules use is one the code exports; ports, hosts and topic names agree across
files. Each check is a function returning a list of problems, and the tests at the end feed each one
a deliberately broken input to show that it catches it.

Run ``python -m tests.unit.test_deploy --write`` to regenerate deploy/k8s/monitoring/prometheusrule.yaml
from deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import fnmatch
import io
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import pytest
import yaml  # the `test` extra installs pyyaml

from anomaly import kafka_io
from anomaly.cli import build_parser
from anomaly.config import ENV_PREFIX, Settings, load_config
from anomaly.errors import ConfigError
from anomaly.metrics import WorkerMetrics
from anomaly.scheduler_metrics import SchedulerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# ANOMALY_* variables that are not configuration fields: anomaly/cli.py reads them itself.
CLI_ENV = ("ANOMALY_LOG_LEVEL", "ANOMALY_DATASETS")
# Metrics the dashboard and rules may use that the code does not export, and who exports them.
EXTERNAL_METRICS = {"up": "Prometheus itself", "kafka_consumergroup_lag": "kafka-exporter (Strimzi's Kafka Exporter)"}
# Kubernetes files that kustomization.yaml leaves out on purpose (its header says why).
K8S_NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "train-job.yaml", "data-loader.yaml",
                            "kafka/strimzi.yaml", "monitoring/podmonitor.yaml", "monitoring/prometheusrule.yaml"}
CONFIG_MOUNT = "/etc/anomaly/anomaly.toml"


# --- loading -------------------------------------------------------------------------------------

def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in yaml_docs(path):
                docs.append({**doc, "_file": path.relative_to(K8S).as_posix()})
    return docs


def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))


def alert_rules() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "anomaly.json").read_text(encoding="utf-8"))


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blanks skipped)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value: str) -> str:
    """Compose's variable substitution with every variable unset: ``${X:-d}`` → d, ``${X:?m}`` and
    ``${X}`` → ``<X>``, ``$$`` → ``$``."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        return arg if op in (":-", "-") else f"<{name}>"
    value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", one, value)
    return value.replace("$$", "$")


def pinned(text: str, package: str) -> str | None:
    match = re.search(rf"{re.escape(package)}(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+-]*)", text)
    return match.group(1) if match else None


# --- checkers: each returns a list of problems ---------------------------------------------------

def cli_problems(argv: Iterable[str], where: str = "") -> list[str]:
    """``anomaly ARGV`` parses with the real parser (``--help`` counts as parsing)."""
    argv = [str(a) for a in argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return []
        lines = err.getvalue().strip().splitlines()
        return [f"{where}anomaly {' '.join(argv)}: {lines[-1] if lines else exc}"]
    return []


def _config_fields() -> dict[str, set[str]]:
    return {section.name: {f.name for f in dataclasses.fields(section.default_factory)}  # type: ignore[misc]
            for section in dataclasses.fields(Settings)}


def env_problems(env: dict[str, str | None], where: str = "") -> list[str]:
    """Every ``ANOMALY_*`` name is ``ANOMALY_<SECTION>__<FIELD>`` of a real field (or one the CLI
    reads), and every value given (``None``: from a secret, name only) loads through ``load_config``."""
    problems = []
    fields = _config_fields()
    cli_source = (ROOT / "anomaly" / "cli.py").read_text(encoding="utf-8")
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" not in name:
            if name not in CLI_ENV or f'"{name}"' not in cli_source:
                problems.append(f"{where}{name}: not ANOMALY_<SECTION>__<FIELD>, and anomaly/cli.py does not read it")
            continue
        section, _, field = name[len(ENV_PREFIX):].lower().partition("__")
        if field not in fields.get(section, set()):
            problems.append(f"{where}{name}: no configuration field {section}.{field}")
            continue
        if value is not None:
            try:
                load_config(env={name: value})
            except ConfigError as exc:
                problems.append(f"{where}{name}={value!r}: {exc}")
    return problems


def config_problems(toml_text: str, env: dict[str, str] | None = None, where: str = "") -> list[str]:
    """A TOML configuration (plus an environment) loads through ``load_config``."""
    try:
        effective(toml_text, env)
    except ConfigError as exc:
        return [f"{where}{exc}"]
    return []


def effective(toml_text: str, env: dict[str, str | None] | None = None) -> Settings:
    """The settings a process sees: this TOML plus the given (literal) environment."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "anomaly.toml"
        path.write_text(toml_text, encoding="utf-8")
        literal = {k: v for k, v in (env or {}).items() if v is not None and k.startswith(ENV_PREFIX) and "__" in k}
        return load_config(path, env=literal)


def exported_metric_names() -> set[str]:
    """Every sample name the worker's and the scheduler's registries can expose, with the suffixes
    prometheus_client adds (counters ``_total``; histograms ``_bucket``/``_sum``/``_count``)."""
    names: set[str] = set()
    for registry in (WorkerMetrics().registry, SchedulerMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                        "summary": ("", "_sum", "_count", "_created")}.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
            names |= {sample.name for sample in family.samples}
    return names


_PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                 "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (no full parser: strings, label matchers, ranges,
    grouping clauses, numbers and function calls are taken out; what is left names metrics)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?[smhdwy]?", " 0 ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = match.group(0)
        if s[match.end():].lstrip().startswith("(") or token.lower() in _PROMQL_WORDS:
            continue
        names.add(token)
    return names


def grafana_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus query; ``label_values(metric, label)`` names ``metric``."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return promql_metric_names(match.group(1)) if match else promql_metric_names(query)


def metric_problems(names: Iterable[str], where: str = "") -> list[str]:
    known = exported_metric_names()
    problems = []
    for name in sorted(set(names)):
        if name.startswith("anomaly_") and name not in known:
            close = sorted(n for n in known if n.startswith(name) or name.startswith(n))[:3]
            problems.append(f"{where}metric {name} is not exported by anomaly/metrics.py or "
                            f"anomaly/scheduler_metrics.py{f' (did you mean {close})' if close else ''}")
        elif not name.startswith("anomaly_") and name not in EXTERNAL_METRICS:
            problems.append(f"{where}metric {name} is neither ours nor a known external one {sorted(EXTERNAL_METRICS)}")
    return problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_problems(text: str, torch_pin: str, where: str = "Dockerfile: ") -> list[str]:
    """torch==<pin> is installed in a RUN before the one that installs the package; the last USER is
    not root; ENTRYPOINT is exec-form ``["anomaly"]``; CMD parses as an ``anomaly`` command line."""
    problems = []
    instructions = dockerfile_instructions(text)
    runs = [(i, args) for i, (kw, args) in enumerate(instructions) if kw == "RUN"]
    torch_at = next((i for i, args in runs if re.search(rf"pip install\b.*[\"' ]torch=={re.escape(torch_pin)}[\"' ]", args + " ")), None)
    package_at = next((i for i, args in runs if re.search(r"pip install\b(?:\s+-\S+)*\s+\.(?:\s|$|\[)", args)), None)
    if torch_at is None:
        problems.append(f"{where}no RUN installs torch=={torch_pin}")
    if package_at is None:
        problems.append(f"{where}no RUN installs the package (pip install .)")
    if torch_at is not None and package_at is not None and torch_at > package_at:
        problems.append(f"{where}torch=={torch_pin} is installed after the package: pip would resolve another torch")
    users = [args for kw, args in instructions if kw == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{where}runs as root (no non-root USER at the end)")
    entrypoints = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    try:
        entrypoint = json.loads(entrypoints[-1]) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = entrypoints[-1]
    if entrypoint != ["anomaly"]:
        problems.append(f"{where}ENTRYPOINT is {entrypoint!r}, not [\"anomaly\"] (exec form, so signals reach it)")
    cmds = [args for kw, args in instructions if kw == "CMD"]
    if cmds:
        try:
            problems += cli_problems(json.loads(cmds[-1]), where)
        except json.JSONDecodeError:
            problems.append(f"{where}CMD is not exec form: {cmds[-1]}")
    return problems


# --- compose -------------------------------------------------------------------------------------

def _service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    out = {k: interpolate(str(v)) for k, v in env.items()}
    for item in service.get("env_file") or []:
        path = item["path"] if isinstance(item, dict) else item
        example = DEPLOY / f"{path}.example"
        if (DEPLOY / path).exists():
            out = {**env_file(DEPLOY / path), **out}
        elif example.exists():
            out = {**env_file(example), **out}
    return out


def _anomaly_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run our image (its ENTRYPOINT is ``anomaly``)."""
    return {name: svc for name, svc in doc["services"].items()
            if str((svc.get("build") or {}).get("dockerfile", "")).startswith("deploy/Dockerfile")}


def _mounted_config(service: dict[str, Any]) -> Path | None:
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == CONFIG_MOUNT:
            return DEPLOY / parts[0]
    return None


def _replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def compose_settings(doc: dict[str, Any], name: str) -> Settings:
    service = doc["services"][name]
    config = _mounted_config(service)
    assert config is not None, f"compose service {name} mounts no {CONFIG_MOUNT}"
    return effective(config.read_text(encoding="utf-8"), _service_env(service))


def kafka_init_topics(doc: dict[str, Any]) -> dict[str, dict[str, int]]:
    """topic → {"partitions": N, "retention_ms": M} from the kafka-init service's script."""
    script = interpolate(" ".join(str(c) for c in doc["services"]["kafka-init"]["command"]))
    topics = {}
    for line in script.splitlines():
        match = re.search(r"--topic\s+(\S+)\s+--partitions\s+(\d+)", line)
        if match:
            retention = re.search(r"retention\.ms=(\d+)", line)
            topics[match.group(1)] = {"partitions": int(match.group(2)),
                                      "retention_ms": int(retention.group(1)) if retention else -1}
    return topics


def _asked_partitions(settings: Settings) -> dict[str, int]:
    """The partitions the worker asks of each topic at start (a topic made with others: a warning each time),
    and `anomaly feedback` of the feedback topic."""
    from anomaly import feedback_topic
    from anomaly.worker import options_from_settings, topic_partitions

    asked = topic_partitions(options_from_settings(settings))
    if settings.kafka.feedback_topic:
        asked[settings.kafka.feedback_topic] = feedback_topic.PARTITIONS
    return asked


def _wanted_topics(settings: Settings) -> set[str]:
    """Every topic the configuration names."""
    k = settings.kafka
    return {k.input_topic, k.events_topic, k.dlq_topic} | ({k.scores_topic, k.feedback_topic} - {None})


def compose_problems(doc: dict[str, Any], prom: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services = doc["services"]
    ours = _anomaly_services(doc)
    for need in ("kafka", "kafka-init", "mlflow", "postgres", "worker", "scheduler", "prometheus", "grafana"):
        if need not in services:
            problems.append(f"compose: no service {need}")
    if problems:
        return problems
    for name, svc in ours.items():
        where = f"compose {name}: "
        command = [interpolate(str(c)) for c in svc.get("command") or []]
        problems += cli_problems(command, where)
        env = _service_env(svc)
        problems += env_problems(env, where)
        if "--config" in command:
            path = command[command.index("--config") + 1]
            mounted = _mounted_config(svc)
            if path != CONFIG_MOUNT or mounted is None or not mounted.is_file():
                problems.append(f"{where}--config {path} is not a mounted file of the repository")
            else:
                problems += config_problems(mounted.read_text(encoding="utf-8"), env, where)
        if env.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") != "false":
            problems.append(f"{where}MLFLOW_ALLOW_PICKLE_DESERIALIZATION is not false")
    if problems:
        return problems

    # Workers: one consumer group, several replicas, fewer replicas than input partitions.
    worker, scheduler = services["worker"], services["scheduler"]
    w = compose_settings(doc, "worker")
    if _replicas(worker) < 2:
        problems.append("compose worker: deploy.replicas should be > 1 (one consumer group, N workers)")
    if _replicas(scheduler) != 1:
        problems.append("compose scheduler: exactly one scheduler (replicas 1)")
    topics = kafka_init_topics(doc)
    wanted = _wanted_topics(w)
    if set(topics) != wanted:
        problems.append(f"compose kafka-init creates {sorted(topics)}, the configuration names {sorted(wanted)}")
    elif topics[w.kafka.input_topic]["partitions"] < _replicas(worker):
        problems.append("compose: fewer input partitions than workers leaves workers idle")
    elif (asked := _asked_partitions(w)) != {name: t["partitions"] for name, t in topics.items()}:
        problems.append(f"compose kafka-init's partitions differ from the worker's (it warns at each start): {asked}")
    elif topics[w.kafka.input_topic]["retention_ms"] < w.retrain.lookback_s * 1000:
        problems.append("compose: input topic retention is shorter than retrain.lookback_s")

    # Kafka: the bootstrap address is the broker's advertised internal listener.
    kafka_env = {k: str(v) for k, v in services["kafka"]["environment"].items()}
    for server in w.kafka.bootstrap_servers.split(","):
        if f"//{server.strip()}" not in kafka_env.get("KAFKA_ADVERTISED_LISTENERS", ""):
            problems.append(f"compose: kafka.bootstrap_servers {server} is not an advertised listener of kafka")
    try:
        if len(base64.urlsafe_b64decode(kafka_env["CLUSTER_ID"] + "==")) != 16:
            raise ValueError
    except (KeyError, ValueError):
        problems.append("compose kafka: CLUSTER_ID must be 16 bytes in URL-safe base64")

    # MLflow: the tracking URI points at the mlflow service's port, which it answers; artifacts go through it.
    mlflow_args = [interpolate(str(a)) for a in services["mlflow"]["command"]]
    port = mlflow_args[mlflow_args.index("--port") + 1] if "--port" in mlflow_args else "5000"
    parsed = urlparse(w.mlflow.tracking_uri)
    if parsed.hostname not in services or str(parsed.port) != port:
        problems.append(f"compose: {w.mlflow.tracking_uri} is not the mlflow service on port {port}")
    problems += _proxied_artifacts("compose", w.mlflow.artifact_location)
    if "--serve-artifacts" not in mlflow_args:
        problems.append("compose mlflow: --serve-artifacts missing (clients upload through the server)")
    if "--allowed-hosts" in mlflow_args:
        allowed = mlflow_args[mlflow_args.index("--allowed-hosts") + 1].split(",")
        host = urlparse(w.mlflow.tracking_uri).netloc
        if not any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed):
            problems.append(f"compose mlflow: --allowed-hosts refuses the clients' Host header {host}")

    # Ports: Prometheus scrapes what the processes serve, on an address it can reach.
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    worker_job = jobs.get("anomaly-worker", {})
    dns = (worker_job.get("dns_sd_configs") or [{}])[0]
    if dns.get("names") != ["worker"] or dns.get("port") != w.worker.metrics_port:
        problems.append(f"prometheus: job anomaly-worker scrapes {dns.get('names')}:{dns.get('port')}, "
                        f"the workers serve worker:{w.worker.metrics_port}")
    if w.worker.metrics_host != "0.0.0.0":
        problems.append("compose worker: worker.metrics_host must be 0.0.0.0 for Prometheus to reach it")
    if str(w.worker.metrics_port) not in [str(p) for p in worker.get("expose", [])]:
        problems.append("compose worker: expose does not list worker.metrics_port")
    health = " ".join(map(str, worker.get("healthcheck", {}).get("test", [])))
    if f":{w.worker.metrics_port}/healthz" not in health:
        problems.append("compose worker: the healthcheck does not ask /healthz on worker.metrics_port")
    s = compose_settings(doc, "scheduler")
    targets = [t for sc in jobs.get("anomaly-scheduler", {}).get("static_configs", []) for t in sc["targets"]]
    if targets != [f"scheduler:{s.scheduler.metrics_port}"] or s.scheduler.metrics_host != "0.0.0.0":
        problems.append(f"prometheus: job anomaly-scheduler scrapes {targets}, the scheduler serves "
                        f"{s.scheduler.metrics_host}:{s.scheduler.metrics_port}")
    state_dir = str(Path(s.scheduler.job_store).parent)
    if not any(str(v).split(":")[1:2] == [state_dir] for v in scheduler.get("volumes", [])):
        problems.append(f"compose scheduler: the job store's directory {state_dir} is not a volume")
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host = target.split(":")[0]
                if host != "localhost" and host not in services:
                    problems.append(f"prometheus: target {target} is not a compose service")

    # Files: bind mounts exist; Prometheus reads its rules; Grafana reads its dashboards.
    for name, svc in services.items():
        for volume in svc.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith(".") and not (DEPLOY / source).exists():
                problems.append(f"compose {name}: bind mount {source} does not exist")
    for rule_file in prom.get("rule_files", []):
        if not (DEPLOY / "prometheus" / Path(rule_file).name).is_file() or not rule_file.startswith("/etc/prometheus/"):
            problems.append(f"prometheus: rule file {rule_file} is not in the mounted deploy/prometheus")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/anomaly.yml").read_text())["providers"][0]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    if mounts.get(provider["options"]["path"]) != "./grafana/dashboards":
        problems.append("grafana: the dashboard provider's path is not where deploy/grafana/dashboards is mounted")
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    ds_url = urlparse(datasource["url"])
    published = [str(p).split(":")[-1] for p in services.get(ds_url.hostname or "", {}).get("ports", [])]
    if str(ds_url.port) not in published:
        problems.append(f"grafana: datasource {datasource['url']} is not the prometheus service")

    # Secrets: passwords come from the environment (deploy/.env), never literally from the file.
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key) and not re.search(r"\$\{\w+:\?", str(value)):
                problems.append(f"compose {name}: {key} must come from deploy/.env (${{VAR:?...}}), not the file")
        if name == "mlflow" and not re.search(r"\$\{POSTGRES_PASSWORD:\?", str(svc["environment"].get("MLFLOW_BACKEND_STORE_URI"))):
            problems.append("compose mlflow: the store URI's password must come from deploy/.env")
    return problems


# --- kubernetes ----------------------------------------------------------------------------------

def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def _pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


def _proxied_artifacts(where: str, location: str) -> list[str]:
    """Problems of an artifact location meant to go through the tracking server (--serve-artifacts): an
    ``mlflow-artifacts:/path`` URI without a host. With one (``mlflow-artifacts://mlflow:5000/...``) MLflow
    3.17's server refuses to create the experiment, since its host policy trusts only its own
    --default-artifact-root: the stack's first training failed."""
    parsed = urlparse(location)
    if parsed.scheme != "mlflow-artifacts" or parsed.netloc or not parsed.path.strip("/"):
        return [f"{where}: artifact_location {location} is not mlflow-artifacts:/<path> (no host): the server "
                "refuses a host, and a path of the client's own is out of the other services' reach"]
    return []


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name), None)


def _container_env(container: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _is_ours(container: dict[str, Any]) -> bool:
    return re.match(r"(?:.*/)?anomaly(?:-cuda)?(?::|$)", container.get("image", "")) is not None


def k8s_config_toml(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]) -> str | None:
    """The TOML the container reads through --config: a ConfigMap key mounted at its path."""
    args = container.get("args", [])
    if "--config" not in args:
        return None
    path = Path(args[args.index("--config") + 1])
    for mount in container.get("volumeMounts", []):
        if Path(mount["mountPath"]) == path.parent:
            volume = next(v for v in pod.get("volumes", []) if v["name"] == mount["name"])
            if "configMap" in volume:
                configmap = _find(docs, "ConfigMap", volume["configMap"]["name"])
                if configmap is not None:
                    return configmap["data"].get(path.name)
    return None


def k8s_settings(docs: list[dict[str, Any]], kind: str, name: str) -> Settings:
    doc = _find(docs, kind, name)
    pod = _pod_spec(doc)
    container = pod["containers"][0]
    return effective(k8s_config_toml(docs, pod, container), _container_env(container))


def _port_number(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def k8s_problems(docs: list[dict[str, Any]], secret_keys: dict[str, set[str]]) -> list[str]:
    problems: list[str] = []
    for doc in docs:
        where = f"k8s {doc['_file']} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: "
        if not doc.get("apiVersion") or not doc.get("kind") or not doc.get("metadata", {}).get("name"):
            problems.append(f"{where}apiVersion, kind and metadata.name are required")
            continue
        pod = _pod_spec(doc)
        if pod is None:
            continue
        for container in pod["containers"]:
            env = _container_env(container)
            for e in container.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["key"] not in secret_keys.get(ref["name"], set()):
                    problems.append(f"{where}secret key {ref['name']}/{ref['key']} is not in secret.example.yaml")
            if not _is_ours(container):
                continue
            problems += cli_problems(container.get("args", []), where)
            problems += env_problems(env, where)
            if env.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") != "false":
                problems.append(f"{where}MLFLOW_ALLOW_PICKLE_DESERIALIZATION is not false")
            toml_text = k8s_config_toml(docs, pod, container)
            if toml_text is None:
                problems.append(f"{where}--config does not point at a mounted ConfigMap key")
            else:
                problems += config_problems(toml_text, env, where)
    if problems:
        return problems

    worker = _find(docs, "Deployment", "anomaly-worker")
    scheduler = _find(docs, "Deployment", "anomaly-scheduler")
    if worker is None or scheduler is None:
        return ["k8s: Deployments anomaly-worker and anomaly-scheduler are required"]
    w = k8s_settings(docs, "Deployment", "anomaly-worker")
    wc = _pod_spec(worker)["containers"][0]
    if worker["spec"]["replicas"] < 2:
        problems.append("k8s worker: replicas should be > 1")
    if w.worker.metrics_host != "0.0.0.0":
        problems.append("k8s worker: worker.metrics_host must be 0.0.0.0 (probes and Prometheus use the pod IP)")
    if w.worker.metrics_port not in [p["containerPort"] for p in wc.get("ports", [])]:
        problems.append(f"k8s worker: no containerPort {w.worker.metrics_port} (worker.metrics_port)")
    if worker["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port") != str(w.worker.metrics_port):
        problems.append("k8s worker: prometheus.io/port is not worker.metrics_port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (wc.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != "/healthz" or _port_number(wc, get.get("port")) != w.worker.metrics_port:
            problems.append(f"k8s worker: {probe} is not GET /healthz on worker.metrics_port")

    s = k8s_settings(docs, "Deployment", "anomaly-scheduler")
    sc = _pod_spec(scheduler)["containers"][0]
    if scheduler["spec"]["replicas"] != 1 or scheduler["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("k8s scheduler: replicas 1 and strategy Recreate (never two schedulers)")
    if s.scheduler.metrics_port not in [p["containerPort"] for p in sc.get("ports", [])] or \
            scheduler["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port") != str(s.scheduler.metrics_port):
        problems.append("k8s scheduler: containerPort / prometheus.io/port are not scheduler.metrics_port")
    state_dir = str(Path(s.scheduler.job_store).parent)
    mount = next((m for m in sc.get("volumeMounts", []) if m["mountPath"] == state_dir), None)
    volume = next((v for v in _pod_spec(scheduler).get("volumes", []) if mount and v["name"] == mount["name"]), {})
    if "persistentVolumeClaim" not in volume or _find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) is None:
        problems.append(f"k8s scheduler: the job store's directory {state_dir} is not on a PersistentVolumeClaim")

    # Services: a targetPort is a port of the pods the selector picks.
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        pods = [d for d in docs if _pod_spec(d) is not None and selector.items() <= _pod_labels(d).items()]
        if not pods:
            problems.append(f"k8s Service/{svc['metadata']['name']}: its selector matches no pods")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(_port_number(c, target) for d in pods for c in _pod_spec(d)["containers"]):
                problems.append(f"k8s Service/{svc['metadata']['name']}: targetPort {target} is no container port")

    # MLflow: the tracking URI is the mlflow Service's name and port; artifacts go through it.
    mlflow_svc = _find(docs, "Service", "mlflow")
    parsed = urlparse(w.mlflow.tracking_uri)
    if mlflow_svc is None or parsed.hostname != "mlflow" or parsed.port not in [p["port"] for p in mlflow_svc["spec"]["ports"]]:
        problems.append(f"k8s: {w.mlflow.tracking_uri} is not the mlflow Service")
    problems += _proxied_artifacts("k8s", w.mlflow.artifact_location)

    # Training: the CUDA image with a GPU.
    for doc in docs:
        if doc["kind"] in ("Job", "CronJob"):
            container = _pod_spec(doc)["containers"][0]
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            if not container["image"].startswith("anomaly-cuda") or int(gpus) < 1:
                problems.append(f"k8s {doc['kind']}/{doc['metadata']['name']}: needs the anomaly-cuda image and a nvidia.com/gpu limit")

    # Strimzi topics and user: the configuration's names, enough partitions, enough retention.
    topics = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "KafkaTopic"}
    wanted = _wanted_topics(w)
    if set(topics) != wanted:
        problems.append(f"k8s kafka/strimzi.yaml: topics {sorted(topics)}, the configuration names {sorted(wanted)}")
    elif topics[w.kafka.input_topic]["partitions"] < worker["spec"]["replicas"]:
        problems.append("k8s: fewer input partitions than worker replicas")
    elif (asked := _asked_partitions(w)) != {name: t["partitions"] for name, t in topics.items()}:
        problems.append(f"k8s kafka/strimzi.yaml's partitions differ from the worker's (it warns at each start): {asked}")
    elif int(topics[w.kafka.input_topic]["config"]["retention.ms"]) < w.retrain.lookback_s * 1000:
        problems.append("k8s: input topic retention is shorter than retrain.lookback_s")
    user = next((d for d in docs if d["kind"] == "KafkaUser"), None)
    if user is not None:
        groups = {acl["resource"]["name"] for acl in user["spec"]["authorization"]["acls"] if acl["resource"]["type"] == "group"}
        if w.kafka.group_id not in groups:
            problems.append(f"k8s KafkaUser: no ACL for the consumer group {w.kafka.group_id}")

    # PodMonitors select the pods and name a port they have.
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        pods = [d for d in docs if _pod_spec(d) is not None and selector.items() <= _pod_labels(d).items()]
        ports = {p["port"] for p in monitor["spec"]["podMetricsEndpoints"]}
        if not pods or not all(_port_number(c, port) for d in pods for c in _pod_spec(d)["containers"] for port in ports):
            problems.append(f"k8s PodMonitor/{monitor['metadata']['name']}: selects no pod with port {ports}")

    # No credentials in the configuration file.
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                options = tomllib.loads(text).get("kafka", {}).get("client_options", {}) if key.endswith(".toml") else {}
                if any(re.search(r"password|secret|token", k) for k in options):
                    problems.append(f"k8s ConfigMap/{doc['metadata']['name']}: credentials in kafka.client_options; use the Secret")
    return problems


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule (Prometheus Operator) that carries deploy/prometheus/alerts.yml."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "anomaly", "namespace": "anomaly", "labels": {"app.kubernetes.io/part-of": "anomaly"}},
            "spec": {"groups": alerts["groups"]}}


def operations_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Operations")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


# --- tests: the files ----------------------------------------------------------------------------

DATA_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json", ".toml"))


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_data_file_parses(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        json.loads(text)
    elif path.suffix == ".toml":
        tomllib.loads(text)
    else:
        assert yaml_docs(path), f"{path} is empty"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.toml")), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_config_file_loads(path):
    assert config_problems(path.read_text(encoding="utf-8"), {}, f"{path.name}: ") == []


def test_env_examples_name_real_fields():
    for name in ("anomaly.env.example", "env.example"):
        env = env_file(DEPLOY / name)
        assert env_problems(env, f"{name}: ") == []


def test_dockerfiles_install_torch_first_and_run_anomaly():
    torch_pin = pinned((DEPLOY / "setup.sh").read_text(encoding="utf-8"), "torch")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert torch_pin == "2.13.0"
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / name).read_text(encoding="utf-8")
        assert dockerfile_problems(text, torch_pin, f"{name}: ") == []
        assert pinned(text, "kafka-python") == pinned(pyproject, "kafka-python"), name
        assert (DEPLOY / f"{name}.dockerignore").is_file()
    cpu = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile_instructions(cpu)[0] == ("FROM", "python:3.11-slim")
    assert "download.pytorch.org/whl/cpu" in cpu
    cuda = (DEPLOY / "Dockerfile.cuda").read_text(encoding="utf-8")
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", cuda) and "download.pytorch.org/whl/cu" in cuda
    mlflow = (DEPLOY / "mlflow" / "Dockerfile").read_text(encoding="utf-8")
    assert pinned(mlflow, "mlflow") == pinned(pyproject, "mlflow") and "psycopg2" in mlflow


def test_compose_agrees_with_the_code():
    assert compose_problems(compose(), prometheus_config()) == []


def test_compose_runs_n_workers_and_one_scheduler():
    services = compose()["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert "container_name" not in services["worker"]  # replicas need generated names
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft


def test_kubernetes_agrees_with_the_code():
    docs = k8s_docs()
    secrets = {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
               for d in docs if d["kind"] == "Secret"}
    assert k8s_problems(docs, secrets) == []


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    for resource in listed:
        assert (K8S / resource).is_file(), resource
    files = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")}
    assert files - listed == K8S_NOT_IN_KUSTOMIZATION
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].split(":")[0] for d in k8s_docs() if _pod_spec(d) for c in _pod_spec(d)["containers"]}
    assert {"anomaly", "anomaly-cuda", "anomaly-mlflow"} <= used and images == used - {"postgres"}


def test_secret_example_kafka_options_are_kafka_python_options():
    secret = _find(k8s_docs(), "Secret", "anomaly-secrets")
    options = secret["stringData"]["kafka-client-options"]
    assert env_problems({"ANOMALY_KAFKA__CLIENT_OPTIONS": options}) == []
    parsed = json.loads(options)
    for build in (kafka_io.consumer_options, kafka_io.producer_options, kafka_io.admin_options):
        kwargs = {"client_options": parsed}
        options_out = build("kafka:9093", "g", **kwargs) if build is kafka_io.consumer_options else build("kafka:9093", **kwargs)
        assert options_out["security_protocol"] == "SASL_SSL"


def test_dashboard_and_alerts_use_exported_metrics():
    names: set[str] = set()
    board = dashboard()
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            found = promql_metric_names(target["expr"])
            assert found, target["expr"]
            names |= found
    for variable in board["templating"]["list"]:
        names |= grafana_query_metric_names(variable["query"]["query"])
    assert metric_problems(names, "dashboard: ") == []
    rule_names: set[str] = set()
    for group in alert_rules()["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            rule_names |= promql_metric_names(rule["expr"])
    assert metric_problems(rule_names, "alerts: ") == []
    # Every counter and gauge the worker exports is on the dashboard.
    worker = {f.name + ("_total" if f.type == "counter" else "_bucket" if f.type == "histogram" else "")
              for f in WorkerMetrics().registry.collect()}
    assert worker - names == set()


def test_prometheus_rule_matches_alerts_file():
    rule = _find(k8s_docs(), "PrometheusRule", "anomaly")
    expected = prometheus_rule(alert_rules())
    assert {k: v for k, v in rule.items() if k != "_file"} == expected, \
        "deploy/k8s/monitoring/prometheusrule.yaml is stale: python -m tests.unit.test_deploy --write"


def test_readme_operations_lists_every_alert_and_deploy_file():
    section = operations_section()
    for group in alert_rules()["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] in section, f"README Operations does not mention {rule['alert']}"
    for path in ("deploy/compose.yaml", "deploy/k8s/", "deploy/Dockerfile", "deploy/Dockerfile.cuda",
                 "tests/unit/test_deploy.py", "anomaly models rollback", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        assert path in section, path


# --- tests: the checkers catch what they are for --------------------------------------------------

def test_cli_checker_catches_unknown_commands_and_flags():
    assert cli_problems(["worker", "--config", "/etc/anomaly/anomaly.toml"]) == []
    assert cli_problems(["train", "--help"]) == []
    assert cli_problems(["serve"])  # no such subcommand
    assert cli_problems(["worker", "--metrics-port", "9108"])  # a scheduler flag, not a worker one
    assert cli_problems(["models", "rollbak"])  # a bad choice
    assert cli_problems(["train"])  # --data or --dataset is required


def test_env_checker_catches_unknown_fields_and_bad_values():
    assert env_problems({"ANOMALY_WORKER__METRICS_PORT": "9108", "ANOMALY_LOG_LEVEL": "INFO", "PATH": "/bin"}) == []
    assert env_problems({"ANOMALY_KAFKA__CLIENT_OPTIONS": None}) == []  # from a secret: the name is checked
    assert env_problems({"ANOMALY_WORKER__METRICS_PROT": "9108"})
    assert env_problems({"ANOMALY_WORKERS__METRICS_PORT": "9108"})
    assert env_problems({"ANOMALY_WORKER__METRICS_PORT": "ninety"})
    assert env_problems({"ANOMALY_KAFKA__CLIENT_OPTIONS": "security_protocol=SSL"})  # not JSON
    assert env_problems({"ANOMALY_LOGLEVEL": "INFO"})


def test_config_checker_catches_bad_files():
    assert config_problems('[worker]\nmetrics_port = 9108\n') == []
    assert config_problems('[worker]\nmetrics_prot = 9108\n')
    assert config_problems('[worker]\nmetrics_port = "9108"\n')
    assert config_problems('[worker]\nmetrics_port = 9108\n', {"ANOMALY_WORKER__STRIDE": "0"})


def test_metric_checker_catches_unknown_names():
    assert metric_problems({"anomaly_records_consumed_total", "anomaly_batch_seconds_bucket",
                            "anomaly_scheduler_jobs_finished_total", "up"}) == []
    assert metric_problems({"anomaly_records_consumed"})  # the counter's sample is ..._total
    assert metric_problems({"anomaly_batch_seconds_total"})
    assert metric_problems({"anomaly_scheduler_jobs_total"})
    assert metric_problems({"node_cpu_seconds_total"})


def test_promql_names_are_found():
    expr = ('count by (model) (count_values by (model) ("version", anomaly_model_version)) > 1 and on() '
            'sum(rate(anomaly_dead_letters_total{instance=~"$instance"}[$__rate_interval])) '
            '/ clamp_min(sum(rate(anomaly_records_consumed_total[5m] offset 1h)), 1e-9) > 3 * 86400')
    assert promql_metric_names(expr) == {"anomaly_model_version", "anomaly_dead_letters_total",
                                         "anomaly_records_consumed_total"}
    assert grafana_query_metric_names("label_values(anomaly_entities, instance)") == {"anomaly_entities"}


GOOD_DOCKERFILE = """FROM python:3.11-slim
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY . /src
RUN cd /src \\
    && pip install . && rm -rf /src
USER 10001
ENTRYPOINT ["anomaly"]
CMD ["worker"]
"""


def test_dockerfile_checker_catches_order_user_and_commands():
    assert dockerfile_problems(GOOD_DOCKERFILE, "2.13.0") == []
    swapped = GOOD_DOCKERFILE.replace('RUN pip install "torch==2.13.0"', "RUN true").replace(
        "USER 10001", 'RUN pip install "torch==2.13.0"\nUSER 10001')
    assert any("after the package" in p for p in dockerfile_problems(swapped, "2.13.0"))
    assert dockerfile_problems(GOOD_DOCKERFILE, "2.12.0")  # another pin
    assert dockerfile_problems(GOOD_DOCKERFILE.replace("USER 10001", "USER root"), "2.13.0")
    assert dockerfile_problems(GOOD_DOCKERFILE.replace('["anomaly"]', '["anomalyd"]'), "2.13.0")
    assert dockerfile_problems(GOOD_DOCKERFILE.replace('CMD ["worker"]', 'CMD ["wroker"]'), "2.13.0")


def test_compose_checker_catches_port_topic_and_command_drift():
    prom = prometheus_config()
    for mutate in (
        lambda d, p: p["scrape_configs"][0]["dns_sd_configs"][0].update(port=9100),
        lambda d, p: d["services"]["worker"].update(command=["worker", "--config", CONFIG_MOUNT, "--stride", "2"]),
        lambda d, p: d["services"]["worker"]["environment"].update(ANOMALY_WORKER__METRICS_PORT="9200"),
        lambda d, p: d["services"]["worker"]["environment"].update(ANOMALY_WORKER__METRICS_HOST="127.0.0.1"),
        lambda d, p: d["services"]["kafka-init"].update(
            command=[d["services"]["kafka-init"]["command"][0].replace("--topic anomalies ", "--topic events ")]),
        lambda d, p: d["services"]["kafka-init"].update(
            command=[d["services"]["kafka-init"]["command"][0].replace("--topic sensors --partitions 12", "--topic sensors --partitions 2")]),
        lambda d, p: d["services"]["mlflow"].update(command=[c.replace("5000", "5001") for c in d["services"]["mlflow"]["command"]]),
        lambda d, p: d["services"]["scheduler"]["deploy"].update(replicas=2),
        lambda d, p: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"),
    ):
        doc, prom_copy = compose(), copy.deepcopy(prom)
        mutate(doc, prom_copy)
        assert compose_problems(doc, prom_copy), mutate


def test_kubernetes_checker_catches_port_probe_and_scheduler_drift():
    def worker(docs):
        return _find(docs, "Deployment", "anomaly-worker")

    def secrets(docs):
        return {d["metadata"]["name"]: set(d.get("stringData", {})) for d in docs if d["kind"] == "Secret"}

    for mutate in (
        lambda docs: worker(docs)["spec"]["template"]["metadata"]["annotations"].update({"prometheus.io/port": "9100"}),
        lambda docs: worker(docs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(path="/health"),
        lambda docs: worker(docs)["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort=8080),
        lambda docs: worker(docs)["spec"]["template"]["spec"]["containers"][0].update(args=["wroker"]),
        lambda docs: worker(docs)["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "ANOMALY_WORKER__MODEL_ALIAS_", "value": "champion"}),
        lambda docs: _find(docs, "Deployment", "anomaly-scheduler")["spec"].update(strategy={"type": "RollingUpdate"}),
        lambda docs: _find(docs, "Service", "mlflow")["spec"]["ports"][0].update(targetPort="web"),
        lambda docs: _find(docs, "KafkaTopic", "sensors.dlq")["metadata"].update(name="dlq"),
        lambda docs: _find(docs, "Job", "anomaly-train")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
        lambda docs: _find(docs, "ConfigMap", "anomaly-config")["data"].update(
            {"anomaly.toml": _find(docs, "ConfigMap", "anomaly-config")["data"]["anomaly.toml"].replace("metrics_port = 9108", "metrics_port = 9100")}),
    ):
        docs = copy.deepcopy(k8s_docs())
        mutate(docs)
        assert k8s_problems(docs, secrets(docs)), mutate


def _write_prometheus_rule() -> None:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)

    Dumper.add_representer(str, text)
    header = ("# Generated from deploy/prometheus/alerts.yml for the Prometheus Operator; not part of\n"
              "# kustomization.yaml. tests/unit/test_deploy.py checks that the two agree; after editing\n"
              "# alerts.yml regenerate it: python -m tests.unit.test_deploy --write\n")
    body = yaml.dump(prometheus_rule(alert_rules()), Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)
    (K8S / "monitoring" / "prometheusrule.yaml").write_text(header + body, encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    if sys.argv[1:] == ["--write"]:
        _write_prometheus_rule()
    else:
        print("usage: python -m tests.unit.test_deploy --write", file=sys.stderr)
        sys.exit(2)


def test_compose_drops_every_capability_of_ours_and_mlflow():
    # README "Security" said so for compose too, and compose dropped none.
    services = compose()["services"]
    for name in ("worker", "scheduler", "tools", "trainer", "mlflow"):
        assert services[name].get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in services[name].get("security_opt", []), name


def test_the_kafka_ca_instruction_names_every_service_that_lists_its_own_volumes():
    """anomaly.env.example says where to mount the Kafka CA file. A service that lists its own volumes
    replaces x-anomaly-service's (a merge key does not add lists): the instruction named only the shared
    list, so the scheduler, tools and trainer had no CA file and failed the TLS handshake."""
    raw = compose()
    shared = raw["x-anomaly-service"]
    text = (DEPLOY / "anomaly.env.example").read_text(encoding="utf-8")
    instruction = text[text.index("The CA file must be in the containers"):text.index("# ANOMALY_KAFKA__CLIENT_OPTIONS=")]
    ours = {name: service for name, service in raw["services"].items() if service.get("env_file") == shared["env_file"]}
    assert {"worker", "scheduler", "tools", "trainer"} <= set(ours)
    for name, service in ours.items():
        if service.get("volumes") != shared["volumes"]:
            assert name in instruction, f"{name} lists its own volumes: the CA instruction must name it"
