"""The embed stage: a dataset's rows -> embedding shards, one array task per shard.

``params`` (the ``model`` and ``embed`` nodes), ``plan`` (its stage in a plan), ``task``
(what its job runs), ``shard`` (one shard, part by part), ``token_filter`` (drop, never
truncate) and ``backends`` (hf, vllm). Imports the shared layers, never another stage.
"""
