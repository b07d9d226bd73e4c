"""BillingConfig: on only with a key, read from env or a Secret, never shows a secret."""

from __future__ import annotations

import base64

import pytest

from gpupool.billing import BillingConfig

KEY = "sk_test_supersecretvalue123"
WHSEC = "whsec_anothersecretvalue456"


def test_off_without_a_key() -> None:
    assert not BillingConfig().enabled
    assert not BillingConfig.from_env({}).enabled
    assert not BillingConfig.from_env({"GPUPOOL_STRIPE_API_KEY": "   "}).enabled


def test_from_env() -> None:
    config = BillingConfig.from_env({"GPUPOOL_STRIPE_API_KEY": KEY,
                                     "GPUPOOL_STRIPE_WEBHOOK_SECRET": WHSEC,
                                     "GPUPOOL_STRIPE_API_BASE": "http://127.0.0.1:8420"})
    assert config.enabled and config.webhooks_enabled
    assert (config.api_key, config.webhook_secret, config.api_base) == \
        (KEY, WHSEC, "http://127.0.0.1:8420")


def test_from_secret_data_base64_and_plain() -> None:
    data = {"apiKey": base64.b64encode(KEY.encode()).decode(),
            "webhookSecret": base64.b64encode(WHSEC.encode()).decode()}
    config = BillingConfig.from_secret_data(data)
    assert (config.api_key, config.webhook_secret, config.api_base) == (KEY, WHSEC, None)
    plain = BillingConfig.from_secret_data({"GPUPOOL_STRIPE_API_KEY": KEY}, base64_encoded=False)
    assert plain.api_key == KEY and not plain.webhooks_enabled
    assert not BillingConfig.from_secret_data(None).enabled
    with pytest.raises(ValueError, match="apiKey"):
        BillingConfig.from_secret_data({"apiKey": "not base64!"})


def test_repr_never_shows_secrets() -> None:
    config = BillingConfig(api_key=KEY, webhook_secret=WHSEC, api_base="http://x")
    for text in (repr(config), str(config), f"{config}"):
        assert KEY not in text and WHSEC not in text
        assert "enabled=True" in text
