"""/admin for the IT team: one blueprint, one module per page family (auth, WeCom sign-in, pages, templates,
audit, suppressions)."""
from __future__ import annotations

import services
# wecom_login first: its before_request (the sign-in's cookie hand-over) runs before auth's login check.
from ops.admin import wecom_login  # noqa: F401  (each registers its routes on the blueprint)
from ops.admin import audit, auth, pages, suppressions, templates  # noqa: F401
from ops.admin.blueprint import bp


def init_app(app) -> None:
    """Mount /admin only when a way to sign in is configured (ADMIN_TOKEN or ADMIN_USERIDS): otherwise every
    /admin URL is a plain 404."""
    settings = services.of(app).settings
    if settings.admin_token or settings.admin_userids:
        app.register_blueprint(bp)
