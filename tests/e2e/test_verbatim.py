"""Strings shaped like SQL injection, markup, template or format strings and unicode oddities are stored and
returned verbatim wherever identifiers and texts are free-form: through the ledger's REST API, through Kafka
into rules, the ledger and metrics, and back out on loyalty.ledger-entries.v1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI

from ledger.app import create_app as ledger_app
from metrics.app import create_app as metrics_app
from rules.app import create_app as rules_app
from shared.events import PurchaseLine, ReviewPosted, make_event, utcnow
from shared.topics import ENGAGEMENT, LEDGER_ENTRIES, PURCHASES
from tests.conftest import create_api_key, eventually, read_topic, running_app, service_settings, topic
from tests.factories import purchase

pytestmark = [pytest.mark.kafka, pytest.mark.db]

# Identifiers that paths address: no "/" (a path separator), no NUL or lone surrogate (refused by the input
# contract with a 422 or the DLQ). Texts may hold anything else.
HOSTILE = [
    "'; drop table ledger.entries; --",
    "<img src=x onerror=alert('x')>",
    '" OR "1"="1',
    "Ünïcødé ✓ 😀 e\u0301 \u200b\u202eevil",
    "{{7*7}} ${jndi:ldap:x} %s%n",
    "line\nbreak\ttab\\backslash",
]
# Header values are single-line ASCII.
HOSTILE_KEYS = ["'; drop table ledger.entries; --", "<script>alert('x')</script>", "../../etc/passwd"]
SMALL_POOL: dict[str, Any] = {"database_pool_size": 3, "database_pool_warm": False}


APPS: dict[str, Callable[..., FastAPI]] = {"ledger": ledger_app, "rules": rules_app, "metrics": metrics_app}


def path(value: str) -> str:
    return quote(value, safe="")


@pytest.fixture
async def services(tenant: str) -> AsyncIterator[tuple[dict[str, httpx.AsyncClient], dict[str, dict[str, str]]]]:
    async with AsyncExitStack() as stack:
        clients = {
            name: await stack.enter_async_context(
                running_app(create(service_settings(name, consumer_group_suffix=f"-{tenant}", **SMALL_POOL)))
            )
            for name, create in APPS.items()
        }
        keys = {name: {"X-API-Key": await create_api_key(name, tenant, ["admin"])} for name in clients}
        yield clients, keys


async def test_ledger_rest_keeps_hostile_ids_and_texts_verbatim(tenant: str) -> None:
    key = {"X-API-Key": await create_api_key("ledger", tenant, ["admin"])}
    settings = service_settings("ledger", consumers_enabled=False, **SMALL_POOL)
    async with running_app(ledger_app(settings)) as client:
        for n, text in enumerate(HOSTILE):
            idempotency = HOSTILE_KEYS[n % len(HOSTILE_KEYS)] + f" #{n}"
            earned = await client.post(
                f"/v1/accounts/{path(text)}/earn",
                json={"points": 50, "member_id": text, "reason": f"{text} </script> ../../etc/passwd"},
                headers={**key, "Idempotency-Key": idempotency},
            )
            assert earned.status_code == 201, earned.text
            redeemed = await client.post(
                f"/v1/accounts/{path(text)}/redeem",
                json={"points": 5, "member_id": text, "reference": text},
                headers={**key, "Idempotency-Key": f"r{n}"},
            )
            assert redeemed.status_code == 201, redeemed.text

            balance = (await client.get(f"/v1/accounts/{path(text)}", headers=key)).json()
            assert (balance["account_id"], balance["available"]) == (text, 45)
            entries = (await client.get(f"/v1/accounts/{path(text)}/entries", headers=key)).json()["items"]
            earn, redeem = sorted(entries, key=lambda e: e["seq"])
            assert earn["reason"] == f"{text} </script> ../../etc/passwd"
            assert (earn["member_id"], earn["source"]) == (text, f"request:{idempotency}")
            assert (redeem["member_id"], redeem["reference_id"]) == (text, text)
            verified = (await client.get(f"/v1/accounts/{path(text)}/verify", headers=key)).json()
            assert verified["ok"], verified
        listed = (await client.get("/v1/accounts", params={"kind": "customer"}, headers=key)).json()["items"]
        assert sorted(b["account_id"] for b in listed) == sorted(HOSTILE)


async def test_kafka_events_carry_hostile_ids_verbatim_into_rules_the_ledger_and_metrics(
    services: tuple[dict[str, httpx.AsyncClient], dict[str, dict[str, str]]],
    raw_producer: AIOKafkaProducer,
    tenant: str,
) -> None:
    clients, keys = services
    ruleset = {
        "document": {
            "name": HOSTILE[0],
            "currencies": {"EUR": {"points_per_unit": "1"}},
            "rules": [
                {"id": "base", "kind": "points_per_unit"},
                {"id": "review", "kind": "engagement", "on": "review.posted", "points": 7},
            ],
        }
    }
    created = await clients["rules"].post("/v1/rulesets/main/versions", json=ruleset, headers=keys["rules"])
    assert created.status_code == 201, created.text
    version = created.json()["version"]
    stored = (await clients["rules"].get(f"/v1/rulesets/main/versions/{version}", headers=keys["rules"])).json()
    assert stored["document"]["name"] == HOSTILE[0]
    activated = await clients["rules"].post(
        f"/v1/rulesets/main/versions/{version}/activate",
        json={"effective_from": "2000-01-01T00:00:00Z"},
        headers=keys["rules"],
    )
    assert activated.status_code == 201, activated.text

    for text in HOSTILE:
        line = PurchaseLine(sku=text, category=text, quantity=Decimal(1), unit_price=Decimal(30))
        event = purchase(tenant, text, net="30", order_id=text, member_id=text, lines=[line])
        await raw_producer.send_and_wait(topic(PURCHASES), event.to_bytes(), key=event.key)
        review = make_event(
            "review.posted", ReviewPosted(review_id=text, customer_id=text, rating=5), tenant_id=tenant, source=text
        )
        await raw_producer.send_and_wait(topic(ENGAGEMENT), review.to_bytes(), key=review.key)

    async def booked() -> bool:
        for text in HOSTILE:
            response = await clients["ledger"].get(f"/v1/accounts/{path(text)}", headers=keys["ledger"])
            if response.status_code != 200 or response.json()["available"] != 37:
                return False
        return True

    await eventually(booked, timeout_s=60)
    for text in HOSTILE:
        state = (await clients["rules"].get(f"/v1/customers/{path(text)}/state", headers=keys["rules"])).json()
        assert (state["customer_id"], state["categories"], state["purchase_count"]) == (text, [text], 1)
        awards = (await clients["rules"].get(f"/v1/customers/{path(text)}/awards", headers=keys["rules"])).json()
        assert sorted((a["customer_id"], a["order_id"] or "") for a in awards) == sorted([(text, text), (text, "")])
        entries = (await clients["ledger"].get(f"/v1/accounts/{path(text)}/entries", headers=keys["ledger"])).json()
        members = {e["member_id"] for e in entries["items"]}
        assert text in members, entries

    today = utcnow().date()
    day = {"from": today.isoformat(), "to": (today + timedelta(days=1)).isoformat(), "period": "day"}

    async def counted() -> bool:
        kpis = await clients["metrics"].get("/v1/kpis", params=day, headers=keys["metrics"])
        return kpis.status_code == 200 and kpis.json()["items"][0]["orders"] == len(HOSTILE)

    # Metrics consumes the purchases on its own, not after the ledger.
    await eventually(counted, timeout_s=60)
    for text in HOSTILE:
        summary = await clients["metrics"].get(f"/v1/customers/{path(text)}/metrics", headers=keys["metrics"])
        assert summary.status_code == 200, summary.text
        assert (summary.json()["customer_id"], summary.json()["orders"]) == (text, 1)

    def posted(records: list[Any]) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            event = json.loads(record.value)
            if event["tenantid"] == tenant and event["data"]["account_id"] in HOSTILE:
                found.setdefault(event["data"]["account_id"], []).append(event["data"])
        return found

    # Two entries on each customer's account (the purchase and the review), each published once at least.
    records = await read_topic(
        topic(LEDGER_ENTRIES), until=lambda rs: all(len(v) >= 2 for v in posted(rs).values()) and len(posted(rs)) == 6
    )
    for text, data in posted(records).items():
        assert {d.get("customer_id") for d in data} == {text}
        assert text in {d.get("member_id") for d in data}
