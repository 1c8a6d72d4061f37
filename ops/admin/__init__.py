"""/admin for the IT team: one blueprint, one module per page family (auth, pages, templates, suppressions)."""
from __future__ import annotations

import services
from ops.admin import auth, pages, suppressions, templates  # noqa: F401  (each registers its routes on the blueprint)
from ops.admin.blueprint import bp


def init_app(app) -> None:
    """Mount /admin only when a way to sign in is configured: otherwise every /admin URL is a plain 404."""
    if services.of(app).settings.admin_token:
        app.register_blueprint(bp)
