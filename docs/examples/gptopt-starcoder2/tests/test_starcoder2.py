import dataclasses

import pytest
from gptopt_starcoder2 import STARCODER2

from gptopt_core import GptoptError, Pipeline, architecture_of, check_architecture, tiny_model


def test_the_row_matches_the_model_and_a_wrong_row_fails_loudly():
    model, _ = tiny_model("tiny-random-starcoder2")
    check_architecture(model, STARCODER2)
    wrong = dataclasses.replace(STARCODER2, groups=STARCODER2.groups[:3])  # mlp.c_proj left out
    with pytest.raises(GptoptError, match="block 0's linear layer 'mlp.c_proj' is in no group"):
        check_architecture(model, wrong)


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
