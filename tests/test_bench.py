"""`blockrt bench` defaults that work: auto batch within the artifact's limit, workloads fitted to
its context (or refused) before anything runs, --prompt-len/--gen-len imply a custom workload,
--against hf takes the vanilla model given with it or is refused at once, and JSON without NaN.
Speed itself is measured by running the command, never asserted here."""

from __future__ import annotations

import json

import pytest

from blockrt.runtime import bench
from blockrt.runtime.bench import Hardware, Target, _batches, fit_workloads, plan_targets

from conftest import TEST_MAX_BATCH, TEST_MAX_CONTEXT


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a benchmark starts (refusals must come first)."""
    def started(*args, **kwargs):
        raise AssertionError("a benchmark started before the input was refused")

    monkeypatch.setattr(bench, "measure_hardware", started)


def test_the_typical_flow_runs_on_a_cpu_with_json_without_nan(exported, blockrt_cli, tmp_path):
    pytest.importorskip("transformers", reason="--against hf needs transformers (the hf extra)")
    directory = exported("tiny_block")
    out = tmp_path / "results.json"
    code, table, err = blockrt_cli("bench", str(directory), "--against", "tiny_vanilla", "--against", "hf",
                                   "--prompt-len", "8", "--gen-len", "12", "--dtype", "fp32", "--out", str(out))
    assert code == 0, err
    data = _strict_json(out.read_text())
    engines = [r["engine"].split("-")[0] for r in data["results"]]
    assert engines == ["blockrt", "blockrt", "hf"]
    assert [r["name"].split(" ")[0] for r in data["results"]] == [str(directory), "tiny_vanilla", "hf:tiny_vanilla"]
    assert [r["batch"] for r in data["results"]] == [TEST_MAX_BATCH, bench.CPU_AUTO_BATCH, bench.CPU_AUTO_BATCH]
    assert all((r["prompt_len"], r["gen_len"]) == (8, 12) for r in data["results"])
    assert data["hardware"]["copy_bandwidth_gbs"] is None and len(data["ratios"]) == 2
    assert "nan" not in table.lower() and "not measured" in table


def test_auto_batch_stays_within_the_artifacts_limit_and_is_small_on_a_cpu():
    assert _batches("auto", 1 << 40, 1, TEST_MAX_BATCH) == [TEST_MAX_BATCH]  # memory for millions of rows
    assert _batches("auto", 1 << 40, 1, 4096, cpu=True) == [bench.CPU_AUTO_BATCH]
    assert _batches("auto", 1 << 40, 1, 2, cpu=True) == [2]


def test_a_batch_above_the_artifacts_limit_is_refused_before_anything_runs(exported, blockrt_cli, nothing_runs):
    code, _, err = blockrt_cli("bench", str(exported("tiny_block")), "--batch", "2,64", "--prompt-len", "4",
                               "--gen-len", "4")
    assert code == 2 and f"batch 64 is above the max batch {TEST_MAX_BATCH}" in err


@pytest.mark.parametrize("batch, message", [
    ("2,x", "--batch (auto or sizes) '2,x': 'x' is not an integer batch size"),
    ("0", "batch size 0 is below 1"),
])
def test_a_bad_batch_spec_is_refused_before_anything_runs(exported, blockrt_cli, nothing_runs, batch, message):
    code, _, err = blockrt_cli("bench", str(exported("tiny_block")), "--batch", batch, "--prompt-len", "4",
                               "--gen-len", "4")
    assert code == 2 and message in err and "Traceback" not in err


def test_named_workloads_are_shortened_to_the_artifacts_context_with_the_reason(exported, caplog):
    plans = plan_targets([Target(str(exported("tiny_block")))], ["auto"])
    fitted = fit_workloads([("decode-heavy", 128, 2048), ("prefill-heavy", 2048, 128)], plans)
    assert fitted == [("decode-heavy", 128, TEST_MAX_CONTEXT - 128), ("prefill-heavy", TEST_MAX_CONTEXT - 128, 128)]
    assert all(p + g <= TEST_MAX_CONTEXT for _, p, g in fitted)
    assert f"exceed the max context {TEST_MAX_CONTEXT}" in caplog.text and "--max-context 2176" in caplog.text


def test_a_custom_workload_longer_than_the_context_is_refused_before_anything_runs(exported, blockrt_cli,
                                                                                  nothing_runs):
    code, _, err = blockrt_cli("bench", str(exported("tiny_block")), "--prompt-len", "150", "--gen-len", "20")
    assert code == 2
    assert f"prompt 150 (padded to 152) + generate 20 = 172 tokens exceed the max context {TEST_MAX_CONTEXT}" in err


def test_prompt_and_gen_lengths_imply_a_custom_workload(blockrt_cli, monkeypatch):
    seen = {}

    def record(targets, workloads, *args, **kwargs):
        seen["workloads"] = workloads
        return [], Hardware("cpu", None, None), []

    monkeypatch.setattr(bench, "run_bench", record)
    assert blockrt_cli("bench", "tiny_block", "--prompt-len", "16", "--gen-len", "8")[0] == 0
    assert seen["workloads"] == [("custom", 16, 8)]
    assert blockrt_cli("bench", "tiny_block", "--gen-len", "8")[0] == 0
    assert seen["workloads"] == [("custom", 128, 8)]
    code, _, err = blockrt_cli("bench", "tiny_block", "--workload", "decode-heavy", "--prompt-len", "16")
    assert code == 2 and "custom workload" in err


@pytest.mark.parametrize("against, message", [
    (["hf"], "none is given (the models are: tiny_block (block))"),
    (["hf:tiny_block"], "expected hf:<vanilla preset>"),
    (["no_such_model"], "neither a preset"),
])
def test_bad_baselines_are_refused_before_anything_runs(blockrt_cli, nothing_runs, against, message):
    args = [a for x in against for a in ("--against", x)]
    code, _, err = blockrt_cli("bench", "tiny_block", *args, "--prompt-len", "4", "--gen-len", "4")
    assert code == 2 and message in err and "Traceback" not in err


def test_hf_runs_on_the_weights_of_a_vanilla_artifact_given_as_the_model(exported, blockrt_cli, tmp_path):
    pytest.importorskip("transformers", reason="--against hf needs transformers (the hf extra)")
    directory = str(exported("tiny_vanilla"))
    plans = plan_targets([Target("tiny_block"), Target(directory), Target("hf")], ["auto"] * 3)
    assert plans[2].hf_source == directory and plans[2].manifest is plans[1].manifest
    code, out, err = blockrt_cli("bench", directory, "--against", "hf", "--prompt-len", "4", "--gen-len", "4",
                                 "--batch", "2", "--json")
    assert code == 0, err
    model, hf = _strict_json(out)["results"]
    assert hf["name"] == f"hf:{directory}" and hf["dtype"] == model["dtype"] == "fp32" and hf["batch"] == 2


def test_json_has_null_where_a_value_is_not_a_finite_number():
    data = bench.to_json([], Hardware("cpu", float("nan"), None), [{"ttft_ratio": float("inf")}])
    text = json.dumps(data, allow_nan=False)
    assert _strict_json(text)["hardware"]["copy_bandwidth_gbs"] is None and '"ttft_ratio": null' in text


# ------------------------------------------------------------- one tiny run: metrics and engine label

TINY = ("--workload", "custom", "--prompt-len", "6", "--gen-len", "9", "--device", "cpu", "--dtype", "fp32")


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """(stdout JSON, --out file JSON) of one bench of tiny_block (batches 1 and 2, --backend
    onnxruntime, which a preset ignores) against tiny_vanilla (batch 2)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, "-c", "from blockrt.cli import main; main()", "-q", "bench", "tiny_block",
                           *TINY, "--batch", "1,2", "--against", "tiny_vanilla", "--against-batch", "2", "--backend",
                           "onnxruntime", "--json", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return _strict_json(proc.stdout), _strict_json(out.read_text())


def test_bench_json_has_one_result_per_model_and_batch_with_consistent_metrics(bench_json):
    data, saved = bench_json
    assert data == saved
    assert set(data) == {"environment", "hardware", "results", "ratios"} and data["environment"]["torch"]
    rows = [(r["name"], r["kind"], r["batch"], r["prompt_len"], r["gen_len"], r["dtype"], r["workload"])
            for r in data["results"]]
    assert rows == [("tiny_block", "block", 1, 6, 9, "fp32", "custom"), ("tiny_block", "block", 2, 6, 9, "fp32", "custom"),
                    ("tiny_vanilla", "vanilla", 2, 6, 9, "fp32", "custom")]
    for r in data["results"]:
        assert r["wall_s"] > 0 and r["ttft_s"] > 0
        assert r["output_tok_s"] == pytest.approx(r["batch"] * r["gen_len"] / r["wall_s"])
        assert r["total_tok_s"] == pytest.approx(r["batch"] * (r["prompt_len"] + r["gen_len"]) / r["wall_s"])
        assert r["tpot_ms"] == pytest.approx(1e3 * max(r["wall_s"] - r["ttft_s"], 0) / (r["gen_len"] - 1))
        assert r["peak_mem_gib"] is None and r["steps"] == {}  # CPU: no CUDA memory stats or events
    for r in data["results"]:  # the generator's step trace: host time per step, no device to wait for, no graphs
        assert r["step_host_ms"] > 0 and r["step_wait_ms"] == 0 and r["graphs_captured"] == 0


def test_bench_labels_the_engine_that_ran_not_the_flag_that_presets_ignore(bench_json):
    data, _ = bench_json
    assert {r["engine"] for r in data["results"]} == {"blockrt-torch"}  # presets run on the PyTorch engine


def test_bench_compares_the_best_batch_of_the_model_with_each_baseline(bench_json):
    data, _ = bench_json
    best = {name: max((r for r in data["results"] if r["name"] == name), key=lambda r: r["output_tok_s"])
            for name in ("tiny_block", "tiny_vanilla")}
    [ratio] = data["ratios"]
    assert (ratio["model"], ratio["against"], ratio["workload"]) == ("tiny_block", "tiny_vanilla", "custom")
    assert (ratio["model_batch"], ratio["against_batch"]) == (best["tiny_block"]["batch"], best["tiny_vanilla"]["batch"])
    assert ratio["output_tok_s_ratio"] == pytest.approx(best["tiny_block"]["output_tok_s"] / best["tiny_vanilla"]["output_tok_s"])


def test_bench_of_an_artifact_prints_a_table_naming_its_engine(exported, blockrt_cli):
    artifact = exported("tiny_vanilla")
    code, out, err = blockrt_cli("-q", "bench", str(artifact), *TINY, "--batch", "2", "--backend", "onnxruntime")
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("model "))
    header = [c.strip() for c in lines[at].split("|")]
    assert header[:6] == ["model", "engine", "dtype", "batch", "prompt", "gen"]
    [row] = [[c.strip() for c in line.split("|")] for line in lines[at + 2:] if "|" in line]
    assert row[0].startswith(str(artifact)) and row[1:6] == ["blockrt-onnxruntime", "fp32", "2", "6", "9"]


def test_trace_saves_a_timeline_of_the_profiled_run_per_model(blockrt_cli, tmp_path):
    import gzip

    code, _, err = blockrt_cli("-q", "bench", "tiny_block", *TINY, "--batch", "2", "--against", "tiny_vanilla",
                               "--trace-dir", str(tmp_path / "traces"))
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert files == ["tiny_block_custom_b2.trace.json.gz", "tiny_vanilla_custom_b2.trace.json.gz"]
    events = json.loads(gzip.decompress((tmp_path / "traces" / files[0]).read_bytes()))["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # host calls of the profiled generation


def test_every_run_reports_the_results_so_far_so_a_stopped_bench_keeps_them():
    """`on_result` (the CLI saves --out with it) sees the results after each run, growing one at a time."""
    seen = []
    targets = [bench.Target("tiny_block", "torch"), bench.Target("tiny_vanilla", "torch")]
    results, _, _ = bench.run_bench(targets, [("custom", 8, 8)], ["1,2", "1"], "fp32", "cpu",
                                    on_result=lambda so_far, hw: seen.append([r.name for r in so_far]))
    assert seen == [["tiny_block"], ["tiny_block"] * 2, ["tiny_block"] * 2 + ["tiny_vanilla"]]
    assert [r.name for r in results] == seen[-1]
