"""Tests of the deployment files (Dockerfile, compose, Prometheus, Grafana), and the readers they share."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_FILE = PROMETHEUS_DIR / "rules.yml"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

# Grafana's built-in interval variables, and what stands in for them when a query runs outside Grafana. One
# minute is what the recording rules use and spans many scrapes at any interval the stack or the tests use.
_GRAFANA_INTERVAL = re.compile(r"\$(?:__(?:rate_interval|interval|range)\b|\{__(?:rate_interval|interval|range)\})")
GRAFANA_INTERVAL_STANDIN = "1m"
# The dashboard's own query variables (job, model, instance), always used as `label=~"$name"`: with every value
# selected, what Grafana sends matches any value, and so does this stand-in.
DASHBOARD_VARIABLES = ("job", "model", "instance")
_DASHBOARD_VARIABLE = re.compile(
    r"\$(?:(" + "|".join(DASHBOARD_VARIABLES) + r")\b|\{(" + "|".join(DASHBOARD_VARIABLES) + r")\})"
)
DASHBOARD_VARIABLE_STANDIN = ".+"


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL expression of a dashboard panel, with Grafana's variables replaced."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref_id}: {self.expr}"


def read_yaml(path: Path) -> Any:
    """A plain YAML file (no custom tags)."""
    return yaml.safe_load(path.read_text())


def read_dashboard(path: Path) -> dict[str, Any]:
    """A Grafana dashboard JSON file."""
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those nested in collapsed rows included; rows themselves (headers that show no
    data) are not panels here."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") != "row":
            found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def substitute_grafana_variables(expr: str) -> str:
    """``expr`` with Grafana's interval variables replaced by a fixed window, and the dashboard's own variables by
    a regex that matches every value (all selected), as Prometheus itself needs it."""
    return _DASHBOARD_VARIABLE.sub(DASHBOARD_VARIABLE_STANDIN, _GRAFANA_INTERVAL.sub(GRAFANA_INTERVAL_STANDIN, expr))


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Template variable name -> its definition."""
    return {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}


def variable_selectors(dashboard: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """For each ``label_values(selector, label)`` query variable: (selector ready for Prometheus, label)."""
    found = {}
    for name, variable in dashboard_variables(dashboard).items():
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"].strip())
        assert match, f"{name}: {variable['query']}"
        found[name] = (substitute_grafana_variables(match.group(1)), match.group(2))
    return found


def dashboard_queries() -> list[PanelQuery]:
    """Every PromQL expression in the provisioned dashboards, ready to send to Prometheus."""
    queries = []
    for path in DASHBOARD_FILES:
        for panel in panels(read_dashboard(path)):
            for target in panel.get("targets", []):
                queries.append(
                    PanelQuery(path.name, panel.get("title", "?"), target.get("refId", "?"), target.get("expr", ""))
                )
    return [PanelQuery(q.dashboard, q.panel, q.ref_id, substitute_grafana_variables(q.expr)) for q in queries]


def recording_rules() -> dict[str, str]:
    """Recorded series name -> PromQL expression, for every recording rule in rules.yml."""
    rules = {}
    for group in read_yaml(RULES_FILE)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                rules[rule["record"]] = rule["expr"]
    return rules


def alerting_rules() -> dict[str, dict[str, Any]]:
    """Alert name -> its rule, for every alerting rule in alerts.yml."""
    return {rule["alert"]: rule for group in read_yaml(ALERTS_FILE)["groups"] for rule in group["rules"]}


def unhealthy_rules(groups: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(name, health, last error) of every rule that Prometheus's /api/v1/rules reports not healthy. A rule not
    yet evaluated counts only in a group evaluated at least once a minute: the drift alert's group runs every
    minute, and a test may ask before its first evaluation."""
    return [
        (rule["name"], rule["health"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok" and not (rule["health"] == "unknown" and group["interval"] >= 60)
    ]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (the `prometheus` package, which CI installs); skips the test where it is absent."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package (CI does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def provisioned_datasource() -> dict[str, Any]:
    """The single data source that Grafana provisioning creates."""
    (datasource,) = read_yaml(DATASOURCES_FILE)["datasources"]
    return datasource
