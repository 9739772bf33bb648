"""embedfleet library: formats, datasets, embedding backends, merge, k-means, metrics.

The library never imports ``jobs`` or ``launchers``; a job never knows which launcher
started it (see DESIGN.md, "Dependencies point one way").
"""
