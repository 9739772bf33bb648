"""The index stage: a faiss vector index of the merged embeddings, and search over it.

``params`` (the ``index`` node), ``plan`` (one task after merge), ``choice`` (kind, nlist,
metric and search settings from the data), ``reader`` (rows of the merged matrix read
without mapping the whole file), ``build`` (train, streamed add, publish), ``task`` (what
the job runs), ``search`` (load an index and its id map, query it), ``summary``. Imports
the shared layers, never another stage.
"""
