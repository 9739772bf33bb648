"""One entry point per stage: ``python -m jobs.<stage> --run-dir RUN``.

Entry points are thin: the shared runner (``lib.runtime.job``) reads the task's identity
and config and calls the stage's task in ``lib``. They are import-safe (no work at import
time), because vLLM and torch.multiprocessing spawn workers that re-import the main
module. Jobs import ``lib`` only, never a launcher.
"""
