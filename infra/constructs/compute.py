"""The nodes: instance templates, the worker MIG (regional, Spot or on-demand) and the master as a
size-1 MIG with a fixed name and internal IP, so the rendezvous endpoint never changes.

- Autohealing: trainers on an HTTP check of the harness's GET /healthz, the rendezvous-only
  coordinator on a TCP check of its store port.
- Updates never restart a running job: OPPORTUNISTIC updates, no proactive redistribution; a new
  template reaches a VM only when the MIG recreates it anyway (preemption, repair).
- A preempted Spot worker is recreated by its MIG (termination action DELETE) or restarted (STOP).
- The master's checkpoint disk is a stateful disk: it survives autohealing and recreation, and is
  deleted only with the MIG (`make destroy`).
- In a sweep (infra/sweep.py) there is one Compute per job: `workers_size` is the worker group's size
  at creation (0 for a queued job), after which the sweep's queue owns it (Terraform ignores its
  target size: a job's end and the next job's start resize it), and `trainer_metadata` (the queue)
  goes into the templates of the nodes that train.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf import TerraformResourceLifecycle
from cdktf_cdktf_provider_google.compute_address import ComputeAddress
from cdktf_cdktf_provider_google.compute_health_check import (
    ComputeHealthCheck,
    ComputeHealthCheckHttpHealthCheck,
    ComputeHealthCheckTcpHealthCheck,
)
from cdktf_cdktf_provider_google.compute_instance_group_manager import (
    ComputeInstanceGroupManager,
    ComputeInstanceGroupManagerAutoHealingPolicies,
    ComputeInstanceGroupManagerInstanceLifecyclePolicy,
    ComputeInstanceGroupManagerStatefulDisk,
    ComputeInstanceGroupManagerUpdatePolicy,
    ComputeInstanceGroupManagerVersion,
)
from cdktf_cdktf_provider_google.compute_instance_template import (
    ComputeInstanceTemplate,
    ComputeInstanceTemplateDisk,
    ComputeInstanceTemplateGuestAccelerator,
    ComputeInstanceTemplateNetworkInterface,
    ComputeInstanceTemplateScheduling,
    ComputeInstanceTemplateServiceAccount,
    ComputeInstanceTemplateShieldedInstanceConfig,
)
from cdktf_cdktf_provider_google.compute_per_instance_config import (
    ComputePerInstanceConfig,
    ComputePerInstanceConfigPreservedState,
    ComputePerInstanceConfigPreservedStateInternalIp,
    ComputePerInstanceConfigPreservedStateInternalIpIpAddress,
)
from cdktf_cdktf_provider_google.compute_region_instance_group_manager import (
    ComputeRegionInstanceGroupManager,
    ComputeRegionInstanceGroupManagerAutoHealingPolicies,
    ComputeRegionInstanceGroupManagerInstanceLifecyclePolicy,
    ComputeRegionInstanceGroupManagerNamedPort,
    ComputeRegionInstanceGroupManagerUpdatePolicy,
    ComputeRegionInstanceGroupManagerVersion,
)
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from constructs import Construct

from infra import machines, vm
from infra.constructs.iam import Identities
from infra.constructs.network import Network
from infra.settings import Settings

LOCAL_SSD_GB = 375


@dataclass(frozen=True)
class Role:
    """A kind of node (infra/vm.py's Group, shared with the local Spot cloud) and its service account."""

    group: vm.Group
    account: str  # service account email


class Compute(Construct):
    def __init__(self, scope: Construct, id_: str, settings: Settings, network: Network, identities: Identities,
                 bucket: StorageBucket, scripts: dict[str, str], release: str, *, workers_size: int | None = None,
                 trainer_metadata: dict[str, str] | None = None):
        super().__init__(scope, id_)
        self._s, self._network = settings, network
        self._workers_size, self._trainer_metadata = workers_size, dict(trainer_metadata or {})
        self._bindings = identities.bindings
        i = settings.infra
        self.rdzv_address = ComputeAddress(self, "rdzv-address", name=f"{i.name}-rdzv", address_type="INTERNAL",
                                           subnetwork=network.subnet.id, region=i.region)
        self.rdzv_endpoint = f"{self.rdzv_address.address}:{settings.rdzv_port}"
        self._vm = {"scripts": scripts, "rdzv_endpoint": self.rdzv_endpoint, "bucket": bucket.name, "release": release}
        trainer = identities.trainer.email
        healthz = ComputeHealthCheck(
            self, "healthz", name=f"{i.name}-healthz", **self._probe_timing(),
            http_health_check=ComputeHealthCheckHttpHealthCheck(port=settings.health_port, request_path="/healthz"))

        master_group, worker_group = vm.groups(settings)
        if settings.master_trains:
            master = Role(master_group, trainer)
            master_check = healthz
        else:
            assert identities.coordinator is not None
            master = Role(master_group, identities.coordinator.email)
            master_check = ComputeHealthCheck(
                self, "rdzv-check", name=f"{i.name}-rdzv-tcp", **self._probe_timing(),
                tcp_health_check=ComputeHealthCheckTcpHealthCheck(port=settings.rdzv_port))
        self.master_mig = self._master_group(master, master_check)
        self.worker_mig = self._worker_group(Role(worker_group, trainer), healthz)

    def _probe_timing(self) -> dict[str, int]:
        h = self._s.infra.health_check
        return {"check_interval_sec": h.interval_s, "timeout_sec": h.timeout_s, "healthy_threshold": 2,
                "unhealthy_threshold": h.unhealthy_threshold}

    def _template(self, role: Role) -> ComputeInstanceTemplate:
        """The one instance template shape: no external IP, Shielded VM, OS Login, GPUs as guest
        accelerators, Local SSD scratch, the job in metadata."""
        i, group = self._s.infra, role.group
        node = group.node
        shape = machines.shape(node.machine_type)
        assert shape is not None  # settings.validate checked it
        disks = [ComputeInstanceTemplateDisk(boot=True, auto_delete=True, source_image=i.image.self_link,
                                             disk_size_gb=i.boot_disk_gb, disk_type="pd-balanced")]
        if not shape.local_ssd_bundled:  # A2 Ultra and A3 attach theirs automatically
            # No device names: the guest names NVMe Local SSDs google-local-nvme-ssd-N, which startup.sh globs.
            disks += [ComputeInstanceTemplateDisk(type="SCRATCH", disk_type="local-ssd", interface="NVME",
                                                  disk_size_gb=LOCAL_SSD_GB, auto_delete=True)
                      for _ in range(node.local_ssd_count)]
        if group.checkpoint_disk_gb:
            disks.append(ComputeInstanceTemplateDisk(type="PERSISTENT", disk_type="pd-balanced", boot=False,
                                                     auto_delete=True, device_name=vm.PD_DEVICE,
                                                     disk_size_gb=group.checkpoint_disk_gb))
        gpu = bool(node.gpu_count)
        return ComputeInstanceTemplate(
            self, f"{group.role}-template", name_prefix=f"{i.name}-{group.role}-", machine_type=node.machine_type,
            labels={"role": group.role}, disk=disks,
            metadata=vm.metadata(self._s, group, **self._vm,
                                 extra=self._trainer_metadata if group.role != "coordinator" else None),
            guest_accelerator=[ComputeInstanceTemplateGuestAccelerator(type=node.gpu_type, count=node.gpu_count)]
            if gpu else None,
            scheduling=ComputeInstanceTemplateScheduling(
                provisioning_model="SPOT" if group.spot else "STANDARD", preemptible=group.spot,
                automatic_restart=not group.spot,
                # GPU and Spot VMs cannot live-migrate; a CPU coordinator can, and keeps the store up.
                on_host_maintenance="TERMINATE" if group.spot or gpu else "MIGRATE",
                instance_termination_action=i.instance_termination_action if group.spot else None),
            network_interface=[ComputeInstanceTemplateNetworkInterface(
                subnetwork=self._network.subnet.id, nic_type="GVNIC" if shape.gvnic else None)],
            service_account=ComputeInstanceTemplateServiceAccount(email=role.account, scopes=["cloud-platform"]),
            shielded_instance_config=ComputeInstanceTemplateShieldedInstanceConfig(
                enable_secure_boot=i.secure_boot, enable_vtpm=True, enable_integrity_monitoring=True),
            lifecycle=TerraformResourceLifecycle(create_before_destroy=True))

    def _master_group(self, role: Role, check: ComputeHealthCheck) -> ComputeInstanceGroupManager:
        """A zonal MIG holding one named instance with the reserved internal IP. Its target size is
        left to the per-instance config, which adds the instance (terraform-provider-google#15911)."""
        i = self._s.infra
        zone, name = i.zones[0], vm.group_name(self._s, role.group)
        mig = ComputeInstanceGroupManager(
            self, "master", name=name, base_instance_name=name, zone=zone,
            version=[ComputeInstanceGroupManagerVersion(instance_template=self._template(role).id, name="primary")],
            target_size=0, lifecycle=TerraformResourceLifecycle(ignore_changes=["target_size"]),
            auto_healing_policies=ComputeInstanceGroupManagerAutoHealingPolicies(
                health_check=check.id, initial_delay_sec=i.health_check.initial_delay_s),
            update_policy=ComputeInstanceGroupManagerUpdatePolicy(
                type="OPPORTUNISTIC", minimal_action="REPLACE", most_disruptive_allowed_action="REPLACE",
                max_surge_fixed=0, max_unavailable_fixed=1, replacement_method="RECREATE"),
            instance_lifecycle_policy=ComputeInstanceGroupManagerInstanceLifecyclePolicy(
                default_action_on_failure="REPAIR", force_update_on_repair="YES"),
            stateful_disk=[ComputeInstanceGroupManagerStatefulDisk(
                device_name=vm.PD_DEVICE, delete_rule="ON_PERMANENT_INSTANCE_DELETION")]
            if role.group.checkpoint_disk_gb else None,
            wait_for_instances=False, depends_on=self._bindings)
        ComputePerInstanceConfig(
            self, "master-instance", zone=zone, instance_group_manager=mig.name, name=name,
            remove_instance_on_destroy=True, depends_on=self._bindings,
            preserved_state=ComputePerInstanceConfigPreservedState(internal_ip=[
                ComputePerInstanceConfigPreservedStateInternalIp(
                    interface_name="nic0", auto_delete="NEVER",
                    ip_address=ComputePerInstanceConfigPreservedStateInternalIpIpAddress(
                        address=self.rdzv_address.id))]))
        return mig

    def _worker_group(self, role: Role, check: ComputeHealthCheck) -> ComputeRegionInstanceGroupManager:
        """A regional MIG over the worker zones that keeps the group's size (topology.workers.max) asked for."""
        i, w = self._s.infra, self._s.topology.workers
        zones = self._s.worker_zones()
        return ComputeRegionInstanceGroupManager(
            self, "workers", name=vm.group_name(self._s, role.group), base_instance_name=f"{i.name}-worker",
            region=i.region,
            version=[ComputeRegionInstanceGroupManagerVersion(instance_template=self._template(role).id,
                                                              name="primary")],
            target_size=role.group.size if self._workers_size is None else self._workers_size,
            lifecycle=None if self._workers_size is None
            else TerraformResourceLifecycle(ignore_changes=["target_size"]),
            distribution_policy_zones=zones,
            distribution_policy_target_shape=w.distribution,
            auto_healing_policies=ComputeRegionInstanceGroupManagerAutoHealingPolicies(
                health_check=check.id, initial_delay_sec=i.health_check.initial_delay_s),
            update_policy=ComputeRegionInstanceGroupManagerUpdatePolicy(
                type="OPPORTUNISTIC", minimal_action="REPLACE", most_disruptive_allowed_action="REPLACE",
                instance_redistribution_type="NONE", max_surge_fixed=0, max_unavailable_fixed=len(zones)),
            instance_lifecycle_policy=ComputeRegionInstanceGroupManagerInstanceLifecyclePolicy(
                default_action_on_failure="REPAIR", force_update_on_repair="YES"),
            named_port=[ComputeRegionInstanceGroupManagerNamedPort(name="healthz", port=self._s.health_port)],
            wait_for_instances=False, depends_on=self._bindings)


