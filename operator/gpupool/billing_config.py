"""Choose the billing implementation from the environment: Stripe when a key is configured."""

from __future__ import annotations

import os

from gpupool.billing_port import Billing, NoBilling


def make_billing() -> Billing:
    if not os.environ.get("GPUPOOL_STRIPE_API_KEY"):
        return NoBilling()
    from gpupool.billing.adapter import StripeBilling  # written with the Stripe layer

    return StripeBilling.from_env()
