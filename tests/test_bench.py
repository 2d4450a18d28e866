"""bench: timers, memory meters, the CV-driven repeat rule, the step, comparisons and the end-of-run report."""
import json
import math
import statistics
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptopt_bench import BenchStep, compare
from gptopt_bench import measure
from gptopt_bench.report import points, table
from gptopt_core import GptoptError, ParamsError, Pipeline, Step, hookimpl
from gptopt_core.kit.testing import make_context, register_plugin

from conftest import error_lines

CUDA = torch.cuda.is_available()
SMALL = dict(prompt_tokens=16, new_tokens=6, warmup=1)


# -- statistics and the stop rule --------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.floats(0, 100))
def test_percentile_matches_numpy_linear(values, q):
    import numpy

    assert measure.percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_coefficient_of_variation():
    assert measure.coefficient_of_variation([5.0]) is None
    assert measure.coefficient_of_variation([3.0, 3.0, 3.0]) == 0.0
    values = [10.0, 12.0, 14.0]
    assert measure.coefficient_of_variation(values) == pytest.approx(statistics.stdev(values) / 12.0)


def test_stop_rule_extends_until_cv_target_or_limits():
    noisy, steady = [10, 14, 9, 15, 8], [10.0, 10.1, 9.9, 10.0, 10.05]
    assert not measure.enough_repeats(steady[:2], repeats=3, max_repeats=10, target_cv=0.05)  # below minimum
    assert measure.enough_repeats(steady[:3], repeats=3, max_repeats=10, target_cv=0.05)  # stable: stop
    assert not measure.enough_repeats(noisy, repeats=3, max_repeats=10, target_cv=0.05)  # noisy: extend
    assert measure.enough_repeats(noisy, repeats=3, max_repeats=5, target_cv=0.05)  # hit the maximum
    assert measure.enough_repeats(noisy, repeats=3, max_repeats=10, target_cv=0.05, elapsed_s=9, max_seconds=8)
    assert not measure.enough_repeats([10.0], repeats=1, max_repeats=3, target_cv=0.5)  # CV undefined: extend


# -- meters ------------------------------------------------------------------------------------------
def test_meters_chosen_by_device_without_touching_the_gpu():
    timer, memory = measure.meters_for(torch.device("cuda"))
    assert isinstance(timer, measure.CudaEventTimer) and timer.kind == "cuda_event"
    assert isinstance(memory, measure.CudaMemoryMeter) and memory.kind == "cuda_max_memory_allocated"
    timer, memory = measure.meters_for("cpu")
    assert isinstance(timer, measure.PerfCounterTimer) and isinstance(memory, measure.RssMemoryMeter)


def test_perf_counter_timer_measures_wall_time():
    timer = measure.PerfCounterTimer()
    a = timer.mark()
    time.sleep(0.05)
    b = timer.mark()
    timer.sync()
    assert 45 <= timer.elapsed_ms(a, b) < 5000  # a sleep may overrun on a busy machine, never undershoot


@pytest.mark.parametrize("force_sampler", [False, True], ids=["vmhwm", "sampler"])
def test_rss_meter_sees_a_transient_allocation(force_sampler):
    meter = measure.RssMemoryMeter(force_sampler=force_sampler)
    meter.start()
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    time.sleep(0.05)
    del block
    out = meter.stop()
    assert meter.method == ("sampler" if force_sampler else "vmhwm")
    assert out["peak_memory_bytes"] >= 48 * 1024 * 1024
    assert out["peak_rss_bytes"] >= out["peak_memory_bytes"]


# -- the measured operations on a real (tiny) model ---------------------------------------------------
@pytest.fixture(scope="module")
def llama_ctx():
    return make_context(model="tiny-random-llama")


def test_streamer_marks_every_generated_token(llama_ctx):
    ids, mask = measure.prompt_batch(llama_ctx.data.valid_ids, 12, 2, "cpu")
    assert ids.shape == (2, 12) and not torch.equal(ids[0], ids[1])
    gen = measure.generation_kwargs(llama_ctx.model, 7, llama_ctx.tokenizer.eos_token_id)
    timing = measure.time_generate(llama_ctx.model, ids, mask, 7, measure.PerfCounterTimer(), gen)
    assert timing.decode_steps == 6 and timing.batch_size == 2
    assert 0 < timing.ttft_ms < timing.total_ms and 0 < timing.decode_ms < timing.total_ms
    assert timing.decode_tokens_per_s == pytest.approx(2 * 6 / (timing.decode_ms / 1000))


def test_prompt_batch_tiles_short_text():
    ids, mask = measure.prompt_batch(torch.arange(5), 4, 3, "cpu")
    assert ids.tolist() == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]] and mask.sum() == 12
    with pytest.raises(GptoptError, match="no tokens"):
        measure.prompt_batch(torch.arange(0), 4, 1, "cpu")


@pytest.mark.parametrize("target_cv, expect", [(1.0, "repeats"), (1e-9, "max")])
def test_run_bench_repeat_count_follows_cv(llama_ctx, target_cv, expect):
    ids, mask = measure.prompt_batch(llama_ctx.data.valid_ids, 8, 1, "cpu")
    result = measure.run_bench(llama_ctx.model, ids, mask, new_tokens=4, warmup=0, repeats=3, max_repeats=6,
                               target_cv=target_cv)
    cv = measure.coefficient_of_variation(result.decode_rates)
    if expect == "repeats":  # any real timing noise is under 100%: stops at the minimum
        assert len(result.generate) == 3 and cv <= 1.0
    else:  # no real timing is that steady: extends to the maximum
        assert len(result.generate) == 6 and cv > 1e-9
    assert len(result.prefill_ms) == len(result.generate)
    m = measure.summarize(result, target_cv)
    assert m["bench_repeats"] == len(result.generate) and m["bench_cv_met"] == (expect == "repeats")


def test_bench_step_metrics(llama_ctx):
    from gptopt_core.kit.metrics import num_params

    m = BenchStep(**SMALL, batch_size=2, repeats=2, max_repeats=3).apply(llama_ctx)
    assert m["device"] == "cpu" and m["timer"] == "perf_counter" and m["memory_method"].startswith("cpu_peak_rss")
    assert m["decode_tokens_per_s"] > 0 and m["generate_tokens_per_s"] > 0
    assert m["prefill_ms_p90"] >= m["prefill_ms"] > 0 and m["ttft_ms_p90"] >= m["ttft_ms"] > 0
    assert m["decode_ms_per_token"] == pytest.approx(2 * 1000 / m["decode_tokens_per_s"], rel=0.5)
    assert 2 <= m["bench_repeats"] <= 3 and (m["bench_cv"] is None or m["bench_cv"] >= 0)
    assert m["peak_memory_bytes"] >= 0 and m["peak_rss_bytes"] > 0
    assert m["dtypes"] == {"float32": num_params(llama_ctx.model)}
    assert (m["prompt_tokens"], m["new_tokens"], m["batch_size"]) == (16, 6, 2)
    assert m["torch_threads"] == torch.get_num_threads()
    json.dumps(m)  # goes into run.json


def test_bench_refuses_a_workload_longer_than_the_context(llama_ctx):
    with pytest.raises(GptoptError, match="exceeds the model's context of 1024"):
        BenchStep(prompt_tokens=1000, new_tokens=100).apply(llama_ctx)


def test_params_validation():
    with pytest.raises(ParamsError, match="max_repeats: must be at least --repeats \\(5\\) \\(got 2\\)"):
        BenchStep(repeats=5, max_repeats=2)
    for bad in ({"new_tokens": 1}, {"target_cv": 0}, {"device": "tpu"}, {"warmup": -1}, {"batch_size": 0}):
        with pytest.raises(ParamsError):
            BenchStep(**bad)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_bench_device_cuda_without_gpu_is_a_plan_error():
    pipe = Pipeline(model="tiny-random-gpt2", quiet=True).add("bench", device="cuda")
    with pytest.raises(GptoptError, match="no CUDA GPU is available"):
        pipe.validate()


# -- comparisons and the report --------------------------------------------------------------------
def test_compare_only_with_the_first_bench_of_the_same_workload():
    base = {"prompt_tokens": 16, "new_tokens": 6, "batch_size": 1, "device": "cpu"}
    records = [{"name": "eval", "status": "ok", "metrics": {"perplexity": 9.0}},
               {"name": "bench", "status": "ok", "metrics": {**base, "batch_size": 4, "decode_tokens_per_s": 1.0}},
               {"name": "bench", "status": "ok", "metrics": {**base, "decode_tokens_per_s": 20.0, "prefill_ms": 10.0,
                                                             "ttft_ms": 12.0, "peak_memory_bytes": 1000,
                                                             "model_bytes": 4000}},
               {"name": "bench", "status": "ok", "metrics": {**base, "decode_tokens_per_s": 99.0}}]
    now = {**base, "decode_tokens_per_s": 30.0, "prefill_ms": 5.0, "ttft_ms": 6.0, "peak_memory_bytes": 500}
    out = compare(now, 1000, records)
    assert out == {"compared_with_step": 3, "decode_speedup": 1.5, "prefill_speedup": 2.0, "ttft_speedup": 2.0,
                   "memory_ratio": 0.5, "bytes_ratio": 0.25}
    assert compare({**now, "new_tokens": 7}, 1000, records) == {}


def test_points_group_model_states():
    recs = [{"name": "eval", "status": "ok", "metrics": {"perplexity": 10.0, "model_bytes": 400, "sparsity": 0.0}},
            {"name": "bench", "status": "ok", "metrics": {"decode_tokens_per_s": 20.0, "model_bytes": 400}},
            {"name": "prune", "status": "ok", "metrics": {}},
            {"name": "quantize", "status": "ok", "metrics": {}},
            {"name": "bench", "status": "ok", "metrics": {"decode_tokens_per_s": 30.0, "decode_speedup": 1.5,
                                                          "model_bytes": 100, "sparsity": 0.5}},
            {"name": "eval", "status": "ok", "metrics": {"perplexity": 12.5, "model_bytes": 100, "sparsity": 0.5}},
            {"name": "lora", "status": "ok", "metrics": {}},  # no eval/bench after it: no point
            {"name": "eval", "status": "failed"}]
    pts = points(recs)
    assert [(p["label"], p["steps"]) for p in pts] == [("loaded", [1, 2]), ("prune+quantize", [5, 6])]
    assert (pts[1]["perplexity"], pts[1]["model_bytes"], pts[1]["sparsity"]) == (12.5, 100, 0.5)
    header, rows = table(pts)
    col = {h: i for i, h in enumerate(header)}
    assert rows[0][col["× decode"]] == "1.00×" and rows[1][col["× decode"]] == "1.50×"
    assert rows[1][col["ppl"]] == "12.500" and rows[1][col["sparsity"]] == "50.0%"


class HalfStep(Step):
    """Cast the model to bfloat16 (a real model-changing step for the report tests)."""

    name = "to-bf16"

    def apply(self, ctx):
        ctx.model.to(torch.bfloat16)
        return {}


class HalfPlugin:
    @hookimpl
    def gptopt_register_steps(self, register):
        register(HalfStep)


def test_pipeline_compares_later_benches_and_writes_tradeoff(tmp_path):
    out = tmp_path / "run"
    with register_plugin(HalfPlugin(), "bench-test-bf16"):
        result = (Pipeline(model="tiny-random-gpt2", out=out, quiet=True)
                  .add("eval", max_tokens=300, block_size=64).add("bench", **SMALL, repeats=2, max_repeats=2)
                  .add("to-bf16")
                  .add("eval", max_tokens=300, block_size=64).add("bench", **SMALL, repeats=2, max_repeats=2)
                  .run())
    first, second = result.records[1]["metrics"], result.records[4]["metrics"]
    assert "decode_speedup" not in first
    assert second["compared_with_step"] == 2
    assert second["decode_speedup"] == pytest.approx(second["decode_tokens_per_s"] / first["decode_tokens_per_s"])
    assert second["bytes_ratio"] == pytest.approx(0.5, rel=0.01)  # fp32 -> bf16
    assert second["dtypes"] == {"bfloat16": first["dtypes"]["float32"]}
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = (out / "report.md").read_text()
    section = report.split("## Benchmark: each model state side by side")[1]
    assert "| loaded | 1,2 |" in section and "| to-bf16 | 4,5 |" in section and "tradeoff.png" in section
    assert f"{second['decode_speedup']:.2f}×" in section
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["steps"][4]["metrics"]["decode_speedup"] == second["decode_speedup"]


def test_no_bench_no_section(tmp_path):
    out = tmp_path / "run"
    Pipeline(model="tiny-random-gpt2", out=out, quiet=True).add("eval", max_tokens=300, block_size=64).run()
    assert not (out / "tradeoff.png").exists() and "## Benchmark" not in (out / "report.md").read_text()


# -- the real CLI ------------------------------------------------------------------------------------
def test_cli_bench_end_to_end(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("run", "--model", "tiny-random-gpt2", "--out", out, "eval", "--max-tokens", "300", "--block-size", "64",
            "bench", "--prompt-tokens", "16", "--new-tokens", "6", "--warmup", "1", "--repeats", "2",
            "--max-repeats", "2")
    assert r.returncode == 0, r.stderr
    assert "gptopt bench: model states side by side" in r.stderr
    assert (out / "tradeoff.png").exists()
    metrics = json.loads((out / "run.json").read_text())["steps"][1]["metrics"]
    assert metrics["bench_repeats"] == 2 and metrics["decode_tokens_per_s"] > 0


def test_cli_bad_repeats_is_one_line(cli):
    r = cli("run", "--model", "tiny-random-gpt2", "bench", "--repeats", "5", "--max-repeats", "2")
    assert r.returncode == 2
    assert error_lines(r.stderr) == ["Error: bench: max_repeats: must be at least --repeats (5) (got '2')"]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without a GPU")
def test_cli_bench_cuda_without_gpu_fails_before_the_model_loads(cli, tmp_path):
    # a model path that does not exist: loading it would fail differently, so this error came first
    r = cli("run", "--model", tmp_path / "no-such-model", "bench", "--device", "cuda")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "no CUDA GPU is available" in lines[0] and "no-such-model" not in lines[0]


# -- CUDA (only where a GPU is) -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_event_timer_and_memory_meter():
    timer, memory = measure.meters_for("cuda")
    memory.start()
    a = timer.mark()
    x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(50_000_000)
    b = timer.mark()
    timer.sync()
    out = memory.stop()
    del x
    assert timer.elapsed_ms(a, b) > 1
    assert out["peak_memory_growth_bytes"] >= 64 * 1024 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bench_step_on_cuda():
    ctx = make_context(model="tiny-random-llama", device="cuda")
    m = BenchStep(**SMALL, repeats=2, max_repeats=2, device="cuda").apply(ctx)
    assert m["timer"] == "cuda_event" and m["memory_method"] == "cuda_max_memory_allocated"
    assert m["peak_memory_bytes"] >= m["peak_memory_growth_bytes"] > 0 and m["decode_tokens_per_s"] > 0
    ctx_cpu = make_context(model="tiny-random-llama", device="cpu")
    with pytest.raises(GptoptError, match="the model is on cpu"):
        BenchStep(**SMALL, device="cuda").apply(ctx_cpu)


# -- the real model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_bench_agrees_with_a_hand_written_generate_loop():
    """bench's decode tokens/s vs (N-1)/(T_N - T_1) of plain generate calls, interleaved (full version with
    the 5% target: benchmarks/bench_vs_generate.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: all the work runs in this thread, so its CPU clock sees all of it
    try:
        with pytest.MonkeyPatch.context() as mp:
            # both sides on this thread's CPU clock: what other jobs on a busy machine do does not move it
            mp.setattr(measure.PerfCounterTimer, "mark", lambda self: time.thread_time())
            ratios = []
            for _ in range(3):  # interleaved, retried: one disturbed round does not decide
                ratios.append(_agreement_on_smollm2())
                if abs(ratios[-1] - 1) < 0.15:
                    break
    finally:
        torch.set_num_threads(threads)
    assert abs(ratios[-1] - 1) < 0.15, ratios


def _agreement_on_smollm2():
    ctx = make_context(model="smollm2-135m")
    n = 16
    ids = ctx.data.valid_ids[:32].unsqueeze(0)
    pad = ctx.tokenizer.eos_token_id

    def hand():
        times = {}
        for k in (1, n):
            t0 = time.thread_time()
            with torch.inference_mode():
                ctx.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                   min_new_tokens=k, do_sample=False, pad_token_id=pad)
            times[k] = time.thread_time() - t0
        return (n - 1) / (times[n] - times[1])

    step = BenchStep(prompt_tokens=32, new_tokens=n, warmup=0, repeats=2, max_repeats=2)
    BenchStep(prompt_tokens=32, new_tokens=n, warmup=1, repeats=1, max_repeats=1).apply(ctx)
    bench_rates, hand_rates = [], []
    for i in range(4):
        if i % 2:
            hand_rates += [hand(), hand()]
            bench_rates.append(step.apply(ctx)["decode_tokens_per_s"])
        else:
            bench_rates.append(step.apply(ctx)["decode_tokens_per_s"])
            hand_rates += [hand(), hand()]
    ratio = statistics.median(bench_rates) / statistics.median(hand_rates)
    assert math.isfinite(ratio), (bench_rates, hand_rates)
    return ratio
