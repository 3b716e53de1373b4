"""Kafka ACLs of the PFI service principals, created through the admin API (no JVM tool, one round trip).

Least privilege, per topic: whoever creates a set of PFI topics (:func:`services.stack.topics.create_topics`,
as the super user ``admin``) also grants, on exactly those topics (LITERAL patterns, so per-run topic
prefixes such as tests' ``t-<hex>`` or the demo's ``demo-<time>-<hex>`` work without wildcards):

=============  ===========================================  ==========================================
principal      topics                                        consumer groups (PREFIXED)
=============  ===========================================  ==========================================
``aggregator`` READ updates; WRITE dlq, versions             READ ``pfi-aggregator*``
``ingest``     WRITE updates                                 (none: it only produces)
``serving``    READ versions                                 READ ``pfi-serv*``
=============  ===========================================  ==========================================

Hierarchical aggregation (issue 15): ``aggregator`` also READs and WRITEs the partials topic and may WRITE
transactional ids ``pfi-aggregator*`` (PREFIXED; the leaves' transactions).

READ and WRITE imply DESCRIBE (Kafka's rule), so no separate DESCRIBE ACLs are needed; an idempotent
producer needs no IDEMPOTENT_WRITE ACL since Kafka 3.0 (WRITE on a topic implies it). ``admin`` is a super
user (``super.users``); nobody else gets anything (``allow.everyone.if.no.acl.found=false``).

aiokafka 0.14's admin client has no ACL methods, but it ships the CreateAcls / DescribeAcls / DeleteAcls
request structs (v1, with pattern types); the small :class:`~aiokafka.protocol.api.Request` builders
below batch many ACLs into one request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest_v1, DeleteAclsRequest_v1, DescribeAclsRequest_v1
from aiokafka.protocol.api import Request

from schemas.errors import StackError
from services.settings import PFISettings

# Kafka's enum codes (org.apache.kafka.common.resource / acl).
RESOURCE_ANY, RESOURCE_TOPIC, RESOURCE_GROUP, RESOURCE_TRANSACTIONAL_ID = 1, 2, 3, 5
PATTERN_ANY, PATTERN_LITERAL, PATTERN_PREFIXED = 1, 3, 4
OP_ANY, OP_READ, OP_WRITE = 1, 3, 4
PERMISSION_ANY, PERMISSION_ALLOW = 1, 3
#: CreateAcls against a broker without an authorizer.
SECURITY_DISABLED = 54

#: Consumer groups each principal may use (PREFIXED): ``AggregatorSettings.group_id`` must start with it.
AGGREGATOR_GROUP_PREFIX = "pfi-aggregator"
SERVING_GROUP_PREFIX = "pfi-serv"


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule for ``User:<principal>`` from any host."""

    resource_type: int
    resource_name: str
    pattern_type: int
    principal: str  # "User:<name>"
    operation: int

    def row(self) -> tuple[int, str, int, str, str, int, int]:
        """The v1 wire tuple (resource type, name, pattern type, principal, host, operation, permission)."""
        return (
            self.resource_type,
            self.resource_name,
            self.pattern_type,
            self.principal,
            "*",
            self.operation,
            PERMISSION_ALLOW,
        )


def _topic(name: str, user: str, op: int) -> Acl:
    return Acl(RESOURCE_TOPIC, name, PATTERN_LITERAL, f"User:{user}", op)


def group_acls() -> list[Acl]:
    """The consumer-group rules (stack-wide, independent of topic prefixes)."""
    return [
        Acl(RESOURCE_GROUP, AGGREGATOR_GROUP_PREFIX, PATTERN_PREFIXED, "User:aggregator", OP_READ),
        Acl(RESOURCE_GROUP, SERVING_GROUP_PREFIX, PATTERN_PREFIXED, "User:serving", OP_READ),
        # Issue 15: leaves emit partials + offsets in Kafka transactions (transactional ids
        # ``pfi-aggregator-leaf-...``); WRITE on a transactional id implies DESCRIBE.
        Acl(
            RESOURCE_TRANSACTIONAL_ID, AGGREGATOR_GROUP_PREFIX, PATTERN_PREFIXED, "User:aggregator", OP_WRITE
        ),
    ]


def topic_acls(settings: PFISettings, names: Iterable[str] | None = None) -> list[Acl]:
    """The rules on ``settings``' topics (only those among ``names`` when given)."""
    rules = [
        _topic(settings.updates_topic, "aggregator", OP_READ),
        _topic(settings.updates_topic, "ingest", OP_WRITE),
        _topic(settings.dlq_topic, "aggregator", OP_WRITE),
        _topic(settings.versions_topic, "aggregator", OP_WRITE),
        _topic(settings.versions_topic, "serving", OP_READ),
        _topic(settings.partials_topic, "aggregator", OP_READ),  # the root
        _topic(settings.partials_topic, "aggregator", OP_WRITE),  # the leaves (transactional)
    ]
    if names is None:
        return rules
    wanted = set(names)
    return [rule for rule in rules if rule.resource_name in wanted]


def acls_enabled(settings: PFISettings) -> bool:
    """ACLs are managed whenever clients authenticate (an unauthenticated broker has no principals)."""
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


# ------------------------------------------------------------------------------------ wire requests


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = 30

    def __init__(self, acls: Iterable[Acl]) -> None:
        self._rows = [acl.row() for acl in acls]

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self._rows)


class _DescribeAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = 29

    def __init__(self, resource_type: int = RESOURCE_ANY, name: str | None = None) -> None:
        self._filter = (resource_type, name, PATTERN_ANY, None, None, OP_ANY, PERMISSION_ANY)

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        return request_struct_class(*self._filter)


class _DeleteAcls(Request[DeleteAclsRequest_v1]):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = 31

    def __init__(self, topics: Iterable[str]) -> None:
        self._filters = [
            (RESOURCE_TOPIC, name, PATTERN_LITERAL, None, None, OP_ANY, PERMISSION_ANY) for name in topics
        ]

    def build(self, request_struct_class: type[DeleteAclsRequest_v1]) -> DeleteAclsRequest_v1:
        return request_struct_class(self._filters)


async def _send(admin: AIOKafkaAdminClient, request: Request[Any]) -> dict[str, Any]:
    response = await admin._send_request(request)  # aiokafka has no public ACL API
    result: dict[str, Any] = response.to_object()
    return result


async def describe_acls(admin: AIOKafkaAdminClient) -> set[Acl]:
    """Every ALLOW rule the broker's authorizer holds."""
    result = await _send(admin, _DescribeAcls())
    if result["error_code"] != 0:
        raise StackError(f"DescribeAcls failed: {result['error_message'] or result['error_code']}")
    found: set[Acl] = set()
    for res in result["resources"]:
        for acl in res["acls"]:
            if acl["permission_type"] == PERMISSION_ALLOW and acl["host"] == "*":
                found.add(
                    Acl(
                        res["resource_type"],
                        res["resource_name"],
                        res["resource_pattern_type"],
                        acl["principal"],
                        acl["operation"],
                    )
                )
    return found


async def ensure_acls(admin: AIOKafkaAdminClient, acls: Iterable[Acl], *, timeout_s: float = 30.0) -> int:
    """Create the missing ones among ``acls`` (one request), then wait until the broker enforces them.

    Returns how many were created. A broker without an authorizer (``SECURITY_DISABLED``) is left alone."""
    wanted = set(acls)
    if not wanted:
        return 0
    missing = sorted(wanted - await describe_acls(admin))
    if not missing:
        return 0
    result = await _send(admin, _CreateAcls(missing))
    for acl, row in zip(missing, result["creation_responses"], strict=True):
        if row["error_code"] == SECURITY_DISABLED:
            return 0
        if row["error_code"] != 0:
            raise StackError(f"cannot create Kafka ACL {acl}: {row['error_message'] or row['error_code']}")
    # The controller committed them; wait until the broker's authorizer has applied the metadata too.
    deadline = time.monotonic() + timeout_s
    while not wanted.issubset(await describe_acls(admin)):
        if time.monotonic() > deadline:
            raise StackError(f"Kafka ACLs not visible {timeout_s:.0f}s after creation: {missing}")
        await asyncio.sleep(0.05)
    return len(missing)


async def delete_topic_acls(admin: AIOKafkaAdminClient, topics: Iterable[str]) -> int:
    """Removes every rule on these topics (LITERAL patterns); returns how many were removed."""
    names = sorted(set(topics))
    if not names:
        return 0
    result = await _send(admin, _DeleteAcls(names))
    removed = 0
    for row in result["filter_responses"]:
        if row["error_code"] == SECURITY_DISABLED:
            return 0
        if row["error_code"] != 0:
            raise StackError(f"cannot delete Kafka ACLs: {row['error_message'] or row['error_code']}")
        removed += len(row["matching_acls"])
    return removed
