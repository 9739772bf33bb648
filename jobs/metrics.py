"""Cluster metrics of a named clustering, outside a pipeline (``lib.metrics.named``).

python -m jobs.metrics CLUSTER [KEY=VALUE ...]          all levels of CLUSTER
python -m jobs.metrics CLUSTER --sanity-check           compare with scikit-learn
python -m jobs.metrics --list                           the clusterings that exist
srun python -m jobs.metrics CLUSTER                     one rank per SLURM task
"""

from __future__ import annotations

import sys

from lib.config.compose import compose
from lib.metrics import named


def main(argv: list[str] | None = None) -> int:
    return named.main(argv, lambda overrides: compose(overrides, job_name="metrics"))


if __name__ == "__main__":
    sys.exit(main())
