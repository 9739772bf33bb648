"""The k-means stage: hierarchical k-means, one distributed job per level.

``params`` (the ``kmeans`` node), ``plan`` (its levels in a plan, their hashes), ``task``
(what a level job runs), ``hierarchy`` (a level: steps, resampling, resume), ``split``,
``resample``, ``outputs`` (publishing a step) and the solver: ``solver`` (the API),
``init`` (k-means++), ``lloyd``, ``assign``, ``points``, ``faiss``. Imports the shared
layers, never another stage.
"""
