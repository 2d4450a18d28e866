"""A process whose save hangs for a minute, for the tests that interrupt a save (SIGINT, SIGTERM).

    python tests/slow_save.py pipeline DIR FLAG   # Pipeline(...).add("save", to=DIR/m).run(), out=DIR/run
    python tests/slow_save.py cli DIR FLAG        # the same through gptopt's CLI main(), on a small local text

The save hook writes the model, then FLAG, then sleeps: a test waits for FLAG and sends its signal.
"""
import signal
import sys
import time
import types
from pathlib import Path

from gptopt_core import Pipeline, hookimpl
from gptopt_core.cli import main
from gptopt_core.kit.testing import register_plugin


@hookimpl(tryfirst=True)
def gptopt_save_model(ctx, model, path):
    model.save_pretrained(str(path))
    Path(sys.argv[3]).write_text("saving")
    time.sleep(60)
    return True


if __name__ == "__main__":
    # a test runner started in the background (nohup ... &) hands its children SIGINT ignored; a user's terminal
    # does not: give the child the interactive default so Ctrl-C is what a test sends
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, out = sys.argv[1], sys.argv[2]
    with register_plugin(types.SimpleNamespace(gptopt_save_model=gptopt_save_model), "slow-save"):
        if mode == "pipeline":
            Pipeline(model="tiny-random-gpt2", quiet=True, out=out + "/run").add("save", to=out + "/m").run()
        else:
            Path(out, "d.txt").write_text("A little text to load. " * 50)
            main(["run", "--model", "tiny-random-gpt2", "--data", out + "/d.txt", "--quiet", "--out", out + "/run",
                  "save", "--to", out + "/m"])
