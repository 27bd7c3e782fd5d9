"""``python -m service``: load the model folder (or the model repository), then serve it with uvicorn until
SIGTERM/SIGINT (SIGHUP rescans the repository: `service.reload_signal`).

Exit status: 0 after a graceful shutdown, 1 when the model cannot be served or the server cannot start, 2 for
invalid settings, 3 when the shutdown timeout cut requests off (they were answered 503). Start-up problems are one
line on stderr, not a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from export.manifest import ManifestError, folder_digest
from service.admin_auth import required_token
from service.api import create_app
from service.cpu_quota import available_cpus, cgroup_cpu_limit
from service.cuda_info import read_cuda_info
from service.errors import ModelLoadError
from service.model import CUDA, cuda_build_version, requested_providers
from service.request_context import RequestContextFilter
from service.server import EXIT_CUT, build_server
from service.settings import Settings

logger = logging.getLogger("service")


def _settings_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "settings"
        problems.append(f"{name} ({'RIDE_' + name.upper()}): {item['msg']}")
    return "; ".join(problems)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s trace_id=%(trace_id)s: %(message)s"


def _configure_logging(level: str) -> None:
    """One handler for every logger, uvicorn's included (`service.server` gives uvicorn no configuration of its
    own): each line names the request it was written for (`service.request_context`), ``-`` outside one."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestContextFilter())


def _keep_exit_status_zero(signum: int, frame: object) -> None:
    # uvicorn re-raises the signal it handled once its graceful shutdown is over, through the handler that was
    # installed before it started: this one, so that a requested shutdown ends with status 0, not -SIGTERM.
    logger.info("shutdown after signal %d complete", signum)


def _threads_note(intra_op_threads: int) -> str:
    quota = cgroup_cpu_limit()
    threads = "onnxruntime's choice (one per physical core)" if intra_op_threads == 0 else str(intra_op_threads)
    return (
        f"intra-op threads: {threads} (CPUs this process may use: {available_cpus()}; cgroup CPU quota: "
        f"{'none' if quota is None else f'{quota:g}'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the process exit status."""
    try:
        settings = Settings.from_cli(sys.argv[1:] if argv is None else argv)
    except ValidationError as error:
        print(f"error: invalid settings: {_settings_error(error)}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    source = settings.model_repository if settings.model_repository is not None else settings.model_dir
    what = "model repository" if settings.model_repository is not None else "model folder"
    if not source.is_dir():
        hint = (
            "point --model-repository (RIDE_MODEL_REPOSITORY) at a folder of <name>/<version>/ model folders"
            if settings.model_repository is not None
            else "export one with `python -m export` or point --model-dir (RIDE_MODEL_DIR) at one"
        )
        print(f"error: {what} {source} does not exist: {hint}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings)
    except (ModelLoadError, ManifestError) as error:
        print(f"error: cannot serve {what} {source}: {error}", file=sys.stderr)
        return 1
    state = app.state.service
    for served in state.table.all_versions():
        manifest = served.model.manifest
        logger.info(
            "serving %s version %s (%d experts, routers: %s) from %s (digest %s%s) with provider %s, %s",
            served.name,
            served.version,
            manifest.cascade.num_experts,
            manifest.cascade.has_routers,
            served.model.folder,
            folder_digest(served.model.folder),
            ", pinned" if settings.model_sha256 else "; pin it with RIDE_MODEL_SHA256",
            served.model.provider,
            _threads_note(settings.threads_for(CUDA in requested_providers(settings.provider))),
        )
        serving = served.operating.serving
        expected = f", validation compute {serving.point.relative_compute:.3f}" if serving.point is not None else ""
        logger.info("serving threshold %.6g (from %s%s)", serving.threshold, serving.source, expected)
    logger.info("default model (the unnamed routes): %s", state.table.default_name)
    if settings.admin_routes:
        if required_token(settings) is None:
            logger.warning(
                "admin routes are on (RIDE_ADMIN_ROUTES) without a token: anyone who reaches %s:%d may load and "
                "unload models and move the operating point; set RIDE_ADMIN_TOKEN (or RIDE_API_KEY)",
                settings.host,
                settings.port,
            )
        else:
            logger.info("admin routes are on, behind the bearer token")
    if any(served.model.provider == CUDA for served in state.table.all_versions()):
        logger.info("CUDA: %s", read_cuda_info(cuda_build_version()).describe())
    server = build_server(app, settings)
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, _keep_exit_status_zero)
    try:
        server.run()
    except SystemExit as stop:
        # uvicorn exits with its own status (3) when the app's start-up fails or it cannot bind; its log line
        # above says why. Start-up problems keep the documented status 1.
        if stop.code in (0, None):
            raise
        if getattr(server.lifespan, "startup_failed", False):
            print("error: the application's start-up failed (see the log above)", file=sys.stderr)
        else:
            print(
                f"error: cannot listen on {settings.host}:{settings.port}: the address is in use or not available "
                "(set --port / RIDE_PORT, or --host / RIDE_HOST)",
                file=sys.stderr,
            )
        return 1
    if not server.started:
        return 1
    if state.drain.cut_requests:
        print(
            f"error: the shutdown timeout ({settings.shutdown_timeout_s:g} s, RIDE_SHUTDOWN_TIMEOUT_S) cut "
            f"{state.drain.cut_requests} requests off (each was answered 503)",
            file=sys.stderr,
        )
        return EXIT_CUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
