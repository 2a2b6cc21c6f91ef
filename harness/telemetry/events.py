"""Ledger event kinds: one name per thing that happens to a job, shared by the writers (the train loop,
through `Telemetry`) and the reader (`goodput.breakdown`)."""

JOB_START = "job_start"  # first incarnation only: wandb_run_id, prices, config digest
# t is the process's own start time: pid, world_size, launched (when the launcher or torchrun started
# this round, when known: startup counts from there); durable before it trains
PROCESS_START = "process_start"
RENDEZVOUS_DONE = "rendezvous_done"  # the process group is up: seconds (in init_process_group, ending at t)
RESTORE_START = "restore_start"
RESTORE_END = "restore_end"  # step restored
FIRST_STEP = "first_step"  # this incarnation's first completed step: step, seconds (its step time)
STEPS = "steps"  # a range of completed steps: first, last, seconds (step time spent on them)
CKPT_BLOCK = "ckpt_block"  # training blocked by a periodic checkpoint: step, seconds (ends at t), snapshot_bytes
PREEMPTION_NOTICE = "preemption_notice"  # source, step
EMERGENCY_SAVE = "emergency_save"  # step, seconds (ends at t), tier
EXIT = "exit"  # code
HEARTBEAT = "heartbeat"  # written by an idle flush, so a live but quiet process does not look dead
TELEMETRY_ERROR = "telemetry_error"  # sink, error, count
INTERVAL_CHANGE = "interval_change"  # interval_steps, previous, blocking_s, step_time_s, mtbi_s

# The launcher's word to its trainers: when it started the current round (a wall-clock time), which is
# when the node's startup began (process_start's `launched`).
LAUNCHED_ENV = "SPOT_LAUNCHED_AT"
