"""Plugins declare their own vocabulary (gptopt_register_vocabulary): ctx.state keys, fact families and matrix cells
belong to the plugin that registers them, a word registered twice is refused, no core module spells a plugin's
word, and ctx.state refuses a key nobody declared."""
import ast
import types

import pytest
from conftest import ROOT

from gptopt_core import FACTS, STATE_KEYS, Fact, GptoptError, MatrixCell, StateKey, hookimpl
from gptopt_core.matrix import CELLS
from gptopt_core.plugins import Plugins, get_plugins
from gptopt_core.kit.testing import register_plugin
from gptopt_core.vocabulary import State, UndeclaredStateKey, records


def vocabulary_plugin(*words):
    return types.SimpleNamespace(gptopt_register_vocabulary=hookimpl(lambda register: [register(w) for w in words]))


def test_the_core_keeps_only_its_own_words_and_plugins_own_theirs():
    owners = {key: owner for key, (owner, _) in STATE_KEYS.items()}
    assert {k for k, o in owners.items() if o == "gptopt-core"} == {"trainer", "original_model", "kl_base",
                                                                    "kl_base_hash", "quantized"}
    assert owners["masks"] == "gptopt-prune" and owners["gguf"] == "gptopt-export" and owners["l1"] == "gptopt-l1"
    assert FACTS["adapter"][0] == "gptopt-transfer" and FACTS["cpu-only"][0] == "gptopt-cpu"
    assert CELLS["prune wanda"].plugin == "gptopt-prune" and CELLS["eval"].plugin == "gptopt-core"
    assert CELLS["export gguf f32 + llamacpp"].needs == "gguf"
    info = get_plugins().info["gptopt-prune"]
    assert "state key 'masks'" in info.vocabulary and "matrix cell 'prune wanda 2:4'" in info.vocabulary


@pytest.mark.parametrize("word,owner", [(StateKey("masks", "my masks"), "gptopt-prune"),
                                        (Fact("adapter", "my adapter"), "gptopt-transfer"),
                                        (MatrixCell("eval"), "gptopt-core"),
                                        (StateKey("trainer", "my trainer"), "gptopt-core")])
def test_a_word_registered_twice_is_refused_and_blamed_on_the_second_plugin(word, owner):
    with pytest.raises(GptoptError, match=f"plugin test-dup: {word.key} is already registered by {owner}"):
        with register_plugin(vocabulary_plugin(StateKey("dup-ok", "registered before the clash"), word), "test-dup"):
            pass
    assert "dup-ok" not in STATE_KEYS  # all or nothing: the plugin's first word is gone too
    assert (STATE_KEYS["masks"][0], FACTS["adapter"][0], CELLS["eval"].plugin) == (
        "gptopt-prune", "gptopt-transfer", "gptopt-core")


@pytest.mark.parametrize("words,reason", [
    ((StateKey("mine", "one"), StateKey("mine", "two")), "registers state key 'mine' twice"),
    (("mine",), "give a gptopt_core.StateKey, Fact or MatrixCell"),
    ((StateKey("mine", " "),), "give a non-empty name and meaning"),
    ((Fact("mine:detail", "a family with a detail"),), "declare the family only ('mine')"),
    ((MatrixCell("mine", needs="llamacpp"),), "needs='llamacpp' is not a gptopt_core.Architecture field"),
])
def test_a_bad_word_rejects_the_plugin(words, reason):
    plugins = Plugins(strict=False)
    with pytest.warns(Warning, match="plugin test-bad: "):
        info = plugins.register(vocabulary_plugin(*words), "test-bad")
    assert reason in info.error and info.vocabulary == [] and plugins.vocabulary == {}


def test_a_plugins_words_come_and_go_with_it():
    words = (StateKey("hello_count", "greetings so far"), Fact("greeted", "the model was greeted", lossy=True),
             MatrixCell("hello", needs="gguf", why_not="needs a GGUF layout"))
    with register_plugin(vocabulary_plugin(*words), "test-words"):
        assert STATE_KEYS["hello_count"] == ("test-words", "greetings so far")
        assert FACTS["greeted"] == ("test-words", "the model was greeted")
        assert CELLS["hello"].why_not == "needs a GGUF layout"
        from gptopt_core.kit.klbase import is_lossy

        step = types.SimpleNamespace(plugins=None, next_facts=lambda facts: {"greeted:twice"})
        assert is_lossy(step)
    assert "hello_count" not in STATE_KEYS and "greeted" not in FACTS and "hello" not in CELLS
    assert not is_lossy(step)


def test_ctx_state_stores_only_declared_keys():
    state = State({"masks": {}}, plugins=get_plugins())
    state["quantized"] = {"a": "int8"}
    state.setdefault("trainer", None)
    assert state == {"masks": {}, "quantized": {"a": "int8"}, "trainer": None}
    assert state.get("cuts") is None and "cuts" not in state  # reading is a dict's: the owner may not be loaded
    for write in (lambda: state.__setitem__("cuts", 1), lambda: state.setdefault("cuts", 1),
                  lambda: state.update(cuts=1), lambda: State({"cuts": 1}, get_plugins())):
        with pytest.raises(UndeclaredStateKey) as info:
            write()
        message = str(info.value)
        assert message.startswith("ctx.state['cuts'] is not a declared state key") and "\n" not in message
        assert "register(gptopt_core.StateKey('cuts'" in message and "gptopt_register_vocabulary" in message
    assert "cuts" not in state
    with register_plugin(vocabulary_plugin(StateKey("cuts", "what was cut")), "test-cuts"):
        state["cuts"] = 1
    assert state.pop("cuts") == 1
    with pytest.raises(UndeclaredStateKey):  # unregistered: undeclared again
        state["cuts"] = 1


#: strings in core modules that equal a plugin's word but mean something else (the file and the string)
OTHER_MEANINGS = {("architectures.py", "gguf"): "the Architecture field",
                  ("gguf_files.py", "gguf"): "a model source's name in run.json",
                  ("report.py", "gguf"): "the gguf distribution whose version run.json records"}


def core_strings():
    """``(file name, line, string)`` of every string constant in gptopt_core that is not a docstring."""
    for path in sorted((ROOT / "gptopt_core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                yield path.name, node.lineno, node.value


def plugin_words(plugins=None) -> set:
    return {word for kind in (StateKey, Fact, MatrixCell) for word, r in records(kind, plugins).items()
            if r.plugin != "gptopt-core"}


def spelled(strings, words) -> list:
    return [(f, line, s) for f, line, s in strings if (s in words or s.split(":")[0] in words and ":" in s)
            and (f, s) not in OTHER_MEANINGS]


def test_no_core_module_spells_a_plugins_word():
    words = plugin_words()
    assert {"masks", "gguf", "cpu-only", "adapter", "prune wanda", "l1_runtime"} <= words
    strings = list(core_strings())
    assert not spelled(strings, words), "declare these in the plugin that owns them: " + repr(spelled(strings, words))
    # planted: klbase's old LOSSY_FACTS = ("quantized", "masks", "cpu-only"), context's old "l1_runtime" row
    planted = strings + [("klbase.py", 28, "masks"), ("klbase.py", 28, "cpu-only"), ("context.py", 21, "l1_runtime")]
    assert [s for _, _, s in spelled(planted, words)] == ["masks", "cpu-only", "l1_runtime"]
