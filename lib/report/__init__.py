"""The report stage: one self-contained HTML page of a run's outputs (``report/index.html``).

``params`` (the ``report`` node), ``plan`` (one task after every other stage of the run),
``pca`` (principal components from a covariance streamed over the memory-mapped merged
embeddings), ``collect`` (what the run's files say: markers, metadata, clusters, metrics,
curated rows, texts read back from the dataset), ``figures`` (Plotly figures), ``page``
(the Jinja2 page with plotly.js inlined once, every text escaped), ``task`` (what the job
runs and ``launch.py report`` calls), ``summary``. Reads other stages' outputs through
their files only, never their packages.
"""
