"""GET /metrics: docs/receipts-and-metrics.md, "Metrics". The text is read with
prometheus_client's own parser and checked against a fan-out whose outcomes
the test chose (the decrypting stand-in answers each subscriber as scripted)."""

from __future__ import annotations

import dataclasses
import time

import webtest
from prometheus_client.parser import text_string_to_metric_families

import api
from conftest import AUTH, WAIT


def scrape(client, headers=AUTH) -> dict:
    """Every sample, as {(name, sorted labels): value}."""
    response = client.get("/metrics", headers=headers)
    assert response.content_type == "text/plain"
    return samples(response.text)


def samples(text: str) -> dict:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_need_the_push_token_by_default(app):
    assert "push token" in app.get("/metrics", status=401).json["error"]
    assert scrape(app)


def test_metrics_token_reads_metrics_and_nothing_else(app_with):
    client = app_with(metrics_token="metrics-token-0123456789")
    guard = {"Authorization": "Bearer metrics-token-0123456789"}
    assert scrape(client, guard)
    client.get("/topics", headers=guard, status=403)
    client.post_json("/push", {"title": "t"}, headers=guard, status=403)
    assert scrape(client, AUTH)  # the push token is the admin key: it may too


def test_metrics_count_a_known_fan_out(app, push_service):
    subs = [push_service.subscriber() for _ in range(3)]
    subs.append(push_service.subscriber(script=[410]))  # gone: removed
    subs.append(push_service.subscriber(script=[500, 201]))  # sent on a retry
    subs.append(push_service.subscriber(script=[400]))  # refused: failed
    for sub in subs:
        app.post_json("/subscription", sub.subscription)
    done = app.post_json("/push", {"title": "t"}, headers=WAIT).json
    assert (done["sent"], done["removed"], done["failed"]) == (4, 1, 1)
    messages = [d.message for d in push_service.received() if d.status == 201]
    for message in messages[:2]:
        body = {"event": "delivered", "receipt": message["receipt"]}
        app.post_json(f"/notifications/{done['id']}/events", body)
    body = {"event": "clicked", "receipt": messages[0]["receipt"]}
    app.post_json(f"/notifications/{done['id']}/events", body)
    app.post_json(f"/notifications/{done['id']}/events", body)  # counted once
    app.get("/topics", status=401)

    found = scrape(app)
    service = (("channel", "webpush"), ("origin", push_service.origin))
    for result, count in (("sent", 4), ("removed", 1), ("failed", 1)):
        key = ("webpush_messages_total", (*service, ("result", result)))
        assert found[key] == count, result
    assert found[("webpush_retries_total", service)] == 1
    assert found[("webpush_push_service_seconds_count", service)] == 6
    infinite = (
        "webpush_push_service_seconds_bucket",
        tuple(sorted((*service, ("le", "+Inf")))),
    )
    assert found[infinite] == 6
    assert found[("webpush_push_service_seconds_sum", service)] > 0
    assert found[("webpush_receipts_total", (("event", "delivered"),))] == 2
    assert found[("webpush_receipts_total", (("event", "clicked"),))] == 1
    assert found[("webpush_receipts_total", (("event", "closed"),))] == 0
    assert found[("webpush_subscriptions", (("channel", "webpush"),))] == 5
    assert found[("webpush_subscriptions", (("channel", "fcm"),))] == 0
    assert found[("webpush_notifications", (("status", "done"),))] == 1
    assert found[("webpush_notifications", (("status", "queued"),))] == 0
    assert found[("webpush_queue_batches", ())] == 0
    assert found[("webpush_queue_oldest_seconds", ())] == 0

    def requests_of(route: str, method: str, status: int) -> float:
        labels = (("method", method), ("route", route), ("status", str(status)))
        return found.get(("webpush_http_requests_total", labels), 0)

    assert requests_of("/subscription", "POST", 201) == 6
    assert requests_of("/push", "POST", 200) == 1
    assert requests_of("/notifications/<id>/events", "POST", 200) == 4
    assert requests_of("/topics", "GET", 401) == 1


def test_queue_depth_and_age_show_work_waiting(settings, push_service):
    """Delivery that cannot keep up: the batches wait, and their age grows."""
    slow = dataclasses.replace(settings, push_concurrency=1, push_processes=1)
    application = api.create_app(slow)
    client = webtest.TestApp(application)
    try:
        push_service.latency = 0.2
        for _ in range(3):
            client.post_json("/subscription", push_service.subscriber().subscription)
        for _ in range(2):
            client.post_json("/push", {"title": "t"}, headers=AUTH, status=202)
        deadline = time.monotonic() + 10
        while True:
            found = scrape(client)
            batches = found[("webpush_queue_batches", ())]
            waited = found[("webpush_queue_oldest_seconds", ())]
            if (batches >= 1 and waited > 0.1) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert batches >= 1 and waited > 0.1
    finally:
        application.config["webpush.close"]()


def test_metric_labels_stay_bounded_however_many_push_service_hosts_subscribe():
    """Anyone may subscribe: a push service of many hosts is one label, and
    past 20 other origins the rest are "other"."""
    metrics = api.Metrics()
    hosts = [f"https://x{n}.notify.windows.com" for n in range(100)]
    assert {metrics.origin_label(h) for h in hosts} == {"https://*.notify.windows.com"}
    assert metrics.origin_label("https://fcm.googleapis.com") == (
        "https://fcm.googleapis.com"
    )
    local = [f"http://127.0.0.1:{port}" for port in range(1000, 1100)]
    labels = [metrics.origin_label(o) for o in local]
    assert labels[:19] == local[:19] and set(labels[19:]) == {"other"}
    assert metrics.origin_label(local[0]) == local[0]  # kept for good
