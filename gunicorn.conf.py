"""gunicorn settings for `gunicorn 'app:create_app()'` (read from the working directory by default)."""
import os
import sys

bind = os.environ.get("BIND", "127.0.0.1:" + os.environ.get("PORT", "8000"))
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Callbacks mostly wait for their commit, and those waiting together share one (store/recording.py): under
# load, 16 threads make batches of about 3 rows where 4 made under 2 (BENCHMARKS.md, issue 15).
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
# A callback is answered in milliseconds; anything near these limits is a bug, not load.
timeout = 30
graceful_timeout = 30
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
# Counters from every worker process add up in /metrics only through prometheus_client's
# multiprocess mode; it needs the directory before any worker imports the client.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="wecom-mailer-metrics-")

# The control socket (new in gunicorn 27) lives under ~/.gunicorn: not wanted in a container.
control_socket_disable = True

from gunicorn.glogging import Logger  # noqa: E402 - after the settings above, which it does not need


class ServiceLogger(Logger):
    """gunicorn's logger, but an answered WeCom event writes one line, the service's own `event N …: recorded`,
    and not also an access line (the service sets the mark in the request's environ once it has written it;
    refusals, the URL check, /admin and every other request keep their access line). At 2,000 callbacks/s the
    access line was 9 % of the workers' CPU (BENCHMARKS.md, issue 25) and half of the log volume."""

    def access(self, resp, req, environ, request_time):
        if environ.get("wecom_mailer.event_logged"):  # app.EVENT_LOGGED (not imported: gunicorn loads first)
            return
        super().access(resp, req, environ, request_time)


logger_class = ServiceLogger

if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":

    class JsonLogger(ServiceLogger):
        """gunicorn's own lines (start-up, workers, access log) as JSON too, like the service's."""

        def setup(self, cfg):
            super().setup(cfg)
            import logs  # gunicorn has put the working directory on sys.path by now

            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(logs.JsonFormatter())

    logger_class = JsonLogger


def on_starting(server):
    """Refuse to start with a broken configuration: one line naming the variable, no traceback."""
    sys.path.insert(0, os.getcwd())
    import config

    config.load_dotenv_file()
    try:
        settings = config.from_env()
    except config.ConfigError as exc:
        print(f"wecom-mailer: configuration error: {exc}", file=sys.stderr)
        sys.exit(1)
    # Not only in `flask check`: gunicorn reachable directly gives each slow client a thread (issue 24).
    from ops.exposure import bind_warning  # light: imports nothing of the service

    warning = bind_warning(settings)
    if warning:
        print(f"wecom-mailer: warning: {warning}", file=sys.stderr)
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        import glob
        os.makedirs(multiproc_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(multiproc_dir, "*.db")):
            os.remove(stale)


def _services(worker):
    """The service parts create_app() built in this gunicorn worker (None if the app did not load)."""
    return getattr(getattr(worker, "wsgi", None), "extensions", {}).get("wecom_mailer")


def post_worker_init(worker):
    """Each web process runs one delivery thread unless WORKER_IN_WEB=false; started here, after the
    fork, so that create_app() itself starts no thread (tests, shells and `flask` commands build apps too)."""
    parts = _services(worker)
    if parts is not None and parts.settings.worker_in_web:
        parts.start_worker()


def worker_exit(server, worker):
    """Stop this web process's delivery thread while Python still runs normally: the message in flight
    finishes and the event's lease is released (once interpreter shutdown starts, thread pools refuse work)."""
    parts = _services(worker)
    if parts is not None:
        parts.stop_worker()


def child_exit(server, worker):
    """Let Prometheus drop the live gauges of a worker that has gone."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
