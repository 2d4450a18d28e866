"""gptopt core: the pipeline, the plugin contract and the CLI. Plugins import only from here."""
from .context import RunContext
from .errors import GptoptError, ParamsError, PlanError, SourceError, StepFailed
from .hookspecs import hookimpl
from .pipeline import Pipeline, RunResult
from .steps import Params, Step

__all__ = ["GptoptError", "Params", "ParamsError", "Pipeline", "PlanError", "RunContext", "RunResult",
           "SourceError", "Step", "StepFailed", "hookimpl"]
