"""Stripe test fixtures: a real localstripe, a billing service on it, a webhook receiver.

Use with ``pytest_plugins = ["support.stripe"]`` in a test module (or list it in the rootdir
conftest). The helpers themselves (``LocalStripe``, ``WebhookReceiver``, ``wait_until``,
``signed_event``) live in :mod:`gpupool.billing.localstripe`, so test modules import them from
there and this module is only loaded as a plugin.

- ``localstripe_server`` (session): one ``localstripe --port P --from-scratch`` process; its log
  goes to pytest's basetemp. Skips when localstripe is not installed, unless
  ``GPUPOOL_REQUIRE_STRIPE=1``.
- ``stripe_server``: the same server, emptied (``DELETE /_config/data``) and with no webhooks.
- ``billing``: a :class:`BillingService` on it (webhook secret :data:`WEBHOOK_SECRET`).
- ``webhook_receiver``: the operator's webhook app served by uvicorn on a free port in the test's
  event loop, registered with localstripe; collects verified, de-duplicated events.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from gpupool.billing import BillingService
from gpupool.billing.localstripe import (
    WEBHOOK_SECRET,
    LocalStripe,
    WebhookReceiver,
    find_binary,
)


def _require_localstripe() -> None:
    try:
        find_binary()
    except FileNotFoundError as exc:
        if os.environ.get("GPUPOOL_REQUIRE_STRIPE") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def localstripe_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    _require_localstripe()
    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with LocalStripe(log_path=log) as server:
        yield server


@pytest.fixture
def stripe_server(localstripe_server: LocalStripe) -> LocalStripe:
    localstripe_server.reset()
    return localstripe_server


@pytest.fixture
async def billing(stripe_server: LocalStripe) -> AsyncIterator[BillingService]:
    service = BillingService(stripe_server.billing_config(webhook_secret=WEBHOOK_SECRET))
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def webhook_receiver(stripe_server: LocalStripe) -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(stripe_server.billing_config(webhook_secret=WEBHOOK_SECRET))
    await receiver.start()
    stripe_server.register_webhook("gpupool-test", receiver.url, WEBHOOK_SECRET)
    try:
        yield receiver
    finally:
        stripe_server.unregister_webhook("gpupool-test")
        await receiver.stop()
