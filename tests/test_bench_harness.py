"""benchmarks/harness.py, the layer every benchmark runs on: budgeted sections (skips recorded with their reason,
a failure recorded while the others still run, a hard stop), results saved after each section, and the timer.

The harness is benchmark code; the test loads it as `python benchmarks/x.py` would (its folder first on
sys.path), which is the one way to test it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402


def test_sections_run_in_order_a_failure_is_kept_and_a_section_over_budget_is_skipped_with_its_reason(tmp_path):
    out = tmp_path / "r.json"
    bench = harness.Bench(device="cpu", budget_s=30.0, out=str(out))
    seen_on_disk = []

    def first(b):
        b.results["first"] = 1

    def broken(b):
        seen_on_disk.append(json.loads(out.read_text()))  # saved after the first section, before this one
        raise ValueError("bad shape")

    def last(b):
        b.results["last"] = 3

    sections = {"first": first, "broken": broken, "costly": harness.Section(last, estimate_s=60.0), "last": last}
    code = harness.run_sections(bench, list(sections), sections, reserve_s=5.0, report=False)
    data = json.loads(out.read_text())
    assert code == 1
    assert seen_on_disk[0]["first"] == 1 and "broken" not in seen_on_disk[0].get("section_s", {})
    assert data["first"] == 1 and data["last"] == 3
    assert data["errors"] == {"broken": "ValueError: bad shape"}
    assert data["skipped"] == ["costly"] and data["skip_reasons"]["costly"].startswith("budget: ")
    assert set(data["section_s"]) == {"first", "broken", "last"}
    assert not list(tmp_path.glob("*.tmp"))  # written by rename


def test_the_reserve_skips_everything_once_the_budget_is_spent(tmp_path):
    bench = harness.Bench(device="cpu", budget_s=1.0)
    ran = []
    sections = {name: (lambda b, n=name: ran.append(n)) for name in ("a", "b")}
    assert harness.run_sections(bench, ["a", "b"], sections, reserve_s=2.0, report=False) == 0
    assert ran == [] and bench.results["skipped"] == ["a", "b"]
    zero = harness.Bench(harness.parser(None, sections).parse_args(["--budget-s", "0", "--reserve-s", "0"]))
    assert zero.budget_s == 0.0 and zero.device.type in ("cpu", "cuda")  # a zero budget is a budget
    harness.run_sections(zero, ["a"], sections, reserve_s=0.0, report=False)
    assert ran == [] and zero.results["skipped"] == ["a"]


@pytest.mark.skipif(not hasattr(harness.signal, "SIGALRM"), reason="needs SIGALRM")
def test_a_hard_limit_stops_a_running_section_and_keeps_what_came_before():
    bench = harness.Bench(device="cpu")
    ran = []

    def slow(b):
        ran.append("slow")
        time.sleep(5)
        ran.append("slow finished")

    sections = {"quick": lambda b: ran.append("quick"), "slow": slow, "after": lambda b: ran.append("after")}
    with harness.hard_limit(1):
        harness.run_sections(bench, list(sections), sections, reserve_s=0.0, report=False)
    assert ran == ["quick", "slow"] and "hard time limit 1 s" in bench.results["stopped"]


def test_the_timer_warms_up_then_times_each_call_on_the_cpu():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.004)

    times = harness.times_ms(fn, harness.pick_device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 4.0 for t in times)
    bench = harness.Bench(device="cpu")
    assert bench.time_ms(fn, warmup=0, repeats=3) >= 4.0


def test_environment_names_the_device_torch_and_the_date():
    env = harness.environment(harness.pick_device("cpu"))
    assert env["device"] == "cpu" and env["torch"] and env["gpu"] is None
    assert env["date"][:2] == "20" and env["date"].endswith("+00:00")
