"""What to watch: descriptors of the harness's custom metrics (names imported from
harness/telemetry/metric_names.py), a log-based count of Spot preemptions from Compute Engine's
audit log, alert policies on goodput, preemption rate, stalled progress and absent progress, email
channels and a dashboard.

Two conditions watch progress because each misses what the other sees: "stalled" (the last step
stopped changing) needs somebody still writing the metric; "absent" fires when nobody writes it at
all (every worker preempted, no Spot capacity, the job crashed). Each policy's documentation names
the runbook step in the README ("When an alert fires") that handles it."""

from __future__ import annotations

import json
import re

from cdktf_cdktf_provider_google.logging_metric import LoggingMetric, LoggingMetricMetricDescriptor
from cdktf_cdktf_provider_google.monitoring_alert_policy import (
    MonitoringAlertPolicy,
    MonitoringAlertPolicyConditions,
    MonitoringAlertPolicyConditionsConditionAbsent,
    MonitoringAlertPolicyConditionsConditionAbsentAggregations,
    MonitoringAlertPolicyConditionsConditionPrometheusQueryLanguage,
    MonitoringAlertPolicyConditionsConditionThreshold,
    MonitoringAlertPolicyConditionsConditionThresholdAggregations,
    MonitoringAlertPolicyDocumentation,
)
from cdktf_cdktf_provider_google.monitoring_dashboard import MonitoringDashboard
from cdktf_cdktf_provider_google.monitoring_metric_descriptor import (
    MonitoringMetricDescriptor,
    MonitoringMetricDescriptorLabels,
)
from cdktf_cdktf_provider_google.monitoring_notification_channel import MonitoringNotificationChannel
from cdktf_cdktf_provider_time.sleep import Sleep
from constructs import Construct

from harness.telemetry import metric_names as mn
from infra.settings import Settings

# How the harness writes its metrics (harness/telemetry/monitoring_sink.py, telemetry.py): GAUGE
# series on the `global` resource, labelled with the run name as `job`. A descriptor must declare
# every label a write uses, and its value type must match.
RESOURCE = "global"
LABELS = {"job": "run.name of the training job"}
METRICS = {  # metric type -> (value type, unit, description)
    mn.GOODPUT: ("DOUBLE", "1", "Share of wall time spent on training steps that count"),
    mn.STEPS_PER_SECOND: ("DOUBLE", "1/s", "Training steps per second"),
    mn.PREEMPTIONS: ("INT64", "1", "Preemptions the job has seen"),
    mn.LAST_STEP: ("INT64", "1", "Last completed training step"),
    mn.CHECKPOINT_BLOCKING_SECONDS: ("DOUBLE", "s", "Seconds the training loop waited for a checkpoint"),
}


# The README's "When an alert fires" steps, by policy: what each alert's documentation points to.
RUNBOOK = {
    "goodput": "1. Goodput is low",
    "preemptions": "2. Too many preemptions",
    "stalled": "3. Training stalled",
    "absent": "4. No node reports progress",
}


def promql_name(metric_type: str) -> str:
    """A Cloud Monitoring metric type as a PromQL metric name: the first '/' becomes ':', every
    other character that is not a letter, digit or '_' becomes '_'."""
    domain, _, path = metric_type.partition("/")
    return re.sub(r"\W", "_", domain) + ":" + re.sub(r"\W", "_", path)


def _threshold(filter_: str, comparison: str, value: float, duration_s: int, period_s: int, aligner: str,
               reducer: str) -> MonitoringAlertPolicyConditionsConditionThreshold:
    return MonitoringAlertPolicyConditionsConditionThreshold(
        filter=filter_, comparison=comparison, threshold_value=value, duration=f"{duration_s}s",
        aggregations=[MonitoringAlertPolicyConditionsConditionThresholdAggregations(
            alignment_period=f"{period_s}s", per_series_aligner=aligner, cross_series_reducer=reducer)])


def _chart(title: str, filter_: str, aligner: str, reducer: str | None = None, period_s: int = 60) -> dict:
    aggregation = {"alignmentPeriod": f"{period_s}s", "perSeriesAligner": aligner}
    if reducer:
        aggregation["crossSeriesReducer"] = reducer
    return {"title": title, "xyChart": {"dataSets": [{
        "plotType": "LINE",
        "timeSeriesQuery": {"timeSeriesFilter": {"filter": filter_, "aggregation": aggregation}},
    }]}}


class Monitoring(Construct):
    def __init__(self, scope: Construct, id_: str, settings: Settings):
        super().__init__(scope, id_)
        i, a = settings.infra, settings.infra.alerts
        self._name = i.name
        descriptors = [
            MonitoringMetricDescriptor(
                self, f"metric-{metric_type.rsplit('/', 1)[-1]}", type=metric_type, metric_kind="GAUGE",
                value_type=value_type, unit=unit, description=description,
                display_name=metric_type.rsplit("/", 1)[-1].replace("_", " "),
                labels=[MonitoringMetricDescriptorLabels(key=k, value_type="STRING", description=d)
                        for k, d in LABELS.items()])
            for metric_type, (value_type, unit, description) in METRICS.items()]
        preemptions = LoggingMetric(
            self, "preemption-count", name=f"{i.name}-spot-preemptions",
            description="Spot preemptions of this deployment's VMs (Compute Engine system event audit log)",
            filter=" AND ".join([
                'resource.type="gce_instance"',
                f'logName="projects/{i.project}/logs/cloudaudit.googleapis.com%2Fsystem_event"',
                'protoPayload.methodName="compute.instances.preempted"',
                f'protoPayload.resourceName:"/instances/{i.name}-"']),
            metric_descriptor=LoggingMetricMetricDescriptor(metric_kind="DELTA", value_type="INT64", unit="1"))
        preemption_type = f"logging.googleapis.com/user/{preemptions.name}"
        # The alerting API cannot find a new log-based metric for up to 10 minutes (404 "Cannot find
        # metric(s)", terraform-provider-google#11102) and depends_on alone does not wait: a time_sleep
        # after the metric does, once, at its creation.
        preemptions_ready = [Sleep(self, "preemption-metric-visible", create_duration=f"{a.log_metric_wait_s}s",
                                   depends_on=[preemptions])] if a.log_metric_wait_s else [preemptions]
        self.channels = [
            MonitoringNotificationChannel(self, f"email-{n}", type="email", display_name=f"{i.name} alerts: {email}",
                                          labels={"email_address": email})
            for n, email in enumerate(a.emails)]

        job_filter = f'resource.type="{RESOURCE}" AND metric.type='
        self._policy("goodput", f"goodput below {a.goodput_below:g} for {a.goodput_window_min} min",
                     MonitoringAlertPolicyConditions(
                         display_name="goodput", condition_threshold=_threshold(
                             f'{job_filter}"{mn.GOODPUT}"', "COMPARISON_LT", a.goodput_below,
                             a.goodput_window_min * 60, 60, "ALIGN_MEAN", "REDUCE_MEAN")),
                     "Training spends too little time on steps that count: frequent preemptions, slow "
                     "restores or checkpoints. Check the preemption chart and the job's ledger.", descriptors)
        self._policy("preemptions", f"more than {a.preemptions_per_hour} Spot preemptions per hour",
                     MonitoringAlertPolicyConditions(
                         display_name="preemptions", condition_threshold=_threshold(
                             f'resource.type="gce_instance" AND metric.type="{preemption_type}"', "COMPARISON_GT",
                             a.preemptions_per_hour, 0, 3600, "ALIGN_SUM", "REDUCE_SUM")),
                     "Spot capacity is scarce here: consider more zones (topology.workers.distribution), "
                     "another region, or the hybrid topology.", preemptions_ready)
        step = f'{promql_name(mn.LAST_STEP)}{{monitored_resource="{RESOURCE}"}}'
        self._policy("stalled", f"no training progress for {a.stall_min} min",
                     MonitoringAlertPolicyConditions(
                         display_name="stalled",
                         condition_prometheus_query_language=MonitoringAlertPolicyConditionsConditionPrometheusQueryLanguage(
                             query=f"changes({step}[{a.stall_min}m]) < 1", duration="0s",
                             evaluation_interval="60s")),
                     "The last completed step has not changed: the job is stuck (rendezvous waiting for "
                     "nodes, a hung collective) or cannot get capacity.", descriptors)
        self._policy("absent", f"no training steps reported for {a.absent_min} min",
                     MonitoringAlertPolicyConditions(
                         display_name="absent", condition_absent=MonitoringAlertPolicyConditionsConditionAbsent(
                             filter=f'{job_filter}"{mn.LAST_STEP}"', duration=f"{a.absent_min * 60}s",
                             aggregations=[MonitoringAlertPolicyConditionsConditionAbsentAggregations(
                                 alignment_period="300s", per_series_aligner="ALIGN_MAX",
                                 cross_series_reducer="REDUCE_MAX")])),
                     "No node writes the last-step metric any more: every worker is preempted and none "
                     "came back (no Spot capacity), the job crashed on every node, or it finished.", descriptors)

        nodes = (f'metric.type="compute.googleapis.com/instance_group/size" resource.type="instance_group" '
                 f'resource.label.instance_group_name=starts_with("{i.name}-")')
        tiles = [
            _chart("Goodput", f'metric.type="{mn.GOODPUT}" resource.type="{RESOURCE}"', "ALIGN_MEAN"),
            _chart("Steps per second", f'metric.type="{mn.STEPS_PER_SECOND}" resource.type="{RESOURCE}"',
                   "ALIGN_MEAN"),
            _chart("Spot preemptions (per 10 min)", f'metric.type="{preemption_type}" resource.type="gce_instance"',
                   "ALIGN_SUM", "REDUCE_SUM", 600),
            _chart("Nodes per instance group", nodes, "ALIGN_MEAN"),
        ]
        self.dashboard = MonitoringDashboard(self, "dashboard", dashboard_json=json.dumps({
            "displayName": f"{i.name}: Spot training",
            "mosaicLayout": {"columns": 12, "tiles": [
                {"xPos": 6 * (n % 2), "yPos": 4 * (n // 2), "width": 6, "height": 4, "widget": widget}
                for n, widget in enumerate(tiles)]},
        }))

    def _policy(self, id_: str, title: str, condition: MonitoringAlertPolicyConditions, runbook: str,
                depends_on: list) -> None:
        content = (f"{runbook}\n\nRunbook: README, Deploy to Google Cloud > When an alert fires, step "
                   f"\"{RUNBOOK[id_]}\". The job's log: `make logs ARGS=\"run.name=<run>\"`.")
        MonitoringAlertPolicy(
            self, f"alert-{id_}", display_name=f"{self._name}: {title}", combiner="OR", conditions=[condition],
            notification_channels=[c.id for c in self.channels], severity="WARNING",
            documentation=MonitoringAlertPolicyDocumentation(content=content, mime_type="text/markdown"),
            depends_on=depends_on)
