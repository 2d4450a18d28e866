from gptopt_core import FACTS, STATE_KEYS, Pipeline


def test_hello_counts_weight_layers():
    result = Pipeline(model="tiny-random-llama", quiet=True).add("hello", name="tests", times=2).run()
    assert result.records[0]["metrics"]["weight_layers"] == 14
    assert result.ctx.state["greetings"] == 2 and "greeted" in result.records[0]["facts"]
    assert STATE_KEYS["greetings"][0] == "gptopt-hello" and FACTS["greeted"][0] == "gptopt-hello"
