"""The run-dir contract: errors, every name of a run dir (``paths.RunPaths``), storage on a
local path or an fsspec URL (``storage``), completion markers, sharding and hashing.

Imports nothing else from ``lib``; everything else imports it.
"""
