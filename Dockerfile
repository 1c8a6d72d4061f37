# wecom-mailer image: a build stage makes the virtual environment, the final stage runs it as a system user.
# tests/test_dockerfile.py runs these steps for real in a fresh virtual environment (no Docker needed).

FROM python:3.11-slim AS build
WORKDIR /build
COPY requirements.txt ./
# Every runtime dependency ships a manylinux wheel: no compiler in this stage either.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check -r requirements.txt

FROM python:3.11-slim
# A system user with no login shell and no home: the only place it may write is /app/var
# (the default SQLite state and MAIL_FILE_DIR) and the metrics directory under /tmp.
RUN groupadd --system wecom \
 && useradd --system --gid wecom --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin wecom
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
USER wecom
EXPOSE 8000
# healthcheck.py: GET http://127.0.0.1:8000/healthz (the port follows BIND) with a 3 s timeout, exit 0/1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/app/healthcheck.py"]
CMD ["gunicorn", "app:create_app()"]
