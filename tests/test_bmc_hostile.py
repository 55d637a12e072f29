"""A hostile BMC: pools/baremetal/ipmi.py against answers no honest BMC sends.

The hostile BMC is a real one - OpenIPMI's ipmi_sim (pools/baremetal/simbmc.py) - behind a UDP
man in the middle on 127.0.0.x that forwards every request and may replace, cut, repeat or drop
each answer. The proxy is given the BMC's password, so it follows the RAKP handshake, derives
the session keys (SIK, K1, K2 of cipher suite 3) and can unseal and reseal the encrypted,
integrity-protected answers inside the session: with the password it can say whatever a BMC can
say, which makes it as good as a malicious BMC (and better than a packet mangler, whose changes
the integrity check would drop at once).

What crv's power code must do whatever comes back: end within a bound, with its one-line
PoolError naming the machine and the BMC (temporary when a retry could help), never an exception
of python-ipmi, struct or IndexError, never a hang, and without unbounded memory.

The bound, from the code: every wait for an answer ends `timeout` after the request was sent,
however many packets arrive meanwhile (invalid ones are ignored), so one attempt of Get Chassis
Status is at most its nine exchanges (presence ping, Get Channel Authentication Capabilities,
Open Session, RAKP 1/2, RAKP 3/4, Set Session Privilege Level, Get Chassis Status, Close
Session) of `timeout` each, and no attempt starts after `window`: an operation ends within
`window + 9 * timeout` (plus pacing and scheduling). With crv's defaults (timeout 2 s, window
60 s) that is 78 s; these tests use timeout 0.3 s and window 1 s, so 3.7 s.

crv reads no SDR repository (it sends only the commands named above, Chassis Control and Set
System Boot Options), so the "huge SDR" attack is here as huge answers (up to the UDP maximum of
65,507 bytes) and endless answers (a flood) to the commands crv does send.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import random
import re
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyipmi.interfaces.rmcpplus import (
    CIPHER_SUITES,
    PAYLOAD_TYPE_IPMI,
    PAYLOAD_TYPE_OPEN_SESSION_REQUEST,
    PAYLOAD_TYPE_OPEN_SESSION_RESPONSE,
    PAYLOAD_TYPE_RAKP_1,
    PAYLOAD_TYPE_RAKP_2,
    PAYLOAD_TYPE_RAKP_4,
    SessionKeys,
    pack_rmcpplus,
    unpack_rmcpplus,
)

from pools.baremetal import simbmc
from pools.baremetal.inventory import Lease
from pools.baremetal.ipmi import OFF_WAIT, Bmc, Power, presence_ping
from pools.baremetal.pool import BaremetalOptions, BaremetalPool
from pools.base import PoolError
from tests.conftest import chain, needs_ipmi_sim

# a minute of hostile sessions: the fault-injection run (`./dev test -m faults`), not the default
pytestmark = [needs_ipmi_sim, pytest.mark.faults]

PASSWORD = "H0stile-bmc-pw"  # distinctive, so a leak anywhere is found
USER = "admin"
TIMEOUT = 0.3
WINDOW = 1.0
EXCHANGES = 9  # of one Get Chassis Status attempt, see the module's docstring
BOUND = WINDOW + EXCHANGES * TIMEOUT + 1.5  # the code's bound, plus pacing and a loaded host
SUITE = CIPHER_SUITES[3]  # ipmi_sim has no SHA-256
RMCP_HEADER = 4
RMCPPLUS_HEADER = 12

# answer kinds, by what they answer
PONG = "pong"  # ASF presence pong
CAPS = "caps"  # Get Channel Authentication Capabilities (IPMI 1.5, before the session)
OPEN = "open"  # Open Session Response
RAKP2 = "rakp2"
RAKP4 = "rakp4"
PRIV = "priv"  # Set Session Privilege Level, the first message inside the session
STATUS = "status"  # Get Chassis Status
CONTROL = "control"  # Chassis Control
BOOT = "boot"  # Set System Boot Options
CLOSE = "close"  # Close Session
OTHER = "other"

IN_SESSION = {  # (netfn of the answer, command) -> kind
    (0x07, 0x3B): PRIV,
    (0x07, 0x3C): CLOSE,
    (0x01, 0x01): STATUS,
    (0x01, 0x02): CONTROL,
    (0x01, 0x08): BOOT,
}
KINDS = {PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS, CONTROL, BOOT, CLOSE, OTHER}
SETUP = {
    PAYLOAD_TYPE_OPEN_SESSION_RESPONSE: OPEN,
    PAYLOAD_TYPE_RAKP_2: RAKP2,
    PAYLOAD_TYPE_RAKP_4: RAKP4,
}


def ident(value: object) -> str | None:
    """Test ids: the kind of answer attacked and the attack; pytest's own for the rest."""
    if callable(value):
        return str(getattr(value, "__name__", None))
    return value if value in KINDS else SAYS.get(value)  # type: ignore[call-overload]


def free_endpoint() -> tuple[str, int]:
    """A random 127.0.0.x address and a UDP port free on it right now."""
    address = f"127.0.0.{random.randint(10, 250)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        return address, sock.getsockname()[1]


def ipmb_checksums(msg: bytes) -> bytes:
    """An IPMB message (header checksum at 2, data checksum last) with both checksums right."""
    head = msg[:2]
    body = msg[3:-1]
    return head + bytes([-sum(head) & 0xFF]) + body + bytes([-sum(body) & 0xFF])


@dataclass(frozen=True)
class Answer:
    """One datagram from the BMC to crv, as the proxy understood it."""

    raw: bytes
    kind: str
    payload: bytes = b""  # session setup: the payload; in the session: the IPMI message
    session_id: int = 0
    sequence: int = 0


Rule = Callable[["Hostile", Answer], Iterable[bytes]]


def forward(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    return [answer.raw]


class Hostile(threading.Thread):
    """The man in the middle: crv talks to (address, port), the proxy to the real BMC.

    `rule(proxy, answer)` says what crv gets instead of each answer (nothing: dropped; several:
    all of them, in order). `repeat(packet)` sends `packet` to crv over and over, from another
    thread, until `repeat(None)`: a flood that does not wait for requests."""

    def __init__(self, upstream: tuple[str, int], password: str) -> None:
        super().__init__(daemon=True)
        self.password = password.encode()
        self.address, _ = free_endpoint()
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind((self.address, 0))
        self.port = self.front.getsockname()[1]
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(upstream)
        self.rule: Rule = forward
        self.seen: Counter[str] = Counter()  # answers from the BMC, by kind
        self.sent = 0  # datagrams sent to crv
        self.client: tuple[str, int] | None = None
        self.keys: SessionKeys | None = None
        self._rm = b""
        self._role = b""
        self._flood: bytes | None = None
        self._stopped = threading.Event()
        self._send_lock = threading.Lock()
        self._flooder = threading.Thread(target=self._flood_loop, daemon=True)

    @property
    def bmc(self) -> Bmc:
        return Bmc(self.address, self.port, USER, self.password.decode(), cipher_suite=3)

    # -- the proxy ---------------------------------------------------------------------------

    def run(self) -> None:
        self._flooder.start()
        with selectors.DefaultSelector() as selector:
            selector.register(self.front, selectors.EVENT_READ, self._from_client)
            selector.register(self.back, selectors.EVENT_READ, self._from_bmc)
            while not self._stopped.is_set():
                for key, _ in selector.select(0.05):
                    with contextlib.suppress(OSError):  # a client gone, a BMC restarting
                        key.data()

    def _from_client(self) -> None:
        data, self.client = self.front.recvfrom(65535)
        if len(data) > RMCP_HEADER + RMCPPLUS_HEADER and data[3] == 0x07 and data[4] == 0x06:
            payload_type = data[5] & 0x3F
            payload = data[RMCP_HEADER + RMCPPLUS_HEADER :]
            if payload_type == PAYLOAD_TYPE_OPEN_SESSION_REQUEST:
                self.keys = None  # a new session
            elif payload_type == PAYLOAD_TYPE_RAKP_1:
                self._rm = payload[8:24]
                self._role = bytes([payload[24], payload[27]]) + payload[28 : 28 + payload[27]]
        self.back.send(data)

    def _from_bmc(self) -> None:
        data = self.back.recv(65535)
        answer = self._understand(data)
        self.seen[answer.kind] += 1
        if answer.kind == RAKP2 and len(answer.payload) >= 24:
            # SIK = HMAC_KG(Rm | Rc | RoleM | ULengthM | UNameM); K_G is the password here
            sik = hmac.new(
                self.password, self._rm + answer.payload[8:24] + self._role, hashlib.sha1
            )
            self.keys = SessionKeys(SUITE, sik.digest())
        for packet in self.rule(self, answer):
            self.send(packet)

    def _understand(self, data: bytes) -> Answer:
        if len(data) < RMCP_HEADER + 1:
            return Answer(data, OTHER)
        if data[3] == 0x06:
            return Answer(data, PONG)
        if data[4] != 0x06:
            return Answer(data, CAPS)
        pdu = data[RMCP_HEADER:]
        payload_type = pdu[1] & 0x3F
        if payload_type in SETUP:
            _, _, session_id, sequence, _ = struct.unpack("<BBIIH", pdu[:RMCPPLUS_HEADER])
            return Answer(data, SETUP[payload_type], pdu[RMCPPLUS_HEADER:], session_id, sequence)
        if payload_type == PAYLOAD_TYPE_IPMI and self.keys is not None:
            _, session_id, sequence, msg = unpack_rmcpplus(pdu, self.keys)
            kind = IN_SESSION.get((msg[1] >> 2, msg[5]), OTHER)
            return Answer(data, kind, msg, session_id, sequence)
        return Answer(data, OTHER)

    def send(self, packet: bytes) -> None:
        if self.client is not None:
            with self._send_lock:
                self.front.sendto(packet, self.client)
                self.sent += 1

    def repeat(self, packet: bytes | None) -> None:
        self._flood = packet

    def _flood_loop(self) -> None:
        while not self._stopped.is_set():
            packet = self._flood
            if packet is None or self.client is None:
                time.sleep(0.005)
                continue
            for _ in range(20):
                try:
                    self.send(packet)
                except OSError:
                    break
            time.sleep(0.002)  # some 10,000 packets a second

    def close(self) -> None:
        self._stopped.set()
        self.join(5)
        self._flooder.join(5)
        self.front.close()
        self.back.close()

    # -- forging answers ---------------------------------------------------------------------

    def setup(self, answer: Answer, payload: bytes) -> bytes:
        """A session setup answer (Open Session Response, RAKP 2 and 4) with another payload."""
        payload_type = {v: k for k, v in SETUP.items()}[answer.kind]
        return answer.raw[:RMCP_HEADER] + pack_rmcpplus(payload_type, payload)

    def sealed(
        self,
        answer: Answer,
        msg: bytes | None = None,
        *,
        session_id: int | None = None,
        payload_type: int = PAYLOAD_TYPE_IPMI,
    ) -> bytes:
        """An answer inside the session, encrypted and signed with the session's keys: what
        only the BMC (or whoever has the password) can send."""
        assert self.keys is not None
        pdu = pack_rmcpplus(
            payload_type,
            answer.payload if msg is None else msg,
            answer.session_id if session_id is None else session_id,
            answer.sequence,
            self.keys,
        )
        return answer.raw[:RMCP_HEADER] + pdu


# -- fixtures and helpers --------------------------------------------------------------------------


# ipmi_sim's chassis: one that stays off, in sh. These tests need a real BMC, not a machine, and
# simbmc's hook (a Python process per Get Chassis Status) can take longer than TIMEOUT on a
# loaded host, which would turn "ignored invalid answers" into a plain timeout.
STAYS_OFF = """#!/bin/sh
shift
[ "$1" = get ] || exit 0
shift
for parm; do
    case $parm in power) echo power:0 ;; boot) echo boot:default ;; *) exit 1 ;; esac
done
"""


@pytest.fixture(scope="module")
def real_bmc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    machine_dir = tmp_path_factory.mktemp("hostile") / "m1"
    address, port = free_endpoint()
    spec = simbmc.SimBmcSpec("m1", address, port, USER, PASSWORD, machine_dir)
    simbmc.write_config(spec)
    hook = machine_dir / "bmc" / "chassis-hook"
    hook.write_text(STAYS_OFF)
    hook.chmod(0o700)
    proc = simbmc.start(spec)
    try:
        yield address, port
    finally:
        simbmc.stop(proc)


@pytest.fixture
def hostile(real_bmc: tuple[str, int]) -> Iterator[Hostile]:
    proxy = Hostile(real_bmc, PASSWORD)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


def power(timeout: float = TIMEOUT) -> Power:
    """crv's power control with short waits (`timeout=2`, crv's default, where the test expects
    success: then only the honest answers' speed matters)."""
    return Power("rack", min_interval=0.01, timeout=timeout, window=WINDOW)


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0


def bounded(call: Callable[[], Any], bound: float = BOUND) -> Outcome:
    """Run `call` in a thread; fail the test if it has not ended after `bound` seconds (the
    thread is left to end once the proxy stops)."""
    outcome = Outcome()

    def run() -> None:
        began = time.monotonic()
        try:
            outcome.value = call()
        except BaseException as e:  # judged by the test
            outcome.error = e
        outcome.elapsed = time.monotonic() - began

    thread = threading.Thread(target=run, daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"hung: still running after {time.monotonic() - began:.1f} s"
    return outcome


def crv_error(outcome: Outcome, proxy: Hostile, *, temporary: bool = True) -> str:
    """The outcome is crv's one-line PoolError about this BMC, with no library exception chained
    and no password in it; returns the text after the BMC's address."""
    error = outcome.error
    assert isinstance(error, PoolError), f"not crv's error: {error!r}"
    text = str(error)
    prefix = f"pool rack: machine m1: BMC {proxy.address}:{proxy.port} "
    assert text.startswith(prefix), text
    assert "\n" not in text
    assert error.temporary is temporary, text
    assert error.__cause__ is None and error.__context__ is None
    for link in chain(error):
        assert PASSWORD not in f"{link} {link!r} {link.args!r}"
    return text.removeprefix(prefix)


def rule_for(kind: str, change: Callable[[Hostile, Answer], Iterable[bytes]]) -> Rule:
    """Answers of `kind` changed by `change`, the others forwarded."""

    def rule(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        return change(proxy, answer) if answer.kind == kind else [answer.raw]

    return rule


# -- the proxy itself ------------------------------------------------------------------------------


def test_the_proxy_forwards_an_honest_session(hostile: Hostile) -> None:
    """The proxy in its honest mode: crv works through it, and it understood every answer (so
    the keys it derived are right: it unsealed the answers inside the session)."""
    outcome = bounded(lambda: power(2.0).state("m1", hostile.bmc))
    assert outcome.error is None and outcome.value == "off"
    assert hostile.seen == Counter(
        {PONG: 1, CAPS: 1, OPEN: 1, RAKP2: 1, RAKP4: 1, PRIV: 1, STATUS: 1, CLOSE: 1}
    )


# -- what crv says ---------------------------------------------------------------------------------

ATTEMPTS = r"after \d+ attempts"
IGNORED = r"; \d+ invalid answers? ignored"
TIMED_OUT = rf"not answering {ATTEMPTS} \(timed out\)"  # only other answers (sequence, command)
TIMED_OUT_IGNORING = rf"not answering {ATTEMPTS} \(timed out{IGNORED}\)"
NO_PONG = rf"not answering {ATTEMPTS} \(no answer to the RMCP presence ping\)"
NO_PONG_IGNORING = rf"not answering {ATTEMPTS} \(no answer to the RMCP presence ping{IGNORED}\)"
TIMED_OUT_ANY = rf"not answering {ATTEMPTS} \(timed out({IGNORED})?\)"
INVALIDLY = rf"answering invalidly {ATTEMPTS} \(DecodingError\)"
SAYS = {
    TIMED_OUT: "timed-out",
    TIMED_OUT_IGNORING: "ignoring",
    TIMED_OUT_ANY: "timed-out-maybe-ignoring",
    NO_PONG_IGNORING: "no-pong-ignoring",
    INVALIDLY: "invalidly",
}


def ignoring(kind: str) -> str:
    """What crv says when every answer of `kind` is replaced by invalid packets."""
    return NO_PONG_IGNORING if kind == PONG else TIMED_OUT_IGNORING


def assert_says(outcome: Outcome, proxy: Hostile, pattern: str) -> None:
    said = crv_error(outcome, proxy)
    assert re.fullmatch(pattern, said), said


# -- truncated packets -----------------------------------------------------------------------------


def every_prefix(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """The answer cut at every length, from the empty datagram up to one byte short."""
    return [answer.raw[:n] for n in range(len(answer.raw))]


@pytest.mark.parametrize("kind", [PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS])
def test_truncated_answers(hostile: Hostile, kind: str) -> None:
    """(Before: the empty datagram raised struct.error, a permanent "failed unexpectedly".)"""
    hostile.rule = rule_for(kind, every_prefix)
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, ignoring(kind))
    assert hostile.seen[kind] >= 2  # retried


def test_truncated_answers_then_the_real_one_succeed(hostile: Hostile) -> None:
    """Every answer comes after all its truncations: crv ignores them and gets its answer."""
    hostile.rule = lambda proxy, answer: [*every_prefix(proxy, answer), answer.raw]
    outcome = bounded(lambda: power(2.0).state("m1", hostile.bmc))
    assert outcome.error is None, repr(outcome.error)
    assert outcome.value == "off"


# -- wrong message tag, session ID, sequence number; broken integrity -----------------------------


def other_tag(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """xcat2 PR #7555: a BMC that answers with another message tag."""
    payload = bytes([answer.payload[0] ^ 0x5A]) + answer.payload[1:]
    return [proxy.setup(answer, payload)]


def other_console_session(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """The answer names another console (remote console session ID, bytes 4-7)."""
    payload = answer.payload[:4] + bytes(b ^ 0xFF for b in answer.payload[4:8]) + answer.payload[8:]
    return [proxy.setup(answer, payload)]


def other_session(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """Sealed with the right keys, for another session ID."""
    return [proxy.sealed(answer, session_id=answer.session_id ^ 0x01010101)]


def other_sequence(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """The answer to another request: its IPMB sequence number differs (checksums right)."""
    msg = bytearray(answer.payload)
    msg[4] = ((msg[4] >> 2) + 7) % 64 << 2 | msg[4] & 3
    return [proxy.sealed(answer, ipmb_checksums(bytes(msg)))]


def other_command(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    msg = bytearray(answer.payload)
    msg[5] ^= 0x40
    return [proxy.sealed(answer, ipmb_checksums(bytes(msg)))]


def bit_flipped(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
    """One bit of the encrypted payload flipped: the integrity check fails."""
    raw = bytearray(answer.raw)
    raw[RMCP_HEADER + RMCPPLUS_HEADER + 20] ^= 0x01
    return [bytes(raw)]


@pytest.mark.parametrize(
    ("kind", "change", "says"),
    [
        (OPEN, other_tag, TIMED_OUT_IGNORING),
        (RAKP2, other_tag, TIMED_OUT_IGNORING),
        (RAKP4, other_tag, TIMED_OUT_IGNORING),
        (OPEN, other_console_session, INVALIDLY),
        (RAKP2, other_console_session, INVALIDLY),
        (RAKP4, other_console_session, INVALIDLY),
        (PRIV, other_session, TIMED_OUT_IGNORING),
        (STATUS, other_session, TIMED_OUT_IGNORING),
        (PRIV, other_sequence, TIMED_OUT),
        (STATUS, other_sequence, TIMED_OUT),
        (STATUS, other_command, TIMED_OUT),
        (PRIV, bit_flipped, TIMED_OUT_IGNORING),  # before: "refused the credentials"
        (STATUS, bit_flipped, TIMED_OUT_IGNORING),
    ],
    ids=ident,
)
def test_answers_to_something_else(
    hostile: Hostile, kind: str, change: Callable[[Hostile, Answer], Iterable[bytes]], says: str
) -> None:
    """An answer that is not the answer to crv's request is a temporary failure, whatever it
    is: the next attempt may find an honest BMC (and a corrupted answer says nothing about the
    credentials)."""
    hostile.rule = rule_for(kind, change)
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, says)
    assert hostile.seen[kind] >= 2


def test_a_forged_rakp2_reads_as_wrong_credentials(hostile: Hostile) -> None:
    """The one lie a BMC can tell that is permanent: a RAKP 2 whose key exchange code does not
    check out is what a wrong password looks like, and retrying it only fills the BMC's lockout
    counter."""

    def forged(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        return [proxy.setup(answer, answer.payload[:40] + bytes(len(answer.payload) - 40))]

    hostile.rule = rule_for(RAKP2, forged)
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    said = crv_error(outcome, hostile, temporary=False)
    assert said == "refused the credentials of user 'admin'"
    assert hostile.seen[RAKP2] == 1


def test_a_session_whose_set_up_failed_is_closed(hostile: Hostile) -> None:
    """After RAKP 4 the BMC holds a session slot (it has a handful); when Set Session Privilege
    Level then fails, crv closes the session all the same. (Before, each such attempt left a
    slot taken until the BMC timed it out.)"""
    hostile.rule = rule_for(PRIV, garbage(seed=3))
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, TIMED_OUT_IGNORING)
    assert hostile.seen[PRIV] >= 2
    assert hostile.seen[CLOSE] == hostile.seen[RAKP4] == hostile.seen[PRIV]


# -- garbage, silence ------------------------------------------------------------------------------


def garbage(seed: int) -> Callable[[Hostile, Answer], Iterable[bytes]]:
    """Random datagrams of every size up to 40 bytes and a few larger, some behind a valid RMCP
    header, some behind a valid RMCP+ session header (of a random payload type)."""
    rng = random.Random(seed)

    def change(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        packets = []
        for size in [*range(0, 40), 64, 300, 1500]:
            junk = rng.randbytes(size)
            packets.append(junk)
            packets.append(answer.raw[:RMCP_HEADER] + junk)
            packets.append(answer.raw[: RMCP_HEADER + 2] + junk)
            header = struct.pack("<BBIIH", 0x06, rng.randrange(256), 0, 0, size)
            packets.append(answer.raw[:RMCP_HEADER] + header + junk)
        return packets

    return change


@pytest.mark.parametrize("kind", [PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS])
def test_garbage_instead_of_answers(hostile: Hostile, kind: str) -> None:
    hostile.rule = rule_for(kind, garbage(seed=len(kind)))
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, ignoring(kind))


def test_garbage_before_every_answer_is_ignored(hostile: Hostile) -> None:
    change = garbage(seed=7)
    hostile.rule = lambda proxy, answer: [*change(proxy, answer), answer.raw]
    outcome = bounded(lambda: power(2.0).state("m1", hostile.bmc))
    assert outcome.error is None, repr(outcome.error)
    assert outcome.value == "off"


@pytest.mark.parametrize("kind", [PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS])
def test_silence(hostile: Hostile, kind: str) -> None:
    hostile.rule = rule_for(kind, lambda proxy, answer: [])
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, NO_PONG if kind == PONG else TIMED_OUT)


def test_no_answer_to_close_session_keeps_the_answer_got(hostile: Hostile) -> None:
    """The command was answered; a Close Session left unanswered only costs one timeout."""
    hostile.rule = rule_for(CLOSE, lambda proxy, answer: [])
    outcome = bounded(lambda: power().state("m1", hostile.bmc), 3 * TIMEOUT + 1)
    assert outcome.error is None and outcome.value == "off"


# -- floods ----------------------------------------------------------------------------------------


def flooded(make: Callable[[Hostile, Answer], bytes]) -> Callable[[Hostile, Answer], list[bytes]]:
    """The real answer withheld; `make(answer)` sent to crv without end instead."""

    def change(proxy: Hostile, answer: Answer) -> list[bytes]:
        proxy.repeat(make(proxy, answer))
        return []

    return change


def wrong_tag_packet(proxy: Hostile, answer: Answer) -> bytes:
    return next(iter(other_tag(proxy, answer)))


def garbage_packet(proxy: Hostile, answer: Answer) -> bytes:
    return answer.raw[:RMCP_HEADER] + b"\x06\x00" + os.urandom(30)


def other_payload_type(proxy: Hostile, answer: Answer) -> bytes:
    """A sealed SOL payload (type 1): valid in the session, not an IPMI message."""
    return proxy.sealed(answer, payload_type=0x01)


def other_sequence_packet(proxy: Hostile, answer: Answer) -> bytes:
    return next(iter(other_sequence(proxy, answer)))


@pytest.mark.parametrize(
    ("kind", "make", "says"),
    [
        (OPEN, wrong_tag_packet, TIMED_OUT_IGNORING),  # before: hung
        (RAKP2, wrong_tag_packet, TIMED_OUT_IGNORING),  # before: hung
        (RAKP4, wrong_tag_packet, TIMED_OUT_IGNORING),  # before: hung
        (OPEN, garbage_packet, TIMED_OUT_IGNORING),  # before: hung
        (CAPS, garbage_packet, TIMED_OUT_IGNORING),
        (PONG, garbage_packet, NO_PONG_IGNORING),
        (PRIV, other_payload_type, TIMED_OUT_IGNORING),  # before: hung
        (STATUS, other_payload_type, TIMED_OUT_IGNORING),  # before: hung
        # the flood goes on into the next attempt's session, where it is invalid
        (STATUS, other_sequence_packet, TIMED_OUT_ANY),
        (STATUS, garbage_packet, TIMED_OUT_IGNORING),
    ],
    ids=ident,
)
def test_endless_flood_instead_of_the_answer(
    hostile: Hostile, kind: str, make: Callable[[Hostile, Answer], bytes], says: str
) -> None:
    """Packets arrive faster than the timeout, for ever: a wait that restarts its timeout with
    each packet never ends."""
    hostile.rule = rule_for(kind, flooded(make))
    try:
        outcome = bounded(lambda: power().state("m1", hostile.bmc))
    finally:
        hostile.repeat(None)
    assert_says(outcome, hostile, says)
    assert hostile.sent > 1000


def test_replays_of_every_answer_are_ignored(hostile: Hostile) -> None:
    """Each answer 50 times (a network that duplicates, a BMC that repeats itself): the copies
    reach crv while it waits for the next answer, and are ignored. (Before: a copy of RAKP 4
    read inside the session failed the attempt, "invalid answer (DecodingError)".)"""
    hostile.rule = lambda proxy, answer: [answer.raw] * 50
    outcome = bounded(lambda: power(2.0).state("m1", hostile.bmc))
    assert outcome.error is None, repr(outcome.error)
    assert outcome.value == "off"


# -- huge answers ----------------------------------------------------------------------------------

UDP_MAX = 65507


def huge(proxy: Hostile, answer: Answer) -> list[bytes]:
    """The answer followed by as much junk as a datagram holds; and the answer's own payload
    made huge with consistent length fields (sealed, inside the session)."""
    packets = [(answer.raw + os.urandom(UDP_MAX))[:UDP_MAX]]
    if answer.kind in SETUP.values():
        packets.append(proxy.setup(answer, answer.payload + bytes(UDP_MAX - 200)))
    elif proxy.keys is not None and answer.kind in IN_SESSION.values():
        msg = answer.payload[:-1] + bytes(UDP_MAX - 300) + answer.payload[-1:]
        packets.append(proxy.sealed(answer, ipmb_checksums(msg)))
    return packets


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("kind", [PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS])
def test_huge_answers(hostile: Hostile, kind: str) -> None:
    """(Before: a huge answer inside the session set-up read as "refused the credentials".)"""
    hostile.rule = rule_for(kind, huge)
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    assert_says(outcome, hostile, ignoring(kind))


def test_a_flood_of_huge_answers_does_not_grow_memory(hostile: Hostile) -> None:
    """An endless answer: 64 KiB datagrams, sealed with the session's keys, without end."""
    before = max_rss_mib()
    hostile.rule = rule_for(STATUS, flooded(lambda proxy, answer: huge(proxy, answer)[-1]))
    try:
        outcome = bounded(lambda: power().state("m1", hostile.bmc))
    finally:
        hostile.repeat(None)
    assert_says(outcome, hostile, TIMED_OUT_IGNORING)
    assert hostile.sent > 1000  # some 64 MB went to crv
    assert max_rss_mib() - before < 64


# -- completion codes ------------------------------------------------------------------------------


def completion_code(cc: int) -> Callable[[Hostile, Answer], Iterable[bytes]]:
    """The answer with another completion code and no data."""

    def change(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        msg = answer.payload[:6] + bytes([cc]) + answer.payload[-1:]
        return [proxy.sealed(answer, ipmb_checksums(msg))]

    return change


@pytest.mark.parametrize(
    ("cc", "temporary", "says"),
    [
        (0x00, True, INVALIDLY),  # "success", without the status bytes
        (0xC0, True, rf"busy {ATTEMPTS} \(completion code 0xc0 Node Busy\)"),
        (0xC3, True, rf"not answering {ATTEMPTS} \(completion code 0xc3 .*\)"),
        (0xFF, True, rf"not answering {ATTEMPTS} \(completion code 0xff .*\)"),
        (0xD4, False, r"refused a command to user 'admin': completion code 0xd4 .*"),
        (0x42, False, r"refused the command: completion code 0x42 Unknown error description"),
    ],
    ids=["success-without-data", "busy", "timeout", "unspecified", "privilege", "unknown"],
)
def test_completion_codes_of_get_chassis_status(
    hostile: Hostile, cc: int, temporary: bool, says: str
) -> None:
    hostile.rule = rule_for(STATUS, completion_code(cc))
    outcome = bounded(lambda: power().state("m1", hostile.bmc))
    said = crv_error(outcome, hostile, temporary=temporary)
    assert re.fullmatch(says, said), said


# -- the other operations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "kind"),
    [("off", CONTROL), ("pxe_boot", BOOT), ("off", CLOSE)],
    ids=["off-control", "pxe_boot-boot-options", "off-close"],
)
@pytest.mark.parametrize("attack", [every_prefix, flooded(garbage_packet)], ids=["cut", "flood"])
def test_power_commands_against_a_hostile_bmc(
    hostile: Hostile, operation: str, kind: str, attack: Callable[[Hostile, Answer], Any]
) -> None:
    """Power-off and a PXE boot (of a machine that is off: Get Chassis Status, then Set System
    Boot Options, attacked, so no power-up is ever sent) end like Get Chassis Status; invalid
    answers to Close Session do not undo the command's answer."""
    hostile.rule = rule_for(kind, attack)
    run = getattr(power(), operation)
    try:
        outcome = bounded(lambda: run("m1", hostile.bmc))
    finally:
        hostile.repeat(None)
    assert hostile.seen[kind] >= 1
    if kind == CLOSE:
        assert outcome.error is None, repr(outcome.error)
    else:
        assert_says(outcome, hostile, TIMED_OUT_IGNORING)


def test_presence_ping_against_garbage(hostile: Hostile) -> None:
    """crv's own presence ping (`Power.ping`, no session) through a flood of garbage and cut
    pongs: False after its timeout, a temporary error after its (short) window."""
    hostile.rule = rule_for(PONG, lambda proxy, answer: [*every_prefix(proxy, answer)])
    began = time.monotonic()
    assert not presence_ping(hostile.address, hostile.port, TIMEOUT)
    assert time.monotonic() - began < TIMEOUT + 0.5
    hostile.rule = rule_for(PONG, flooded(garbage_packet))
    try:
        outcome = bounded(lambda: power().ping("m1", Bmc(hostile.address, hostile.port)))
    finally:
        hostile.repeat(None)
    assert_says(outcome, hostile, NO_PONG)
    assert hostile.sent > 1000
    hostile.rule = forward
    assert presence_ping(hostile.address, hostile.port, TIMEOUT)


# -- through the bare-metal pool -------------------------------------------------------------------


def test_the_pool_reports_a_hostile_bmc_and_keeps_the_lease(
    hostile: Hostile, tmp_path: Path
) -> None:
    """The pool's own Power (default timeout, 2 s) against a BMC that floods garbage: the node
    shows the power as unknown with crv's message, and destroying it fails temporarily and
    leaves the lease (the machine may be on) for a retry."""
    (tmp_path / "m1.pass").write_text(PASSWORD + "\n")
    (tmp_path / "m1.pass").chmod(0o600)
    (tmp_path / "machines.yaml").write_text(
        "machines:\n"
        "  - name: m1\n"
        '    macs: ["52:54:00:00:00:01"]\n'
        f"    bmc: {{address: {hostile.address}, port: {hostile.port}, username: {USER},\n"
        f"          password: {{file: {tmp_path / 'm1.pass'}}}, cipher_suite: 3}}\n"
    )
    options = BaremetalOptions(
        machines=str(tmp_path / "machines.yaml"),
        kernel="http://127.0.0.1:9/vmlinuz",
        initrd="http://127.0.0.1:9/initrd",
        min_interval=0.01,
        power_window=0.5,  # one attempt
    )
    pool = BaremetalPool("rack", tmp_path / "home" / "pools" / "rack", options)
    with pool.leases.open() as ledger:
        ledger.leases["n1"] = Lease("n1", "c1", "web", "m1", "up")
    bound = options.power_window + EXCHANGES * pool.power.timeout + 1.5

    hostile.rule = rule_for(STATUS, flooded(garbage_packet))
    try:
        outcome = bounded(lambda: pool.get_node("n1"), bound)
    finally:
        hostile.repeat(None)
    assert outcome.error is None, repr(outcome.error)
    info = outcome.value
    assert info.state == "error"
    assert re.fullmatch(
        rf"unknown: machine m1: BMC {hostile.address}:{hostile.port} {TIMED_OUT_IGNORING}",
        info.extra["power"],
    ), info.extra["power"]

    hostile.rule = rule_for(CONTROL, flooded(garbage_packet))
    try:
        outcome = bounded(lambda: pool.destroy_node("n1"), bound)
    finally:
        hostile.repeat(None)
    assert_says(outcome, hostile, TIMED_OUT_IGNORING)
    assert "n1" in pool.leases.read().leases

    hostile.rule = forward
    pool.destroy_node("n1")  # an honest BMC again: the retry finishes the job
    assert "n1" not in pool.leases.read().leases


# -- fuzzing ---------------------------------------------------------------------------------------


def mutated(rng: random.Random) -> Callable[[Hostile, Answer], Iterable[bytes]]:
    """Random damage to an answer: bits flipped, cut, lengthened, repeated, or - inside the
    session - its plaintext changed and sealed again, so it passes the integrity check."""

    def change(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        raw = bytearray(answer.raw)
        how = rng.randrange(6)
        if how == 0 and raw:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return [bytes(raw)]
        if how == 1:
            return [bytes(raw[: rng.randrange(len(raw) + 1)])]
        if how == 2:
            return [bytes(raw) + rng.randbytes(rng.randint(1, 100))]
        if how == 3:
            return [bytes(raw)] * rng.randint(2, 20)
        if answer.payload:
            payload = bytearray(answer.payload)
            for _ in range(rng.randint(1, 3)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            if how == 5:
                payload = payload[: rng.randrange(len(payload) + 1)]
            if answer.kind in SETUP.values():
                return [proxy.setup(answer, bytes(payload))]
            if proxy.keys is not None:
                if rng.random() < 0.5 and len(payload) >= 4:
                    payload = bytearray(ipmb_checksums(bytes(payload)))
                return [proxy.sealed(answer, bytes(payload))]
        return [bytes(raw)]

    return change


def test_fuzzed_answers(hostile: Hostile) -> None:
    """80 rounds, each with the answers of one kind damaged at random: every round ends within
    the bound, with the state or a one-line PoolError - never an exception that crv did not
    compose ("failed unexpectedly", which names a type it did not expect)."""
    rng = random.Random(22)
    kinds = [PONG, CAPS, OPEN, RAKP2, RAKP4, PRIV, STATUS, CLOSE]
    said: Counter[str] = Counter()
    for _ in range(80):
        hostile.rule = rule_for(rng.choice(kinds), mutated(rng))
        outcome = bounded(lambda: power().state("m1", hostile.bmc))
        if outcome.error is None:
            assert outcome.value == "off"
            said["off"] += 1
            continue
        error = outcome.error
        assert isinstance(error, PoolError), repr(error)
        text = crv_error(outcome, hostile, temporary=error.temporary)
        assert "unexpectedly" not in text, text
        said[re.sub(r"\d+", "N", text)] += 1
    assert said["off"] > 0 and len(said) > 3, said


def test_a_chassis_that_never_goes_off_bounds_a_pxe_boot(hostile: Hostile) -> None:
    """A BMC that answers Get Chassis Status with "on" for ever, whatever it is told: the PXE
    boot's power-down waits OFF_WAIT (30 s) and then fails temporarily, without a retry (the
    machine, not the BMC, is what failed)."""

    def always_on(proxy: Hostile, answer: Answer) -> Iterable[bytes]:
        msg = bytearray(answer.payload)
        msg[7] |= 0x01  # current power state: on
        return [proxy.sealed(answer, ipmb_checksums(bytes(msg)))]

    hostile.rule = rule_for(STATUS, always_on)
    outcome = bounded(lambda: power().pxe_boot("m1", hostile.bmc), BOUND + OFF_WAIT)
    said = crv_error(outcome, hostile)
    assert said == f"left the chassis on {OFF_WAIT:g} s after power down"
    assert outcome.elapsed >= OFF_WAIT
