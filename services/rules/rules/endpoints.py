from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.requests import Request

from rules import schemas
from rules.engine import CustomerSnapshot, Evaluation
from rules.errors import (
    CustomerNotFound,
    EventTooLarge,
    InvalidEvent,
    NoActiveRuleset,
    RulesetNotFound,
    RulesetValidationFailed,
    SimulationNotSupported,
    TiersNotDefined,
)
from rules.service import rules_service
from shared.auth import Principal, require
from shared.db import ReadSessionDep, SessionDep
from shared.errors import DocumentedRoute, raises
from shared.events import NO_NUL, UtcDatetime, utcnow
from shared.runtime import Runtime

router = APIRouter(prefix="/v1", route_class=DocumentedRoute)

PointsRead = Annotated[Principal, Depends(require("points:read"))]
RulesAdmin = Annotated[Principal, Depends(require("rules:admin"))]
EventsWrite = Annotated[Principal, Depends(require("events:write"))]


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
CustomerId = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_NUL)]
RulesetId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,100}$")]
# Versions are 32-bit (their column): a larger one is a 422, not a database error.
Version = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _state(state: CustomerSnapshot) -> schemas.CustomerState:
    at = utcnow()
    return schemas.CustomerState(
        customer_id=state.customer_id,
        purchase_count=state.purchase_count,
        first_purchase_at=state.first_purchase_at,
        last_purchase_at=state.last_purchase_at,
        spend_12m=state.spend_12m(at),
        points_12m=state.points_12m(at),
        categories=sorted(state.categories),
        tier=state.tier,
        tier_reviewed_at=state.tier_reviewed_at,
        segment=state.segment,
    )


def _simulation(evaluation: Evaluation) -> schemas.Simulation:
    return schemas.Simulation(
        ruleset_id=evaluation.ruleset_id,
        version=evaluation.version,
        event_id=evaluation.event_id,
        customer_id=evaluation.customer_id,
        total_points=evaluation.total_points,
        commands=[
            schemas.PlannedCommand(
                command_id=c.command_id,
                customer_id=c.customer_id,
                member_id=c.member_id,
                points=c.points,
                matures_at=c.matures_at,
                breakdown=c.breakdown,
            )
            for c in evaluation.commands
        ],
        rules=[
            schemas.RuleResult(
                rule_id=o.rule_id, fired=o.fired, points=o.points, explanation=o.explanation, customer_id=o.customer_id
            )
            for o in evaluation.trace
        ],
    )


# --- customers -------------------------------------------------------------------------------------


@router.get("/customers/{customer_id}/state", response_model=schemas.CustomerState, tags=["customers"])
@raises(CustomerNotFound)
async def get_customer_state(
    customer_id: CustomerId, principal: PointsRead, session: ReadSessionDep
) -> schemas.CustomerState:
    """The state the rules keep for one customer of the caller's tenant."""
    state = await rules_service.get_state(session, tenant_id=principal.tenant_id, customer_id=customer_id)
    if state is None:
        raise CustomerNotFound(customer_id)
    return _state(state)


@router.get("/customers/{customer_id}/tier", response_model=schemas.Tier, tags=["customers"])
@raises(CustomerNotFound)
async def get_customer_tier(customer_id: CustomerId, principal: PointsRead, session: ReadSessionDep) -> schemas.Tier:
    """The customer's current tier."""
    state = await rules_service.get_state(session, tenant_id=principal.tenant_id, customer_id=customer_id)
    if state is None:
        raise CustomerNotFound(customer_id)
    return schemas.Tier(customer_id=customer_id, tier=state.tier, reviewed_at=state.tier_reviewed_at)


@router.get("/customers/{customer_id}/awards", response_model=list[schemas.AwardOut], tags=["customers"])
async def list_customer_awards(
    customer_id: CustomerId,
    principal: PointsRead,
    session: ReadSessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[schemas.AwardOut]:
    """The customer's awards, newest first, each with its ruleset version, rules and arithmetic."""
    awards = await rules_service.awards(session, tenant_id=principal.tenant_id, customer_id=customer_id, limit=limit)
    return [schemas.AwardOut.model_validate(award) for award in awards]


# --- rulesets --------------------------------------------------------------------------------------


@router.post("/rulesets/validate", response_model=schemas.ValidationResult, tags=["rulesets"])
async def validate_ruleset(body: schemas.RulesetSource, principal: RulesAdmin) -> schemas.ValidationResult:
    """Validates a ruleset document without storing it; every problem names the rule and the position."""
    problems = await rules_service.check(body.source)
    return schemas.ValidationResult(valid=not problems, errors=[p.as_dict() for p in problems])


@router.post(
    "/rulesets/{ruleset_id}/versions", response_model=schemas.RulesetVersion, status_code=201, tags=["rulesets"]
)
@raises(RulesetValidationFailed)
async def create_ruleset_version(
    ruleset_id: RulesetId,
    body: schemas.RulesetSource,
    principal: RulesAdmin,
    session: SessionDep,
) -> schemas.RulesetVersion:
    """Creates the next version of a ruleset (422 with every problem when the document is invalid)."""
    created = await rules_service.create_version(
        session, tenant_id=principal.tenant_id, ruleset_id=ruleset_id, source=body.source, key_id=principal.key_id
    )
    return schemas.RulesetVersion.model_validate(created)


@router.get("/rulesets", response_model=schemas.RulesetList, tags=["rulesets"])
async def list_rulesets(principal: RulesAdmin, session: ReadSessionDep) -> schemas.RulesetList:
    """Every version and activation of the tenant's rulesets, and the version active now."""
    versions = await rules_service.list_versions(session, tenant_id=principal.tenant_id)
    activations = await rules_service.activations(session, tenant_id=principal.tenant_id)
    active = await rules_service.active_version(session, tenant_id=principal.tenant_id, at=utcnow())
    return schemas.RulesetList(
        versions=[schemas.RulesetVersionSummary.model_validate(v) for v in versions],
        activations=[schemas.Activation.model_validate(a) for a in activations],
        active_now=schemas.ActiveVersion(ruleset_id=active[0], version=active[1]) if active else None,
    )


@router.get("/rulesets/{ruleset_id}/versions/{version}", response_model=schemas.RulesetVersion, tags=["rulesets"])
@raises(RulesetNotFound)
async def get_ruleset_version(
    ruleset_id: RulesetId, version: Version, principal: RulesAdmin, session: ReadSessionDep
) -> schemas.RulesetVersion:
    """One version of a ruleset, as stored (old versions stay readable)."""
    stored = await rules_service.get_version(
        session, tenant_id=principal.tenant_id, ruleset_id=ruleset_id, version=version
    )
    return schemas.RulesetVersion.model_validate(stored)


@router.post(
    "/rulesets/{ruleset_id}/versions/{version}/activate",
    response_model=schemas.Activation,
    status_code=201,
    tags=["rulesets"],
)
@raises(RulesetNotFound)
async def activate_ruleset_version(
    ruleset_id: RulesetId, version: Version, body: schemas.ActivationCreate, principal: RulesAdmin, session: SessionDep
) -> schemas.Activation:
    """Makes a version the tenant's active ruleset from `effective_from` (default now)."""
    activation = await rules_service.activate(
        session,
        tenant_id=principal.tenant_id,
        ruleset_id=ruleset_id,
        version=version,
        effective_from=body.effective_from,
        key_id=principal.key_id,
    )
    return schemas.Activation.model_validate(activation)


@router.get("/rulesets/active", response_model=schemas.ActiveVersion, tags=["rulesets"])
@raises(NoActiveRuleset)
async def get_active_ruleset(
    principal: RulesAdmin, session: ReadSessionDep, at: UtcDatetime | None = None
) -> schemas.ActiveVersion:
    """The version active at `at` (default now)."""
    return await rules_service.require_active(session, tenant_id=principal.tenant_id, at=at or utcnow())


@router.post("/tiers/review", response_model=schemas.TierReview, tags=["rulesets"])
@raises(NoActiveRuleset, TiersNotDefined)
async def review_tiers(
    body: schemas.TierReviewRequest, principal: RulesAdmin, session: SessionDep, runtime: RuntimeDep
) -> schemas.TierReview:
    """Runs the tier review for every customer due at `at`; changes are published as tier.changed."""
    reviewed, changed = await rules_service.review_tiers(
        session, tenant_id=principal.tenant_id, at=body.at or utcnow(), namespace=runtime.settings.topic_namespace
    )
    return schemas.TierReview(reviewed=reviewed, changed=changed)


# --- simulate and ingest ---------------------------------------------------------------------------


@router.post("/simulate", response_model=schemas.Simulation, tags=["rulesets"])
@raises(InvalidEvent, SimulationNotSupported, NoActiveRuleset, RulesetNotFound)
async def simulate(body: schemas.SimulateRequest, principal: RulesAdmin, session: ReadSessionDep) -> schemas.Simulation:
    """Evaluates one event against the stored customer state and returns the full breakdown; stores nothing."""
    _, event = rules_service.parse_event(body.event, tenant_id=principal.tenant_id)
    evaluation = await rules_service.simulate(
        session, tenant_id=principal.tenant_id, event=event, ruleset_id=body.ruleset_id, version=body.version
    )
    return _simulation(evaluation)


@router.post("/events", response_model=schemas.Accepted, status_code=202, tags=["ingest"])
@raises(InvalidEvent, EventTooLarge)
async def ingest_event(body: dict[str, Any], principal: EventsWrite, runtime: RuntimeDep) -> schemas.Accepted:
    """Validates one purchase or engagement CloudEvent and produces it to its topic."""
    ids = await rules_service.ingest(
        runtime.producer,
        namespace=runtime.settings.topic_namespace,
        tenant_id=principal.tenant_id,
        docs=[body],
        limits=runtime.settings.input_limits,
        max_event_bytes=runtime.settings.max_event_bytes,
    )
    return schemas.Accepted(event_ids=ids)


@router.post("/events/batch", response_model=schemas.Accepted, status_code=202, tags=["ingest"])
@raises(InvalidEvent, EventTooLarge)
async def ingest_events(body: schemas.EventBatch, principal: EventsWrite, runtime: RuntimeDep) -> schemas.Accepted:
    """Validates up to 1000 events (all or none) and produces them to their topics."""
    ids = await rules_service.ingest(
        runtime.producer,
        namespace=runtime.settings.topic_namespace,
        tenant_id=principal.tenant_id,
        docs=body.events,
        limits=runtime.settings.input_limits,
        max_event_bytes=runtime.settings.max_event_bytes,
    )
    return schemas.Accepted(event_ids=ids)
