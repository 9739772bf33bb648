"""The metrics stage: cluster metrics of each k-means level (inertia, Davies-Bouldin,
Calinski-Harabasz, silhouette, per cluster, best/worst examples), as a pipeline stage or
on a named clustering.

``params``, ``plan``, ``task`` (the pipeline stage), ``named`` (a named clustering),
``measure`` (both), ``levels`` (one level, published), ``compute`` (the metrics),
``sanity`` (against scikit-learn), ``tracking`` (W&B). Reads the hierarchy through
``lib.formats.clusters``; never imports another stage.
"""
