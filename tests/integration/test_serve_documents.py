"""Private retrieval (a user's own documents) through the service's HTTP API against the real Redis,
tiny model, real all-MiniLM-L6-v2 embeddings: isolation between users, deletion that leaves nothing in
Redis, bad input, retrieval correctness on a small fixed corpus, score/generate with retrieved or
device context (checked against a direct computation) and two replicas sharing one Redis."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F
from redis.asyncio import Redis

from schemas.events import FederationSpec
from services.personalization.harness import Harness, serving
from services.personalization.user_documents import MAX_CONCURRENT_ADDS
from services.settings import PFISettings, ServeSettings
from services.store import keys
from services.store.versions import VersionStore
from tests.support.serving import tiny_federation

pytestmark = pytest.mark.integration

CORPUS = {
    "garden": "Tomatoes in my garden need watering every morning; the basil and peppers grow beside them "
    "in raised beds of compost.",
    "bike": "My bicycle chain slipped again on the climb, so I oiled the derailleur and adjusted the gears "
    "before the weekend ride.",
    "sister": "Call my sister Margot on Sunday about her wedding in Lisbon and the flights for June.",
    "taxes": "The tax return is due in April: gather the receipts, the bank statements and the pension "
    "letter for the accountant.",
}
TEXT = "I should water the tomatoes before work tomorrow."


@pytest.fixture
def settings(redis_url: str, kafka_bootstrap: str) -> PFISettings:
    return PFISettings(redis_url=redis_url, kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture
async def fed(redis_client: Redis) -> FederationSpec:
    return await tiny_federation(VersionStore(redis_client))


@pytest.fixture
async def h(settings: PFISettings, fed: FederationSpec) -> AsyncIterator[Harness]:
    async with serving(settings, ServeSettings(), federation=fed.name) as harness:
        yield harness


def docs_url(fed: str, user: str) -> str:
    return f"/v1/federations/{fed}/users/{user}/documents"


async def add(h: Harness, fed: str, user: str, docs: dict[str, str], **kw: Any) -> dict[str, Any]:
    body = {"documents": [{"id": i, "text": t} for i, t in docs.items()]}
    response = await h.client.post(docs_url(fed, user), json=body, headers=h.auth(user, **kw))
    assert response.status_code == 201, response.text
    out: dict[str, Any] = response.json()
    return out


async def search(h: Harness, fed: str, user: str, query: str, **body: Any) -> list[dict[str, Any]]:
    response = await h.client.post(
        docs_url(fed, user) + "/search", json={"query": query, **body}, headers=h.auth(user)
    )
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()["hits"]
    return hits


async def post(h: Harness, path: str, user: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return await h.client.post(path, json=body, headers=h.auth(user, **kw))


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def redis_dump(redis: Redis) -> list[bytes]:
    """Every key name and every stored byte string (fields, members, values) of the test database."""
    out: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        out.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                out += [field, value]
        elif kind == "zset":
            out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        elif kind == "stream":
            for _, entry in await redis.xrange(key):
                for field, value in entry.items():
                    out += [field, value]
    return out


def containing(dump: list[bytes], needle: str) -> list[bytes]:
    raw = needle.encode()
    return [item for item in dump if raw in item]


# ------------------------------------------------------------------------------ routes and correctness


async def test_documents_are_added_listed_searched_and_found_by_meaning_and_by_words(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    added = await add(h, name, "alice", CORPUS)
    assert [d["id"] for d in added["documents"]] == list(CORPUS)
    assert all(d["chunks"] >= 1 and d["chars"] == len(CORPUS[d["id"]]) for d in added["documents"])

    listed = (await h.client.get(docs_url(name, "alice"), headers=h.auth("alice"))).json()
    assert listed["total"] == len(CORPUS)
    assert [d["id"] for d in listed["documents"]] == list(CORPUS)
    page = (await h.client.get(docs_url(name, "alice") + "?offset=1&limit=2", headers=h.auth("alice"))).json()
    assert [d["id"] for d in page["documents"]] == list(CORPUS)[1:3]

    # lexical: shared words; dense: meaning without shared words; hybrid: both
    assert (await search(h, name, "alice", "receipts accountant", mode="lexical"))[0]["doc_id"] == "taxes"
    assert (await search(h, name, "alice", "repair my cycling gear", mode="dense"))[0]["doc_id"] == "bike"
    assert (await search(h, name, "alice", "paying the government what I owe", mode="dense"))[0][
        "doc_id"
    ] == "taxes"
    expectations = {
        "when is the wedding of my sibling": "sister",
        "vegetables need watering": "garden",
        "filing my tax return": "taxes",
    }
    for query, doc in expectations.items():
        hits = await search(h, name, "alice", query, k=2)
        assert hits[0]["doc_id"] == doc, (query, hits)
        assert len(hits) == 2
        assert hits[0]["score"] >= hits[1]["score"]
        assert hits[0]["text"] in CORPUS[doc]
        assert hits[0]["dense"] is not None
        assert hits[0]["lexical"] is not None

    assert h.sample("pfi_serve_documents_total", op="added") == len(CORPUS)
    assert h.sample("pfi_serve_retrieval_duration_seconds_count", mode="hybrid") == len(expectations)


async def test_a_replaced_document_is_searched_with_its_new_text_only(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    await add(h, name, "alice", {"note": "The piano lesson moved to Thursday evening."})
    assert (await search(h, name, "alice", "piano lesson", mode="lexical"))[0]["doc_id"] == "note"
    await add(h, name, "alice", {"note": "Buy oat milk and lemons at the market."})
    assert await search(h, name, "alice", "piano lesson", mode="lexical") == []
    listed = (await h.client.get(docs_url(name, "alice"), headers=h.auth("alice"))).json()
    assert listed["total"] == 1


# ------------------------------------------------------------------------------------------- isolation


async def test_a_user_can_never_read_search_list_delete_or_retrieve_anothers_documents(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    await add(h, name, "alice", CORPUS)
    url = docs_url(name, "alice")
    bob = h.auth("bob")
    refused = [
        await h.client.get(url, headers=bob),
        await h.client.post(url + "/search", json={"query": "wedding"}, headers=bob),
        await h.client.post(url, json={"documents": [{"text": "planted by bob"}]}, headers=bob),
        await h.client.delete(url + "/sister", headers=bob),
        await h.client.delete(url, headers=bob),
        await post(
            h, f"/v1/federations/{name}/score", "bob", {"texts": [TEXT], "user_id": "alice", "retrieval": {}}
        ),
        await post(
            h,
            f"/v1/federations/{name}/generate",
            "bob",
            {"prompt": "Hi", "user_id": "alice", "retrieval": {}},
        ),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused), [r.text for r in refused]
    assert all(error_code(r) == "forbidden" for r in refused)

    # another federation's token for the same user name is refused too
    other = await h.client.get(url, headers=h.auth("alice", federation="another-fed"))
    assert other.status_code == 403

    # bob's own retrieval only ever sees bob's (empty) store
    assert await search(h, name, "bob", "wedding in Lisbon") == []
    own = await post(h, f"/v1/federations/{name}/score", "bob", {"texts": [TEXT], "retrieval": {"k": 4}})
    assert own.status_code == 200, own.text
    assert own.json()["results"][0]["retrieval"]["hits"] == []
    assert own.json()["results"][0]["retrieval"]["context_tokens"] == 0

    # nothing of alice's changed; an admin may act on her
    listed = await h.client.get(url, headers=h.auth("root", admin=True))
    assert listed.status_code == 200
    assert listed.json()["total"] == len(CORPUS)


# -------------------------------------------------------------------------------------------- deletion


async def test_deleting_documents_leaves_nothing_of_them_in_redis(
    h: Harness, fed: FederationSpec, redis_client: Redis
) -> None:
    name = fed.name
    user = f"erasable-{secrets.token_hex(4)}"
    marker = f"zqx{secrets.token_hex(6)}"
    secret_docs = {
        f"doc-{marker}-{i}": f"{marker} private note number {i} about {t}"
        for i, t in enumerate(CORPUS.values())
    }
    await add(h, name, user, secret_docs)
    await add(h, name, "bystander", {"keep": "The bystander keeps this note."})
    assert containing(await redis_dump(redis_client), marker)
    assert await search(h, name, user, marker, mode="lexical")

    first = next(iter(secret_docs))
    response = await h.client.delete(docs_url(name, user) + f"/{first}", headers=h.auth(user))
    assert response.status_code == 204
    dump = await redis_dump(redis_client)
    assert not containing(dump, first)
    assert not containing(dump, secret_docs[first])
    assert all(hit["doc_id"] != first for hit in await search(h, name, user, "private note number 0", k=8))
    again = await h.client.delete(docs_url(name, user) + f"/{first}", headers=h.auth(user))
    assert (again.status_code, error_code(again)) == (404, "not_found")

    response = await h.client.delete(docs_url(name, user), headers=h.auth(user))
    assert response.status_code == 204
    dump = await redis_dump(redis_client)
    assert not containing(dump, marker), containing(dump, marker)[:3]
    assert not containing(dump, user)
    assert not await redis_client.exists(
        keys.user_documents(name, user), keys.user_document_order(name, user)
    )
    assert await search(h, name, user, marker) == []
    listed = (await h.client.get(docs_url(name, user), headers=h.auth(user))).json()
    assert listed == {"documents": [], "total": 0, "offset": 0, "limit": 100}
    # the bystander's documents are untouched
    assert (await search(h, name, "bystander", "bystander note", mode="lexical"))[0]["doc_id"] == "keep"


# ------------------------------------------------------------------------------------------- bad input


async def test_bad_documents_and_parameters_get_clear_4xx_in_the_api_error_shape(
    settings: PFISettings, fed: FederationSpec
) -> None:
    serve = ServeSettings(
        doc_max_chars=2000, doc_max_per_request=3, doc_max_request_chars=5000, doc_max_chunks_per_user=6
    )
    async with serving(settings, serve, federation=fed.name) as h:
        name = fed.name
        url = docs_url(name, "alice")
        auth = {**h.auth("alice"), "Content-Type": "application/json"}

        async def status(body: Any, path: str = url) -> tuple[int, str]:
            response = await h.client.post(path, json=body, headers=auth)
            return response.status_code, error_code(response)

        assert await status({"documents": [{"text": ""}]}) == (422, "invalid_request")
        assert await status({"documents": [{"text": "   \n\t "}]}) == (422, "empty_document")
        assert await status({"documents": []}) == (422, "invalid_request")
        assert await status({"documents": [{"text": "x" * 2001}]}) == (413, "payload_too_large")
        assert await status({"documents": [{"text": "a b"}] * 4}) == (413, "payload_too_large")
        assert await status({"documents": [{"text": "word " * 390}] * 3}) == (413, "payload_too_large")
        assert await status({"documents": [{"text": "ok", "colour": "red"}]}) == (422, "invalid_request")
        assert await status({"documents": [{"text": "ok"}], "extra": 1}) == (422, "invalid_request")
        assert await status({"documents": [{"id": "bad:id", "text": "ok"}]}) == (422, "invalid_request")
        assert await status({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}) == (
            422,
            "duplicate_id",
        )
        assert await status({"documents": [{"text": "ok", "metadata": {"k": 1}}]}) == (422, "invalid_request")
        too_many_words = " ".join(f"w{i}" for i in range(350))  # > 6 chunks of 64 words, 16 overlap
        assert await status({"documents": [{"text": too_many_words}]}) == (413, "too_many_chunks")

        lone_surrogate = b'{"documents": [{"text": "bad \\ud800 text"}]}'
        response = await h.client.post(url, content=lone_surrogate, headers=auth)
        assert response.status_code == 422, response.text  # refused by the schema or by the store
        assert error_code(response) in ("invalid_request", "invalid_text")
        for raw in (b'{"documents": [{"text": "\xff\xfe latin-1 \xe9"}]}', b"\xff\xfe\x00{", b"not json"):
            response = await h.client.post(url, content=raw, headers=auth)
            assert 400 <= response.status_code < 500, response.text
            assert "error" in response.json(), response.text

        oversized = {"documents": [{"text": "y" * 100_000}]}  # past the gate's cap for this route
        response = await h.client.post(url, json=oversized, headers=auth)
        assert (response.status_code, error_code(response)) == (413, "payload_too_large")

        for k in (0, 33, -1, "four"):
            assert await status({"query": "q", "k": k}, url + "/search") == (422, "invalid_request")
        assert await status({"query": ""}, url + "/search") == (422, "invalid_request")
        assert await status({"query": "q", "mode": "magic"}, url + "/search") == (422, "invalid_request")
        assert await status({"query": "q" * 4097}, url + "/search") == (422, "invalid_request")

        score_url = f"/v1/federations/{name}/score"
        both = {"texts": [TEXT], "retrieval": {"k": 2}, "context": "some context"}
        assert await status(both, score_url) == (422, "invalid_request")
        for bad in ({"k": 0}, {"k": 33}, {"max_context_tokens": 8}, {"mode": "x"}, {"query": ""}, {"kk": 1}):
            assert await status({"texts": [TEXT], "retrieval": bad}, score_url) == (422, "invalid_request")
        assert await status({"texts": [TEXT], "context": "c" * (64 * 1024 + 1)}, score_url) == (
            422,
            "invalid_request",
        )
        admin = await h.client.post(
            score_url, json={"texts": [TEXT], "retrieval": {}}, headers=h.auth("root", admin=True)
        )
        assert (admin.status_code, error_code(admin)) == (422, "unprocessable")
        nowhere = await h.client.post(
            docs_url("no-such-fed", "alice"),
            json={"documents": [{"text": "hello"}]},
            headers=h.auth("alice", federation="no-such-fed"),
        )
        assert nowhere.status_code == 404

        documents = h.service.engine.documents
        documents._adds = MAX_CONCURRENT_ADDS  # as if that many uploads were being embedded
        busy = await h.client.post(url, json={"documents": [{"text": "later"}]}, headers=auth)
        assert (busy.status_code, error_code(busy)) == (429, "documents_busy")
        assert int(busy.headers["Retry-After"]) >= 1
        documents._adds = 0

        listed = (await h.client.get(url, headers=h.auth("alice"))).json()
        assert listed["total"] == 0  # nothing refused was stored


# ---------------------------------------------------------------------------- score / generate + context


def direct_nll(h: Harness, fed: str, context: str, text: str) -> tuple[float, int]:
    """Mean NLL of ``text``'s tokens after ``BOS + context + "\\n\\n"``, computed here with torch."""
    stack: Any = h.service.engine.runtimes[fed].current
    assert stack is not None
    tokenizer = stack.tokens.tokenizer
    ctx = tokenizer.encode(context + "\n\n")  # BOS + context bytes
    body = tokenizer.encode(text, add_bos=False)
    ids = torch.tensor([ctx + body])
    with torch.inference_mode():
        logits = stack.model(input_ids=ids).logits[0].float()
    targets = ids[0, len(ctx) :]
    predicted = logits[len(ctx) - 1 : -1]
    nll = F.cross_entropy(predicted, targets, reduction="mean")
    return float(nll), len(body)


async def test_score_with_context_scores_only_the_texts_tokens_conditioned_on_the_context(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    await add(h, name, "alice", CORPUS)
    score_url = f"/v1/federations/{name}/score"
    plain = (await post(h, score_url, "alice", {"texts": [TEXT]})).json()
    retrieved = await post(h, score_url, "alice", {"texts": [TEXT], "retrieval": {"k": 1}})
    assert retrieved.status_code == 200, retrieved.text
    result = retrieved.json()["results"][0]
    info = result["retrieval"]
    assert (info["source"], info["k"], info["mode"]) == ("service", 1, "hybrid")
    assert [hit["doc_id"] for hit in info["hits"]] == ["garden"]
    assert info["context_tokens"] > 0
    assert info["generation"] >= 1
    assert retrieved.json()["global_version"] == 0

    hit_text = (await search(h, name, "alice", TEXT, k=1))[0]["text"].strip()
    device = (await post(h, score_url, "alice", {"texts": [TEXT], "context": hit_text})).json()["results"][0]
    assert (device["retrieval"]["source"], device["retrieval"]["hits"]) == ("device", [])

    expected, count = direct_nll(h, name, hit_text, TEXT)
    plain_result = plain["results"][0]
    assert result["tokens"] == device["tokens"] == count == plain_result["tokens"]
    assert math.isclose(result["mean_nll"], expected, rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(device["mean_nll"], expected, rel_tol=1e-4, abs_tol=1e-5)
    assert (
        info["context_tokens"] == device["retrieval"]["context_tokens"] == len((hit_text + "\n\n").encode())
    )
    assert abs(plain_result["mean_nll"] - expected) > 1e-4  # the context really conditions the text

    # several texts: each is its own query (one batched search), unless retrieval.query is given
    texts = [TEXT, "The gears of my bicycle need oil."]
    each = await post(h, score_url, "alice", {"texts": texts, "retrieval": {"k": 1}})
    assert [r["retrieval"]["hits"][0]["doc_id"] for r in each.json()["results"]] == ["garden", "bike"]
    fixed = await post(
        h, score_url, "alice", {"texts": texts, "retrieval": {"k": 1, "query": "tax receipts"}}
    )
    assert [r["retrieval"]["hits"][0]["doc_id"] for r in fixed.json()["results"]] == ["taxes", "taxes"]
    own = {"k": 1, "mode": "lexical", "queries": ["Margot wedding Lisbon", "receipts accountant"]}
    each_query = await post(h, score_url, "alice", {"texts": texts, "retrieval": own})
    assert [r["retrieval"]["hits"][0]["doc_id"] for r in each_query.json()["results"]] == ["sister", "taxes"]
    solo = await post(h, score_url, "alice", {"texts": texts[:1], "retrieval": {"k": 1, "queries": ["bike"]}})
    assert solo.status_code == 200
    wrong = await post(h, score_url, "alice", {"texts": texts, "retrieval": {"queries": ["only one"]}})
    assert (wrong.status_code, error_code(wrong)) == (422, "unprocessable")
    both = await post(
        h, score_url, "alice", {"texts": texts, "retrieval": {"query": "a", "queries": ["b", "c"]}}
    )
    assert (both.status_code, error_code(both)) == (422, "invalid_request")


async def test_generate_with_retrieval_prepends_the_context_and_reports_it(
    h: Harness, fed: FederationSpec
) -> None:
    name = fed.name
    await add(h, name, "alice", CORPUS)
    gen_url = f"/v1/federations/{name}/generate"
    prompt = "Remember to call my sister about the wedding"
    body = {"prompt": prompt, "max_new_tokens": 8, "retrieval": {"k": 1, "mode": "lexical"}}
    response = await post(h, gen_url, "alice", body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert [hit["doc_id"] for hit in out["retrieval"]["hits"]] == ["sister"]
    assert out["prompt_tokens"] == len(prompt.encode()) + 1
    assert out["retrieval"]["context_tokens"] > 0
    device = await post(
        h, gen_url, "alice", {"prompt": prompt, "max_new_tokens": 8, "context": CORPUS["sister"].strip()}
    )
    assert device.status_code == 200, device.text
    assert device.json()["tokens"] == out["tokens"]  # greedy: the same context gives the same tokens
    assert device.json()["retrieval"]["context_tokens"] == out["retrieval"]["context_tokens"]


async def test_context_is_cut_to_the_positions_the_model_has_left(h: Harness, fed: FederationSpec) -> None:
    name = fed.name
    long_text = "t" * 400  # the tiny model has 512 positions
    response = await post(
        h, f"/v1/federations/{name}/score", "alice", {"texts": [long_text], "context": "c" * 5000}
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["tokens"] == 400
    assert 0 < result["retrieval"]["context_tokens"] <= 512 - 401


# ------------------------------------------------------------------------------------ two replicas


async def test_two_replicas_share_documents_and_a_delete_on_one_is_seen_by_the_other(
    settings: PFISettings, fed: FederationSpec
) -> None:
    secret = secrets.token_bytes(32)
    name = fed.name
    async with (
        serving(settings, ServeSettings(), secret=secret, federation=name) as one,
        serving(settings, ServeSettings(), secret=secret, federation=name) as two,
    ):
        await add(one, name, "alice", CORPUS)
        assert (await search(two, name, "alice", "wedding Lisbon", mode="lexical"))[0]["doc_id"] == "sister"
        assert len(two.service.engine.documents.cache) == 1  # replica two has alice's index cached now

        response = await one.client.delete(docs_url(name, "alice") + "/sister", headers=one.auth("alice"))
        assert response.status_code == 204
        hits = await search(two, name, "alice", "wedding Lisbon sister Margot", k=4)
        assert hits
        assert all(hit["doc_id"] != "sister" for hit in hits)

        scored = await post(
            two, f"/v1/federations/{name}/score", "alice", {"texts": [TEXT], "retrieval": {"k": 4}}
        )
        assert all(hit["doc_id"] != "sister" for hit in scored.json()["results"][0]["retrieval"]["hits"])

        response = await two.client.delete(docs_url(name, "alice"), headers=two.auth("alice"))
        assert response.status_code == 204
        assert await search(one, name, "alice", "tomatoes garden", k=4) == []
