"""The command line as a client of the HTTP API: ``send``, ``status`` and
``notifications`` against a real server process (README "Send from your
backend"), and what ``python3 api.py`` says when it cannot serve: a busy
port, a missing static/ folder."""

from __future__ import annotations

import os
import pty
import shutil
import socket
import subprocess
import sys

import pytest
import requests

import api
from conftest import BACKENDS, ROOT, TOKEN, Server, env_of, free_port


def cli(server: Server | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"WEBPUSH_URL": server.url, "WEBPUSH_TOKEN": TOKEN} if server else {}
    return subprocess.run(
        [sys.executable, str(ROOT / "api.py"), *args],
        env={**os.environ, **base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def store(server: Server, subscriber, topics: list[str] = ()) -> None:
    body = {**subscriber.subscription, "topics": list(topics)}
    assert requests.post(server.url + "/subscription", json=body).status_code == 201


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the tests that keep apart by topic."""
    server = Server(tmp_path_factory.mktemp("cli")).start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def server(request, tmp_path):
    server = Server(tmp_path, **env_of(request.param, request)).start()
    yield server
    server.stop()


def test_send_prints_the_id_and_with_wait_the_outcome_and_its_commonest_error(
    server, push_service
):
    fine, refusing = push_service.subscriber(), push_service.subscriber([400])
    store(server, fine, ["deploys"])
    store(server, refusing, ["deploys"])
    store(server, push_service.subscriber(), ["news"])  # not in the topic
    done = cli(server, "send", "v2 is live", "--body", "Faster pages", "--topic", "deploys", "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    notification_id, outcome = done.stdout.splitlines()
    assert outcome.startswith("done: 1 sent, 1 failed, 0 removed (gone) of 2")
    assert "commonest error" in outcome and "(400)" in outcome
    assert "of 2 handled" in done.stderr  # plain lines: stderr is no terminal
    delivered = [d for d in push_service.received() if d.status == 201]
    assert [d.subscriber for d in delivered] == [fine.id]
    assert delivered[0].message["title"] == "v2 is live"
    assert delivered[0].message["id"] == notification_id


def test_send_exits_non_zero_when_it_reached_none_of_its_subscribers(
    shared, push_service
):
    store(shared, push_service.subscriber([400]), ["refusing"])
    done = cli(shared, "send", "Anyone?", "--topic", "refusing", "--wait")
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].startswith("done: 0 sent, 1 failed")


def test_send_takes_a_rate_and_a_local_time(shared, push_service):
    for _ in range(2):
        store(shared, push_service.subscriber(), ["paced"])
    local = "2026-01-01T09:00"  # passed in every zone: sent at once, at the rate
    done = cli(shared, "send", "Paced", "--topic", "paced", "--rate", "60", "--local-time", local, "--wait")  # fmt: skip
    assert done.returncode == 0, done.stderr
    notification_id, outcome = done.stdout.splitlines()
    assert outcome.startswith("done: 2 sent")
    document = requests.get(
        f"{shared.url}/notifications/{notification_id}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()
    assert (document["rate"], document["send_at_local"]) == (60, local)
    refused = cli(shared, "send", "Too fast", "--rate", "5")
    assert refused.returncode != 0
    assert "'rate' must be whole messages per minute" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_send_with_wait_draws_a_progress_bar_on_a_terminal(shared, push_service):
    store(shared, push_service.subscriber(), ["bar"])
    ours, theirs = pty.openpty()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "api.py"),
            "send",
            "Hi",
            "--topic",
            "bar",
            "--wait",
        ],
        env={**os.environ, "WEBPUSH_URL": shared.url, "WEBPUSH_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=theirs,
        timeout=60,
        check=False,
    )
    os.close(theirs)
    drawn = os.read(ours, 65536).decode()
    os.close(ours)
    assert done.returncode == 0
    assert "\r[##############################] done: 1 of 1 handled" in drawn


def test_status_and_notifications_show_what_was_sent_and_by_which_key(
    shared, push_service
):
    store(shared, push_service.subscriber(), ["backups"])
    done = cli(shared, "send", "Backup done", "--topic", "backups", "--wait")
    sent = done.stdout.splitlines()[0]
    status = cli(shared, "status", sent)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"Backup done ({sent})"
    assert lines[1] == "  to topic backups, by admin"
    assert "done: 1 sent, 0 failed" in status.stdout
    listed = cli(shared, "notifications", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "SENT"]
    assert row.split()[:3] == [sent, "done", "1"] and row.endswith("Backup done")


def test_status_takes_an_id_that_begins_with_a_dash(shared):
    """Ids made before new ones avoided a leading "-" still work."""
    done = cli(shared, "status", "-Io-P92-aCZ2g5Q0")
    assert done.returncode == 1 and "usage:" not in done.stderr
    assert "no such notification" in done.stderr


def test_no_new_notification_id_begins_with_a_dash():
    message = api.Message({"title": "t"}, b"{}", 60)
    made = [
        api.new_notification(message, api.Audience(), 0.0, None, None, "", "api", 0)
        for _ in range(300)
    ]
    assert not [n["id"] for n in made if n["id"].startswith("-")]


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["send", "Hi"], {"WEBPUSH_TOKEN": "wrong"}, "does not accept WEBPUSH_TOKEN"),
        (["send", "Hi"], {"WEBPUSH_URL": "http://127.0.0.1:9"}, "cannot reach the push server"),
        (["send", "Hi", "--ttl", "-5"], {}, "'ttl'"),
        (["send", "Hi", "--at", "tomorrow"], {}, "send_at"),
        (["status", "nope"], {}, "no such notification"),
        (["notifications", "--limit", "0"], {}, "'limit'"),
        (["notifications"], {"WEBPUSH_TOKEN": "wpk_\u2019pasted"}, "a character no key has"),
        (["notifications"], {"WEBPUSH_URL": "http://[::1"}, "WEBPUSH_URL must be"),
    ],
)  # fmt: skip
def test_a_refused_command_says_why_in_one_line_without_a_traceback(
    shared, args, env, says
):
    done = cli(shared, *args, **env)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and says in line, line
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr


def test_a_busy_port_is_said_first_and_nothing_is_made(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, str(ROOT / "api.py")],
            env={
                **os.environ,
                "PORT": str(port),
                "HOST": "127.0.0.1",
                "VAPID_DIR": str(tmp_path / "vapid"),
                "SUBSCRIPTIONS_FILE": str(tmp_path / "subscriptions.json"),
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: port {port} is in use by another program")
    assert not (tmp_path / "vapid").exists()


def test_without_static_the_pages_say_what_is_missing_and_the_api_works(tmp_path):
    alone = tmp_path / "copied"
    alone.mkdir()
    shutil.copy(ROOT / "api.py", alone / "api.py")  # without static/ beside it
    server = Server(tmp_path)  # its environment, not its process
    proc = subprocess.Popen(
        [sys.executable, str(alone / "api.py")],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "serving on" in line:
                break
        assert "no static/ beside api.py" in line and "demo page at" not in line
        for page in ("/", "/admin"):
            answer = requests.get(server.url + page)
            assert answer.status_code == 404
            assert answer.headers["Content-Type"].startswith("text/html")
            assert "static/" in answer.text and str(alone) not in answer.text
        for script in ("/webpush.js", "/webpush-sw.js"):
            assert requests.get(server.url + script).status_code == 404
        assert requests.get(server.url + "/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("host", ["127.0.0.1", "*", "", "localhost"])
def test_the_early_port_check_takes_the_hosts_waitress_takes(host):
    assert api.port_problem(host, free_port()) is None
