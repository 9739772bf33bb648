"""The multi-host launchers: ``cluster=hosts`` (SSH machines) and ``cluster=tpu_vm`` (TPU
VM workers through ``gcloud``). ``commands`` builds every remote command and local argv
(pure, golden-tested); ``launcher`` schedules tasks onto the machines' slots."""
