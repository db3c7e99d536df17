"""`pyro-vae diagnose`, `compare` and `explore` on real runs."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest

from pyro_vae.cli import main


def _train(path, epochs, *extra):
    code = main(["train", "--epochs", str(epochs), "--hidden", "64", "--latent-dim", "4",
                 "--quiet", "--eval-particles", "0", "--out", str(path), *extra])
    assert code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _train(root / "good", 40)
    _train(root / "crippled", 1)
    return root


def test_diagnose_writes_netcdf_and_prints_the_summary(runs, capsys):
    assert main(["diagnose", str(runs / "good"), "--particles", "200", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["particles"] == 200 and summary["num_datapoints"] == 180
    assert 0 <= summary["pareto_k_share_above_0.7"] <= 1
    assert len(summary["kl_per_dim"]) == 4
    assert summary["kl_total"] == pytest.approx(sum(summary["kl_per_dim"]), rel=1e-5)
    idata = az.from_netcdf(runs / "good" / "diagnostics.nc")
    assert idata.posterior["z"].shape == (1, 200, 180, 4)
    assert main(["diagnose", str(runs / "good"), "--particles", "50"]) == 0
    text = capsys.readouterr().out
    assert "k̂" in text and "active units" in text and "KL per latent dimension" in text


def test_compare_a_run_with_itself_gives_zero(runs, capsys):
    assert main(["compare", str(runs / "good"), str(runs / "good"), "--particles", "50",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["difference"] == 0.0 and summary["z"] == 0.0
    assert not summary["significant"]


def test_compare_good_with_crippled_is_significant_with_the_right_sign(runs, capsys):
    assert main(["compare", str(runs / "good"), str(runs / "crippled"), "--particles", "100",
                 "--json"]) == 0
    forward = json.loads(capsys.readouterr().out)
    assert forward["difference"] > 0 and forward["z"] > 3 and forward["better"] == "good"
    assert main(["compare", str(runs / "crippled"), str(runs / "good"), "--particles", "100",
                 "--json"]) == 0
    backward = json.loads(capsys.readouterr().out)
    assert backward["difference"] == pytest.approx(-forward["difference"], rel=1e-6)
    assert main(["compare", str(runs / "good"), str(runs / "crippled"), "--particles", "20"]) == 0
    assert "good is better by" in capsys.readouterr().out


def test_compare_refuses_runs_on_different_data(runs, tmp_path, capsys):
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).random((60, 5)).astype(np.float32))
    _train(tmp_path / "other", 1, "--data", str(data))
    assert main(["compare", str(runs / "good"), str(tmp_path / "other"), "--particles", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dimensions" in err


def test_explore_writes_every_figure(runs, tmp_path, capsys):
    out = tmp_path / "explore"
    assert main(["explore", str(runs / "good"), "--out", str(out), "--particles", "50",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for name in ("interpolation.png", "traversals.png", "latent_scatter.png",
                 "reconstructions.png", "anomalies.png", "probe.png"):
        assert (out / name).stat().st_size > 0, name
    assert summary["probe_accuracy"] > summary["probe_chance"]
    assert len(summary["most_anomalous"]) == 10


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code


@pytest.mark.parametrize("argv,message", [
    (["diagnose", "/nonexistent/run"], "not found"),
    (["compare", "/nonexistent/a", "/nonexistent/b"], "not found"),
    (["explore", "/nonexistent/run"], "not found"),
    (["diagnose", "RUN", "--particles", "0"], "positive integer"),
])
def test_research_commands_refuse_bad_input(runs, argv, message, capsys):
    argv = [str(runs / "good") if a == "RUN" else a for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
