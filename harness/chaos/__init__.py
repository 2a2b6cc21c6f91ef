"""The local Spot cloud: a topology of simulated VMs on this machine that run the real startup scripts
and the harness under torchrun, preempted on a seeded schedule and recreated like a managed instance
group, with fake-gcs-server as the bucket. `python -m harness.chaos` runs it (see __main__.py)."""
