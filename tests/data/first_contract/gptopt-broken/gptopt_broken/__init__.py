"""A deliberately broken plugin: importing it fails, and gptopt must name it and keep working."""
import gptopt_this_module_does_not_exist  # noqa: F401
