"""Sweeps and ablations: one Hydra multirun becomes many jobs, each an ordinary, exact run.

    make sweep ARGS="optim.lr=1e-3,3e-4 model.n_layer=2,4"          # 4 jobs here, one after another
    make sweep ARGS="... sweep.on=chaos sweep.parallel=2"            # on the local Spot cloud, preempted
    make deploy ARGS="--multirun infra.project=P optim.lr=1e-3,3e-4"  # one deployment, a Spot MIG per job
    make sweep-status ARGS="sweep.on=gcp infra.project=P optim.lr=1e-3,3e-4"

- jobs.py    the overrides -> Hydra's parser and basic sweeper -> named, numbered, checked jobs
- runner.py  runs them on this machine (local or the local Spot cloud), parallel within max_concurrent
- results.py each job's state from its durable tier -> `<sweep.root>/<sweep>/sweep.json` and the table
- queue.py   on GCP: which jobs hold VMs, decided by each finishing job's rank 0 (the job's end)
- plan.py    `make cost-plan` of a sweep: every job all-Spot vs on-demand, and the total

Nothing here imports torch; `harness/job_end.py` calls `queue.advance` at every job's end.
"""
