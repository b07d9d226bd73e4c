"""Billing settings, read from the environment or the Stripe Secret. Secrets never reach a repr."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

ENV_API_KEY = "GPUPOOL_STRIPE_API_KEY"
ENV_WEBHOOK_SECRET = "GPUPOOL_STRIPE_WEBHOOK_SECRET"
ENV_API_BASE = "GPUPOOL_STRIPE_API_BASE"

# Keys looked up in a Secret's data (camelCase first, then the env-style names).
SECRET_KEYS = {
    "api_key": ("apiKey", "api-key", ENV_API_KEY),
    "webhook_secret": ("webhookSecret", "webhook-secret", ENV_WEBHOOK_SECRET),
    "api_base": ("apiBase", "api-base", ENV_API_BASE),
}


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


@dataclass(frozen=True)
class BillingConfig:
    """Stripe settings. ``enabled`` is false without an API key: every step then succeeds at once.

    ``api_base`` points the client somewhere other than api.stripe.com (tests: localstripe).
    """

    api_key: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    api_base: str | None = None
    timeout_seconds: float = 30.0
    # stripe-python's own retries stay off: a retried POST against a server that ignores
    # idempotency keys could charge twice; the operator retries whole steps instead.
    max_network_retries: int = 0
    webhook_tolerance_seconds: int = 300
    max_workers: int = 8

    @property
    def enabled(self) -> bool:
        return bool(self.api_key)

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_secret)

    def __repr__(self) -> str:  # dataclass repr=False fields are omitted; say whether they are set
        return (f"BillingConfig(enabled={self.enabled}, webhooks={self.webhooks_enabled}, "
                f"api_base={self.api_base!r}, timeout_seconds={self.timeout_seconds})")

    def with_overrides(self, **changes: object) -> BillingConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BillingConfig:
        env = os.environ if env is None else env
        return cls(api_key=_clean(env.get(ENV_API_KEY)),
                   webhook_secret=_clean(env.get(ENV_WEBHOOK_SECRET)),
                   api_base=_clean(env.get(ENV_API_BASE)))

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str | bytes] | None, *,
                         base64_encoded: bool = True) -> BillingConfig:
        """From a Secret's ``data`` (base64, as the API returns it) or ``stringData``."""
        values: dict[str, str | None] = {}
        for attr, names in SECRET_KEYS.items():
            values[attr] = None
            for name in names:
                raw = (data or {}).get(name)
                if raw is None:
                    continue
                values[attr] = _clean(_decode(raw, base64_encoded, name))
                break
        return cls(**values)  # type: ignore[arg-type]


def _decode(raw: str | bytes, base64_encoded: bool, name: str) -> str:
    if base64_encoded:
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"Secret key {name!r} is not valid base64") from None
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    return raw
