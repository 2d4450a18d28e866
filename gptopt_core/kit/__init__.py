"""gptopt's kit: the engines (calibration, grids, training, evaluation, KL) and model I/O (sources, files, the
architecture rows) that steps use. Plugins import each name from the module it lives in
(``from gptopt_core.kit.calibration import run_blockwise``); the lazy front ``gptopt_core`` re-exports
the public ones for third-party code (docs/contract.md)."""
