"""Redis unreachable: sends are retried with backoff, an Event says why, and no VM is lost; when
Redis returns (empty: it kept nothing on disk) every VM's message reaches its node's queue."""

from __future__ import annotations

import base64
import json
import re

import redis as redis_client

from harness.fake_worker import message_has_no_spec
from harness.procs import wait_for
from mikrom import names


def _queue(r: redis_client.Redis, node: str) -> list[dict]:
    """The messages waiting on the node's queue, decoded from kombu's Redis format."""
    out = []
    for raw in r.lrange(names.node_queue(node), 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        out.append({"task": envelope["headers"]["task"], "id": envelope["headers"]["id"], "kwargs": kwargs,
                    "raw": raw.decode()})
    return out


def test_unreachable_redis_is_retried_with_backoff_and_no_vm_is_lost(operators, worker, mvms, restartable_redis):
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=16, labels={"test": mvms.label})
    op = operators(broker=restartable_redis.url())
    r = redis_client.Redis.from_url(restartable_redis.url(), socket_timeout=5, socket_connect_timeout=5)

    mvms.create("before", nodeName=node)
    wait_for(lambda: len(_queue(r, node)) == 1, 15, "the first message while Redis is up")

    restartable_redis.stop()
    for i in range(3):
        mvms.create(f"vm-{i}", nodeName=node)
    uids = {f"vm-{i}": wait_for(lambda i=i: (mvms.get(f"vm-{i}") or {}).get("metadata", {}).get("uid"), 10, "uid")
            for i in range(3)}

    def failures(uid):
        return [e for e in mvms.events(uid) if e.reason == names.DISPATCH_FAILED]

    wait_for(lambda: all(len(failures(u)) >= 3 for u in uids.values()), 40, "three failed sends per VM")
    for name, uid in uids.items():
        evs = failures(uid)
        assert all(e.type == "Warning" for e in evs)
        assert f"Redis at redis://127.0.0.1:{restartable_redis.port}/0" in evs[0].message, evs[0].message
        assert restartable_redis.password not in evs[0].message
        delays = [float(re.search(r"retrying in ([0-9.]+)s", e.message).group(1)) for e in evs[:3]]
        assert delays[0] < delays[1] < delays[2], delays  # backoff
        st = mvms.status(name)  # recorded, kept, not lost
        assert st["phase"] == "Scheduled" and st["node"] == node and st["dispatch"]["intent"] == "create"

    restartable_redis.start()
    want = {uids[n]: mvms.status(n)["dispatch"]["taskId"] for n in uids}

    def delivered():
        msgs = [m for m in _queue(r, node) if m["kwargs"]["uid"] in want]
        return msgs if {m["kwargs"]["uid"] for m in msgs} == set(want) else None

    msgs = wait_for(delivered, 40, "every VM's message after Redis returned")
    assert sorted(m["task"] for m in msgs) == [names.CREATE_VM] * 3
    assert all(m["id"] == want[m["kwargs"]["uid"]] for m in msgs)  # the recorded dispatch, sent once
    assert all(message_has_no_spec(m["raw"]) for m in msgs)
    # each VM's message went out on a retry, logged as such
    retried = {d["vm_uid"] for d in op.dispatches() if d["why"] == "send-retry"}
    assert set(want) <= retried
