"""The model variants (issue 7): cell type, depth, bidirectional encoder, decoder attention."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from anomaly.config import ModelSettings, load_config
from anomaly.errors import ConfigError
from anomaly.model import CELLS, ModelConfig, PeepholeLSTM, PeepholeLSTMCell, build_model

VARIANTS = [dict(cell=cell, bidirectional=bi, attention=att, num_layers=layers)
            for cell, bi, att, layers in itertools.product(CELLS, (False, True), (False, True), (1, 2))]


def _ids(v):
    return f"{v['cell']}-{'bi' if v['bidirectional'] else 'uni'}-{'att' if v['attention'] else 'noatt'}-{v['num_layers']}l"


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_shapes_and_gradients_reach_every_parameter(variant):
    torch.manual_seed(0)
    cfg = ModelConfig(n_features=3, window_size=6, hidden_size=5, latent_size=4, dropout=0.1, **variant)
    model = build_model(cfg)
    x = torch.randn(4, 6, 3)
    z = model.encode(x)
    assert z.shape == (4, 4)
    y = model(x)
    assert y.shape == (4, 6, 3)
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} has a zero or non-finite gradient"
    model.eval()  # no dropout: the same window gives the same reconstruction, whatever else is in the batch
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)


def test_default_variant_builds_the_same_modules_as_before():
    """Models registered before the variants existed must load into the default variant."""
    model = build_model(ModelConfig(n_features=3, window_size=8, hidden_size=16, latent_size=4))
    assert sorted(model.state_dict()) == sorted([
        "encoder.weight_ih_l0", "encoder.weight_hh_l0", "encoder.bias_ih_l0", "encoder.bias_hh_l0",
        "to_latent.weight", "to_latent.bias",
        "decoder.weight_ih_l0", "decoder.weight_hh_l0", "decoder.bias_ih_l0", "decoder.bias_hh_l0",
        "to_output.weight", "to_output.bias"])
    assert isinstance(model.encoder, torch.nn.LSTM) and not model.encoder.bidirectional
    assert model.to_latent.in_features == 16


def test_variant_modules():
    bi = build_model(ModelConfig(n_features=2, window_size=4, hidden_size=6, latent_size=3, bidirectional=True))
    assert bi.encoder.bidirectional and not bi.decoder.bidirectional  # the decoder stays causal in time
    assert bi.to_latent.in_features == 12
    gru = build_model(ModelConfig(n_features=2, window_size=4, cell="gru"))
    assert isinstance(gru.encoder, torch.nn.GRU) and isinstance(gru.decoder, torch.nn.GRU)
    att = build_model(ModelConfig(n_features=2, window_size=4, hidden_size=6, attention=True, bidirectional=True))
    assert att.attention.key.in_features == 12 and att.attention.combine.out_features == 6


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_peephole_cell_equals_a_hand_computed_step():
    """One unit, one input, fixed weights: two steps worked out with scalar arithmetic, so the input
    and forget gates must see c_{t-1} and the output gate c_t."""
    cell = PeepholeLSTMCell(input_size=1, hidden_size=1)
    wx = [0.5, -0.3, 0.8, 0.2]  # i, f, g, o
    wh = [0.1, 0.4, -0.6, 0.3]
    b = [0.05, 1.0, -0.1, 0.2]
    p_i, p_f, p_o = 0.7, -0.2, 1.5
    with torch.no_grad():
        cell.input_proj.weight.copy_(torch.tensor(wx).view(4, 1))
        cell.input_proj.bias.copy_(torch.tensor(b))
        cell.hidden_proj.weight.copy_(torch.tensor(wh).view(4, 1))
        cell.peep_i.fill_(p_i)
        cell.peep_f.fill_(p_f)
        cell.peep_o.fill_(p_o)

    h, c = 0.3, -0.4  # a non-zero start, so the peepholes on c_{t-1} matter from the first step
    state = (torch.tensor([[h]]), torch.tensor([[c]]))
    for x in (1.2, -0.7):
        i = _sigmoid(wx[0] * x + wh[0] * h + p_i * c + b[0])
        f = _sigmoid(wx[1] * x + wh[1] * h + p_f * c + b[1])
        g = math.tanh(wx[2] * x + wh[2] * h + b[2])
        c = f * c + i * g
        o = _sigmoid(wx[3] * x + wh[3] * h + p_o * c + b[3])
        h = o * math.tanh(c)
        with torch.no_grad():
            state = cell(torch.tensor([[x]]), state)
        assert state[0].item() == pytest.approx(h, abs=1e-6)
        assert state[1].item() == pytest.approx(c, abs=1e-6)


def test_peephole_without_peepholes_is_an_lstm():
    """With the peephole weights at zero the cell is exactly ``nn.LSTM`` (same gate order, same maths)."""
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(3, 5, batch_first=True)
    ours = PeepholeLSTM(3, 5)
    cell = ours.cells[0]
    with torch.no_grad():
        cell.input_proj.weight.copy_(lstm.weight_ih_l0)
        cell.input_proj.bias.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)
        cell.hidden_proj.weight.copy_(lstm.weight_hh_l0)
        for p in (cell.peep_i, cell.peep_f, cell.peep_o):
            p.zero_()
        x = torch.randn(2, 7, 3)
        out, (h, c) = lstm(x)
        ours_out, (ours_h, ours_c) = ours(x)
    torch.testing.assert_close(ours_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_h, h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_c, c, atol=1e-5, rtol=1e-5)


def test_bidirectional_peephole_runs_the_backward_cell_on_the_reversed_window():
    torch.manual_seed(2)
    layer = PeepholeLSTM(2, 4, bidirectional=True).eval()
    x = torch.randn(3, 5, 2)
    with torch.no_grad():
        out, (h, _) = layer(x)
        forward_only = PeepholeLSTM(2, 4)
        forward_only.cells[0].load_state_dict(layer.cells[1].state_dict())
        back, (back_h, _) = forward_only(x.flip(1))
    assert out.shape == (3, 5, 8) and h.shape == (2, 3, 4)
    torch.testing.assert_close(out[..., 4:], back.flip(1))
    torch.testing.assert_close(h[1], back_h[0])


def test_attention_reads_the_encoder_outputs():
    """With attention, changing an early input step changes late reconstructions through a second path."""
    torch.manual_seed(3)
    cfg = ModelConfig(n_features=2, window_size=6, hidden_size=8, latent_size=4, attention=True)
    model = build_model(cfg).eval()
    x = torch.randn(1, 6, 2)
    with torch.no_grad():
        z, enc = model._encode(x)
        with_context = model.decode(z, 6, enc)
        other = model.decode(z, 6, torch.zeros_like(enc))
    assert not torch.allclose(with_context, other)
    with pytest.raises(ValueError):
        model.decode(z, 6)


@pytest.mark.parametrize("kwargs, field", [
    ({"cell": "transformer"}, "model.cell"),
    ({"cell": "LSTM"}, "model.cell"),
    ({"bidirectional": "yes"}, "model.bidirectional"),
    ({"attention": 1}, "model.attention"),
    ({"num_layers": 0}, "model.num_layers"),
    ({"hidden_size": 2.5}, "model.hidden_size"),
    ({"dropout": 1.0}, "model.dropout"),
])
def test_model_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(n_features=2, window_size=4, **kwargs)
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize("env, field", [
    ({"ANOMALY_MODEL__CELL": "rnn"}, "model.cell"),
    ({"ANOMALY_MODEL__BIDIRECTIONAL": "sometimes"}, "model.bidirectional"),
    ({"ANOMALY_MODEL__ATTENTION": "2"}, "model.attention"),
])
def test_settings_errors_name_the_field(env, field):
    with pytest.raises(ConfigError) as err:
        load_config(env=env)
    assert err.value.field == field


def test_settings_flow_into_the_model_config():
    s = load_config(env={"ANOMALY_MODEL__CELL": "peephole", "ANOMALY_MODEL__BIDIRECTIONAL": "true",
                         "ANOMALY_MODEL__ATTENTION": "yes"})
    cfg = ModelConfig(n_features=3, **s.model.model_params())  # as anomaly.detector.fit_detector builds it
    assert (cfg.cell, cfg.bidirectional, cfg.attention) == ("peephole", True, True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    defaults = ModelSettings()
    assert (defaults.cell, defaults.bidirectional, defaults.attention) == ("lstm", False, False)
    for cell in CELLS:  # config.py keeps its own copy of the cell names (a leaf module); they agree
        ModelSettings(cell=cell).check()


def test_model_json_without_variant_fields_loads_as_the_default(tmp_path):
    """A detector saved before the variant fields existed: model.json lacks cell/bidirectional/attention."""
    from anomaly.detector import Detector
    from anomaly.scaling import fit_scaler
    from anomaly.thresholds import fit_threshold

    torch.manual_seed(4)
    model = build_model(ModelConfig(n_features=2, window_size=5, hidden_size=6, latent_size=3)).eval()
    values = np.random.default_rng(0).normal(size=(40, 2))
    det = Detector(model=model, scaler=fit_scaler(values, ["a", "b"], "standard"),
                   threshold=fit_threshold(np.linspace(0, 1, 50), "quantile", q=0.9))
    det.save(tmp_path)
    doc = json.loads((tmp_path / "model.json").read_text())
    for key in ("cell", "bidirectional", "attention"):
        del doc["model_config"][key]
    (tmp_path / "model.json").write_text(json.dumps(doc))
    loaded = Detector.load(tmp_path)
    assert loaded.config == det.config and loaded.config.cell == "lstm"
    np.testing.assert_array_equal(loaded.score_values(values).scores, det.score_values(values).scores)


@pytest.mark.parametrize("variant", [dict(cell="gru"), dict(cell="peephole", bidirectional=True),
                                     dict(attention=True, num_layers=2)], ids=["gru", "bi-peephole", "attention-2l"])
def test_saved_variant_records_itself_and_loads_back(tmp_path, variant):
    from anomaly.detector import Detector
    from anomaly.scaling import fit_scaler
    from anomaly.thresholds import fit_threshold

    torch.manual_seed(5)
    model = build_model(ModelConfig(n_features=2, window_size=5, hidden_size=6, latent_size=3, **variant)).eval()
    values = np.random.default_rng(1).normal(size=(40, 2))
    det = Detector(model=model, scaler=fit_scaler(values, ["a", "b"], "standard"),
                   threshold=fit_threshold(np.linspace(0, 1, 50), "quantile", q=0.9))
    det.save(tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())["model_config"]
    assert {k: saved[k] for k in variant} == variant
    loaded = Detector.load(tmp_path)
    np.testing.assert_array_equal(loaded.score_values(values).scores, det.score_values(values).scores)


def test_benchmark_variants_are_valid_settings_on_every_dataset():
    from anomaly import protocols
    from pipelines.benchmark import FAMILIES, SIZES, VARIANTS as BENCH_VARIANTS, variant_settings

    assert BENCH_VARIANTS["lstm"] == {}  # the baseline row is the default model
    for dataset in protocols.PROFILES:
        base = protocols.profile_settings(dataset)
        for name, overrides in BENCH_VARIANTS.items():
            s = variant_settings(dataset, overrides, max_epochs=3, seed=7)
            assert s.training.epochs == 3 and s.training.seed == 7
            for key, value in overrides.items():
                assert getattr(s.model, key) == value
            for key, value in base.model.model_params().items():  # only the variant's fields change
                if key not in overrides:
                    assert getattr(s.model, key) == value, (dataset, name, key)
    # the size rows put one shape on every dataset; the family rows keep each profile's
    assert all(set(o) == {"window_size", "hidden_size", "latent_size"} for o in SIZES.values())
    assert not any(set(o) & {"window_size", "hidden_size", "latent_size"} for o in FAMILIES.values())
    assert BENCH_VARIANTS == {**FAMILIES, **SIZES}


def test_size_rows_include_the_model_defaults():
    """The README's "Choosing the default network" compares the [model] defaults with the old ones."""
    from anomaly.config import ModelSettings
    from pipelines.benchmark import SIZES

    d = ModelSettings()
    shapes = [(o["window_size"], o["hidden_size"], o["latent_size"]) for o in SIZES.values()]
    assert (d.window_size, d.hidden_size, d.latent_size) in shapes


def test_benchmark_markdown_says_which_sensors_the_skab_row_reads():
    from anomaly.protocols import PROFILES
    from pipelines.benchmark import markdown

    row = {"f1": 0.8, "far": 11.0, "mar": 24.0, "event_f1": 0.7, "mean_delay_s": 20.0, "seconds": 40.0,
           "settings": PROFILES["skab"]}
    text = markdown({"machine": {"device": "cpu", "torch": "2.13.0"}, "results": {"skab": row}})
    assert "reads 6 of SKAB's 8 sensors" in text and "`Volume Flow RateRMS`" in text
    assert "(q0.95 × 1.25), fixed" in text and "adapts to each file" not in text
    assert "left out: `Temperature`, `Thermocouple`" in text
    every = {**row, "settings": {**PROFILES["skab"], "data": {"scaler": "robust"}}}
    assert "SKAB's 8 sensors" not in markdown({"machine": {"device": "cpu", "torch": "2.13.0"}, "results": {"skab": every}})
    # the trivial row, measured on the same test parts, shows what event F1 gives flagging everything
    trivial = {"f1": 0.698, "far": 100.0, "mar": 0.0, "event_f1": 1.0, "fc1": 0.698, "mean_delay_s": 0.0}
    text = markdown({"machine": {"device": "cpu", "torch": "2.13.0"},
                     "results": {"skab": {**row, "fc1": 0.9, "all_anomalous": trivial}}})
    assert "| All-anomalous (trivial), measured | 0.698 | 100.00 | 0.00 | 1.00 | 0.70 | 0.0 |" in text
    assert "| All-anomalous (trivial) | 0.698 |" not in text  # the published row gives way to the measured one
    assert "| 0.70 | 0.90 | 20.0 |" in text  # ours: event F1, Fc1, delay


@pytest.mark.parametrize("argv, words", [
    (["--costs", "--update-readme"], "--costs times the profiles' shapes without data; it does not take --update-readme"),
    (["--costs", "--datasets", "skab"], "does not take --datasets"),
    (["--seed", "1"], "--seed only apply with --variants"),
    (["--datasets", "skab", "--resume"], "--resume only apply with --variants"),
    (["--limit", "1", "--update-readme"], "partial run under the full corpus's caption"),
])
def test_benchmark_refuses_flags_its_mode_would_ignore(argv, words, capsys):
    from pipelines.benchmark import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("results, limit, words", [
    ({"skab": {}}, None, "holds no nab, smd results"),
    ({"skab": {}, "nab": {}, "smd": {}}, 3, "a --limit 3 run"),
])
def test_benchmark_readme_is_not_rewritten_from_a_partial_results_file(results, limit, words, tmp_path, monkeypatch,
                                                                       capsys):
    """A SKAB-only run rendered into the README wiped the NAB and SMD tables; a --limit run's file went in
    under the full corpus's caption."""
    from pipelines.benchmark import main

    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark:start -->\nfull tables\n<!-- benchmark:end -->\n")
    monkeypatch.chdir(tmp_path)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"machine": {"device": "cpu", "torch": "2.13.0"}, "results": results,
                                   "limit": limit}))
    with pytest.raises(SystemExit) as exit_:
        main(["--from-json", str(partial), "--update-readme"])
    assert exit_.value.code == 2 and words in capsys.readouterr().err
    assert "full tables" in readme.read_text()


def test_benchmark_refuses_to_rewrite_the_readme_from_some_datasets(tmp_path, monkeypatch, capsys):
    from pipelines import benchmark

    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmark:start -->\nfull tables\n<!-- benchmark:end -->\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "run", lambda names, limit: {  # (not run: the refusal comes first)
        "machine": {"device": "cpu", "torch": "2.13.0"}, "results": {}, "limit": None})
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--datasets", "skab", "--update-readme", "--json", str(tmp_path / "b.json")])
    assert exit_.value.code == 2 and "--datasets skab would drop the others'" in capsys.readouterr().err
    assert "full tables" in readme.read_text()


def test_benchmark_costs_do_not_overwrite_the_accuracy_results(tmp_path, monkeypatch):
    from pipelines import benchmark

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "variant_costs", lambda: {"skab": {"lstm": {"train_ms": 1.0}}})
    monkeypatch.setattr(benchmark, "costs_markdown", lambda shapes: "table")
    assert benchmark.main(["--costs"]) == 0
    assert (tmp_path / "results" / "variant_costs.json").exists()
    assert not (tmp_path / "results" / "benchmark.json").exists()


def test_benchmark_variants_refuse_to_overwrite_an_earlier_run_without_resume(tmp_path, monkeypatch, capsys):
    from pipelines import benchmark

    earlier = tmp_path / "variants.json"
    earlier.write_text('{"results": {"default": {"skab": {"f1": 0.8}}}}\n')
    monkeypatch.setattr(benchmark, "run_variants", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--variants", "lstm", "--json", str(earlier)])
    assert exit_.value.code == 2 and "--resume continues it" in capsys.readouterr().err
    assert json.loads(earlier.read_text()) == {"results": {"default": {"skab": {"f1": 0.8}}}}


def test_benchmark_variants_caption_names_the_json_the_run_wrote(tmp_path, monkeypatch, capsys):
    from pipelines import benchmark

    data = {"machine": {"device": "cpu", "torch": "2.13.0"}, "variants": {"lstm": {}},
            "protocol": {"datasets": ["skab"], "max_epochs": 2, "smd_machines": None, "limit": None,
                         "torch_threads": 1},
            "results": {"lstm": {"skab": {"f1": 0.8, "far": 11.0, "mar": 24.0, "event_f1": 0.5,
                                              "train_seconds": 3.0, "windows_per_s": 100.0, "series": ["a"]}}}}
    monkeypatch.setattr(benchmark, "run_variants", lambda *a, **k: data)
    out = tmp_path / "mine.json"
    assert benchmark.main(["--variants", "lstm", "--datasets", "skab", "--json", str(out)]) == 0
    assert f"--json {out} --update-readme" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--limit", "--max-epochs", "--smd-machines"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_benchmark_counts_must_be_positive(flag, value, monkeypatch, capsys):
    # --limit 0 ran the whole corpus and --limit -1 all but the last series ("only the first N")
    from pipelines import benchmark

    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("must not run"))
    monkeypatch.setattr(benchmark, "run_variants", lambda *a, **k: pytest.fail("must not run"))
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--variants", "lstm", flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_benchmark_limit_takes_the_first_series(monkeypatch):
    from pipelines import benchmark

    class Ran(Exception):
        pass

    def protocol(name, series, progress):
        raise Ran(list(series))

    monkeypatch.setattr(benchmark.datasets, "load_dataset", lambda name, data_dir: ["a", "b", "c"])
    monkeypatch.setattr(benchmark.protocols, "run_protocol", protocol)
    with pytest.raises(Ran) as ran:
        benchmark.run(["skab"], 2)
    assert ran.value.args[0] == ["a", "b"]


def test_benchmark_markdown_shows_smd_attribution_only_where_measured():
    from pipelines.benchmark import markdown

    row = {"f1": 0.3, "precision": 0.2, "recall": 0.5, "f1_best_mean": 0.5, "event_f1": 0.3, "machines": 6,
           "seconds": 100.0}
    machine = {"device": "cpu", "torch": "2.13.0"}
    assert "HitRate" not in markdown({"machine": machine, "results": {"smd": row}})  # a results file from before
    measured = {**row, "hit_rate_100": 0.613, "hit_rate_150": 0.776, "ndcg_100": 0.6, "ndcg_150": 0.7,
                "hit_rate_100_flagged": 0.72, "hit_rate_150_flagged": 0.8, "attribution_rows": 8273,
                "attribution_flagged_rows": 4006}
    text = markdown({"machine": machine, "results": {"smd": measured}})
    assert "| **anomaly (ours)** | **0.61** | **0.78** | 0.60 | 0.70 | 0.72 (4006 rows) |" in text
    assert "8273 labelled rows" in text and "| TranAD (machine-1-1; Tuli et al. 2022, as quoted, unchecked) | 0.50 |" in text
