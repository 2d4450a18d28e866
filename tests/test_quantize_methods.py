"""``quantize --method`` is a table (plugins/gptopt_quantize/methods.py): every option one method takes and another
does not is refused from the table in one line; choices, help and facts follow the records."""
import typing

import pytest

from gptopt_core import ParamsError
from gptopt_quantize.methods import METHODS, flag, method_options
from gptopt_quantize.step import QuantizeParams, QuantizeStep

#: a value each method option accepts
SAMPLE = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32", "block_size": 64,
          "int8_threshold": 6.0, "plan": "auto", "max_ppl_increase": 0.05, "check_blocks": 4, "calib_blocks": 4,
          "calib_seq_len": 32, "group_size": 32, "symmetric": True, "observer": "minmax", "activations": 8,
          "awq": True, "awq_clip": True, "router": "include", "act_order": True, "dampening": 0.01, "offload": "cpu", "sequential": True,
          "min_expert_tokens": 4, "iters": 10, "lr": 0.1}


def test_every_method_option_has_a_sample_and_is_a_field():
    assert set(method_options()) == set(SAMPLE) and set(SAMPLE) <= set(QuantizeParams.model_fields)


@pytest.mark.parametrize("method", list(METHODS))
def test_options_a_method_does_not_take_are_refused_from_the_table(method):
    record = METHODS[method]
    refused = [o for o in method_options() if o not in record.options]
    assert refused, method
    for option in refused:
        with pytest.raises(ParamsError) as exc:
            QuantizeStep(method=method, bits=4, **{option: SAMPLE[option]})
        text = str(exc.value)
        takers = [m for m in METHODS.values() if option in m.options]
        if option in record.refusals:
            assert record.refusals[option].format(flag=flag(option)) in text
        else:
            assert f"{flag(option)} applies to --method {takers[0].name}" in text, text
            assert f"not {record.title or method}" in text and "/".join(m.name for m in takers) in text, text
        assert "\n" not in text.split(": ", 1)[-1]


def test_choices_help_calibration_and_facts_follow_the_records():
    field = QuantizeParams.model_fields["method"]
    assert list(typing.get_args(field.annotation)) == list(METHODS)
    assert all(f"{m.name}: {m.help}" in field.description for m in METHODS.values())
    for name, m in METHODS.items():
        extra = {"awq": True} if name == "rtn" else {}
        assert QuantizeStep(method=name, bits=4, **extra).params.calibration() == m.calibration
    assert QuantizeStep(bits=4).next_facts({"masks"}) == {"masks", "quantized:4bit"}
    assert QuantizeStep(method="gptq", bits=8, activations=8).next_facts(set()) == {"quantized:grid",
                                                                                     "quantized:w8a8"}
