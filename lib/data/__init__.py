"""A run's input rows: the ``dataset`` node (``params``), row sources for parquet, jsonl,
csv, Hugging Face datasets and the builtin corpus (``datasets``, ``corpus``), the checks
of a dataset's columns (``columns``) and the text of a row (``text``).

Shared by the stages that read a dataset; imports ``lib.core`` only.
"""
