"""`ditkit scaling` on tiny models: outputs, resume, correlations (against scipy), plotting helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from ditkit.apps import scaling
from ditkit.cli import main
from ditkit.models.config import DiTConfig
from ditkit.models.flops import count_macs
from ditkit.runtime.errors import UserError

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2}
MODELS = ("DiT-S/4", "DiT-S/2")


def _opts(out, **kw) -> scaling.ScalingOptions:
    base = dict(out=str(out), models=MODELS, image_size=8, steps=4, eval_at=(2, 4), batch_size=16,
                num_samples=20, sample_steps=3, model_overrides=TINY)
    return scaling.ScalingOptions(**{**base, **kw})


def test_study_outputs_resume_and_correlation(tmp_path):
    opts = _opts(tmp_path / "s")
    summary = scaling.run_scaling(opts, log=lambda _: None)
    record = json.loads((tmp_path / "s" / "results.json").read_text())
    assert record["settings"]["lr"] == opts.lr
    for name in MODELS:
        entry = record["models"][name]
        config = DiTConfig.from_name(name, input_size=8, in_channels=1, num_classes=10, **TINY)
        assert entry["gflops"] == pytest.approx(count_macs(config) / 1e9, rel=1e-12)
        assert entry["params"] > 0
        assert set(entry["evals"]) == {"2", "4"}
        for ev in entry["evals"].values():
            assert 0.0 <= ev["accuracy"] <= 1.0 and ev["frechet"] >= 0.0
    # Patch 2 has 4× the tokens of patch 4: more Gflops.
    assert record["models"]["DiT-S/2"]["gflops"] > record["models"]["DiT-S/4"]["gflops"]
    for png in ("steps.png", "gflops.png"):
        with Image.open(tmp_path / "s" / png) as img:
            img.verify()
        with Image.open(tmp_path / "s" / png) as img:
            assert img.size == (scaling.LinePlot.W, scaling.LinePlot.H)
            # something was drawn besides white and gray grid: the series colours
            assert len(img.getcolors(maxcolors=100_000)) > 10
    # The correlation against scipy on the stored numbers (final step 4, log10 Gflops vs Fréchet).
    x = [math.log10(record["models"][m]["gflops"]) for m in MODELS]
    y = [record["models"][m]["evals"]["4"]["frechet"] for m in MODELS]
    assert summary["step"] == 4
    assert summary["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-9)
    assert summary["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-9)
    table = (tmp_path / "s" / "table.md").read_text()
    assert all(m in table for m in MODELS) and "Spearman" in table

    # A re-run trains and evaluates nothing: the record is the same, no train call happens.
    calls = []
    orig = scaling._evaluate
    scaling._evaluate = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try:
        again = scaling.run_scaling(opts, log=lambda _: None)
    finally:
        scaling._evaluate = orig
    assert calls == []
    assert json.loads((tmp_path / "s" / "results.json").read_text())["models"] == record["models"]
    assert again["pearson"] == pytest.approx(summary["pearson"], abs=0)

    # Training in segments (2, then resumed to 4) gives the same step-4 evaluation as one run straight to 4.
    one = scaling.run_scaling(_opts(tmp_path / "one", models=("DiT-S/4",), eval_at=(4,)), log=lambda _: None)
    straight = json.loads((tmp_path / "one" / "results.json").read_text())["models"]["DiT-S/4"]["evals"]["4"]
    segmented = record["models"]["DiT-S/4"]["evals"]["4"]
    assert straight["frechet"] == pytest.approx(segmented["frechet"], rel=1e-4)
    assert straight["accuracy"] == pytest.approx(segmented["accuracy"], abs=1e-9)
    assert "pearson" not in one and one["step"] == 4  # one model: no correlation

    # Other settings in the same folder are refused with one line.
    with pytest.raises(UserError, match="lr"):
        scaling.run_scaling(_opts(tmp_path / "s", lr=1e-3), log=lambda _: None)


def test_budget_stops_before_the_next_segment(tmp_path):
    # A budget already spent after the first segment: the study stops there (step-major order: the first model
    # reached the first evaluation point), writes what it has, and a later run continues.
    summary = scaling.run_scaling(_opts(tmp_path / "s", budget_minutes=1e-6), log=lambda _: None)
    record = json.loads((tmp_path / "s" / "results.json").read_text())
    assert summary["stopped_early"] and summary["step"] is None
    assert set(record["models"][MODELS[0]]["evals"]) == {"2"} and not record["models"][MODELS[1]]["evals"]
    assert (tmp_path / "s" / "steps.png").exists() and not (tmp_path / "s" / "gflops.png").exists()
    assert "No common evaluation step" in (tmp_path / "s" / "table.md").read_text()


def test_cli_errors(capsys, tmp_path):
    assert main(["scaling", "--models", "DiT-Q/2", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["scaling", "--eval-at", "500,100", "--out", str(tmp_path)]) == 2
    assert "--eval-at" in capsys.readouterr().err
    assert main(["scaling", "--image-size", "12", "--out", str(tmp_path)]) == 2
    assert "divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["scaling", "--model-overrides", "[1]"])
    assert err.value.code == 2


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=7)
    y = np.round(rng.normal(size=7), 0)  # rounding makes ties, which Spearman must average
    assert scaling.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert scaling.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    assert math.isnan(scaling.pearson([1, 2, 3], [5, 5, 5]))


def test_axis_ticks():
    assert scaling.axis_ticks(0.0, 1.0, log=False) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert scaling.axis_ticks(0.3, 30.0, log=True) == pytest.approx([0.5, 1, 2, 5, 10, 20])
    ticks = scaling.axis_ticks(0.01, 1000.0, log=True)
    assert ticks == pytest.approx([0.01, 0.1, 1, 10, 100, 1000])


def test_budget_guess_scales_by_gflops():
    opts = scaling.ScalingOptions()
    macs = {n: count_macs(DiTConfig.from_name(n, input_size=32, in_channels=1, num_classes=10))
            for n in ("DiT-S/4", "DiT-B/2", "DiT-S/8")}
    rate, evals = {"DiT-S/4": 0.02}, {"DiT-S/4": 3.0}
    assert scaling._guess_seconds("DiT-S/4", 100, rate, opts, evals) == pytest.approx(0.02 * 100 + 3.0)
    expected = macs["DiT-B/2"] / macs["DiT-S/4"] * (0.02 * 100 + 3.0)
    assert scaling._guess_seconds("DiT-B/2", 100, rate, opts, evals) == pytest.approx(expected, rel=1e-12)
    # a smaller model is not assumed cheaper than the measured one (launch-bound small models)
    assert scaling._guess_seconds("DiT-S/8", 100, rate, opts, evals) == pytest.approx(0.02 * 100 + 3.0)
    assert scaling._guess_seconds("DiT-S/8", 100, {}, opts) == 0.0


def test_plot_skips_non_finite_points(tmp_path):
    plot = scaling.LinePlot("t", "x", "y", log_x=True, log_y=True)
    plot.points("S", [(0.5, 3.0), (2.0, float("nan")), (6.0, 1.0)], ["a", "b", "c"])
    plot.line("L", [(0.5, 2.0), (6.0, float("inf"))])
    with Image.open(plot.save(tmp_path / "p.png")) as img:
        assert img.format == "PNG" and img.size == (scaling.LinePlot.W, scaling.LinePlot.H)
    empty = scaling.LinePlot("t", "x", "y")
    empty.line("L", [(1.0, float("nan"))])
    with pytest.raises(UserError, match="nothing finite"):
        empty.save(tmp_path / "q.png")


def test_cli_maps_arguments(monkeypatch, capsys, tmp_path):
    seen = []

    def fake(opts):
        seen.append(opts)
        return {"table": "TABLE\n", "pictures": ["a.png"], "elapsed_seconds": 1.0, "stopped_early": True}

    monkeypatch.setattr(scaling, "run_scaling", fake)
    argv = ["scaling", "--models", "DiT-S/8, DiT-B/2", "--eval-at", "10,20", "--steps", "20", "--lr", "1e-3",
            "--budget-minutes", "7", "--model-overrides", '{"depth": 2}', "--out", str(tmp_path), "--no-compile"]
    assert main(argv) == 0
    (opts,) = seen
    assert opts.models == ("DiT-S/8", "DiT-B/2") and opts.eval_at == (10, 20) and opts.steps == 20
    assert opts.lr == 1e-3 and opts.budget_minutes == 7 and opts.model_overrides == {"depth": 2}
    assert opts.cfg_scale == 1.0 and opts.metric == "frechet" and opts.compile is False
    out = capsys.readouterr().out
    assert "TABLE" in out and "a.png" in out and "stopped early" in out
