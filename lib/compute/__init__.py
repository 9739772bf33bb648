"""Where numbers are computed: devices and dtypes (one resolver), torch.distributed set-up
from the task's environment and the collectives (``Comm``), and finding models on disk.

Imports ``lib.core`` and ``lib.runtime``; torch is imported by the modules that need it,
not by this package.
"""
