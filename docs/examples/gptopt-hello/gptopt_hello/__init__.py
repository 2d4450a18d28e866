"""An example gptopt plugin: the `hello` step counts the model's weight layers and greets."""
import pydantic

from gptopt_core import Fact, Params, StateKey, Step, hookimpl, weight_modules


class HelloParams(Params):
    name: str = pydantic.Field("world", min_length=1, description="who to greet")
    times: int = pydantic.Field(1, ge=1, le=10, description="how many greetings")


class Hello(Step):
    """Greet, and report how many linear / Conv1D weight layers the model has."""

    name = "hello"
    Params = HelloParams
    provides = frozenset({"greeted"})

    def apply(self, ctx):
        layers = len(weight_modules(ctx.model))
        for _ in range(self.params.times):
            ctx.log(f"Hello, {self.params.name}! This model has {layers} weight layers.")
        ctx.state["greetings"] = ctx.state.get("greetings", 0) + self.params.times
        return {"weight_layers": layers}


@hookimpl
def gptopt_register_steps(register):
    register(Hello)


@hookimpl
def gptopt_register_vocabulary(register):
    register(StateKey("greetings", "how many greetings the hello steps of this run said so far"))
    register(Fact("greeted", "a hello step greeted the model"))
