"""kill -9 of a server process in the middle of a burst of writes from 16
clients: after a restart, every write the server acknowledged (a 200) is
there, on SQLite (WAL, synchronous=FULL) and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from store_helpers import _free_port, db_url, store_config  # noqa: F401  (fixture)

from pad_core.types import Preference
from server.store import Store

CLIENTS = 16
KILL_AFTER_ACKS = 160
SERVER = Path(__file__).with_name("store_server.py")


def start_server(url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, str(SERVER), url, str(port)], cwd=SERVER.parent.parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server process exited at start"
        try:
            httpx.get(f"{base}/v1/users/probe/preferences", timeout=1.0)
            return process, base
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise TimeoutError("server not up")


async def _seed(url: str) -> None:
    store = await Store.open(store_config(url))
    await store.record_completion("chatcmpl-d", messages=[{"role": "user", "content": "q"}], answers=["a"],
                                  preferences=[Preference("p")], user="w0")
    await store.close()


async def _feedback_comments(url: str) -> set[str]:
    store = await Store.open(store_config(url))
    try:
        return {f.comment for f in await store.list_feedback()}
    finally:
        await store.close()


def test_kill_9_loses_no_acknowledged_write(db_url):  # noqa: F811
    asyncio.run(_seed(db_url))
    process, base = start_server(db_url)
    acked_prefs: list[tuple[str, str]] = []
    acked_feedback: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=10.0) as http:
            for j in range(10_000):
                try:
                    if j % 4 == 3:
                        comment = f"fb {i} {j}"
                        response = http.post("/v1/feedback", json={"completion_id": "chatcmpl-d", "comment": comment})
                        if response.status_code == 200:
                            with lock:
                                acked_feedback.append(comment)
                    else:
                        user, text = f"w{i}-{j}", f"pref {i} {j} ✓"
                        response = http.put(f"/v1/users/{user}/preferences", json={"preferences": [text]})
                        if response.status_code == 200:
                            with lock:
                                acked_prefs.append((user, text))
                except httpx.HTTPError:
                    return  # the server is gone
                with lock:
                    if len(acked_prefs) + len(acked_feedback) >= KILL_AFTER_ACKS:
                        enough.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(120), "the burst did not get going"
        os.kill(process.pid, signal.SIGKILL)  # mid-burst: requests are in flight
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        for thread in threads:
            thread.join(30)
    assert len(acked_prefs) >= KILL_AFTER_ACKS // 2

    restarted, base = start_server(db_url)
    try:
        with httpx.Client(base_url=base, timeout=10.0) as http:
            for user, text in acked_prefs:
                response = http.get(f"/v1/users/{user}/preferences")
                assert response.status_code == 200, f"acknowledged write of {user} lost"
                assert response.json()["preferences"] == [{"text": text, "weight": 1.0}]
    finally:
        restarted.terminate()
        restarted.wait(30)
    assert set(acked_feedback) <= asyncio.run(_feedback_comments(db_url))
