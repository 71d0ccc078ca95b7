"""ASGI entry point: HTTP through Django, websockets through Channels.

Two kinds of websocket clients: nodes, which authenticate every connection
with their bearer credential and send no browser Origin, and browsers, which
carry a session cookie and must come from an allowed host (the origin check
is what stops another site's page from opening a socket with that cookie).
HTTP passes through :mod:`orchestrator.asgi_limits` first, so that a body
over its path's limit, or one that stops coming, is answered before Django
waits on it; then a node's quiet sync is answered on the event loop
(:mod:`sites.quiet_asgi`) and everything else goes to Django.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from metrics.counters import quiet_sync_count  # noqa: E402
from orchestrator import keys  # noqa: E402
from orchestrator.asgi_limits import BodyLimits  # noqa: E402
from orchestrator.routing import agent_websocket_urlpatterns, browser_websocket_urlpatterns  # noqa: E402
from sites.heartbeats import flusher_start  # noqa: E402
from sites.quiet_asgi import QuietSyncs  # noqa: E402

# A missing or foreign signing key stops the server here, naming the file,
# rather than at the first node that syncs.
keys.check_at_startup()
# Quiet syncs' heartbeats reach PostgreSQL from every serving process (one flush at a time across them).
flusher_start()

application = ProtocolTypeRouter(
    {
        # Quiet syncs are answered before Django (sites.quiet_asgi), inside the body limits.
        "http": BodyLimits(QuietSyncs(django_asgi_app, counted=quiet_sync_count)),  # type: ignore[arg-type]
        "websocket": URLRouter(
            [
                path("agent/", URLRouter(agent_websocket_urlpatterns)),
                # A prefix match: path("") would match the empty path only, since
                # the origin check around the router hides it from URLRouter.
                re_path(r"^", AllowedHostsOriginValidator(
                    AuthMiddlewareStack(URLRouter(browser_websocket_urlpatterns)))),
            ]
        ),
    }
)
