"""One entry point per stage: ``python -m jobs.<stage> --run-dir RUN``.

Entry points are thin: read the task identity and config, call ``lib``, write outputs.
They are import-safe (no work at import time), because vLLM and torch.multiprocessing
spawn workers that re-import the main module.
"""
