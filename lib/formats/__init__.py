"""File formats of a run dir: arrays with shape sidecars and safetensors memmaps
(``arrays``), the streaming matrix writer (``matrix_writer``), row tables (``parquet``)
and the k-means hierarchy as stages read it (``clusters``). Imports ``lib.core`` only.
"""
