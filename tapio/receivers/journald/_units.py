"""systemd's own journal messages about units, and the unit state each one reports. Pure data.

The message ids are those of systemd's catalog (``systemd.catalog``, the
``SD_MESSAGE_UNIT_*`` ids of ``sd-messages.h``). systemd writes them from
PID 1 with the unit in ``UNIT=`` (a user manager writes the same messages
with ``USER_UNIT=``) and, depending on the message, ``JOB_TYPE``,
``JOB_ID``, ``JOB_RESULT`` (job messages), ``UNIT_RESULT`` (failed,
skipped), ``N_RESTARTS`` (restart scheduled), ``EXIT_CODE`` /
``EXIT_STATUS`` / ``COMMAND`` (process exited) and ``INVOCATION_ID``.

Invariant: ``state`` is an ActiveState systemd itself reports for a unit
(``active``, ``reloading``, ``inactive``, ``failed``, ``activating``,
``deactivating``), and only set where the message implies it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UnitMessage:
    #: the value of ``systemd.unit.event``
    event: str
    #: the unit's ActiveState after the message, or None when the message does not say
    state: str | None
    #: the field holding the result (``JOB_RESULT``, ``UNIT_RESULT``), or None
    result_field: str | None = None
    #: the result when the message has no result field (``success`` for "unit succeeded")
    result: str | None = None


#: MESSAGE_ID (as the journal stores it: 32 lower-case hex digits) → what it says about the unit
UNIT_MESSAGES: dict[bytes, UnitMessage] = {
    b"7d4958e842da4a758f6c1cdc7b36dcc5": UnitMessage("starting", "activating"),
    b"39f53479d3a045ac8e11786248231fbf": UnitMessage("started", "active", "JOB_RESULT"),
    b"be02cf6855d2428ba40df7e9d022f03d": UnitMessage("start_failed", "failed", "JOB_RESULT"),
    b"de5b426a63be47a7b6ac3eaac82e2f6f": UnitMessage("stopping", "deactivating"),
    b"9d1aaa27d60140bd96365438aad20286": UnitMessage("stopped", "inactive", "JOB_RESULT"),
    b"d34d037fff1847e6ae669a370e694725": UnitMessage("reloading", "reloading"),
    b"7b05ebc668384222baa8881179cfda54": UnitMessage("reloaded", "active", "JOB_RESULT"),
    b"5eb03494b6584870a536b337290809b3": UnitMessage("restart_scheduled", "activating"),
    b"7ad2d189f7e94e70a38c781354912448": UnitMessage("succeeded", "inactive", result="success"),
    b"0e4284a0caca4bfc81c0bb6786972673": UnitMessage("skipped", "inactive", "UNIT_RESULT"),
    b"d9b373ed55a64feb8242e02dbe79a49c": UnitMessage("failed", "failed", "UNIT_RESULT"),
    b"98e322203f7a4ed290d09fe03c09fe15": UnitMessage("process_exited", None),
    b"fe6faa94e7774663a0da52717891d8ef": UnitMessage("oom_kill", None),
    b"641257651c1b4ec9a8624d7a40a9e1e7": UnitMessage("spawn_failed", None),
    b"ae8f7b866b0347b9af31fe1c80b127c0": UnitMessage("resources", None),
}

#: job results after which a failed start job leaves the unit failed (others: dependency, canceled … leave it inactive)
UNIT_FAILING_JOB_RESULTS = frozenset({"failed", "timeout"})

#: systemd's EXIT_CODE values (sigchld codes) and whether EXIT_STATUS is then a signal number
EXIT_CODE_IS_SIGNAL = {"exited": False, "killed": True, "dumped": True}
