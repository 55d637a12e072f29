"""BMC power control over IPMI 2.0 (RMCP+), with python-ipmi's native `rmcpplus` interface.

Why this shape:

- Native RMCP+ only. python-ipmi's `ipmitool` interface puts the password on a command line
  (visible in `ps`) and in its DEBUG log; the native interface keeps it in this process.
- The cipher suite is pinned (17 by default, 3 as an opt-in fallback for older BMCs and for
  OpenIPMI's `ipmi_sim`, which has no SHA-256): left alone, python-ipmi tries 17 then 3, and a
  silent downgrade is not something an operator should discover later. Suite 0 (no
  authentication) is refused before any packet is sent.
- One session per operation (open, command(s), close) and no keep-alive thread: a BMC has a
  handful of session slots, and an idle session held by crv is one the operator cannot use.
- BMCs are fragile embedded systems: commands to one BMC (address, port) are serialized across
  threads and spaced at least `min_interval` apart.
- Errors say whether a retry helps. A BMC that does not answer, or answers "busy", is retried with
  backoff within `window` seconds and then reported as a temporary PoolError; refused credentials
  are permanent at once (retrying only fills the BMC's lockout counter).
- A BMC's answers are not trusted to end a wait (tests/test_bmc_hostile.py plays a hostile BMC).
  Every wait for an answer ends `timeout` after the request was sent, however many packets
  arrive meanwhile, and a packet that is not the answer - cut short, garbage, failing its
  integrity check, another session's, another payload type, another message tag or sequence
  number - is ignored, counted, and waited past. Left alone, python-ipmi restarts its wait with
  each packet, so a BMC sending wrong-tag or foreign-payload packets faster than the timeout
  held an operation for ever; a short datagram raised struct.error (a permanent "failed
  unexpectedly"), and a corrupted packet inside the session an AuthenticationError that read as
  a wrong password. So an operation ends within `window` plus one attempt, and an attempt is at
  most one `timeout` per message (nine for Get Chassis Status: presence ping, Get Channel
  Authentication Capabilities, Open Session, RAKP 1/2, RAKP 3/4, Set Session Privilege Level,
  the command, Close Session), plus `OFF_WAIT` for a power-down in `pxe_boot`.
- The password never leaves this module: python-ipmi's `Session.__str__` prints it and its
  rmcp interface logs that string at DEBUG when closing a session, so the session used here
  redacts it; library exceptions are translated into messages composed here and raised outside
  the `except` block, so neither `__cause__` nor `__context__` refers to them.

What `Power.commands` counts, per machine name: one per session-open attempt (whatever the
outcome), one per IPMI command sent inside the session (Get Chassis Status, Chassis Control,
Set System Boot Options) and one per Close Session sent. A presence ping counts one.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pyipmi
from pyipmi.chassis import BootDevice
from pyipmi.errors import (
    AuthenticationError,
    CompletionCodeError,
    DecodingError,
    IpmiConnectionError,
    IpmiLongPasswordError,
    MessageStatusCodeError,
    NotSupportedError,
    RetryError,
)
from pyipmi.interfaces.rmcp import RMCP_CLASS_ASF, AsfMsg, AsfPing, AsfPong, RmcpMsg
from pyipmi.interfaces.rmcpplus import (
    PAYLOAD_TYPE_IPMI,
    PAYLOAD_TYPE_OPEN_SESSION_REQUEST,
    PAYLOAD_TYPE_RAKP_1,
    PAYLOAD_TYPE_RAKP_3,
    RmcpPlus,
)
from pyipmi.msgs import constants
from pyipmi.session import Session

from pools.base import PoolError

log = logging.getLogger(__name__)

T = TypeVar("T")

ALLOWED_SUITES = (17, 3)
MAX_PASSWORD = 20  # bytes, IPMI 2.0 (16 for IPMI 1.5)
MAX_USERNAME = 16  # bytes
BMC_ADDRESS = 0x20  # the BMC's IPMB address
OFF_WAIT = 30.0  # seconds a chassis may take to be off after a power down
RECEIVE_BUFFER = 4096  # bytes of a datagram read: more than any answer to crv's commands
# what decoding a packet that is not a valid answer raises, in python-ipmi 0.6
INVALID = (DecodingError, AuthenticationError, struct.error, IndexError, ValueError)

# completion codes after which the same command may succeed later
BUSY_CODES = {constants.CC_NODE_BUSY}
TRANSIENT_CODES = {
    constants.CC_TIMEOUT,
    constants.CC_OUT_OF_SPACE,
    constants.CC_RESP_COULD_NOT_BE_PRV,
    constants.CC_UNSPECIFIED_ERROR,
}
# RMCP+ session setup status codes that mean "the BMC did not like this user or password"
CREDENTIAL_MSC = {
    constants.MSC_INVALID_NAME_LENGTH,
    constants.MSC_UNAUTHORIZED_NAME,
    constants.MSC_INVALID_INTEGRITY_CHECK_VALUE,
}
SUITE_MSC = {
    constants.MSC_INVALID_AUTHENTICATION_ALGORITHM,
    constants.MSC_INVALID_INTEGRITY_ALGORITHM,
    constants.MSC_NO_MATCHING_AUTHENTICATION_PAYLOAD,
    constants.MSC_NO_MATCHING_INTEGRITY_PAYLOAD,
    constants.MSC_INVALID_CONFIDENTIALITY_ALGORITHM,
    constants.MSC_NO_CIPHER_SUITE_MATCH,
}
ROLE_MSC = {constants.MSC_INVALID_ROLE, constants.MSC_UNAUTHORIZED_ROLE}
BUSY_MSC = {constants.MSC_INSUFFICIENT_RESOURCES, constants.MSC_INSUFFICIENT_RESOURCES_FOR_ROLE}


@dataclass(frozen=True)
class Bmc:
    """Where a machine's BMC answers and who we are to it. The password is left out of repr and
    str (dataclass str is repr), and out of every error this module raises."""

    address: str
    port: int = 623
    username: str = ""
    password: str = field(repr=False, default="")
    cipher_suite: int = 17

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"


class _Session(Session):  # type: ignore[misc]
    """python-ipmi's session, minus the password in its text (logged at DEBUG on close)."""

    def __str__(self) -> str:
        return f"Session(sid=0x{self.sid:08x}, host={self.rmcp_host}:{self.rmcp_port})"

    __repr__ = __str__


class _Transient(Exception):
    """An attempt failed in a way a later attempt may not: `what` is "busy", "not answering" or
    "answering invalidly"."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(detail)
        self.what = what
        self.detail = detail


class _Ignored(DecodingError):  # type: ignore[misc]
    """A packet that is not the awaited answer, already counted."""


class _Interface(RmcpPlus):  # type: ignore[misc]
    """python-ipmi's RMCP+ interface, holding to its timeout whatever the BMC sends (see the
    module's docstring): each wait ends `timeout` after the request was sent, and packets that
    are not the answer are ignored and counted in `invalid`."""

    def __init__(self, cipher_suite: int) -> None:
        super().__init__(keep_alive_interval=0, cipher_suite=cipher_suite)
        self.invalid = 0
        self._answer_by = 0.0
        self._awaited: tuple[int, bytes] | None = None  # session setup: (payload type, tag)

    @property
    def in_session(self) -> bool:
        """The RAKP handshake succeeded: the BMC holds a session slot until it is closed."""
        return self._session is not None and bool(self._session.activated)

    def _ignore(self, e: Exception | str) -> None:
        self.invalid += 1
        log.debug(
            "ignoring an invalid packet from %s:%s: %s",
            self.host,
            self.port,
            e if isinstance(e, str) else type(e).__name__,
        )

    def _send_rmcp_msg(self, sdu: bytes | None, class_of_msg: int) -> None:
        super()._send_rmcp_msg(sdu, class_of_msg)
        self._answer_by = time.monotonic() + (self._timeout or 0.0)

    def _receive_rmcp_msg(self) -> tuple[int | None, int | None, bytes]:
        left = self._answer_by - time.monotonic()
        if left <= 0:
            raise TimeoutError("no valid answer in time")
        self._sock.settimeout(left)
        data = self._sock.recv(RECEIVE_BUFFER)
        rmcp = RmcpMsg()
        try:
            sdu = rmcp.unpack(data)
        except INVALID as e:
            self._ignore(e)
            raise _Ignored("not an RMCP packet") from None
        return rmcp.seq_number, rmcp.class_of_msg, sdu

    def _receive_asf_msg(self, cls: type[AsfMsg]) -> AsfMsg:
        while True:
            try:
                return super()._receive_asf_msg(cls)
            except _Ignored:
                continue
            except INVALID as e:
                self._ignore(e)

    def _send_payload(self, payload_type: int, payload: bytes) -> None:
        super()._send_payload(payload_type, payload)
        setup = (PAYLOAD_TYPE_OPEN_SESSION_REQUEST, PAYLOAD_TYPE_RAKP_1, PAYLOAD_TYPE_RAKP_3)
        # the answer to a session setup request: the next payload type, with the same tag
        self._awaited = (payload_type + 1, payload[:1]) if payload_type in setup else None

    def _receive_payload(self) -> tuple[int, bytes]:
        """One RMCP+ payload. Its session setup skips a DecodingError and waits on; so does
        `_receive_ipmi_msg` here."""
        try:
            payload_type, payload = super()._receive_payload()
        except _Ignored:
            raise
        except INVALID as e:
            self._ignore(e)
            raise _Ignored("not a valid RMCP+ packet") from None
        if self._keys is None and self._awaited not in (None, (payload_type, payload[:1])):
            self._ignore(f"payload type 0x{payload_type:02x} or message tag not awaited")
            raise _Ignored("not the answer awaited")
        return payload_type, payload

    def _receive_ipmi_msg(self, ignore_sdu_length: bool = False) -> bytes:
        while True:
            try:
                if self._keys is None:  # before the session: IPMI 1.5
                    return super()._receive_ipmi_msg(ignore_sdu_length)  # type: ignore[no-any-return]
                payload_type, data = self._receive_payload()
            except _Ignored:
                continue
            except INVALID as e:
                self._ignore(e)
                continue
            if payload_type == PAYLOAD_TYPE_IPMI:
                return data
            self._ignore(f"payload type 0x{payload_type:02x}")


class Power:
    """Power and boot control of machines through their BMCs, for pool `pool`.

    `timeout` is the wait for each answer (presence ping and each IPMI message); `window` bounds
    the time spent retrying one operation; `min_interval` is the least time between two
    commands to the same BMC, from any thread of this process.
    """

    def __init__(
        self, pool: str, *, min_interval: float = 0.5, timeout: float = 2.0, window: float = 60.0
    ) -> None:
        self.pool = pool
        self.min_interval = min_interval
        self.timeout = timeout
        self.window = window
        self.commands: collections.Counter[str] = collections.Counter()
        self._guard = threading.Lock()  # the dicts below and `commands`
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._last: dict[tuple[str, int], float] = {}

    # -- the operations --------------------------------------------------------------------------

    def state(self, machine: str, bmc: Bmc) -> str:
        """The power state, "on" or "off", from Get Chassis Status."""
        return self._run(machine, bmc, lambda s: "on" if s.status().power_on else "off")

    def on(self, machine: str, bmc: Bmc) -> None:
        """Power up (the BMC ignores it when the chassis is already on)."""
        self._run(machine, bmc, lambda s: s.control("power_up"))

    def off(self, machine: str, bmc: Bmc) -> None:
        """Hard power down, not an ACPI shutdown: the pool owns the machine's life cycle."""
        self._run(machine, bmc, lambda s: s.control("power_down"))

    def pxe_boot(self, machine: str, bmc: Bmc) -> None:
        """Boot the machine from the network now: power down if it is on (and wait until it is
        off), set the next boot to PXE, power up - the sequence of Ironic's reboot.

        Each step is idempotent, and a retry (after a lost or late answer) repeats only the steps
        not yet answered, so a retried boot boots once. Chassis Control "power cycle" is not
        used: a power-up retried after a late answer finds the chassis on and cycles it - a
        second boot, without the PXE flag that the first boot used (seen with ipmi_sim)."""
        done: set[str] = set()

        def act(s: _Step) -> None:
            if "off" not in done:
                if s.status().power_on:
                    s.control("power_down")
                    s.wait_off(OFF_WAIT)
                done.add("off")
            if "pxe" not in done:
                s.pxe_once()
                done.add("pxe")
            s.control("power_up")  # again after a lost answer: ignored by a chassis that is on

        self._run(machine, bmc, act)

    def ping(self, machine: str, bmc: Bmc) -> None:
        """An RMCP presence ping: proves something speaks RMCP at the address, without
        credentials. Retried like the other operations, but within at most three timeouts, so a
        check of many machines does not wait a full `window` for each dead one."""
        self._check_address(machine, bmc)
        key = (bmc.address, bmc.port)
        window = min(self.window, 3 * self.timeout + 1)
        self._attempts(machine, bmc, lambda: self._ping_once(machine, key), window)

    # -- checks ----------------------------------------------------------------------------------

    def _error(self, machine: str, bmc: Bmc, what: str, *, temporary: bool = False) -> PoolError:
        return PoolError(
            self.pool, f"machine {machine}: BMC {bmc.where} {what}", temporary=temporary
        )

    def _check_address(self, machine: str, bmc: Bmc) -> None:
        if not bmc.address or not 0 < bmc.port < 65536:
            raise self._error(machine, bmc, "is not a valid address and UDP port")

    def check(self, machine: str, bmc: Bmc) -> None:
        """Refuse, without a packet sent, what can never work or must never be tried."""
        self._check_address(machine, bmc)
        if bmc.cipher_suite == 0:
            raise self._error(
                machine, bmc, "uses cipher suite 0: cipher suite 0 has no authentication"
            )
        if bmc.cipher_suite not in ALLOWED_SUITES:
            raise self._error(
                machine,
                bmc,
                f"uses cipher suite {bmc.cipher_suite}: allowed are 17, and 3 as a fallback",
            )
        if not bmc.username:
            raise self._error(
                machine, bmc, "has no user name: an empty (NULL) user logs in anonymously"
            )
        if "\0" in bmc.username:
            raise self._error(
                machine, bmc, "has a user name with a NUL byte (a NUL ends an IPMI user name)"
            )
        if not bmc.password:
            raise self._error(machine, bmc, f"has no password for user {bmc.username!r}")
        if len(bmc.password.encode()) > MAX_PASSWORD:
            raise self._error(
                machine,
                bmc,
                f"password of user {bmc.username!r} is longer than {MAX_PASSWORD} bytes "
                "(the IPMI 2.0 maximum)",
            )
        if len(bmc.username.encode()) > MAX_USERNAME:
            raise self._error(machine, bmc, f"user name is longer than {MAX_USERNAME} bytes")

    # -- attempts and retries --------------------------------------------------------------------

    def _run(self, machine: str, bmc: Bmc, action: Callable[[_Step], T]) -> T:
        self.check(machine, bmc)
        return self._attempts(machine, bmc, lambda: self._session(machine, bmc, action))

    def _attempts(
        self, machine: str, bmc: Bmc, attempt: Callable[[], T], window: float | None = None
    ) -> T:
        deadline = time.monotonic() + (self.window if window is None else window)
        delay = 0.25
        count = 0
        while True:
            count += 1
            try:
                return attempt()
            except _Transient as e:
                failure = e
            if time.monotonic() + delay >= deadline:
                break
            log.debug("machine %s: BMC %s: %s, again in %.2fs", machine, bmc.where, failure, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        what = f"{failure.what} after {count} attempts ({failure.detail})"
        raise self._error(machine, bmc, what, temporary=True)

    def _lock(self, key: tuple[str, int]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _pace(self, key: tuple[str, int]) -> None:
        """Wait until `min_interval` has passed since the last command to this BMC ended. Called
        with the BMC's lock held."""
        wait = self._last.get(key, float("-inf")) + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _count(self, machine: str) -> None:
        with self._guard:
            self.commands[machine] += 1

    def _done(self, key: tuple[str, int]) -> None:
        self._last[key] = time.monotonic()

    def _ping_once(self, machine: str, key: tuple[str, int]) -> None:
        with self._lock(key):
            self._pace(key)
            self._count(machine)
            try:
                ok = presence_ping(key[0], key[1], self.timeout)
            finally:
                self._done(key)
        if not ok:
            raise _Transient("not answering", "no answer to the RMCP presence ping")

    def _session(self, machine: str, bmc: Bmc, action: Callable[[_Step], T]) -> T:
        """One attempt: open a session, run `action`, close. Library exceptions become a
        _Transient or a PoolError composed here, raised outside the except clauses."""
        key = (bmc.address, bmc.port)
        failure: Exception | None = None
        with self._lock(key):
            step = _Step(self, machine, bmc, key)
            try:
                step.open()
                return action(step)
            except Exception as e:  # translated below, never passed on
                failure = self._translate(machine, bmc, e, step)
            finally:
                step.close()
        assert failure is not None  # the try returned otherwise
        raise failure

    def _translate(self, machine: str, bmc: Bmc, e: Exception, step: _Step) -> Exception:
        user = f"user {bmc.username!r}"
        opened = step.opened
        invalid = step.interface.invalid
        ignored = (
            f"; {invalid} invalid answer{'s' if invalid != 1 else ''} ignored" if invalid else ""
        )
        if isinstance(e, PoolError):
            return e
        if isinstance(e, CompletionCodeError):
            code = f"completion code 0x{e.cc:02x} {e.cc_desc}"
            if e.cc in BUSY_CODES:
                return _Transient("busy", code)
            if e.cc in TRANSIENT_CODES:
                return _Transient("not answering", code)
            if e.cc == constants.CC_INSUFFICIENT_PRIVILEGES:
                return self._error(machine, bmc, f"refused a command to {user}: {code}")
            return self._error(machine, bmc, f"refused the command: {code}")
        if isinstance(e, MessageStatusCodeError):
            if e.msc in CREDENTIAL_MSC:
                return self._error(machine, bmc, f"refused the credentials of {user}")
            if e.msc in SUITE_MSC:
                return self._error(
                    machine, bmc, f"does not accept cipher suite {bmc.cipher_suite} ({e.msc_desc})"
                )
            if e.msc in ROLE_MSC:
                return self._error(machine, bmc, f"refused administrator privilege to {user}")
            if e.msc in BUSY_MSC:
                return _Transient("busy", f"no free session: {e.msc_desc}")
            return _Transient("not answering", f"session setup failed: {e.msc_desc}")
        if isinstance(e, (AuthenticationError, IpmiLongPasswordError)) and not opened:
            # raised by the RAKP handshake only: a packet failing its integrity check is ignored
            return self._error(machine, bmc, f"refused the credentials of {user}")
        if isinstance(e, IpmiConnectionError):
            return _Transient("not answering", f"no answer to the RMCP presence ping{ignored}")
        if isinstance(e, (TimeoutError, RetryError)):
            return _Transient("not answering", f"timed out{ignored}")
        if isinstance(e, ConnectionRefusedError):
            return _Transient("not answering", "connection refused")
        if isinstance(e, OSError):
            return _Transient("not answering", f"network error {type(e).__name__}")
        if isinstance(e, INVALID):
            # an answer that came in time and passed the checks of its packet, but not those of
            # its content (another console's session ID, a short message, other algorithms)
            name = "struct.error" if isinstance(e, struct.error) else type(e).__name__
            return _Transient("answering invalidly", f"{name}{ignored}")
        if isinstance(e, NotSupportedError):
            return self._error(machine, bmc, "does not support what is needed (IPMI 2.0, AES)")
        # unknown: the type only, its text might hold anything
        return self._error(machine, bmc, f"failed unexpectedly ({type(e).__name__})")


class _Step:
    """One session with one BMC; every command is paced and counted."""

    def __init__(self, power: Power, machine: str, bmc: Bmc, key: tuple[str, int]) -> None:
        self.power = power
        self.machine = machine
        self.bmc = bmc
        self.key = key
        self.opened = False
        self.interface = interface = _Interface(bmc.cipher_suite)
        session = _Session()
        session.set_session_type_rmcp(bmc.address, port=bmc.port)
        session.set_auth_type_user(bmc.username, bmc.password)
        session.set_priv_level("administrator")
        self.ipmi = pyipmi.Ipmi(interface=interface, session=session)
        self.ipmi.target = pyipmi.Target(ipmb_address=BMC_ADDRESS)

    def _command(self, send: Callable[[], T]) -> T:
        self.power._pace(self.key)
        self.power._count(self.machine)
        try:
            return send()
        finally:
            self.power._done(self.key)

    def open(self) -> None:
        def establish() -> None:
            self.ipmi.interface.open()
            self.ipmi.interface.set_timeout(self.power.timeout)
            self.ipmi.session.establish()

        self._command(establish)
        self.opened = True

    def close(self) -> None:
        """Close Session (not paced: it frees the BMC's session slot), then the socket. A
        failing close does not undo the command that succeeded. A session whose set-up failed
        after the RAKP handshake (at Set Session Privilege Level) holds a slot too: closed."""
        try:
            if self.opened or self.interface.in_session:
                self.power._count(self.machine)
                self.ipmi.session.close()
        except Exception:
            log.debug("machine %s: closing the IPMI session failed", self.machine)
        finally:
            self.power._done(self.key)
            self.ipmi.interface.close()

    def status(self) -> pyipmi.chassis.ChassisStatus:
        return self._command(self.ipmi.get_chassis_status)

    def control(self, what: str) -> None:
        self._command(getattr(self.ipmi, f"chassis_control_{what}"))

    def pxe_once(self) -> None:
        """Boot from the network on the next boot only (boot flags valid, not persistent, legacy
        mode - what `ipmitool chassis bootdev pxe` sends). Many BMCs drop the flag 60 s after
        it is set unless a power command follows, so `pxe_boot` sets it right before power-up."""
        self._command(lambda: self.ipmi.set_boot_options(BootDevice.PXE, "legacy", False))

    def wait_off(self, seconds: float) -> None:
        """Until Get Chassis Status says off (some BMCs answer a power-down before the chassis
        is off); a chassis still on after `seconds` is a temporary failure of the machine."""
        deadline = time.monotonic() + seconds
        while self.status().power_on:
            if time.monotonic() >= deadline:
                raise self.power._error(
                    self.machine,
                    self.bmc,
                    f"left the chassis on {seconds:g} s after power down",
                    temporary=True,
                )
            time.sleep(0.5)


def presence_ping(address: str, port: int, timeout: float) -> bool:
    """Send an RMCP/ASF presence ping and wait up to `timeout` for the pong (python-ipmi's
    codec, our socket: no session, no credentials)."""
    deadline = time.monotonic() + timeout
    packet = RmcpMsg(RMCP_CLASS_ASF).pack(AsfPing().pack(), 0xFF)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, port))
            sock.send(packet)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                data = sock.recv(512)
                rmcp = RmcpMsg()
                try:
                    sdu = rmcp.unpack(data)
                    if rmcp.class_of_msg == RMCP_CLASS_ASF:
                        AsfPong().unpack(sdu)
                        return True
                except (DecodingError, struct.error):
                    continue
        except OSError:  # timeout, ICMP port unreachable (refused), no route
            return False
    return False
