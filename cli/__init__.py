"""The command line: ``launch.py`` runs ``cli.app.main``.

``app`` (argument routing, the Hydra app), ``run`` (validate, plan, save the run, hand it
to a launcher), ``commands`` (status/wait/logs/retry/cancel), ``status`` (what each task
is doing) and ``summary`` (the end-of-run summary). Imports ``launchers`` and ``lib``.
"""
