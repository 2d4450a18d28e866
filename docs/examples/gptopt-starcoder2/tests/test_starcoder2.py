from gptopt_core import Pipeline, architecture_of


def test_starcoder2_quantizes_exports_and_runs_in_llamacpp(tmp_path):
    result = (Pipeline(model="tiny-random-starcoder2", quiet=True)
              .add("eval", block_size=128, max_tokens=512)
              .add("quantize", method="gptq", bits=8, group_size="32", calib_blocks=4, calib_seq_len=32)
              .add("eval", block_size=128, max_tokens=512)
              .add("export", to=str(tmp_path / "m.gguf"))
              .add("llamacpp", block_size=128, max_tokens=512, warmup=0, repeats=1, new_tokens=4,
                   prompt_tokens=16)
              .run())
    assert architecture_of(result.model).model_type == "starcoder2"
    exported, measured = result.records[3]["metrics"], result.records[4]["metrics"]
    assert exported["gguf_architecture"] == "starcoder2"
    assert exported["gguf_exact_grid_tensors"] == 2 * 6  # GPTQ int8 grids of both blocks, written exactly (q8_0)
    torch_ppl = result.records[2]["metrics"]["perplexity"]
    assert abs(measured["llamacpp_perplexity"] / torch_ppl - 1) < 0.01
