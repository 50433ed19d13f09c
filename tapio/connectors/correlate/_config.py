"""The correlate connector's config and its rules: the built-in pack, rule files and inline rules, merged by name.

Invariants:
- A `RuleConfig` that passed ``validate()`` compiles (`compile_rule`)
  without error: every condition, name and number is checked there.
- Rules are looked up by name; later sources replace earlier ones whole:
  the built-in pack, then each of ``rules_files`` in order, then the
  inline ``rules``. ``disabled_rules`` removes rules by name last.
- Loading a rule file reads it and nothing else; every problem in it is
  reported with the file, line and key it is at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tapio._yamlnodes import Loc, parse_yaml
from tapio.component import StorageRef, setting
from tapio.decode import INVALID, Problems, decode_validated
from tapio.units import Duration

from ._match import AttributeMatch, EventMatch

Severity = Literal["info", "warning", "error", "critical"]
Role = Literal["required", "optional", "absent", "resolves"]

#: rule and member names appear in span names and metric labels: keep them plain
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: ``{attribute.name}`` in a summary template
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
BUILTIN_RULES = "rules.yaml"


def _condition_problems(key: str, conditions: dict[str, Any]) -> list[str]:
    problems = []
    for name, cond in conditions.items():
        try:
            AttributeMatch.compile({name: cond})
        except ValueError as e:
            problems.append(f"{key}.{e}")
    return problems


@dataclass(frozen=True, kw_only=True)
class MemberConfig:
    role: Role = setting(
        "required",
        doc="`required`: the incident needs it; `optional`: raises the confidence when present; `absent`: the incident "
        "holds only if this never arrives within the window; `resolves`: its arrival cancels the incident (or marks an "
        "emitted one resolved).",
    )
    event: str = setting("", doc="The log record's event name: exact, a pattern with `*`, or alternatives separated by `|`; empty matches any.")
    scope: str = setting("", doc="The instrumentation scope name of the record (e.g. `tapio.ebpf`; patterns and `|` as for `event`); empty matches any.")
    attributes: dict[str, Any] = setting(
        default_factory=dict,
        doc="Attribute conditions that must all hold: a value (equality) or a mapping of `equals`, `not_equals`, `in`, "
        "`not_in`, `regex`, `gt`, `gte`, `lt`, `lte`, `exists`. Record attributes are looked up first, then the resource's.",
    )
    any_of: list[dict[str, Any]] = setting(
        default_factory=list, doc="Alternative sets of attribute conditions: at least one set must hold (besides `attributes`)."
    )
    min_count: int = setting(1, doc="How many matching events the window must hold for the member to count as present.")
    join: list[str] = setting(
        default_factory=list, doc="This member's join attributes, when its events name the key otherwise (e.g. `host.name` for a node)."
    )

    def validate(self) -> list[str]:
        problems: list[str] = []
        if self.min_count < 1:
            problems.append(f"min_count: must be at least 1, got {self.min_count}")
        problems += _condition_problems("attributes", self.attributes)
        for i, alt in enumerate(self.any_of):
            if not alt:
                problems.append(f"any_of[{i}]: an empty alternative matches everything; remove it")
            problems += _condition_problems(f"any_of[{i}]", alt)
        if self.join and any(not k for k in self.join):
            problems.append("join: attribute names cannot be empty")
        if not (self.event or self.scope or self.attributes or self.any_of):
            problems.append("a member must say what it matches: event, scope, attributes or any_of")
        return problems

    def compile(self) -> EventMatch:
        return EventMatch(
            event=self.event,
            scope=self.scope,
            attributes=AttributeMatch.compile(self.attributes),
            any_of=tuple(AttributeMatch.compile(a) for a in self.any_of),
        )


@dataclass(frozen=True, kw_only=True)
class RuleConfig:
    description: str = setting("", doc="What the rule finds, for people (shown on the incident).")
    severity: Severity = setting("warning", doc="The incident's severity: info, warning, error or critical.")
    summary: str = setting(
        "", doc="The incident's one-line summary; `{attribute}` is replaced by the first member event holding it, `{rule}` by the rule name."
    )
    join: list[str] = setting(default_factory=list, doc="The attributes whose values make the join key (e.g. `[k8s.pod.uid]`).")
    window: Duration = setting(Duration(120.0), doc="How far apart in time member events of one incident may be.")
    settle: Duration = setting(
        Duration(5.0),
        doc="How long to wait, once every required member is present, for optional and resolving members before the "
        "incident is sent (it is sent at the end of the window at the latest; with an `absent` member only then).",
    )
    confidence: float = setting(0.7, doc="Confidence of an incident with its required members only, between 0 and 1.")
    confidence_per_optional: float = setting(0.1, doc="Added for each optional member present (at most 1 in total).")
    members: dict[str, MemberConfig] = setting(default_factory=dict, doc="The events of an incident, by member name.")

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.join and not all(m.join for m in self.members.values()):
            problems.append("join: name the attributes that join member events (e.g. [k8s.pod.uid])")
        if self.window <= 0:
            problems.append("window: must be more than 0s")
        if self.settle > self.window:
            problems.append(f"settle: must not exceed the window ({self.window})")
        for key in ("confidence", "confidence_per_optional"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{key}: must be between 0 and 1, got {v:g}")
        if not self.members:
            problems.append("members: a rule needs at least one member")
        elif not any(m.role == "required" for m in self.members.values()):
            problems.append("members: a rule needs at least one required member")
        for name, member in self.members.items():
            if not _NAME.match(name):
                problems.append(f"members.{name}: a member name is a letter then letters, digits, '_', '.' or '-' (64 at most)")
            problems += [f"members.{name}.{p}" for p in member.validate()]
            if self.join and member.join and len(member.join) != len(self.join):
                problems.append(f"members.{name}.join: must name as many attributes as the rule's join ({len(self.join)})")
        for placeholder in _PLACEHOLDER.findall(self.summary):
            if not placeholder.strip():
                problems.append("summary: an empty {} placeholder; write {attribute.name}")
        return problems


@dataclass(frozen=True, kw_only=True)
class RulesFile:
    """A rules file: the same ``rules:`` mapping as the connector's inline rules."""

    rules: dict[str, RuleConfig] = setting(default_factory=dict, doc="Rules by name.")

    def validate(self) -> list[str]:
        return _rules_problems(self.rules)


def _rules_problems(rules: dict[str, RuleConfig]) -> list[str]:
    problems: list[str] = []
    for name, rule in rules.items():
        if not _NAME.match(name):
            problems.append(f"rules.{name}: a rule name is a letter then letters, digits, '_', '.' or '-' (64 at most)")
        problems += [f"rules.{name}.{p}" for p in rule.validate()]
    return problems


@dataclass(frozen=True, kw_only=True)
class CorrelateConfig:
    builtin_rules: bool = setting(True, doc="Use the rules that ship with tapio (see the list above); false starts from none.")
    rules_files: list[str] = setting(
        default_factory=list, doc="YAML files with more rules (`rules:` by name), loaded in order; a rule replaces one of the same name."
    )
    rules: dict[str, RuleConfig] = setting(
        default_factory=dict, doc="Rules written here, by name; one named like a built-in or file rule replaces it."
    )
    disabled_rules: list[str] = setting(default_factory=list, doc="Names of rules to turn off (built-in or not).")
    max_keys: int = setting(10000, doc="Most open join keys (windows) per rule; the least recently used is dropped beyond it (counted).")
    max_events_per_member: int = setting(
        32, doc="Member events kept per incident and member (as child spans); more are counted, not kept."
    )
    lateness: Duration = setting(
        Duration(5.0), doc="How long after its window an incident still takes late events (out-of-order arrival)."
    )
    storage: StorageRef | None = setting(
        None,
        doc="A storage extension (e.g. `storage`) where open windows are saved every `checkpoint_interval` and at shutdown, so "
        "a restart goes on assembling the incidents it had begun. None keeps them in memory only: on shutdown every complete "
        "incident is sent and the rest is dropped.",
    )
    checkpoint_interval: Duration = setting(
        Duration(10.0), doc="How often open windows are saved to `storage` (a crash loses at most this much of their events)."
    )
    def validate(self) -> list[str]:
        problems: list[str] = []
        if self.max_keys < 1:
            problems.append(f"max_keys: must be at least 1, got {self.max_keys}")
        if self.max_events_per_member < 1:
            problems.append(f"max_events_per_member: must be at least 1, got {self.max_events_per_member}")
        if float(self.checkpoint_interval) < 0.1:
            problems.append(f"checkpoint_interval: must be at least 100ms, got {self.checkpoint_interval}")
        problems += _rules_problems(self.rules)
        loaded, file_problems = self._file_rules()
        problems += file_problems
        if not file_problems:
            known = set(loaded) | set(self.rules)
            for i, name in enumerate(self.disabled_rules):
                if name not in known:
                    problems.append(f"disabled_rules[{i}]: no rule is named {name!r}")
        return problems

    def _file_rules(self) -> tuple[dict[str, RuleConfig], list[str]]:
        rules: dict[str, RuleConfig] = {}
        problems: list[str] = []
        sources: list[tuple[str, str | None]] = []
        if self.builtin_rules:
            sources.append(("", None))
        sources += [(f"rules_files[{i}]", p) for i, p in enumerate(self.rules_files)]
        for key, path in sources:
            loaded, errs = load_rules_file(path)
            if errs:
                problems += [f"{key}: {e}" if key else f"the built-in rules: {e}" for e in errs]
            rules.update(loaded)
        return rules, problems

    def effective_rules(self) -> dict[str, RuleConfig]:
        """Every rule in force, by name (call only on a config that validated)."""
        rules, problems = self._file_rules()
        if problems:
            raise ValueError("; ".join(problems))
        rules.update(self.rules)
        for name in self.disabled_rules:
            rules.pop(name, None)
        return rules


def load_rules_file(path: str | None) -> tuple[dict[str, RuleConfig], list[str]]:
    """The rules of a file (None: the built-in pack) and the problems found, each as ``file:line:col: key: message``."""
    if path is None:
        name = f"{__package__}/{BUILTIN_RULES}"
        try:
            text = resources.files(__package__).joinpath(BUILTIN_RULES).read_text(encoding="utf-8")
        except OSError as e:  # a broken install
            return {}, [f"cannot read {name}: {e}"]
    else:
        name = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return {}, [f"cannot read rules file {path}: {getattr(e, 'strerror', None) or e}"]
    report = Problems()
    root = parse_yaml(text, name, {}, report)
    if root is None:
        return {}, [str(p) for p in report.items] or [f"{name}: the file is empty; write `rules:` with rules by name"]
    decoded = decode_validated(RulesFile, root, "", report, Loc(name, 1, 1))
    if decoded is INVALID or report.has_errors:
        return {}, [str(p) for p in report.items if p.severity == "error"]
    return dict(decoded.rules), []
