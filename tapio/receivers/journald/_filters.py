"""The receiver's filters as journal matches, the way journalctl builds them. Pure.

A plan is a conjunction of sections; a section is a disjunction of terms; a
term is a list of ``FIELD=value`` matches that must all hold (libsystemd ORs
matches of one field within a term). Sections, in order:

- priority: ``PRIORITY=`` each priority of the range (none when the range
  is 0-7: then entries without a PRIORITY field are kept too);
- units: per unit, what ``journalctl --unit`` matches — the unit's own
  entries (``_SYSTEMD_UNIT``), its core dumps (the coredump message from
  uid 0 with ``COREDUMP_UNIT``), PID 1's messages about it (``UNIT``) and
  those of privileged daemons (``OBJECT_SYSTEMD_UNIT`` from uid 0), and,
  beyond journalctl, a user manager's messages about a unit of that name
  (``USER_UNIT``);
- identifiers: ``SYSLOG_IDENTIFIER=`` each;
- matches: each configured group is one term.

Invariant: an empty plan matches every entry; `journalctl_args` says the
same as the plan to journalctl, except the ``USER_UNIT`` term (journalctl's
``--unit`` has no such match).
"""

from __future__ import annotations

from ._config import Config, parse_priority, unit_name

Term = list[str]
Section = list[Term]

#: systemd-coredump's "process dumped core" message (systemd.catalog)
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"


def unit_terms(unit: str) -> Section:
    """The terms that select what `journalctl --unit` shows for ``unit``."""
    return [
        [f"_SYSTEMD_UNIT={unit}"],
        [f"MESSAGE_ID={COREDUMP_MESSAGE_ID}", "_UID=0", f"COREDUMP_UNIT={unit}"],
        ["_PID=1", f"UNIT={unit}"],
        ["_UID=0", f"OBJECT_SYSTEMD_UNIT={unit}"],
        [f"USER_UNIT={unit}"],
    ]


def plan(config: Config) -> list[Section]:
    """The matches ``config`` asks for (see the module docstring)."""
    sections: list[Section] = []
    first, last = parse_priority(config.priority)
    if (first, last) != (0, 7):
        sections.append([[f"PRIORITY={p}" for p in range(first, last + 1)]])
    if config.units:
        sections.append([term for u in dict.fromkeys(unit_name(u) for u in config.units) for term in unit_terms(u)])
    if config.identifiers:
        sections.append([[f"SYSLOG_IDENTIFIER={i}" for i in dict.fromkeys(config.identifiers)]])
    if config.matches:
        sections.append([[f"{k}={v}" for k, v in group.items()] for group in config.matches])
    return sections


def apply(reader, sections: list[Section]) -> None:
    """Add ``sections`` to a systemd ``_Reader`` (``add_match`` / ``add_disjunction`` / ``add_conjunction``)."""
    for section in sections:
        for i, term in enumerate(section):
            if i:
                reader.add_disjunction()
            for match in term:
                reader.add_match(match)
        reader.add_conjunction()


def journalctl_args(config: Config) -> list[str]:
    """The same selection as journalctl arguments (`--priority`, `--unit`, `--identifier`, matches joined by ``+``)."""
    args: list[str] = []
    first, last = parse_priority(config.priority)
    if (first, last) != (0, 7):
        args.append(f"--priority={first}..{last}")
    args += [f"--unit={unit_name(u)}" for u in dict.fromkeys(config.units)]
    args += [f"--identifier={i}" for i in dict.fromkeys(config.identifiers)]
    for i, group in enumerate(config.matches):
        if i:
            args.append("+")
        args += [f"{k}={v}" for k, v in group.items()]
    return args
