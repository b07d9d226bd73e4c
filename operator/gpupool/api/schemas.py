"""The REST API's request and response shapes (pydantic), the source of the OpenAPI schemas.

Answers are built as plain dicts by :mod:`gpupool.api.views`; unit tests validate them against
these models, and schemathesis validates live answers against the OpenAPI document made from them.
Fields the seeds do not list are marked "(gpupool)" in their descriptions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MoneyStr = Annotated[str, Field(pattern=r"^[0-9]+\.[0-9]{2}$", examples=["27.00"],
                                description="USD, two decimals, as a string")]
PoolStatus = Literal["funding", "activating", "active", "paused"]
SubStatus = Literal["pending", "pledged", "pending_key", "active", "past_due", "canceled"]
BlockName = Literal["asia", "europe", "americas"]
BlockInput = Literal["asia", "europe", "americas", "night"]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolSummary(Shape):
    id: str = Field(description="The pool's id (a UUID)")
    slug: str = Field(description="The pool's slug (the Pool's name); usable in place of id")
    modelId: str
    modelName: str
    description: str
    infraSpec: str
    status: PoolStatus = Field(description="funding (accepting pledges), activating, active, "
                                           "paused; draft pools are not listed")
    totalSlots: int = Field(ge=0, description="Seats summed over the blocks")
    pledgedSlots: int = Field(ge=0, description="Seat-blocks held by subscriptions")
    minPricePerDay: MoneyStr = Field(description="Lowest monthly seat price over the blocks")
    manualProvisioning: bool = Field(description="Keys are delivered after manual approval")
    annualDiscount: float = Field(ge=0, lt=1, description="Fraction off when billed yearly")
    reservationFee: MoneyStr = Field(description="(gpupool) Fee charged once when pledging "
                                                 "to a funding pool")
    currency: Literal["usd"] = Field(description="(gpupool) Currency of every amount")


class BlockOffer(Shape):
    block: BlockName
    startHour: int = Field(ge=0, le=23)
    endHour: int = Field(ge=0, le=23)
    price: MoneyStr = Field(description="Monthly price of one seat in this block")
    seats: int = Field(ge=0)
    available: int = Field(ge=0, description="Seats free now")


class HourSlot(Shape):
    id: str
    hour: int = Field(ge=0, le=23)
    slotIndex: int = Field(ge=0)
    pricePerDay: MoneyStr = Field(description="This hour's share of the block's monthly price")
    status: Literal["available", "taken"]


class PoolDetail(PoolSummary):
    blocks: list[BlockOffer] = Field(description="(gpupool) The blocks sold, with free seats")
    hourSlots: list[HourSlot]


class Hour(Shape):
    hour: int = Field(ge=0, le=23)
    slotIndex: int = Field(ge=0)
    pricePerDay: MoneyStr


class Key(Shape):
    id: str = Field(description="Public id of the key")
    apiKey: str = Field(pattern=r"^sk_pool_", description="Bearer token for /v1/* and "
                                                         "/anthropic/*")
    rpmLimit: int = Field(ge=0)
    tpmLimit: int = Field(ge=0)
    concurrencyLimit: int = Field(ge=0, description="(gpupool) Requests in flight at once")
    isActive: bool = Field(description="The key is live (subscription active); it still opens "
                                       "only in the blocks bought")
    gate: Literal["open", "closed"] = Field(description="(gpupool) Whether it works right now")
    subscriptionId: str = Field(description="(gpupool) The subscription it belongs to")


class KeyWithPool(Key):
    poolId: str = Field(description="(gpupool) The pool the key is for")


class Subscription(Shape):
    id: str
    poolId: str | None
    status: SubStatus = Field(description="pledged, pending_key, active, past_due, canceled; "
                                          "pending only while the operator has not decided")
    monthlyPrice: MoneyStr | None
    amount: MoneyStr | None = Field(description="(gpupool) Charged per billing cycle")
    billingCycle: Literal["month", "year"]
    cancelAtPeriodEnd: bool
    currentPeriodEnd: str | None = Field(description="End of the paid period (ISO 8601, UTC)")
    blocks: list[BlockName] = Field(description="(gpupool) The blocks bought")
    quantity: int = Field(ge=1, le=20, description="(gpupool) Seats per block")
    slotCount: int = Field(ge=0, description="Hourly slots held: 8 x blocks x quantity")
    hours: list[Hour]
    key: Key | None


class Canceled(Shape):
    canceled: Literal[True]
    id: str = Field(description="(gpupool) The subscription canceled")
    status: SubStatus = Field(description="(gpupool) Its status after the request")
    cancelAtPeriodEnd: bool = Field(description="(gpupool) True: it ends at currentPeriodEnd")
    currentPeriodEnd: str | None


class SubscribeBody(BaseModel):
    blocks: list[BlockInput] = Field(min_length=1, description='One or more of "asia" (also '
                                     '"night"), "europe", "americas"')
    quantity: int = Field(default=1, ge=1, le=20, description="Seats per block")
    billingCycle: Literal["month", "year"] = Field(default="month")


class KeyBody(BaseModel):
    subscriptionId: str | None = Field(default=None, min_length=1,
                                       description="The subscription to create the key for; "
                                                   "default: your newest active one")


class Error(Shape):
    success: Literal[False]
    error: str


def envelope(name: str, data: object, description: str) -> tuple[str, dict[str, object]]:
    """An OpenAPI schema ``{"success": true, "data": <data>}`` named ``name``."""
    return name, {"type": "object", "description": description,
                  "required": ["success", "data"], "additionalProperties": False,
                  "properties": {"success": {"const": True}, "data": data}}


MODELS: tuple[type[BaseModel], ...] = (PoolSummary, PoolDetail, Subscription, Key, KeyWithPool,
                                       Canceled, SubscribeBody, KeyBody, Error)
