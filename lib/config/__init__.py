"""The configuration: the schema composed from each stage's parameter dataclass
(``schema``), Hydra composition and loading of a run's ``run.yaml`` (``compose``), what
enters a config hash (``fields``) and the redaction of secrets (``redact``).

``fields`` and ``redact`` import only ``lib.core``; ``schema`` and ``compose`` import the
stage packages' ``params`` modules, so stage packages never import them.
"""
