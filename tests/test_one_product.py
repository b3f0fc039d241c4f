"""One notification product on either store: the promises of
docs/notifications.md (isolation, resumption, counting causes of failure, a full
disk) held by the one ``NotificationEngine`` over ``JournalJobStore`` (JSON)
and ``RedisJobStore`` (Redis) alike. Each test runs on both stores unless its
docstring says why it cannot; a real ``python api.py`` process where a
restart, kill -9 or a real disk is the point, the in-process app elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import time
from pathlib import Path

import pytest
import requests

import api
from conftest import (
    AUTH,
    LOCAL_PUSH,
    WAIT,
    fake_subscription,
    mounted_tmpfs,
    preload,
    pushed,
    status_document,
    wait_status,
)
from tests.push_service import PushService
from tests.test_notifications import DOCUMENT_FIELDS, hung_push_service
from tests.test_scale_out import cluster  # noqa: F401 - a fixture, used by name

ERROR_FIELDS = {"channel", "origin", "status", "reason", "count"}
RECEIPT_FIELDS = ("delivered", "clicked", "closed")
# Refusals a push service may answer, each counted as ``failed`` with the
# subscription kept (docs/delivery.md): no retry, no removal.
REFUSALS = (400, 401, 402, 403, 405, 406, 409, 411, 412, 413, 415, 422)


def records(subscriptions: list[dict], topics=()) -> list[dict]:
    """Subscriptions (as browsers send them) as the store keeps them."""
    return [
        {"id": api.subscription_id(sub["endpoint"]), **sub, "topics": list(topics)}
        for sub in subscriptions
    ]


def _isolation_scenario(hung: str, push_service: PushService) -> dict[str, list]:
    """2,000 subscribers on ``hung`` and 10 healthy ones on topic ``all``, 10
    other healthy ones on topic ``other``: what to store before the scenario."""
    on_hung = [
        {**push_service.subscriber().subscription, "endpoint": f"{hung}/push/{n}"}
        for n in range(2000)
    ]
    return {
        "hung": on_hung,
        "healthy": [push_service.subscriber() for _ in range(10)],
        "other": [push_service.subscriber() for _ in range(10)],
    }


def _check_isolation(url: str, push_service: PushService, subs: dict) -> None:
    """The fan-out to ``all`` reaches its 10 healthy subscribers within 2 s,
    and a notification to ``other`` is done within 2 s while it still sends."""
    first = requests.post(
        url + "/push", json={"title": "everyone", "topic": "all"}, headers=AUTH
    ).json()
    assert first["subscriptions"] == 2010
    started = time.monotonic()
    try:
        push_service.wait_for(10, timeout=2)
    except TimeoutError:
        path = f"{url}/notifications/{first['id']}"
        late = requests.get(path, headers=AUTH, timeout=10).json()
        pytest.fail(f"not every healthy subscriber had it within 2 s: {late}")
    reached = {d.subscriber for d in push_service.received()}
    assert reached == {s.id for s in subs["healthy"]}

    started = time.monotonic()
    second = requests.post(
        url + "/push",
        json={"title": "others", "topic": "other"},
        headers={**AUTH, "Prefer": "wait=10"},
        timeout=15,
    )
    took = time.monotonic() - started
    assert second.status_code == 200, second.text
    assert (second.json()["status"], second.json()["sent"]) == ("done", 10)
    assert took < 2, f"the second notification took {took:.1f} s"
    others = [d for d in push_service.received() if d.message["title"] == "others"]
    assert {d.subscriber for d in others} == {s.id for s in subs["other"]}
    path = f"{url}/notifications/{first['id']}"
    deadline = time.monotonic() + 5
    while (still := requests.get(path, headers=AUTH, timeout=10).json())["sent"] < 10:
        assert time.monotonic() < deadline, still  # the healthy batches' counts
        time.sleep(0.05)
    assert still["status"] == "sending", still  # the hung batches are out
    assert still["sent"] == 10


# -- isolation ------------------------------------------------------------------------


def test_a_hung_push_service_delays_neither_its_fan_outs_healthy_subscribers_nor_another_notification(
    server_factory, backend_env, tmp_path, push_service
):
    """docs/notifications.md, "Isolation", on either store: 2,000 subscribers on a push
    service that never answers (PUSH_TIMEOUT=5) and 10 healthy ones in one
    fan-out; the healthy get it within 2 s, and another notification to 10
    other healthy subscribers is done within 2 s while the first still sends."""
    with hung_push_service() as hung:
        subs = _isolation_scenario(hung, push_service)
        preload(backend_env, tmp_path, subs["hung"], ["all"])
        preload(
            backend_env, tmp_path, [s.subscription for s in subs["healthy"]], ["all"]
        )
        preload(
            backend_env, tmp_path, [s.subscription for s in subs["other"]], ["other"]
        )
        server = server_factory(**backend_env, PUSH_TIMEOUT="5").start()
        _check_isolation(server.url, push_service, subs)


def test_a_hung_push_service_delays_nothing_else_across_workers_on_redis(
    cluster,  # noqa: F811 - the fixture imported above
    push_service,
):
    """The same scenario and figures with the API apart from the delivery (an
    HTTP process with API_DELIVERS=false and two ``--worker`` processes): Redis
    only, as only Redis shares notifications between processes."""
    with hung_push_service() as hung:
        subs = _isolation_scenario(hung, push_service)
        store = cluster.store
        store.write(records(subs["hung"][:1000], ["all"]))
        store.write(records(subs["hung"][1000:], ["all"]))
        store.write(records([s.subscription for s in subs["healthy"]], ["all"]))
        store.write(records([s.subscription for s in subs["other"]], ["other"]))
        server = cluster.http(API_DELIVERS="false")
        cluster.worker("one")
        cluster.worker("two")
        _check_isolation(server.url, push_service, subs)


def test_a_small_notification_goes_ahead_of_a_large_fan_out_to_the_same_push_service(
    app_with,
):
    """docs/notifications.md: a notification to at most 1,000 subscribers
    has slots of its own and goes ahead of what waits, so a 3,000-subscriber
    fan-out to the same slow push service does not hold it back."""
    with PushService(latency=0.05) as service:
        client = app_with(push_concurrency=8, push_processes=1)
        store = client.app.config["webpush.store"]
        crowd = [service.subscriber().subscription for _ in range(3000)]
        store.write(records(crowd, ["all"]))
        few = [service.subscriber() for _ in range(5)]
        store.write(records([s.subscription for s in few], ["few"]))
        large = client.post_json(
            "/push", {"title": "everyone", "topic": "all"}, headers=AUTH
        ).json
        service.wait_for(50, timeout=30)  # the fan-out is under way: 160 a second
        started = time.monotonic()
        small = pushed(client, {"title": "just you", "topic": "few"})
        took = time.monotonic() - started
        backlog = status_document(client, large["id"])
    assert (small["status"], small["sent"]) == ("done", 5), small
    assert took < 2, f"{took:.1f} s behind the fan-out ({backlog['sent']} sent)"
    assert backlog["status"] == "sending", "the fan-out ended first: make it larger"


def test_a_push_services_backlog_does_not_hold_back_another_push_services_messages(
    json_settings, push_service, monkeypatch
):
    """docs/delivery.md: a push service that hangs fills only its own slots,
    and every other push service's messages go out at once. Delivery knows
    no store, so this runs once: 1,000 messages for a hung push service are
    handed over first, then one for a healthy one; the healthy one's is
    among the first messages started (encrypted), not behind the backlog."""
    started: list[str] = []
    encrypt = api.encrypt_message

    def recording(record: dict, payload: bytes) -> bytes:
        started.append(record["id"])
        return encrypt(record, payload)

    monkeypatch.setattr(api, "encrypt_message", recording)
    keys = api.VapidKeys.load_or_create(json_settings)
    delivery = api.WebPushDelivery(keys, 1000, 5.0, LOCAL_PUSH)
    message = api.Message({"title": "t"}, b'{"title": "t"}', 60)
    try:
        with hung_push_service() as hung:
            backlog = [
                {**push_service.subscriber().subscription, "id": f"hung-{n}"}
                for n in range(1000)
            ]
            for n, record in enumerate(backlog):
                record["endpoint"] = f"{hung}/push/{n}"
            healthy = push_service.subscriber()
            delivery.submit(backlog, message)
            delivery.submit([{**healthy.subscription, "id": "healthy"}], message)
            handed = len(started)  # of the backlog, started before it came
            push_service.wait_for(1, timeout=10)
            position = started.index("healthy")
    finally:
        delivery.close(1)
    behind = position - handed
    assert behind <= 2 * api.START_BATCH, f"started after {behind} more of the backlog"


# -- the same answers on both stores ---------------------------------------------------


def _subscribe(app, push_service: PushService, topic: str, scripts: list) -> list:
    """One subscriber of ``topic`` per script (its answers, then 201)."""
    subs = [push_service.subscriber(script=script) for script in scripts]
    for sub in subs:
        app.post_json("/subscription", {**sub.subscription, "topics": [topic]})
    return subs


def test_failures_are_counted_whole_and_the_ten_commonest_causes_listed(
    app, push_service
):
    """Twelve causes of failure (refusals with different statuses, each on a
    different number of subscribers) and successes in one fan-out: ``failed``
    counts every failure, ``errors`` the ten commonest, commonest first."""
    scripts = [[status] for n, status in enumerate(REFUSALS) for _ in range(n + 1)]
    _subscribe(app, push_service, "many", scripts + [[]] * 5)
    document = pushed(app, {"title": "t", "topic": "many"}, WAIT)
    assert set(document) == DOCUMENT_FIELDS
    assert (document["status"], document["total"]) == ("done", 78 + 5)
    assert (document["sent"], document["failed"], document["pending"]) == (5, 78, 0)
    assert document["channels"]["webpush"]["failed"] == 78
    errors = document["errors"]
    assert [set(e) for e in errors] == [ERROR_FIELDS] * 10
    assert [(e["status"], e["count"]) for e in errors] == [
        (status, n + 1) for n, status in reversed(list(enumerate(REFUSALS)))
    ][:10]
    assert {(e["channel"], e["origin"]) for e in errors} == {
        ("webpush", push_service.origin)
    }
    assert sum(e["count"] for e in errors) == 78 - 1 - 2  # the two rarest left out
    assert status_document(app, document["id"]) == document


def test_with_ten_causes_or_fewer_failed_is_the_sum_of_their_counts(app, push_service):
    scripts = [[400], [403], [403], [413], [413], [413], [500] * 3, [], []]
    _subscribe(app, push_service, "few", scripts)
    document = pushed(app, {"title": "t", "topic": "few"}, WAIT)
    errors = {e["status"]: e["count"] for e in document["errors"]}
    assert errors == {413: 3, 403: 2, 400: 1, 500: 1}
    assert document["failed"] == sum(errors.values()) == 7
    assert (document["sent"], document["retried"]) == (2, 1)  # the 500, 3 tries
    assert [e["count"] for e in document["errors"]] == [3, 2, 1, 1]


def test_a_cancel_answers_the_status_document_on_either_store(app, push_service):
    _subscribe(app, push_service, "later", [[], [], []])
    answer = app.post_json(
        "/push", {"title": "t", "topic": "later", "delay": 60}, headers=AUTH
    ).json
    cancelled = app.delete(f"/notifications/{answer['id']}", headers=AUTH).json
    assert set(cancelled) == DOCUMENT_FIELDS
    assert (cancelled["id"], cancelled["status"]) == (answer["id"], "cancelled")
    assert (cancelled["total"], cancelled["pending"], cancelled["sent"]) == (3, 3, 0)
    assert cancelled["errors"] == [] and cancelled["finished"] is not None
    assert status_document(app, answer["id"]) == cancelled


def test_an_idempotent_replay_answers_the_same_document_with_its_receipts(
    app, push_service
):
    _subscribe(app, push_service, "once", [[], [], [400]])
    headers = {**WAIT, "Idempotency-Key": "replay-1"}
    body = {"title": "t", "topic": "once"}
    original = app.post_json("/push", body, headers=headers)
    assert original.status_int == 200 and "Idempotent-Replayed" not in original.headers
    assert set(original.json) == DOCUMENT_FIELDS
    replay = app.post_json("/push", body, headers=headers)
    assert replay.status_int == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json == original.json
    receipt = push_service.received()[0].message["receipt"]
    event = {"event": "delivered", "receipt": receipt}
    app.post_json(f"/notifications/{original.json['id']}/events", event)
    again = app.post_json("/push", body, headers=headers).json
    assert again == status_document(app, original.json["id"])
    assert {k: again[k] for k in RECEIPT_FIELDS} == {
        "delivered": 1,
        "clicked": 0,
        "closed": 0,
    }
    unchanged = {k: v for k, v in again.items() if k not in RECEIPT_FIELDS}
    assert unchanged == {
        k: v for k, v in original.json.items() if k not in RECEIPT_FIELDS
    }
    assert len(push_service.received()) == 3  # sent once


# -- resuming ---------------------------------------------------------------------------


def _newcomers_across_a_kill(server, service, env, tmp_path, total: int) -> list:
    """kill -9 the server before its fan-out to ``total`` ends, store one
    subscriber while it is down, start it again and post another: the two
    who subscribed after the notification started."""
    server.stop(signal.SIGKILL)
    assert len(service.received()) < total, "ended before the kill: make it slower"
    service.latency = 0.01  # the rest goes out in about a second
    while_down = service.subscriber()
    preload(env, tmp_path, [while_down.subscription])
    server.start()
    after = service.subscriber()
    response = requests.post(server.url + "/subscription", json=after.subscription)
    assert response.status_code == 201, response.text
    return [while_down, after]


def test_a_resumed_notification_goes_to_those_subscribed_when_it_started(
    server_factory, backend_env, tmp_path
):
    """kill -9 in the middle of a fan-out to 2,000; one subscriber is stored
    while the server is down and one posted right after the restart, while
    the rest is being sent: every one of the 2,000 gets it, the two new ones
    do not, and ``total`` stays 2,000."""
    with PushService(latency=0.1) as service:
        subs = [service.subscriber() for _ in range(2000)]
        preload(backend_env, tmp_path, [s.subscription for s in subs])
        server = server_factory(
            **backend_env,
            PUSH_PROCESSES="1",
            PUSH_CONCURRENCY="20",  # 200 a second: 10 s for all
            WORKER_TIMEOUT="2",  # Redis: the dead process's batches taken back
        ).start()
        answer = requests.post(
            server.url + "/push", json={"title": "t"}, headers=AUTH
        ).json()
        assert answer["subscriptions"] == 2000
        service.wait_for(500, timeout=60)
        _newcomers_across_a_kill(server, service, backend_env, tmp_path, 2000)
        assert status_document(server, answer["id"])["status"] == "sending"
        document = wait_status(server, answer["id"], timeout=120)
        received = service.received()
    assert {d.subscriber for d in received} == {s.id for s in subs}
    assert all(d.error is None for d in received)
    assert len(received) - 2000 <= api.BATCH_SIZE * api.BATCHES_PER_PROCESS
    assert (document["status"], document["total"]) == ("done", 2000)
    assert (document["sent"], document["pending"]) == (2000, 0)


def test_a_resumed_notification_goes_to_those_subscribed_when_it_started_after_a_compaction(
    server_factory, backend_env, tmp_path
):
    """The last subscriber in line unsubscribes during a fan-out, enough
    writes follow for the JSON store to be compacted, then kill -9; one
    subscriber is stored while the server is down, one posted after the
    restart: neither is one of those the notification goes to (a place in
    line is never given twice), on either store."""
    with PushService(latency=0.1) as service:
        server = server_factory(
            **backend_env,
            PUSH_PROCESSES="1",
            PUSH_CONCURRENCY="1",  # 10 a second, in line order
            WORKER_TIMEOUT="2",
        ).start()
        http = requests.Session()
        subs = [service.subscriber() for _ in range(100)]
        for sub in subs:
            http.post(server.url + "/subscription", json=sub.subscription)
        answer = http.post(server.url + "/push", json={"title": "t"}, headers=AUTH)
        assert answer.json()["subscriptions"] == 100
        service.wait_for(5, timeout=30)
        last = subs.pop()
        gone = http.delete(
            server.url + "/subscription", json={"endpoint": last.endpoint}
        )
        assert gone.status_code == 204
        for _ in range(api.JsonLinesStore.COMPACT_MIN_LINES):  # lines to compact
            http.post(server.url + "/subscription", json=subs[0].subscription)
        while_down, new = _newcomers_across_a_kill(
            server, service, backend_env, tmp_path, 99
        )
        notification_id = answer.json()["id"]
        document = wait_status(server, notification_id, timeout=60)
        received = {d.subscriber for d in service.received()}
    assert while_down.id not in received, "one stored after the start got it"
    assert new.id not in received, "one subscribed after the start got it"
    assert received == {s.id for s in subs}
    assert (document["status"], document["total"], document["sent"]) == ("done", 99, 99)


def test_failures_and_their_causes_are_counted_once_across_a_kill_9(
    server_factory, backend_env, tmp_path
):
    """A fan-out to 1,000, a quarter refused (403), killed with -9 midway
    and resumed: the batches sent twice are counted once, so ``failed`` and
    the cause's count are exactly 250, on either store."""
    with PushService(latency=0.05) as service:
        subs = [
            service.subscriber(script=[403] * 5 if n % 4 == 0 else [])
            for n in range(1000)
        ]
        preload(backend_env, tmp_path, [s.subscription for s in subs])
        server = server_factory(
            **backend_env,
            PUSH_PROCESSES="1",
            PUSH_CONCURRENCY="20",
            WORKER_TIMEOUT="2",
        ).start()
        answer = requests.post(
            server.url + "/push", json={"title": "t"}, headers=AUTH
        ).json()
        service.wait_for(400, timeout=60)
        server.stop(signal.SIGKILL)
        assert len(service.received()) < 1000, "ended before the kill: make it slower"
        server.start()
        document = wait_status(server, answer["id"], timeout=60)
        received = {d.subscriber for d in service.received()}
    assert received == {s.id for s in subs}
    assert (document["status"], document["total"]) == ("done", 1000)
    assert (document["sent"], document["failed"], document["retried"]) == (750, 250, 0)
    assert document["errors"] == [
        {
            "channel": "webpush",
            "origin": service.origin,
            "status": 403,
            "reason": "",
            "count": 250,
        }
    ]


def test_a_cancel_answered_survives_kill_9_and_the_notification_is_not_resumed(
    server_factory, backend_env, tmp_path
):
    """Cancelled in the middle of a fan-out, then kill -9 at once: after the
    restart it is still cancelled, with the same document, and a later
    notification goes out while nothing more of the cancelled one does."""
    with PushService(latency=0.1) as service:
        subs = [service.subscriber() for _ in range(1000)]
        preload(backend_env, tmp_path, [s.subscription for s in subs], ["all"])
        server = server_factory(
            **backend_env,
            PUSH_PROCESSES="1",
            PUSH_CONCURRENCY="10",  # 100 a second
            WORKER_TIMEOUT="2",
        ).start()
        answer = requests.post(
            server.url + "/push", json={"title": "t", "topic": "all"}, headers=AUTH
        ).json()
        service.wait_for(50, timeout=30)
        path = f"{server.url}/notifications/{answer['id']}"
        cancelled = requests.delete(path, headers=AUTH)
        assert cancelled.json()["status"] == "cancelled", cancelled.text
        server.stop(signal.SIGKILL)
        sent_before = len(service.received())
        server.start()
        after = status_document(server, answer["id"])
        assert after["status"] == "cancelled"
        assert after["finished"] == cancelled.json()["finished"]
        _a_canary_gets_a_later_notification(server, service)
        received = [d.message["title"] for d in service.received()]
    assert received.count("t") == sent_before < 1000
    assert status_document(server, answer["id"])["status"] == "cancelled"


def _a_canary_gets_a_later_notification(server, service) -> None:
    """A new subscriber on its own topic gets a new notification (title "c"):
    the engine works after the restart."""
    canary = service.subscriber()
    body = {**canary.subscription, "topics": ["canary"]}
    requests.post(server.url + "/subscription", json=body)
    later = requests.post(
        server.url + "/push", json={"title": "c", "topic": "canary"}, headers=WAIT
    ).json()
    assert (later["status"], later["sent"]) == ("done", 1)


# -- a full disk ------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A real 4 MB tmpfs, mounted for the test (root only: CI is)."""
    with mounted_tmpfs(tmp_path, "4m") as mount:
        yield mount


def fill(directory: Path) -> Path:
    """A file that takes every byte left on ``directory``'s disk."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 4096)
    return filler


def test_a_fan_out_the_full_disk_meets_is_recorded_when_space_returns(
    tmpfs, server_factory, tmp_path
):
    """JSON only: the journal keeps in memory the progress a full disk
    refuses and writes it when there is space again. Redis refuses a write
    whole instead (507, nothing recorded), tested in test_scale_out.py.

    3,000 subscribers, a notification due in 2 s, the disk filled before it
    is due: all 3,000 get it; once the filler is deleted the notification is
    done with sent 3000; after a restart it is still done, and nobody gets it
    again."""
    store = tmpfs / "subscriptions.json"
    with PushService() as service:
        subs = [service.subscriber() for _ in range(3000)]
        json_store = api.JsonSubscriptionStore(store)
        json_store.write(records([s.subscription for s in subs], ["all"]))
        json_store.close()
        server = server_factory(SUBSCRIPTIONS_FILE=str(store)).start()
        answer = requests.post(
            server.url + "/push",
            json={"title": "t", "topic": "all", "delay": 2},
            headers=AUTH,
        ).json()
        assert answer["status"] == "scheduled"
        journal = store.with_name("subscriptions.notifications.json")
        assert journal.exists()  # on the small disk too
        filler = fill(tmpfs)
        assert status_document(server, answer["id"])["status"] == "scheduled"
        service.wait_for(3000, timeout=60)
        deadline = time.monotonic() + 10
        while "journal refuses writes" not in server.output():  # it met the disk
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        filler.unlink()
        document = wait_status(server, answer["id"], "done", timeout=10)
        assert (document["sent"], document["total"]) == (3000, 3000)

        server.stop()  # SIGTERM
        server.start()
        assert status_document(server, answer["id"]) == document
        _a_canary_gets_a_later_notification(server, service)  # the engine ran
        received = service.received()
    assert status_document(server, answer["id"]) == document
    titles = [d.message["title"] for d in received]
    assert titles.count("t") == 3000, "sent again after the restart"
    assert {d.subscriber for d in received if d.message["title"] == "t"} == {
        s.id for s in subs
    }


def test_causes_are_counted_whole_across_batches_and_push_services(
    app, store, push_service
):
    """A cause of failure met in several batches is one entry with every
    failure counted; causes at different push services stay apart."""
    with PushService() as other:
        subs = [push_service.subscriber(script=[403]) for _ in range(300)]
        subs += [push_service.subscriber() for _ in range(20)]
        subs += [other.subscriber(script=[400]) for _ in range(7)]
        subs += [other.subscriber(script=[413]) for _ in range(3)]
        store.write(records([s.subscription for s in subs], ["mixed"]))
        assert 300 > api.BATCH_SIZE  # the 403s fill more than one batch
        document = pushed(app, {"title": "t", "topic": "mixed"}, WAIT)
    causes = [(e["origin"], e["status"], e["count"]) for e in document["errors"]]
    assert causes == [
        (push_service.origin, 403, 300),
        (other.origin, 400, 7),
        (other.origin, 413, 3),
    ]
    assert (document["total"], document["sent"], document["failed"]) == (330, 20, 310)


# -- the job stores' own steps ----------------------------------------------------------


def _journal_jobs(tmp_path: Path) -> api.JournalJobStore:
    journal = api.NotificationJournal(tmp_path / "n.json")
    return api.JournalJobStore(
        journal, api.ReceiptDatabase(api.receipts_path(journal.path))
    )


def _queued(total: int) -> dict:
    message = api.Message({"title": "t"}, b"{}", 60, "normal")
    return api.new_notification(
        message, api.Audience(), time.time(), None, None, "", "api", total
    )


def test_an_ended_notification_shows_its_end_while_the_disk_refuses_its_final_record(
    tmp_path, monkeypatch
):
    """JSON only (Redis takes a write whole or refuses it): the status
    document says done, with its counts, while the journal cannot take the
    final record, and the record is written once it can."""
    jobs = _journal_jobs(tmp_path)
    record = _queued(2)
    jobs.insert(record, None)
    nid = record["id"]
    full = [False]
    write = jobs.journal.write

    def refusing(upserts=(), removals=()) -> None:
        if full[0] and (upserts or removals):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(upserts, removals)

    monkeypatch.setattr(jobs.journal, "write", refusing)
    jobs.claim_due(time.time(), time.time() + 10)
    _, cursor = jobs.start(nid, time.time(), 2, 10)
    full[0] = True
    jobs.enqueue(nid, cursor, "3 0", time.time() + 10, [("https://x", ["a", "b"])])
    [batch] = jobs.take("me", lambda origin: 4, 0.1)
    assert jobs.planned(nid, "3 0", time.time()) == 1
    sent = [api.PushOutcome(i, "https://x", 201, "sent") for i in ("a", "b")]
    assert jobs.complete(batch, api.Tally.of(sent), time.time()) == 2
    for _ in range(3):
        jobs.flush()  # the keeper's turns while the disk is full
    shown = api.status_document(jobs.load(nid))
    assert (shown["status"], shown["sent"], shown["pending"]) == ("done", 2, 0)
    assert jobs.status_of([nid]) == ["done"]
    full[0] = False
    jobs.flush()
    written = jobs.journal.get(nid)
    assert (written["status"], written["final"]) == ("done", True)
    jobs.close()


def test_a_notification_cancelled_before_its_final_record_ends_at_the_next_start(
    tmp_path,
):
    """JSON only (its journal): a cancelled notification whose final record
    was never written (a crash with batches out) is ended at the next start,
    not held in memory for ever, and so the retention drops it."""
    jobs = _journal_jobs(tmp_path)
    record = _queued(1)
    jobs.insert(record, None)
    jobs.journal.upsert({**record, "status": "cancelled", "finished": time.time()})
    jobs.close()
    again = _journal_jobs(tmp_path)
    assert api.status_document(again.load(record["id"]))["status"] == "cancelled"
    again.flush()
    assert again.journal.get(record["id"])["final"] is True
    assert again.drop_ended(time.time(), time.time() + 1) == 1
    assert again.load(record["id"]) is None
    again.close()


def test_a_plan_sees_the_topic_as_it_is_when_it_starts_even_after_one_was_cut_short(
    app,
):
    """A fan-out cut short after its first page (cancelled) leaves nothing
    that the next notification to the topic is planned from, on either
    store: one who left the topic since does not get it."""
    store = app.app.config["webpush.store"]
    subs = [{**api_record(n), "topics": ["x"]} for n in range(5)]
    store.write(subs)
    upto = store.sequence()
    assert len(store.page("webpush", "x", 0, upto, 2)) == 2  # then cut short
    left = store.get(subs[4]["id"])
    store.upsert({**left, "topics": []})
    planned = [i for _, i, _ in store.page("webpush", "x", 0, store.sequence(), 100)]
    assert planned == [s["id"] for s in subs[:4]]


def api_record(n: int) -> dict:
    sub = fake_subscription(n)
    return {"id": api.subscription_id(sub["endpoint"]), **sub}


def test_a_batch_that_cannot_be_handed_to_delivery_goes_back_and_is_sent(
    app_with, push_service, monkeypatch
):
    """A delivery that refuses one batch (no delivery process could start)
    strands neither it nor the batches taken with it, on either store."""
    client = app_with(push_processes=2)  # two batches, taken together
    delivery = client.app.config["webpush.delivery"]
    for _ in range(4):
        client.post_json("/subscription", push_service.subscriber().subscription)
    submit, refused = delivery.submit, []

    def refusing_once(*args, **kwargs):
        if not refused:
            refused.append(True)
            raise OSError(errno.EMFILE, "Too many open files")
        return submit(*args, **kwargs)

    monkeypatch.setattr(delivery, "submit", refusing_once)
    document = pushed(client, {"title": "t"})
    assert refused and (document["status"], document["sent"]) == ("done", 4)
