"""Google Cloud infrastructure for Spot training: a CDKTF app driven by the Hydra config tree in conf/.
Entry point: `python -m infra synth|plan|deploy|destroy|cost` (the Makefile's infra targets)."""
