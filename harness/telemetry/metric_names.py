"""Cloud Monitoring metric types written by the harness; infra/ imports these for alerts and the
dashboard, so a name is defined exactly once."""

PREFIX = "custom.googleapis.com/spot_training"

GOODPUT = f"{PREFIX}/goodput"
STEPS_PER_SECOND = f"{PREFIX}/steps_per_second"
PREEMPTIONS = f"{PREFIX}/preemptions"
LAST_STEP = f"{PREFIX}/last_completed_step"
CHECKPOINT_BLOCKING_SECONDS = f"{PREFIX}/checkpoint_blocking_seconds"

ALL = (GOODPUT, STEPS_PER_SECOND, PREEMPTIONS, LAST_STEP, CHECKPOINT_BLOCKING_SECONDS)
