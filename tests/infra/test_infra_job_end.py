"""The job's end in the synthesized stack: every training VM is told its instance groups through one
metadata key, and may resize exactly those groups, with one permission and nothing else."""

from __future__ import annotations

import pytest

from harness import job_end
from infra import vm
from tests.infra.conftest import PROJECT, TOPOLOGIES


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_training_vms_know_their_groups_and_may_resize_only_them(topologies, topology):
    s = topologies[topology]
    workers = s.one("google_compute_region_instance_group_manager")
    master = s.one("google_compute_instance_group_manager")
    expected = [f"projects/{PROJECT}/regions/{workers['region']}/instanceGroupManagers/{workers['name']}",
                f"projects/{PROJECT}/zones/{master['zone']}/instanceGroupManagers/{master['name']}"]
    assert list(vm.group_paths(s.settings).values()) == expected, "one definition of the names"
    trainers = ["worker", "master"] if s.settings.master_trains else ["worker"]
    for role in trainers:
        assert job_end.parse_groups(s.template(role)["metadata"][job_end.GROUPS_KEY]) == expected
    if not s.settings.master_trains:
        assert job_end.GROUPS_KEY not in s.template("coordinator")["metadata"], "the coordinator trains nothing"

    role = s.one("google_project_iam_custom_role")
    assert role["permissions"] == [job_end.RESIZE_PERMISSION] and role["role_id"] == "spotTrainResizeGroups"
    grant = next(m for m in s.resources("google_project_iam_member").values()
                 if m["role"] == f"${{{s.ref(role, 'google_project_iam_custom_role')}.name}}")
    assert "iam_trainer" in grant["member"]
    assert grant["condition"]["expression"] == " || ".join(
        f'resource.name.endsWith("/{path.split("/", 2)[2]}")' for path in expected)
    # Every instance group depends on the grant, so no VM boots before it may stop its groups.
    grant_ref = f"{s.ref(grant, 'google_project_iam_member')}"
    assert grant_ref in workers["depends_on"] and grant_ref in master["depends_on"]
