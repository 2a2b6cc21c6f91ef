"""The training harness: everything that runs on a training VM."""
