"""The SLURM launcher: ``launcher`` (submit a plan), ``render`` (sbatch scripts from
``slurm_templates/``), ``queue`` (sbatch/squeue/sacct and the run's submissions) and
``resources`` (per-stage resources and node layouts). Imports ``launchers.base`` and
``lib``; the submitit launcher reuses ``queue`` and ``resources``."""
