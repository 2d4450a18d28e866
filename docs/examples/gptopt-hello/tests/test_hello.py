from gptopt_core import Pipeline


def test_hello_counts_weight_layers():
    result = Pipeline(model="tiny-random-llama", quiet=True).add("hello", name="tests", times=2).run()
    assert result.records[0]["metrics"]["weight_layers"] == 14
