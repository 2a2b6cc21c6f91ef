"""A dedicated VPC: nodes have no external IP (Cloud NAT for egress, Private Google Access for Google
APIs) and accept only what the job needs: training nodes from each other on the rendezvous and
collective ports, health checks on the port they probe, SSH through IAP. Rules target service
accounts rather than tags, since any instance admin can set a tag."""

from __future__ import annotations

from cdktf_cdktf_provider_google.compute_firewall import ComputeFirewall, ComputeFirewallAllow
from cdktf_cdktf_provider_google.compute_network import ComputeNetwork
from cdktf_cdktf_provider_google.compute_router import ComputeRouter
from cdktf_cdktf_provider_google.compute_router_nat import (
    ComputeRouterNat,
    ComputeRouterNatLogConfig,
    ComputeRouterNatSubnetwork,
)
from cdktf_cdktf_provider_google.compute_subnetwork import ComputeSubnetwork, ComputeSubnetworkLogConfig
from constructs import Construct

from infra.constructs.iam import Identities
from infra.settings import Settings

# cloud.google.com/iap/docs/using-tcp-forwarding: the range IAP TCP forwarding connects from.
IAP_RANGE = "35.235.240.0/20"
# cloud.google.com/load-balancing/docs/health-check-concepts#ip-ranges: health check probers.
HEALTH_CHECK_RANGES = ["35.191.0.0/16", "130.211.0.0/22"]


class Network(Construct):
    def __init__(self, scope: Construct, id_: str, settings: Settings, identities: Identities):
        super().__init__(scope, id_)
        i = settings.infra
        self._name = i.name
        self.vpc = ComputeNetwork(self, "vpc", name=f"{i.name}-vpc", auto_create_subnetworks=False,
                                  routing_mode="REGIONAL")
        self.subnet = ComputeSubnetwork(
            self, "subnet", name=f"{i.name}-{i.region}", network=self.vpc.id, region=i.region,
            ip_cidr_range=i.network.cidr, private_ip_google_access=True,
            log_config=ComputeSubnetworkLogConfig(aggregation_interval="INTERVAL_10_MIN", flow_sampling=0.5,
                                                  metadata="INCLUDE_ALL_METADATA"))
        router = ComputeRouter(self, "router", name=f"{i.name}-router", network=self.vpc.id, region=i.region)
        ComputeRouterNat(
            self, "nat", name=f"{i.name}-nat", router=router.name, region=i.region,
            nat_ip_allocate_option="AUTO_ONLY", source_subnetwork_ip_ranges_to_nat="LIST_OF_SUBNETWORKS",
            subnetwork=[ComputeRouterNatSubnetwork(name=self.subnet.id, source_ip_ranges_to_nat=["ALL_IP_RANGES"])],
            log_config=ComputeRouterNatLogConfig(enable=True, filter="ERRORS_ONLY"))

        trainer = [identities.trainer.email]
        rdzv = str(settings.rdzv_port)
        self._allow("allow-collective", "Training nodes to each other: rendezvous and NCCL/gloo collectives",
                    [rdzv, *i.network.collective_ports], trainer, sources=trainer)
        self._allow("allow-health-checks", "Health check probers to the harness's /healthz port",
                    [str(settings.health_port)], trainer, source_ranges=HEALTH_CHECK_RANGES)
        if identities.coordinator is not None:
            coordinator = [identities.coordinator.email]
            self._allow("allow-rendezvous", "Training nodes to the coordinator's rendezvous store",
                        [rdzv], coordinator, sources=trainer)
            self._allow("allow-health-checks-rdzv", "Health check probers to the coordinator's store port",
                        [rdzv], coordinator, source_ranges=HEALTH_CHECK_RANGES)
        self._allow("allow-iap-ssh", "SSH through IAP TCP forwarding only", ["22"],
                    [a.email for a in identities.accounts], source_ranges=[IAP_RANGE])

    def _allow(self, id_: str, description: str, ports: list[str], targets: list[str], *,
               sources: list[str] | None = None, source_ranges: list[str] | None = None) -> None:
        """An ingress rule allowing TCP `ports` to instances running as `targets` (service accounts)
        from instances running as `sources`, or from `source_ranges`."""
        ComputeFirewall(self, id_, name=f"{self._name}-{id_}", network=self.vpc.id, direction="INGRESS",
                        description=description, allow=[ComputeFirewallAllow(protocol="tcp", ports=ports)],
                        source_service_accounts=sources, source_ranges=source_ranges,
                        target_service_accounts=targets)
