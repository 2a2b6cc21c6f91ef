"""Bad infrastructure settings fail at load time (before any synth) with a message that names the key
and what is allowed."""

from __future__ import annotations

import pytest

from harness.bucket_names import bucket_name_problem
from harness.config import ConfigError
from infra import machines, settings

W = "topology.workers"


def fails(*overrides: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        settings.load(list(overrides))


def test_defaults_of_every_topology_are_valid():
    for topology in ("hybrid", "all_spot", "on_demand"):
        assert settings.load([f"topology={topology}"]).topology.name == topology


def test_zone_outside_the_region():
    fails("infra.zones=[us-central1-a,europe-west4-a]",
          match=r"infra.zones\[1\]='europe-west4-a' is outside infra.region='us-central1'; allowed: zones of "
                r"us-central1, e.g. us-central1-a")
    fails("infra.region=europe-west4", match=r"infra.zones\[0\]='us-central1-a' is outside infra.region='europe-west4'")


def test_min_above_max():
    fails(f"{W}.min=5", f"{W}.max=3",
          match=r"topology.workers.min=5 > topology.workers.max=3; allowed: 0 <= min <= max")
    fails("topology=all_spot", f"{W}.min=0", match=r"topology.workers.min=0 must be >= 1")


def test_a100_on_n1():
    fails(f"{W}.machine_type=n1-standard-8", f"{W}.gpu_type=nvidia-tesla-a100",
          match=r"topology.workers.gpu_type='nvidia-tesla-a100' cannot run on n1-standard-8; allowed: "
                r"nvidia-tesla-t4 x1,2,4; nvidia-tesla-v100 x1,2,4,8")


def test_h100_only_on_a3():
    fails(f"{W}.gpu_type=nvidia-h100-80gb", match=r"gpu_type='nvidia-h100-80gb' cannot run on a2-highgpu-1g; "
                                                  r"allowed: nvidia-tesla-a100 x1")
    fails(f"{W}.machine_type=g2-standard-8", f"{W}.gpu_type=nvidia-h100-80gb", match=r"allowed: nvidia-l4 x1")
    ok = settings.load([f"{W}.machine_type=a3-highgpu-8g", f"{W}.gpu_type=nvidia-h100-80gb", f"{W}.gpu_count=8",
                        f"{W}.local_ssd_count=16"])
    assert ok.topology.workers.machine_type == "a3-highgpu-8g"


def test_a100_80gb_needs_a2_ultra():
    # The guides' hybrid example pairs a2-highgpu-1g with nvidia-tesla-a100-80gb: not a real shape.
    fails(f"{W}.gpu_type=nvidia-a100-80gb", match=r"cannot run on a2-highgpu-1g")


def test_gpu_counts():
    fails(f"{W}.gpu_count=2", match=r"topology.workers.gpu_count=2 is not allowed for nvidia-tesla-a100 on "
                                    r"a2-highgpu-1g; allowed: nvidia-tesla-a100 x1")
    fails(f"{W}.machine_type=n1-standard-8", f"{W}.gpu_type=nvidia-tesla-t4", f"{W}.gpu_count=3",
          match=r"gpu_count=3 is not allowed for nvidia-tesla-t4")
    fails("topology.master.gpu_type=null", "topology.master.gpu_count=0",
          match=r"topology.master.gpu_count=0: a2-highgpu-1g has 1 nvidia-tesla-a100 built in")
    fails("topology=all_spot", "topology.master.gpu_type=nvidia-tesla-t4", "topology.master.gpu_count=1",
          match=r"topology.master.gpu_type='nvidia-tesla-t4' cannot run on e2-standard-2; allowed: none")


def test_local_ssd_counts():
    fails(f"{W}.local_ssd_count=3", match=r"topology.workers.local_ssd_count=3 is not allowed on a2-highgpu-1g; "
                                          r"allowed: 0, 1, 2, 4, 8")
    fails(f"{W}.machine_type=a3-highgpu-8g", f"{W}.gpu_type=nvidia-h100-80gb", f"{W}.gpu_count=8",
          match=r"local_ssd_count=1 is not allowed on a3-highgpu-8g; allowed: 16 \(attached automatically")
    fails(f"{W}.machine_type=n1-standard-8", f"{W}.gpu_type=nvidia-tesla-t4", f"{W}.local_ssd_count=9",
          match=r"allowed: 0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 24")
    fails("topology=all_spot", "topology.master.local_ssd_count=1", match=r"on e2-standard-2; allowed: 0$")


def test_unknown_machine_type():
    fails(f"{W}.machine_type=a9-megagpu-1g", match=r"topology.workers.machine_type='a9-megagpu-1g' is not in "
                                                   r"infra/machines.py; known: a2-highgpu")


@pytest.mark.parametrize(("name", "why"), [
    ("ab", "3-63 characters"),
    ("My_Bucket", "only lowercase letters"),
    ("-bucket", "only lowercase letters"),
    ("goog-checkpoints", "must not start with 'goog'"),
    ("my-google-bucket", "contain 'google'"),
    ("192.168.1.1", "not an IP address"),
    ("a" * 64, "3-63 characters"),
    ("a..b", "no '..'"),
])
def test_bucket_names_gcs_rejects(name, why):
    fails(f"infra.bucket.name={name}", match=rf"infra.bucket.name='{name}' is not a valid GCS bucket name: .*{why}")


def test_valid_bucket_names():
    for name in ("my-proj-spot-ckpt", "a.b.c", "x_1-2", "a" * 63):
        assert bucket_name_problem(name) is None


def test_closed_choices_name_the_allowed_values():
    fails("infra.instance_termination_action=KILL",
          match=r"infra.instance_termination_action='KILL' is not allowed; use one of: STOP, DELETE")
    fails(f"{W}.distribution=RANDOM", match=r"use one of: ANY_SINGLE_ZONE, BALANCED, ANY, EVEN")
    fails(f"{W}.provisioning=PREEMPTIBLE", match=r"use one of: SPOT, STANDARD")
    fails("topology.master.role=boss", match=r"use one of: trainer, rendezvous")


def test_other_checks():
    fails("infra.bucket.soft_delete_days=3", match=r"soft_delete_days=3 is not allowed; use 0 \(off\) or 7-90")
    fails("infra.alerts.emails=[not-an-email]", match=r"infra.alerts.emails\[0\]='not-an-email'")
    fails("infra.alerts.goodput_below=1.5", match=r"goodput_below=1.5 must be in \(0, 1\]")
    fails("infra.network.collective_ports=[70000]", match=r"collective_ports\[0\]='70000'")
    fails("infra.project=Bad_Project", match=r"infra.project='Bad_Project' is not valid")
    fails("infra.name=a-very-long-deployment-name", match=r"infra.name=.* is not valid: 2-20")
    fails("topology=all_spot", "topology.master.checkpoint_disk_gb=100",
          match=r"a rendezvous-only master keeps no checkpoints")
    fails("run.name=has space", match=r"run.name='has space' is not valid")
    fails("wandb.project=two words", match=r"override 'wandb.project=two words' holds whitespace")


def test_wrong_types_and_unknown_keys_name_the_key():
    fails(f"{W}.max=many", match=r"topology.workers.max")
    fails("+infra.nope=1", match=r"infra.nope")


def test_every_table_row_is_consistent():
    for name, shape in machines.SHAPES.items():
        assert shape.gpu_count > 0 and shape.local_ssds, name
        assert not shape.local_ssd_bundled or len(shape.local_ssds) == 1, name
