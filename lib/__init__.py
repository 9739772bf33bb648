"""embedfleet's library. ``core`` (the run-dir contract) at the bottom; the shared layers
``formats``, ``config``, ``data``, ``plan``, ``runtime`` and ``compute``; one package per
stage on top (``embed``, ``merge``, ``kmeans``, ``curate``, ``metrics``), each importing
the shared layers and never another stage.

The library never imports ``jobs``, ``launchers`` or ``cli``; a job never knows which
launcher started it (DESIGN.md, "Dependencies point one way"). The import-linter
contracts in pyproject.toml keep it so.
"""
