"""Pydantic models of the Pool and Subscription specs (camelCase on the wire, no unknown fields).

The CRD schemas in ``crds/`` are the API server's copy of the same contract; a unit test keeps the
two in agreement.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from gpupool.blocks import BLOCK_ORDER, Block, normalize_blocks

MONEY_PATTERN = r"^(0|[1-9][0-9]{0,6})(\.[0-9]{1,2})?$"
FRACTION_PATTERN = r"^0(\.[0-9]{1,4})?$"
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"

Money = Annotated[str, Field(pattern=MONEY_PATTERN)]
BlockName = Literal["asia", "europe", "americas", "night"]


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)


class ModelInfo(Model):
    id: str = Field(min_length=1)
    display_name: str | None = None
    description: str | None = None
    infra_spec: str | None = None


class BlockOffer(Model):
    price: Money
    seats: int | None = Field(default=None, ge=0, le=10000)

    @property
    def price_decimal(self) -> Decimal:
        return Decimal(self.price)


class BlockOffers(Model):
    # The CRD's minProperties: 1. A pool selling no block has no lowest price (min_price fails).
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    asia: BlockOffer | None = None
    europe: BlockOffer | None = None
    americas: BlockOffer | None = None

    @model_validator(mode="after")
    def _sells_a_block(self) -> BlockOffers:
        if not self.offered():
            raise ValueError("at least one block must be offered")
        return self

    def offered(self) -> dict[Block, BlockOffer]:
        return {b: o for b in BLOCK_ORDER if (o := getattr(self, b.value)) is not None}


class KeyLimits(Model):
    rpm: int = Field(default=60, ge=1)
    tpm: int = Field(default=100000, ge=1)
    concurrency: int = Field(default=4, ge=1)


class SecretKeyRef(Model):
    name: str
    key: str = "token"


class ModelCache(Model):
    claim_name: str
    mount_path: str = "/root/.cache/huggingface"


class Runtime(Model):
    image: str = DEFAULT_VLLM_IMAGE
    gpus_per_replica: int = Field(default=1, ge=1, le=64)
    gpu_resource_name: str = "nvidia.com/gpu"
    replicas: int = Field(default=1, ge=0, le=100)
    seats_per_replica: int | None = Field(default=None, ge=1)
    warmup_seconds: int = Field(default=600, ge=0)
    port: int = Field(default=8000, ge=1, le=65535)
    extra_args: list[str] = Field(default_factory=list)
    env: list[dict[str, Any]] = Field(default_factory=list)
    hf_token_secret_ref: SecretKeyRef | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    model_cache: ModelCache | None = None
    shm_size: str = "8Gi"
    startup_timeout_seconds: int = Field(default=1800, ge=60)
    resources: dict[str, Any] | None = None


class PoolSpec(Model):
    model: ModelInfo
    seats: int = Field(ge=0, le=10000)
    blocks: BlockOffers
    annual_discount: Annotated[str, Field(pattern=FRACTION_PATTERN)] = "0"
    reservation_fee: Money = "1.00"
    currency: Literal["usd"] = "usd"
    activation_threshold: int = Field(default=0, ge=0)
    manual_provisioning: bool = False
    published: bool = False
    paused: bool = False
    limits: KeyLimits = Field(default_factory=KeyLimits)
    runtime: Runtime = Field(default_factory=Runtime)

    def capacity(self) -> dict[Block, int]:
        """Seats per offered block: the block's own override, else the pool default."""
        return {b: (o.seats if o.seats is not None else self.seats)
                for b, o in self.blocks.offered().items()}

    def prices(self) -> dict[Block, Decimal]:
        return {b: o.price_decimal for b, o in self.blocks.offered().items()}

    @property
    def annual_discount_decimal(self) -> Decimal:
        return Decimal(self.annual_discount)


class PoolRef(Model):
    name: str = Field(min_length=1)
    namespace: str | None = None


class Customer(Model):
    id: str = Field(min_length=1)
    email: str | None = None


class SubscriptionSpec(Model):
    pool_ref: PoolRef
    customer: Customer
    blocks: list[BlockName] = Field(min_length=1, max_length=4)
    quantity: int = Field(default=1, ge=1, le=20)
    billing_cycle: Literal["month", "year"] = "month"
    cancel_at_period_end: bool = False

    @field_validator("blocks")
    @classmethod
    def _known_blocks(cls, v: list[str]) -> list[str]:
        normalize_blocks(v)
        return v

    def normalized_blocks(self) -> tuple[Block, ...]:
        return normalize_blocks(self.blocks)


def parse_pool_spec(spec: dict[str, Any]) -> PoolSpec:
    return PoolSpec.model_validate(spec)


def parse_subscription_spec(spec: dict[str, Any]) -> SubscriptionSpec:
    return SubscriptionSpec.model_validate(spec)


def describe_validation_error(exc: Exception) -> str:
    """One readable line naming each bad field, e.g. ``spec.quantity: Input should be <= 20``."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in ("spec", *err.get("loc", ())))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
