"""Issue 15: three piper sidecars (TTS_MAX_STREAMS=2 each) behind real HAProxy.

Started by ``scripts/start_multi_gpu.sh`` with the shipped ``deploy/haproxy/haproxy.cfg``.

What "full" means here: a sidecar is full when its open contexts (streams) reach its capacity; a
connection alone holds no stream. A call in these tests is a connection with one context open and
still taking text (the LLM's first words arrived), so it holds a stream until the turn ends.
HAProxy learns that a sidecar is full from ``/health/ready`` (503 ``at_capacity``) within one
check interval and sends it no new connection until a check passes again. When every sidecar is
full, HAProxy itself answers the upgrade with 503 and the protocol's ``busy`` JSON: the 7th
client is refused at once, not queued.

Calls that arrive after a sidecar died or began to drain but before HAProxy's next check of it
are still served (the connection failure or the sidecar's 503 is retried on another sidecar).
To make "before the next check" certain rather than a race against the interval, those tests
pause the checks of that one sidecar through HAProxy's runtime API, then resume them to see it
taken out of rotation.

The last tests run the Pipecat service (``ChatterboxTTSService``) through HAProxy: its sidecar
killed mid-turn, the whole fleet full, and its sidecar full when a turn starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.utils.errors import ErrorCategory
from pipecat_chatterbox.client import ConnectionLostError
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.asr import transcribe, word_error_rate
from tests.client import TTSClient
from tests.deploy.fleet import (
    API_KEY,
    AUTH,
    ROOT,
    Fleet,
    async_wait_until,
    connect_call,
    finish_call,
    http_get,
    open_call,
    require_haproxy,
    start_turn,
)
from tests.plugin.helpers import (
    LivePipeline,
    RecordingChatterboxTTSService,
    audio_of,
    of_type,
    speak,
    stop_of,
)
from tests.plugin.test_speech import LONG_REPLY


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator:
    """Start fleets: ``start(**kwargs)`` (see :class:`Fleet`); all are stopped afterwards."""
    require_haproxy()
    fleets: list[Fleet] = []

    def start(**kwargs) -> Fleet:
        workdir = tmp_path / f"fleet{len(fleets)}"
        workdir.mkdir()
        fleet = Fleet(workdir, **kwargs)
        fleets.append(fleet)
        return fleet.start()

    yield start
    for fleet in fleets:
        fleet.cleanup()


def test_shipped_config_is_valid():
    haproxy = require_haproxy()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_LB_")}  # the defaults
    check = subprocess.run(
        [haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout + check.stderr


def _redispatched_upgrades(fleet: Fleet) -> int:
    """Returns: upgrades HAProxy's log shows retried on another sidecar ("+N" retries field)."""
    log = (fleet.run_dir / "haproxy.log").read_text(errors="replace")
    return len(re.findall(r"/\+[1-9][0-9]* [0-9]+/[0-9]+ \"GET /v1/stream/tts", log))


def _all_down(fleet: Fleet) -> bool:
    return set(fleet.states().values()) == {"DOWN"}


async def _refused_busy(url: str) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        await connect(url, additional_headers=AUTH)
    response = info.value.response
    assert response.status_code == 503
    body = json.loads(bytes(response.body))
    assert body["type"] == "error" and body["code"] == "busy", body
    assert response.headers["Retry-After"] == "1"
    return info.value


async def test_calls_spread_and_full_sidecars_get_no_new_calls(fleet_factory):
    fleet = fleet_factory()
    # 6 concurrent calls: leastconn spreads the connections 2-2-2, then each starts a turn
    opened = await asyncio.gather(*(connect_call(fleet.url) for _ in range(6)))
    clients = [client for client, _ in opened]
    servers = [server for _, server in opened]
    assert Counter(servers) == {name: 2 for name in fleet.names}, servers
    await asyncio.gather(*(start_turn(c, f"call{i}") for i, c in enumerate(clients)))
    # each sidecar holds its 2 streams, so it is full and says so on /health/ready ...
    for name in fleet.names:
        await async_wait_until(
            lambda name=name: fleet.health(name)["active_streams"] == 2,
            30,
            f"{name} holding 2 streams",
        )
        assert fleet.health(name)["status"] == "at_capacity"
    # ... and HAProxy takes all three out of rotation
    await async_wait_until(lambda: _all_down(fleet), 30, f"all DOWN: {fleet.states()}")

    # the 7th call is refused by HAProxy with the protocol's busy, not queued or sent to a sidecar
    await _refused_busy(fleet.url)
    status, body = await asyncio.to_thread(
        http_get, f"{fleet.http_url}/v1/synthesize?text=Hi.", AUTH
    )
    assert status == 503 and json.loads(body)["code"] == "busy"

    # one call on the second sidecar ends its turn: that sidecar alone has a free stream ...
    freed = servers.index(fleet.names[1])
    done = await finish_call(clients[freed], f"call{freed}")
    assert done["type"] == "done" and done["audio_seconds"] > 0
    await async_wait_until(
        lambda: fleet.states() == {"sidecar0": "DOWN", "sidecar1": "UP", "sidecar2": "DOWN"},
        30,
        f"only sidecar1 UP: {fleet.states()}",
    )
    # ... so the next call goes there, and nowhere else
    eighth, server = await open_call(fleet.url, "call8")
    assert server == "sidecar1"
    await async_wait_until(lambda: _all_down(fleet), 30, f"all DOWN again: {fleet.states()}")
    await _refused_busy(fleet.url)

    # every call still open is spoken to its end: no context was refused anywhere
    open_calls = [(c, f"call{i}") for i, c in enumerate(clients) if i != freed] + [
        (eighth, "call8")
    ]
    ends = await asyncio.gather(*(finish_call(c, cid) for c, cid in open_calls))
    assert [e["type"] for e in ends] == ["done"] * 6, ends
    assert all(e["audio_seconds"] > 0 for e in ends)
    for client, _ in open_calls:
        assert client.contexts[next(iter(client.contexts))].audio_bytes
    assert not [
        m
        for c, _ in open_calls
        for m in c.messages
        if isinstance(m, dict) and m.get("code") == "busy"
    ]
    await asyncio.gather(*(c.close() for c in clients + [eighth]))


async def test_api_key_passes_through_and_metrics(fleet_factory):
    fleet = fleet_factory(count=2)
    with pytest.raises(InvalidStatus) as info:
        await connect(fleet.url)
    assert info.value.response.status_code == 401  # the sidecar's answer, not retried
    with pytest.raises(InvalidStatus) as info:
        await connect(fleet.url, additional_headers={"Authorization": "Bearer wrong"})
    assert info.value.response.status_code == 401
    async with await TTSClient.connect(f"{fleet.url}?api_key={API_KEY}") as client:
        result = await client.synthesize("Hello through the load balancer.")
        assert result.end["type"] == "done" and result.audio_bytes
    status, body = await asyncio.to_thread(http_get, f"{fleet.http_url}/metrics", AUTH)
    assert status == 200
    assert "tts_capacity 2.0" in body.decode()
    # HAProxy's own Prometheus metrics on the stats address
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{fleet.stats_port}/metrics")
    assert status == 200 and b"haproxy_server_status" in body


async def test_sigkill_of_a_sidecar_mid_call(fleet_factory):
    fleet = fleet_factory()
    calls = [await open_call(fleet.url, f"call{i}") for i in range(3)]
    assert sorted(server for _, server in calls) == fleet.names  # one call per sidecar
    (victim_client, victim), *others = calls
    # the new calls below must come before HAProxy's next check of the victim: pause its checks
    # (as if the interval were long) so that only the failed connections can tell HAProxy
    assert fleet.admin(f"disable health sidecars/{victim}").strip() == ""
    os.kill(fleet.pid(victim), signal.SIGKILL)

    # the victim's client sees its connection close; its turn never ends with done
    with pytest.raises(ConnectionClosed):
        while True:
            await victim_client.recv(timeout=30)
    assert all(c.end is None or c.end["type"] != "done" for c in victim_client.contexts.values())

    # the calls on the other two sidecars go on undisturbed
    for (client, _), i in zip(others, (1, 2), strict=True):
        end = await finish_call(client, f"call{i}")
        assert end["type"] == "done" and end["audio_seconds"] > 0

    # new calls, in two waves of two, are all served by the other two sidecars: each is tried
    # on the victim (fewest connections) and retried elsewhere when the connection fails
    async def new_call(i: int) -> str:
        async with await TTSClient.connect(fleet.url, additional_headers=AUTH) as client:
            result = await client.synthesize(f"New call number {i} after the crash.")
            assert result.end["type"] == "done" and result.audio_bytes, result.end
            return client.ws.response.headers["X-TTS-Server"]

    served = []
    for wave in range(2):
        served += await asyncio.gather(*(new_call(2 * wave + k) for k in range(2)))
    assert victim not in served and len(served) == 4, served
    assert _redispatched_upgrades(fleet) >= 1
    # and once checked, the victim is out of rotation
    fleet.admin(f"enable health sidecars/{victim}")
    await async_wait_until(lambda: fleet.states()[victim] == "DOWN", 30, f"{victim} DOWN")
    await asyncio.gather(*(client.close() for client, _ in others))


async def test_sigterm_drains_a_sidecar_while_haproxy_sends_calls_elsewhere(fleet_factory):
    fleet = fleet_factory()
    call, target = await open_call(fleet.url, "call")
    # two idle connections on each of the other two, so leastconn would pick the draining one
    idle: list[TTSClient] = []
    for _ in range(50):
        on_others = Counter(c.ws.response.headers["X-TTS-Server"] for c in idle)
        if len(on_others) == 2 and min(on_others.values()) >= 2:
            break
        client = await TTSClient.connect(fleet.url, additional_headers=AUTH)
        if client.ws.response.headers["X-TTS-Server"] == target:
            await client.close()  # a tie went to the target: keep it at one connection
        else:
            idle.append(client)
    else:
        pytest.fail(f"could not place idle connections: {on_others}")
    # the new calls below must come before HAProxy's next check of the target: pause its checks
    assert fleet.admin(f"disable health sidecars/{target}").strip() == ""
    os.kill(fleet.pid(target), signal.SIGTERM)
    await async_wait_until(
        lambda: fleet.health(target)["status"] == "draining", 30, f"{target} draining"
    )

    # new calls during the drain, before HAProxy's next check: the draining sidecar refuses the
    # upgrade with 503 and HAProxy retries it on another one
    for i in range(3):
        async with await TTSClient.connect(fleet.url, additional_headers=AUTH) as client:
            assert client.ws.response.headers["X-TTS-Server"] != target
            result = await client.synthesize(f"Call {i} during the drain.")
            assert result.end["type"] == "done"
    await async_wait_until(
        lambda: _redispatched_upgrades(fleet) == 3, 10, "3 upgrades retried elsewhere in the log"
    )
    # once checked, HAProxy takes the draining sidecar out of rotation
    fleet.admin(f"enable health sidecars/{target}")
    await async_wait_until(
        lambda: fleet.states()[target] == "DOWN", 30, f"{target} DOWN in HAProxy"
    )

    # the call in progress on the draining sidecar finishes its turn, then is closed with 1001
    end = await finish_call(call, "call")
    assert end["type"] == "done" and end["audio_seconds"] > 0
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await call.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    await async_wait_until(
        lambda: f"sidecar {fleet.names.index(target)} exited (0)" in fleet.log(),
        30,
        "the drained sidecar exiting with 0",
    )
    await asyncio.gather(*(c.close() for c in idle))


async def test_haproxy_reload_keeps_calls(fleet_factory):
    fleet = fleet_factory(count=2)
    call, _ = await open_call(fleet.url, "call")
    assert fleet.proc is not None
    fleet.proc.send_signal(signal.SIGHUP)  # the script re-renders the config, HAProxy reloads
    await async_wait_until(lambda: "haproxy: reloaded" in fleet.log(), 30, "HAProxy reloaded")
    # new calls are served by the new worker while the old one keeps the open call
    async with await TTSClient.connect(fleet.url, additional_headers=AUTH) as client:
        result = await client.synthesize("A call after the reload.")
        assert result.end["type"] == "done"
    end = await finish_call(call, "call")
    assert end["type"] == "done" and end["audio_seconds"] > 0
    haproxy_log = fleet.run_dir / "haproxy.log"
    old_worker = re.findall(r"New worker \(([0-9]+)\) forked", haproxy_log.read_text())[0]
    assert f"Former worker ({old_worker}) exited" not in haproxy_log.read_text()
    await call.close()  # the old worker's last connection: now it goes
    await async_wait_until(
        lambda: f"Former worker ({old_worker}) exited" in haproxy_log.read_text(),
        30,
        "the old HAProxy worker exiting once its call closed",
    )


def test_script_restarts_a_dead_sidecar_and_stops_everything_on_sigterm(fleet_factory):
    fleet = fleet_factory(count=2, TTS_RESTART="1")
    old = fleet.pid("sidecar0")
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if fleet.pid("sidecar0") not in (0, old) and fleet.states().get("sidecar0") == "UP":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"sidecar0 not restarted: {fleet.states()}\n{fleet.log()}")
    pids = [fleet.pid(name) for name in fleet.names]
    haproxy = int((fleet.run_dir / "haproxy.pid").read_text())
    assert fleet.stop() == 0, fleet.log()
    for pid in [*pids, haproxy]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "sidecar 0 exited (0)" in fleet.log() and "haproxy exited (0)" in fleet.log()


#
# The Pipecat service through HAProxy
#

RATE = 16000
NEXT_TURN = "Sorry about that, I am back and ready to help."


def _service(fleet: Fleet) -> tuple[RecordingChatterboxTTSService, LivePipeline, list[str]]:
    """The Pipecat service pointed at HAProxy, in a pipeline.

    Returns:
        The service, its pipeline (not started), and the sidecar each of its connections
        reached, in order (HAProxy's ``X-TTS-Server``).
    """
    tts = RecordingChatterboxTTSService(url=fleet.url, api_key=API_KEY)
    servers: list[str] = []

    @tts.event_handler("on_connected")
    async def on_connected(service):
        servers.append(service._websocket.response.headers["X-TTS-Server"])

    return tts, LivePipeline(tts, PipelineParams(audio_out_sample_rate=RATE)), servers


def _assert_spoken(live: LivePipeline, context_id: str, text: str) -> None:
    heard = transcribe(audio_of(live.down, context_id), RATE)
    assert word_error_rate(text, heard) <= 0.2, f"asked for {text!r}, heard {heard!r}"


async def test_plugin_next_turn_after_its_sidecar_is_killed_is_spoken(fleet_factory):
    fleet = fleet_factory()
    tts, live, servers = _service(fleet)
    await live.start()
    await async_wait_until(lambda: len(servers) == 1, 10, "the service connected")
    victim = servers[0]
    await live.send(TTSSpeakFrame(LONG_REPLY))
    first = await live.wait_for(lambda f: isinstance(f, TTSAudioRawFrame))

    os.kill(fleet.pid(victim), signal.SIGKILL)
    # the turn in progress ends where its audio stopped ...
    await live.wait_for(stop_of(first.context_id), timeout=10)
    # ... the service reconnects through HAProxy, which sends it to another sidecar ...
    await async_wait_until(lambda: len(servers) == 2, 10, "the service reconnected")
    assert servers[1] != victim, servers
    # ... and the next turn is spoken.
    after = await speak(live, NEXT_TURN)
    await live.end()

    errors = of_type(live.up, ErrorFrame)
    assert len(errors) == 1, [e.error for e in errors]  # the cut turn, reported once
    assert isinstance(errors[0].exception, ConnectionLostError)
    assert errors[0].exception.context_id == first.context_id
    assert errors[0].category is ErrorCategory.CONNECTIVITY
    assert tts.is_usable
    _assert_spoken(live, after, NEXT_TURN)


async def test_plugin_waits_while_the_fleet_is_full_and_speaks_once_capacity_frees(fleet_factory):
    fleet = fleet_factory(count=2)
    calls = [await open_call(fleet.url, f"call{i}") for i in range(4)]
    assert Counter(server for _, server in calls) == {name: 2 for name in fleet.names}
    await async_wait_until(lambda: _all_down(fleet), 30, f"all DOWN: {fleet.states()}")

    tts, live, servers = _service(fleet)
    await live.start()  # HAProxy refuses the upgrade (503 busy): logged, the text connects again
    await live.send(TTSSpeakFrame(NEXT_TURN))
    started = await live.wait_for(lambda f: isinstance(f, TTSStartedFrame))
    await asyncio.sleep(1.5)  # refused again and again meanwhile, with backoff
    assert not servers
    await _refused_busy(fleet.url)  # still full

    # one call ends its turn: its sidecar has room again, and the waiting turn is spoken there
    freed_client, freed = calls[0]
    end = await finish_call(freed_client, "call0")
    assert end["type"] == "done"
    await live.wait_for(stop_of(started.context_id), timeout=30)
    await live.end()

    assert servers == [freed], servers
    assert not of_type(live.up, ErrorFrame), [e.error for e in of_type(live.up, ErrorFrame)]
    _assert_spoken(live, started.context_id, NEXT_TURN)
    log = (fleet.run_dir / "haproxy.log").read_text(errors="replace")
    assert len(re.findall(r" 503 [0-9]+ .*\"GET /v1/stream/tts", log)) >= 3  # setup and retries
    await asyncio.gather(*(client.close() for client, _ in calls))


async def test_plugin_turn_refused_by_its_full_sidecar_is_spoken_by_another(fleet_factory):
    fleet = fleet_factory(count=2)
    full, other = fleet.names
    # every connection goes to `full`, which stays in rotation while it fills up
    fleet.admin(f"disable server sidecars/{other}")
    assert fleet.admin(f"disable health sidecars/{full}").strip() == ""
    calls = [await open_call(fleet.url, f"call{i}") for i in range(2)]
    assert [server for _, server in calls] == [full, full]
    await async_wait_until(
        lambda: fleet.health(full)["status"] == "at_capacity", 30, f"{full} at capacity"
    )
    tts, live, servers = _service(fleet)
    await live.start()
    await async_wait_until(lambda: servers == [full], 10, "the service connected to the full one")
    # HAProxy learns that `full` is full, and `other` is back
    fleet.admin(f"enable server sidecars/{other}")
    fleet.admin(f"enable health sidecars/{full}")
    await async_wait_until(
        lambda: fleet.states() == {full: "DOWN", other: "UP"}, 30, f"states {fleet.states()}"
    )

    # the turn's context is refused (busy) by `full`; the service sends it again on a new
    # connection, which HAProxy gives to `other`
    context_id = await speak(live, NEXT_TURN)
    await live.end()

    refusals = [m for m in tts.received_of("error") if m.get("context_id") == context_id]
    assert refusals and refusals[0]["code"] == "busy", tts.received_of("error")
    assert servers == [full, other], servers
    assert not of_type(live.up, ErrorFrame), [e.error for e in of_type(live.up, ErrorFrame)]
    _assert_spoken(live, context_id, NEXT_TURN)
    ends = await asyncio.gather(*(finish_call(c, f"call{i}") for i, (c, _) in enumerate(calls)))
    assert [e["type"] for e in ends] == ["done", "done"]
    await asyncio.gather(*(client.close() for client, _ in calls))
