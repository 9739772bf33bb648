"""The curate stage: a balanced subset sampled from a finished k-means hierarchy.

``params``, ``plan``, ``task`` and ``sampling`` (water-filling down the levels). Reads the
hierarchy through ``lib.formats.clusters``; never imports another stage.
"""
