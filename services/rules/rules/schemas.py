from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.events import Amount, RuleAward, UtcDatetime


class CustomerState(BaseModel):
    customer_id: str
    purchase_count: int
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    spend_12m: Amount = Field(description="Net spend of the last 12 calendar months, in the reference currency")
    points_12m: int
    categories: list[str]
    tier: str | None
    tier_reviewed_at: datetime | None
    segment: str | None = Field(description="The value segment the metrics service last announced")


class Tier(BaseModel):
    customer_id: str
    tier: str | None
    reviewed_at: datetime | None


class RulesetSource(BaseModel):
    """A ruleset document, as a JSON object (`document`) or as YAML/JSON text (`yaml`)."""

    model_config = ConfigDict(extra="forbid")

    document: dict[str, Any] | None = None
    yaml: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "RulesetSource":
        if (self.document is None) == (self.yaml is None):
            raise ValueError("send exactly one of 'document' (an object) or 'yaml' (text)")
        return self

    @property
    def source(self) -> str | dict[str, Any]:
        return self.document if self.document is not None else (self.yaml or "")


class ValidationProblem(BaseModel):
    rule: str | None
    path: str
    line: int | None
    column: int | None
    message: str


class ValidationResult(BaseModel):
    valid: bool
    errors: list[ValidationProblem] = Field(default_factory=list)


class RulesetVersion(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ruleset_id: str
    version: int
    document: dict[str, Any]
    source: str | None
    created_at: datetime
    created_by: str | None


class RulesetVersionSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ruleset_id: str
    version: int
    created_at: datetime


class ActivationCreate(BaseModel):
    effective_from: UtcDatetime | None = Field(default=None, description="Default: now")


class Activation(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ruleset_id: str
    version: int
    effective_from: datetime
    activated_at: datetime


class ActiveVersion(BaseModel):
    ruleset_id: str
    version: int


class RulesetList(BaseModel):
    versions: list[RulesetVersionSummary]
    activations: list[Activation]
    active_now: ActiveVersion | None


class SimulateRequest(BaseModel):
    event: dict[str, Any] = Field(description="A CloudEvent (purchase or engagement); `tenantid` may be left out")
    ruleset_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")] | None = Field(
        default=None, description="Default: the version active at the event's time"
    )
    version: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None


class PlannedCommand(BaseModel):
    command_id: str
    customer_id: str
    member_id: str | None
    points: int
    matures_at: datetime | None
    breakdown: list[RuleAward]


class RuleResult(BaseModel):
    rule_id: str
    fired: bool
    points: int
    explanation: str
    customer_id: str | None


class Simulation(BaseModel):
    ruleset_id: str
    version: int
    event_id: str
    customer_id: str
    total_points: int
    commands: list[PlannedCommand]
    rules: list[RuleResult]


class EventBatch(BaseModel):
    events: list[dict[str, Any]] = Field(min_length=1, max_length=1000)


class Accepted(BaseModel):
    event_ids: list[str]


class AwardOut(BaseModel):
    """A command this service issued, with the version and the arithmetic that produced it."""

    model_config = ConfigDict(from_attributes=True)

    command_id: str
    customer_id: str
    order_id: str | None
    event_id: str
    ruleset_id: str
    ruleset_version: int
    points: int
    clawed_back: int
    matures_at: datetime | None
    breakdown: list[RuleAward]
    created_at: datetime


class TierReviewRequest(BaseModel):
    at: UtcDatetime | None = Field(default=None, description="Review as of this time (default now)")


class TierReview(BaseModel):
    reviewed: int
    changed: int
