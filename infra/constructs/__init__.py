"""One construct per concern; infra/stacks.py composes them into a deployment."""
