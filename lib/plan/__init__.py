"""The plan of a run: ``StageSpec``s in order with task counts and config hashes
(``spec``), built from the explicit table of stages (``registry``).

``spec`` imports only ``lib.core``; ``registry`` imports the stage packages' plan modules
lazily, by name.
"""
