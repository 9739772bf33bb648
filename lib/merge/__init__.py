"""The merge stage: every embed shard (or the seed runs' legacy pickles) validated, then
streamed into one matrix with its row tables and a per-source split.

``params``, ``plan``, ``task``, ``inputs`` (collect and validate), ``stream`` (the copy),
``tables`` (metadata, dropped rows, by source). Imports the shared layers, never another
stage.
"""
