# wecom-mailer image: a build stage makes the virtual environment, the final stage runs it as a system user.
# tests/test_dockerfile.py runs these steps for real in a fresh virtual environment (no Docker needed).

# The base image is pinned by digest (both stages): python 3.11.13 slim on Debian 12, the multi-platform index
# digest Docker Hub published for python:3.11.13-slim-bookworm. Not pulled from here (no registry access):
# check and refresh it with `docker buildx imagetools inspect python:3.11-slim-bookworm` (the Digest line).
FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1 AS build
WORKDIR /build
COPY requirements.lock ./
# requirements.lock is requirements.txt with the sha256 of every file (`make lock`): pip refuses anything
# else. Every runtime dependency ships a wheel: no compiler in this stage, and no setup.py runs.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check --require-hashes --only-binary :all: \
    -r requirements.lock

FROM python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1
# A system user with no login shell and no home: the only place it may write is /app/var
# (the default SQLite state and MAIL_FILE_DIR) and the metrics directory under /tmp. Its ids are fixed
# (10001, above any host's users) so that Kubernetes can check runAsNonRoot and deploy/kubernetes names them.
RUN groupadd --system --gid 10001 wecom \
 && useradd --system --uid 10001 --gid wecom --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wecom
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    BIND=0.0.0.0:8000 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
WORKDIR /app
# The whole context is the service: .dockerignore lets in only its modules and packages (never devtools/,
# tests/ or bench/); tests/test_dockerfile.py checks that app.py's imports are all here and the stand-in is not.
COPY . ./
RUN python -m compileall -q /app \
 && mkdir -p /app/var /tmp/metrics \
 && chown wecom:wecom /app/var /tmp/metrics
USER 10001:10001
EXPOSE 8000
# healthcheck.py: GET http://127.0.0.1:8000/healthz (the port follows BIND) with a 3 s timeout, exit 0/1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/app/healthcheck.py"]
CMD ["gunicorn", "app:create_app()"]
