"""The alerting rules (deploy/prometheus/alerts.yml): promtool's unit tests pass, and every alert has a case where
it fires and a case where it must not.

promtool comes from Debian's `prometheus` package, which CI installs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from . import ALERTS_FILE, alerting_rules, dashboard_queries, promtool, read_yaml

ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts.test.yml"
RUNBOOK = ALERTS_FILE.parents[1] / "README.md"


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_load_the_shipped_rules() -> None:
    (rule_file,) = read_yaml(ALERT_TESTS)["rule_files"]
    assert (ALERT_TESTS.parent / rule_file).resolve() == ALERTS_FILE


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, dict[str, int]] = defaultdict(lambda: {"firing": 0, "silent": 0})
    for test in read_yaml(ALERT_TESTS)["tests"]:
        for case in test.get("alert_rule_test", []):
            cases[case["alertname"]]["firing" if case["exp_alerts"] else "silent"] += 1
    alerts = alerting_rules()
    assert set(cases) <= set(alerts), f"tests of unknown alerts: {set(cases) - set(alerts)}"
    for name in alerts:
        assert cases[name]["firing"] >= 1, f"{name}: no case where it fires"
        assert cases[name]["silent"] >= 1, f"{name}: no case where it must stay silent"


def test_every_alert_has_a_severity_and_a_runbook_entry() -> None:
    """The runbook anchor each alert names is a heading of deploy/README.md (GitHub's anchor of `### Name`)."""
    anchors = {
        re.sub(r"[^\w-]", "", heading.strip().lower().replace(" ", "-"))
        for heading in re.findall(r"^#{2,4} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    }
    for name, rule in alerting_rules().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        document, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert document == "deploy/README.md" and anchor == name.lower(), name
        assert anchor in anchors, f"{name}: deploy/README.md has no heading '{name}'"


def _route_matchers() -> set[str]:
    """Every `route=~"..."` matcher of the alerts and of the dashboards' queries."""
    exprs = [rule["expr"] for rule in alerting_rules().values()] + [query.expr for query in dashboard_queries()]
    return {match for expr in exprs for match in re.findall(r'route=~"([^"]+)"', expr)}


def test_alerts_and_dashboards_watch_every_inference_route_of_every_protocol_and_nothing_else() -> None:
    """The route matcher of the request alerts and panels, against the routes of a real app (as the metrics label
    them: the route templates). Prometheus anchors regular expressions at both ends, as `re.fullmatch` does."""
    from service.api import create_app
    from service.model import load_model
    from service.routes import CLASSIFY_ROUTE
    from service.settings import DEFAULT_MODEL_DIR, Settings
    from service.v1_protocol import PREDICT_ROUTE
    from service.v2_protocol import INFER_PATHS

    (matcher,) = _route_matchers()  # one matcher, the same in every alert and panel
    app = create_app(Settings(), model=load_model(DEFAULT_MODEL_DIR, provider="cpu", shared_thread_pool=False))
    paths = {route.path for route in app.routes if hasattr(route, "methods")}
    watched = {path for path in paths if re.fullmatch(matcher, path)}
    inference = {CLASSIFY_ROUTE, PREDICT_ROUTE, *INFER_PATHS}
    assert inference <= paths
    assert watched == inference, f"inference routes the alerts watch: {sorted(watched)}; every route: {sorted(paths)}"
