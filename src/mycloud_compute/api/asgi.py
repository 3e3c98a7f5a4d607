"""Import target for ASGI servers: ``mycloud_compute.api.asgi:app``.

Settings come from the environment (``MYCLOUD_*``), so every server process
started by ``mycloud-compute serve --workers N`` builds the same application.
When running uvicorn directly, pass ``--no-proxy-headers``: uvicorn otherwise
rewrites the scheme and client address from X-Forwarded-* headers sent by local
clients, bypassing ``MYCLOUD_TRUSTED_PROXIES``. Pass also
``--http mycloud_compute.api.http_protocol:EnvelopeHttpToolsProtocol``, so that
requests uvicorn cannot parse get the JSON error body instead of uvicorn's plain text.
"""

from __future__ import annotations

from mycloud_compute.api.app import create_app
from mycloud_compute.logging_setup import configure_logging
from mycloud_compute.settings import load_settings
from mycloud_compute.worker.embedded import run_embedded_worker

_settings = load_settings()
configure_logging(_settings.log_level)
app = create_app(_settings, worker_factory=run_embedded_worker)
