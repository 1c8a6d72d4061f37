"""The shape of the code: no import circle, the wiring in one place, no test double in the service."""
from __future__ import annotations

import threading

import services
from support.imports import cycles, graph


def test_the_project_imports_in_layers_without_a_circle():
    assert cycles(graph()) == []


def test_nothing_imports_app_and_the_service_never_imports_devtools():
    edges = graph()
    importers_of_app = sorted(name for name, targets in edges.items() if "app" in targets)
    assert importers_of_app == []
    service = {name: targets for name, targets in edges.items() if not name.startswith("devtools")}
    leaks = sorted(f"{name} → {target}" for name, targets in service.items() for target in targets
                   if target.startswith("devtools"))
    assert leaks == []


def test_create_app_builds_the_parts_once_and_starts_no_thread(make_app):
    before = {t.ident for t in threading.enumerate()}
    app = make_app(WORKER_IN_WEB="true")
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    assert started == []
    parts = services.of(app)
    assert parts.worker is None and parts.template_engine is parts.engine
    assert app.extensions[services.EXTENSION] is parts
