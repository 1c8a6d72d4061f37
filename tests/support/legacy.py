"""The last release before Alembic, as its own code made databases (tests/data/legacy_outbox_schema2.py)."""
from __future__ import annotations

import importlib.util

from support.env import ROOT


def legacy_release():
    """outbox.py of the release before Alembic, loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location("legacy_outbox", ROOT / "tests/data/legacy_outbox_schema2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
