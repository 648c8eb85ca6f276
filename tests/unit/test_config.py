import tomllib

import pytest

from anomaly.config import Settings, build_settings, example_toml, load_config, reference_markdown
from anomaly.errors import ConfigError


def test_defaults_are_valid():
    s = load_config(env={})
    assert s == Settings()
    s.check()


def test_file_then_env_then_overrides(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[model]\nwindow_size = 20\nhidden_size = 16\n[kafka]\nbootstrap_servers = "k:9092"\n')
    s = load_config(path, env={"ANOMALY_MODEL__HIDDEN_SIZE": "48", "OTHER": "x"},
                    overrides={"training": {"epochs": 3}})
    assert (s.model.window_size, s.model.hidden_size, s.training.epochs) == (20, 48, 3)
    assert s.kafka.bootstrap_servers == "k:9092"


def test_env_types_are_parsed():
    s = load_config(env={"ANOMALY_TRAINING__MIXED_PRECISION": "false", "ANOMALY_DATA__SENSORS": "a, b",
                         "ANOMALY_KAFKA__CLIENT_OPTIONS": '{"security_protocol": "SASL_SSL"}',
                         "ANOMALY_DATA__PERIOD_S": "0.5", "ANOMALY_DATA__MAX_FILL_STEPS": ""})
    assert s.training.mixed_precision is False
    assert s.data.sensors == ["a", "b"]
    assert s.kafka.client_options == {"security_protocol": "SASL_SSL"}
    assert s.data.period_s == 0.5 and s.data.max_fill_steps is None


@pytest.mark.parametrize("env, field", [
    ({"ANOMALY_MODEL__WINDOW_SIZE": "abc"}, "model.window_size"),
    ({"ANOMALY_MODEL__WINDOW_SIZE": "1"}, "model.window_size"),
    ({"ANOMALY_THRESHOLD__METHOD": "magic"}, "threshold.method"),
    ({"ANOMALY_MODEL__COLOUR": "red"}, "model.colour"),
    ({"ANOMALY_TRAINING__STRIDE": "64"}, "training.stride"),  # cross-field: stride > window_size
    ({"ANOMALY_TRAINING__MIXED_PRECISION": "maybe"}, "training.mixed_precision"),
    ({"ANOMALY_NOPE__X": "1"}, "nope"),
    ({"ANOMALY_WORKER__PRECISION": "fp16"}, "worker.precision"),
    ({"ANOMALY_WORKER__DEVICE": "tpu"}, "worker.device"),
    ({"ANOMALY_TRAINING__DEVICE": "cudaX"}, "training.device"),  # torch would refuse it after loading the data
    ({"ANOMALY_TRAINING__DEVICE": "cuda:abc"}, "training.device"),
    ({"ANOMALY_MLFLOW__CHAMPION_ALIAS": "v3"}, "mlflow.champion_alias"),  # the registry's rules, before training
    ({"ANOMALY_MLFLOW__CHALLENGER_ALIAS": "my alias!"}, "mlflow.challenger_alias"),
    ({"ANOMALY_WORKER__MODEL_ALIAS": "latest"}, "worker.model_alias"),
    ({"ANOMALY_MLFLOW__CHAMPION_ALIAS": "2"}, "mlflow.champion_alias"),  # a number names a version to score
    ({"ANOMALY_DATA__SENSORS": "a,b,a"}, "data.sensors"),
    ({"ANOMALY_DATA__TIMESTAMP_COLUMN": "t", "ANOMALY_DATA__ENTITY_COLUMN": "t"}, "data.entity_column"),
    ({"ANOMALY_DATA__SENSORS": "a,pump", "ANOMALY_DATA__ENTITY_COLUMN": "pump"}, "data.entity_column"),
    ({"ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "host:notaport"}, "kafka.bootstrap_servers"),
    ({"ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "a:9092,b:x"}, "kafka.bootstrap_servers"),
    ({"ANOMALY_KAFKA__BOOTSTRAP_SERVERS": " , "}, "kafka.bootstrap_servers"),
    ({"ANOMALY_DATA__SENSORS": "a,b", "ANOMALY_RETRAIN__LABEL_FIELD": "a"}, "retrain.label_field"),
    ({"ANOMALY_MLFLOW__MODEL_NAME": "pumps/north"}, "mlflow.model_name"),  # else refused after training
    # loads split at "?" (models:/ is parsed as a URL): it trained and registered, and could never be served
    ({"ANOMALY_MLFLOW__MODEL_NAME": "pump?line-2"}, "mlflow.model_name"),
    ({"ANOMALY_SCHEDULER__INTERVAL_S": "1e12"}, "scheduler.interval_s"),  # else an OverflowError at start
    ({"ANOMALY_DRIFT__CHECK_INTERVAL_S": "1e12"}, "drift.check_interval_s"),  # else an OverflowError at start
    ({"ANOMALY_SCHEDULER__MISFIRE_GRACE_S": "100000000000"}, "scheduler.misfire_grace_s"),  # else every run errs
    ({"ANOMALY_WORKER__METRICS_HOST": " "}, "worker.metrics_host"),  # "" would bind every address
    ({"ANOMALY_SCHEDULER__METRICS_HOST": " "}, "scheduler.metrics_host"),
    ({"ANOMALY_DRIFT__GROUP_ID": " "}, "drift.group_id"),
    ({"ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "a:9092 b:9092"}, "kafka.bootstrap_servers"),  # a space, not a comma
    ({"ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "a:9092;b:9093"}, "kafka.bootstrap_servers"),  # was one host "a:9092;b"
    # a space or newline at either end (a secret's trailing newline): a second store "mlflow.db ", a model
    # "anomaly-detector " that `score` could not find and named exactly like the one it looked for
    ({"ANOMALY_MLFLOW__TRACKING_URI": "sqlite:///mlruns/mlflow.db "}, "mlflow.tracking_uri"),
    ({"ANOMALY_MLFLOW__MODEL_NAME": "anomaly-detector\n"}, "mlflow.model_name"),
    ({"ANOMALY_KAFKA__INPUT_TOPIC": " sensors"}, "kafka.input_topic"),
    ({"ANOMALY_DRIFT__ENABLED": "true", "ANOMALY_KAFKA__SCORES_TOPIC": "scores",
      "ANOMALY_DRIFT__GROUP_ID": "anomaly-worker", "ANOMALY_KAFKA__GROUP_ID": "anomaly-worker"}, "drift.group_id"),
])
def test_bad_values_name_the_field(env, field):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert err.value.field == field
    assert field in str(err.value)


def test_good_devices_aliases_and_servers_pass():
    s = load_config(env={"ANOMALY_TRAINING__DEVICE": "cuda:1", "ANOMALY_WORKER__DEVICE": "cuda",
                         "ANOMALY_MLFLOW__CHAMPION_ALIAS": "prod-v2_a", "ANOMALY_WORKER__MODEL_ALIAS": "prod-v2_a",
                         "ANOMALY_KAFKA__BOOTSTRAP_SERVERS": "kafka-0.kafka:9092, [::1]:9093,kafka,"})
    assert s.training.device == "cuda:1" and s.mlflow.champion_alias == "prod-v2_a"


def test_toml_type_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[training]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(path, env={})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    bad.write_text("[[model]]\nhidden_size = 8\n")  # was "model: top-level key: every setting belongs under ..."
    with pytest.raises(ConfigError, match=r"model: \[\[model\]\] is an array of tables; a section is written \[model\]"):
        load_config(bad, env={})


def test_example_parses_back_to_defaults(tmp_path):
    path = tmp_path / "example.toml"
    path.write_text(example_toml())
    tomllib.loads(path.read_text())
    assert load_config(path, env={}) == Settings()


def test_reference_documents_every_field():
    ref = reference_markdown()
    import dataclasses

    for section in dataclasses.fields(Settings):
        for f in dataclasses.fields(section.default_factory()):
            assert f"`{f.name}`" in ref
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc line"


def test_shipped_configs_parse_and_example_is_current():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shipped = sorted(root.glob("deploy/**/*.toml"))
    assert shipped, "no shipped config found"
    for path in shipped:
        load_config(path, env={})
    assert (root / "deploy" / "anomaly.example.toml").read_text() == example_toml() + "\n"


def test_empty_client_options_from_the_environment_mean_none():
    assert load_config(None, env={"ANOMALY_KAFKA__CLIENT_OPTIONS": "  "}).kafka.client_options == {}


def test_a_profile_base_is_overridden_by_the_environment_even_with_a_default_value():
    base = {"data": {"scaler": "robust"}, "model": {"window_size": 10}}
    settings = load_config(None, env={"ANOMALY_DATA__SCALER": "standard"}, base=base)
    assert settings.data.scaler == "standard" and settings.model.window_size == 10


def test_worker_options_carry_precision_and_create_topics():
    from anomaly.worker import options_from_settings

    default = options_from_settings(load_config(env={}))
    assert default.create_topics is True and default.precision == "auto"
    opts = options_from_settings(load_config(env={"ANOMALY_WORKER__CREATE_TOPICS": "false",
                                                  "ANOMALY_WORKER__PRECISION": "fp32"}))
    assert opts.create_topics is False and opts.precision == "fp32"


def test_max_future_s_reaches_the_worker_and_names_itself_when_bad():
    from anomaly.worker import options_from_settings

    assert options_from_settings(load_config(env={})).max_future_s == 600.0
    assert options_from_settings(load_config(env={"ANOMALY_WORKER__MAX_FUTURE_S": "-1"})).max_future_s is None
    for bad in ("0", "3601", "-2"):
        with pytest.raises(ConfigError) as err:
            load_config(env={"ANOMALY_WORKER__MAX_FUTURE_S": bad})
        assert err.value.field == "worker.max_future_s"


def test_an_error_in_a_value_from_the_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(env={"ANOMALY_MODEL__WINDOW_SIZE": "1"})
    assert err.value.field == "model.window_size" and "ANOMALY_MODEL__WINDOW_SIZE" in str(err.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[model]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, env={})


def test_a_list_from_the_environment_may_be_json_when_names_hold_commas():
    s = load_config(env={"ANOMALY_DATA__SENSORS": '["flow, inlet", "temp"]'})
    assert s.data.sensors == ["flow, inlet", "temp"]
    assert load_config(env={"ANOMALY_DATA__SENSORS": "flow,temp"}).data.sensors == ["flow", "temp"]
    with pytest.raises(ConfigError, match=r"data.sensors.*not a JSON list"):
        load_config(env={"ANOMALY_DATA__SENSORS": '["flow", '})
    with pytest.raises(ConfigError, match="must be a list of strings"):
        load_config(env={"ANOMALY_DATA__SENSORS": "[1, 2]"})


def test_a_mistyped_variable_is_said(caplog):
    """One underscore where two were meant is a warning naming the variable, not silence; an unknown
    section from the environment names the variable that brought it."""
    with caplog.at_level("WARNING", logger="anomaly.config"):
        s = load_config(env={"ANOMALY_MODEL_WINDOW_SIZE": "12", "ANOMALY_DATASETS": "/data", "ANOMALY_LOG_LEVEL": "INFO"})
    assert s.model.window_size == 10
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("ANOMALY_MODEL_WINDOW_SIZE is not read")
    with pytest.raises(ConfigError) as err:
        load_config(env={"ANOMALY_MODLE__WINDOW_SIZE": "12"})
    assert "unknown section" in str(err.value) and "(set by ANOMALY_MODLE__WINDOW_SIZE)" in str(err.value)


def test_another_threshold_method_than_the_profile_s_drops_the_profile_s_threshold(tmp_path):
    """SKAB's scale 1.25 was chosen for its q0.95: a file choosing POT must not inherit it; the file's
    own threshold fields and the profile's other sections stay."""
    from anomaly.protocols import PROFILES

    config = tmp_path / "pot.toml"
    config.write_text('[threshold]\nmethod = "pot"\nrisk = 0.001\n')
    s = load_config(config, env={}, base=PROFILES["skab"])
    assert (s.threshold.method, s.threshold.scale, s.threshold.risk) == ("pot", 1.0, 0.001)
    assert s.model.window_size == PROFILES["skab"]["model"]["window_size"]
    env = {"ANOMALY_THRESHOLD__METHOD": "mean_std", "ANOMALY_THRESHOLD__SCALE": "2"}
    s = load_config(None, env=env, base=PROFILES["skab"])
    assert (s.threshold.method, s.threshold.scale) == ("mean_std", 2.0)
    same = tmp_path / "same.toml"
    same.write_text('[threshold]\nmethod = "quantile"\nq = 0.9\n')
    s = load_config(same, env={}, base=PROFILES["skab"])
    assert (s.threshold.q, s.threshold.scale) == (0.9, PROFILES["skab"]["threshold"]["scale"])


@pytest.mark.parametrize("topic", ["bad topic!", "a" * 250, ".", "..", "pumps/raw"])
def test_a_topic_name_kafka_refuses_is_refused_naming_the_field(topic):
    with pytest.raises(ConfigError, match="kafka.dlq_topic") as err:
        load_config(env={"ANOMALY_KAFKA__DLQ_TOPIC": topic})
    assert "not a Kafka topic name" in str(err.value)
    assert load_config(env={"ANOMALY_KAFKA__DLQ_TOPIC": "plant-1.sensors_dlq"}).kafka.dlq_topic == "plant-1.sensors_dlq"


def test_a_cron_schedule_that_never_fires_is_refused():
    with pytest.raises(ConfigError, match=r"scheduler.cron: '0 0 31 2 \*' never fires"):
        load_config(env={"ANOMALY_SCHEDULER__TRIGGER": "cron", "ANOMALY_SCHEDULER__CRON": "0 0 31 2 *"})
    # Leap days come; the 31st of February on a Monday is every Monday of February (crontab ORs the days).
    for cron in ("0 0 29 2 *", "0 0 31 2 mon"):
        load_config(env={"ANOMALY_SCHEDULER__TRIGGER": "cron", "ANOMALY_SCHEDULER__CRON": cron})


@pytest.mark.parametrize("section, field", [("data", "sensors"), ("retrain", "entities")])
def test_a_blank_name_in_a_list_is_refused(section, field):
    """A blank sensor or entity (a stray comma in TOML, " ") matched nothing and was silently kept."""
    with pytest.raises(ConfigError) as err:
        build_settings({section: {field: ["pump-1", " "]}})
    assert err.value.field == f"{section}.{field}" and "blank name" in str(err.value)


def test_none_unsets_an_optional_field_from_the_environment_but_names_a_column_in_the_file(tmp_path):
    """A TOML string "none" is a name (it used to unset the field silently); the environment, which has
    no null, still unsets with empty, none or null."""
    path = tmp_path / "c.toml"
    path.write_text('[data]\nentity_column = "none"\ntimestamp_column = ""\n')
    s = load_config(path, env={})
    assert s.data.entity_column == "none" and s.data.timestamp_column is None
    for word in ("", "none", "NULL"):
        assert load_config(path, env={"ANOMALY_DATA__ENTITY_COLUMN": word}).data.entity_column is None


def test_an_integer_beyond_64_bits_is_refused_naming_the_field(tmp_path):
    # a huge TOML integer for a float field raised OverflowError (a traceback); for an int field it was
    # accepted and overflowed later in numpy/torch; over 4300 digits int() itself refuses it
    path = tmp_path / "big.toml"
    path.write_text("[threshold]\nk = 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match=r"threshold\.k: must be a finite number, got an integer of 1329 bits"):
        load_config(path, env={})
    path.write_text("[model]\nwindow_size = 1" + "0" * 30 + "\n")
    with pytest.raises(ConfigError, match=r"model\.window_size: out of range: must fit in 64 bits"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"model\.window_size: out of range: must fit in 64 bits"):
        load_config(env={"ANOMALY_MODEL__WINDOW_SIZE": "-1" + "0" * 30})
    with pytest.raises(ConfigError, match=r"model\.window_size: out of range: .* got 5001 characters of digits"):
        load_config(env={"ANOMALY_MODEL__WINDOW_SIZE": "1" + "0" * 5000})
    path.write_text("[model]\nwindow_size = 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML: Exceeds the limit"):
        load_config(path, env={})
    path.write_text(f"[model]\nwindow_size = 12\n[retrain]\nmin_rows = {2**63 - 1}\n")
    assert load_config(path, env={}).retrain.min_rows == 2**63 - 1  # the largest 64-bit value is still a value


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_label_field_is_refused_naming_it(value):
    with pytest.raises(ConfigError) as err:
        build_settings({"retrain": {"label_field": value}})
    assert err.value.field == "retrain.label_field"


@pytest.mark.parametrize("env, field", [
    ({"ANOMALY_DATA__SENSORS": "a,Label"}, "data.sensors"),  # tables read it as ground truth: never a sensor
    ({"ANOMALY_DATA__SENSORS": "a,changepoint"}, "data.sensors"),
    ({"ANOMALY_DATA__SENSORS": "a,ts", "ANOMALY_DATA__TIMESTAMP_COLUMN": "ts"}, "data.timestamp_column"),
])
def test_a_sensor_named_like_a_label_or_the_timestamp_column_is_refused(env, field):
    # each was accepted, then said "not in the data" or "not numeric ... name it with data.entity_column"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(env=env)


def test_a_toml_file_with_a_byte_order_mark_is_read(tmp_path):
    # Windows editors write one: it was "not valid TOML: Invalid statement (at line 1, column 1)"
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeff[model]\nwindow_size = 12\n".encode("utf-8"))
    assert load_config(path, env={}).model.window_size == 12
