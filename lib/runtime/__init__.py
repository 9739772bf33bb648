"""A task at run time: its identity, rendezvous and stop/requeue, resolved by one
``TaskEnvironment`` per launcher (``environment``, ``slurm``); stop signals (``stop``);
the cores it may use (``cores``); and the runner every job entry point calls (``job``).

Imports ``lib.core``, ``lib.config`` and ``lib.plan``; ``job`` also loads the schema.
"""
