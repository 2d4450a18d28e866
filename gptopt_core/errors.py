"""User-facing errors: each becomes one line on stderr and exit code 2."""


class GptoptError(Exception):
    """Something the user can fix (bad input, impossible chain). One line, exit 2, no traceback."""

    exit_code = 2

    def __init__(self, message=""):
        # always one line: user-supplied names may carry newlines
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class ParamsError(GptoptError):
    """A step's parameters failed validation."""


class PlanError(GptoptError):
    """The chain of steps cannot run in this order."""


class SourceError(GptoptError):
    """A model or data source could not be resolved or read."""


class StepFailed(Exception):
    """A step raised something unexpected while running (a bug or an environment fault): exit 1."""

    def __init__(self, step_name, plugin, error):
        self.step_name, self.plugin, self.error = step_name, plugin, error
        super().__init__(
            f"step '{step_name}' (plugin {plugin}) failed: {type(error).__name__}: {error}"
        )
