"""systemd, the external system that runs cld as a service: the sd_notify protocol.

Owns what the daemon tells systemd: READY=1, STATUS=<line>, WATCHDOG=1, EXTEND_TIMEOUT_USEC=,
STOPPING=1, sent as datagrams to $NOTIFY_SOCKET (a path, or an abstract name starting with `@`),
and the watchdog interval systemd asks for ($WATCHDOG_USEC, for this process only when
$WATCHDOG_PID is unset or names it: sd_watchdog_enabled's rules). Without $NOTIFY_SOCKET (cld run
by hand, in tests) `notifier()` gives a `NullNotifier` that does nothing. Knows nothing of what
the daemon does: callers say when it is ready and what to put in the status line.

Written with `socket` rather than the `sdnotify` package: the protocol is one datagram per
message, and sdnotify (last release 2017) neither reads $WATCHDOG_USEC/$WATCHDOG_PID nor bounds
its send with a timeout, so it would save no code here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Optional, Union

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0
STATUS_TICK_S = 1.0  # how often the status line is checked for changes
# While starting, each tick asks systemd for this much more time (EXTEND_TIMEOUT_USEC) rather than
# the unit guessing how long preparing the model and starting vLLM take; a hung start stops asking.
START_EXTENSION_S = 30.0
# The variables systemd hands the main process; they are taken out of the environment so that
# vLLM, the trainer and other children never speak for cld (sd_notify's unset_environment).
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Speaks sd_notify to one socket. Sending never raises: systemd going away must not stop cld."""

    def __init__(self, address: str, watchdog_interval_s: Optional[float] = None):
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval_s = watchdog_interval_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(SEND_TIMEOUT_S)

    def send(self, *fields: str) -> bool:
        """Send `fields` ("KEY=value") as one message; False (and a warning) when it could not."""
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as error:
            log.warning("could not notify systemd (%s): %s", self.address.lstrip("\0"), error)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more to start or stop (systemd ≥ 236)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        self.sock.close()


class NullNotifier:
    """What `notifier()` gives when systemd did not start cld: every message is dropped."""

    watchdog_interval_s: Optional[float] = None

    def send(self, *fields: str) -> bool:
        return False

    def ready(self, status: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def watchdog(self) -> None:
        pass

    def extend_timeout(self, seconds: float) -> None:
        pass

    def stopping(self) -> None:
        pass

    def close(self) -> None:
        pass


AnyNotifier = Union[Notifier, NullNotifier]


def notifier(env: Optional[MutableMapping[str, str]] = None) -> AnyNotifier:
    """The notifier for this process, from $NOTIFY_SOCKET; removes the notify variables from `env`
    (default: this process's environment) so children do not inherit them."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    interval_s = watchdog_interval_s(env, os.getpid())
    for name in NOTIFY_VARIABLES:
        env.pop(name, None)
    if not address:
        return NullNotifier()
    return Notifier(address, interval_s)


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> Optional[float]:
    """How often to send WATCHDOG=1 (half of $WATCHDOG_USEC), or None when systemd asks for no
    pings from process `pid`: the variable is unset, not a positive integer, or $WATCHDOG_PID
    names another process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def report_status(notifier: AnyNotifier, line: Callable[[], str], starting: Callable[[], bool],
                        tick_s: float = STATUS_TICK_S) -> None:
    """Until cancelled: send STATUS=`line()` whenever it changes, and while `starting()` ask for
    START_EXTENSION_S more start-up time at every tick."""
    sent = None
    while True:
        if (text := line()) != sent:
            notifier.status(text)
            sent = text
        if starting():
            notifier.extend_timeout(START_EXTENSION_S)
        await asyncio.sleep(tick_s)


async def ping_watchdog(notifier: AnyNotifier) -> None:
    """Until cancelled: WATCHDOG=1 every half watchdog period. It runs on the daemon's event loop,
    so a loop that is stuck stops the pings and systemd restarts cld."""
    interval_s = notifier.watchdog_interval_s
    if interval_s is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval_s)
