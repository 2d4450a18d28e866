"""The part of the ``vllm`` step that runs inside vLLM's own Python environment (vLLM pins other versions of
transformers and compressed-tensors than gptopt, so it lives in a venv of its own). Standard library and vLLM
only; gptopt is not importable here. Run as ``python worker.py REQUEST.json RESULT.json``.

The request names the model directory, the eval windows (token ids and the index each window scores from, as
``gptopt_core.kit.evaluate.eval_windows`` cut them) and the decode workload; the result holds, per window, the summed
negative log-likelihood of the scored tokens (vLLM's prompt logprobs) and the timings.
"""
import json
import statistics
import sys
import time


def score_windows(llm, windows):
    """``[(nll_sum, n_scored)]`` per window: ``-log p(token_j | tokens_<j)`` summed over ``j > scored_from``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=w["ids"]) for w in windows]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    scored = []
    for window, out in zip(windows, outputs):
        ids, first = window["ids"], window["scored_from"]
        logprobs = out.prompt_logprobs  # [None, {id: Logprob}, ...]: position j holds log p(ids[j] | ids[:j])
        total = 0.0
        for j in range(first + 1, len(ids)):
            total -= logprobs[j][ids[j]].logprob
        scored.append([total, len(ids) - 1 - first])
    return scored


def time_decode(llm, prompt, new_tokens, streams, warmup, repeats):
    """Median wall seconds of ``streams`` greedy requests of 1 token (time to first token) and of ``new_tokens``
    tokens; decode tokens/s = streams * (new_tokens - 1) / (t_all - t_first)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(prompt)) for _ in range(streams)]

    def run(n):
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = [len(o.outputs[0].token_ids) for o in outs]
        if any(g != n for g in got):
            raise RuntimeError(f"asked for {n} new tokens, vLLM gave {got}")
        return elapsed

    for _ in range(warmup):
        run(1), run(new_tokens)
    firsts, alls = [], []
    for _ in range(repeats):
        firsts.append(run(1))
        alls.append(run(new_tokens))
    first, whole = statistics.median(firsts), statistics.median(alls)
    rates = [streams * (new_tokens - 1) / max(a - f, 1e-9) for f, a in zip(firsts, alls)]
    return {"streams": streams, "ttft_ms": first * 1000, "total_ms": whole * 1000,
            "decode_tokens_per_s": streams * (new_tokens - 1) / max(whole - first, 1e-9),
            "decode_cv": statistics.pstdev(rates) / statistics.mean(rates) if len(rates) > 1 else 0.0}


def main(request_path, result_path):
    with open(request_path) as f:
        req = json.load(f)
    import vllm
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(model=req["model"], tokenizer=req["model"], dtype=req.get("dtype", "auto"),
              max_model_len=req["max_model_len"], enforce_eager=True, seed=req.get("seed", 0),
              max_num_seqs=max(req.get("streams", [1]) + [1]), skip_tokenizer_init=False)
    result = {"vllm_version": vllm.__version__, "load_seconds": time.perf_counter() - start}
    try:
        result["dtype"] = str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    except AttributeError:  # another vLLM layout: the dtype is not reported
        pass
    if req.get("windows"):
        start = time.perf_counter()
        result["windows"] = score_windows(llm, req["windows"])
        result["eval_seconds"] = time.perf_counter() - start
    if req.get("prompt"):
        result["decode"] = [time_decode(llm, req["prompt"], req["new_tokens"], n, req["warmup"], req["repeats"])
                            for n in req["streams"]]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    main(sys.argv[1], sys.argv[2])
