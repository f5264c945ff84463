from dataclasses import dataclass, field

PURCHASES = "loyalty.purchases.v1"
ENGAGEMENT = "loyalty.engagement.v1"
POINTS_COMMANDS = "loyalty.points-commands.v1"
LEDGER_ENTRIES = "loyalty.ledger-entries.v1"
LEDGER_ANCHORS = "loyalty.ledger-anchors.v1"
CUSTOMERS = "loyalty.customers.v1"
REWARDS = "loyalty.rewards.v1"
DLQ = "loyalty.dlq.v1"
DLQ_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


# Purchases, engagement and commands carry the per-customer order that the ledger and rules rely on
# and the bulk of the traffic, so they get the most partitions (the unit of consumer parallelism).
ALL_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(PURCHASES, 12),
    TopicSpec(ENGAGEMENT, 12),
    TopicSpec(POINTS_COMMANDS, 12),
    TopicSpec(LEDGER_ENTRIES, 12),
    TopicSpec(CUSTOMERS, 6),
    # The signed chain head of each ledger account (keyed tenant:account): compaction keeps the latest.
    TopicSpec(LEDGER_ANCHORS, 3, {"cleanup.policy": "compact"}),
    # Redemption orders change far less often than entries are posted.
    TopicSpec(REWARDS, 6),
    # The DLQ keeps the original bytes plus headers, so it accepts larger messages than the inputs.
    TopicSpec(DLQ, 3, {"max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)}),
)
