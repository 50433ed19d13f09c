"""YAML documents as trees of located values, with ``${env:VAR}`` expansion.

Invariants:
- Every node carries the `Loc` (file, 1-based line and column) where its
  value starts in the source text, and every mapping entry also carries its
  key's `Loc`. `merge` keeps each node's own `Loc`, so after several files
  are merged a value still points to the file and line it came from.
- Trees are never modified after they are built and may share subtrees: a
  YAML alias is converted once, so an alias bomb costs no more than its text.
  Nesting is capped at `MAX_DEPTH`, which bounds every later recursion.
- A `Scalar` keeps the text it was read from (after env expansion) next to
  its typed value, so a string field can take ``version: 1.10`` as "1.10".
- Nothing here raises on bad input: each problem goes to the ``report``
  callback, and the offending part is left out or kept as plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping as MappingType, Protocol

import yaml

#: nesting levels a config may use; real configs need fewer than ten
MAX_DEPTH = 64

_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Loc:
    """Where a value was written; all None for values that came from Python code."""

    file: str | None = None
    line: int | None = None
    column: int | None = None


NOWHERE = Loc()


@dataclass(frozen=True, slots=True, eq=False)
class Scalar:
    #: the typed value (str, int, float, bool, None, or what a YAML tag made)
    value: Any
    #: the text it was written as, after env expansion
    text: str
    loc: Loc


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    key_loc: Loc
    node: "Node"


@dataclass(frozen=True, slots=True, eq=False)
class Mapping:
    entries: dict[str, Entry]
    loc: Loc


@dataclass(frozen=True, slots=True, eq=False)
class Sequence:
    items: tuple["Node", ...]
    loc: Loc


Node = Scalar | Mapping | Sequence


class Report(Protocol):
    def __call__(self, loc: Loc, path: str, message: str, severity: str = "error") -> None: ...


def is_null(node: Node) -> bool:
    return isinstance(node, Scalar) and node.value is None


def join_path(path: str, key: str) -> str:
    """``path.key``; a key that would make the dotted path ambiguous is quoted."""
    if key == "" or any(c in key for c in ".[]\"' \t\n"):
        key_part = "[" + repr(key) + "]"
        return f"{path}{key_part}" if path else key_part
    return f"{path}.{key}" if path else key


def describe(node: Node) -> str:
    """A short rendering of a value for messages: 'abc', 42, true, null, a list."""
    if isinstance(node, Mapping):
        return "a mapping"
    if isinstance(node, Sequence):
        return "a list"
    v = node.value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v) if len(v) <= 60 else repr(v[:57] + "...")
    text = node.text or repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --- environment expansion ---------------------------------------------------

_REF = re.compile(r"(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True, slots=True)
class Expansion:
    text: str
    #: the input was exactly one ``${...}`` reference (its result gets a YAML type)
    whole: bool
    #: referenced variables that are not set and have no default
    unset: tuple[str, ...]
    errors: tuple[str, ...]


def expand_env(text: str, env: MappingType[str, str]) -> Expansion:
    """Expand ``${env:NAME}``, ``${env:NAME:-default}``, ``${NAME}``, ``${NAME:-default}``; ``$$`` is one ``$``.

    A variable that is not set expands to its default if one is given, else
    to "" (and is listed in ``unset``); a variable set to "" stays "". A
    ``$`` followed by anything but ``$`` or ``{`` is kept as is. Malformed
    references are kept as written and described in ``errors``.
    """
    out: list[str] = []
    unset: list[str] = []
    errors: list[str] = []
    whole = False
    i, n = 0, len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        nxt = text[j + 1 : j + 2]
        if nxt == "$":
            out.append("$")
            i = j + 2
            continue
        if nxt != "{":
            out.append("$")
            i = j + 1
            continue
        end = text.find("}", j + 2)
        if end < 0:
            errors.append(f"unterminated reference {text[j:]!r}: close it with '}}', or write '$$' for a literal '$'")
            out.append(text[j:])
            break
        body = text[j + 2 : end]
        m = _REF.fullmatch(body)
        if m is None:
            ref = text[j : end + 1]
            if body.startswith("env:"):
                errors.append(f"invalid environment variable name in {ref!r}: use letters, digits and '_', not starting with a digit")
            elif _SCHEME.match(body):
                errors.append(f"unsupported reference {ref!r}: only ${{env:NAME}} and ${{env:NAME:-default}} are supported")
            else:
                errors.append(f"invalid reference {ref!r}: expected ${{env:NAME}} or ${{env:NAME:-default}} (write '$$' for a literal '$')")
            out.append(ref)
        else:
            name, default = m.group(1), m.group(2)
            if name in env:
                out.append(env[name])
            elif default is not None:
                out.append(default)
            else:
                unset.append(name)
            whole = j == 0 and end == n - 1
        i = end + 1
    return Expansion("".join(out), whole, tuple(unset), tuple(errors))


def _unset_message(name: str, exp: Expansion, explicit: bool, path: str) -> str:
    """The warning for an unset variable without a default, saying what the value becomes."""
    what = f"environment variable {name!r} is not set (give a default with ${{env:{name}:-value}})"
    if explicit:
        return f"{what}; the value is an empty string"
    if exp.whole:  # "" read as YAML is null
        if path.endswith("]"):
            return f"{what}; this list item is null"
        return f"{what}; the value is empty, so the setting keeps its default"
    return f"{what}; it is replaced by nothing, giving {exp.text!r}"


# --- reading YAML --------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that remembers whether a scalar's tag was written explicitly (``!!str``)."""

    def compose_scalar_node(self, anchor: Any) -> yaml.ScalarNode:
        event = self.peek_event()
        node = super().compose_scalar_node(anchor)
        node.tapio_explicit_tag = event.tag not in (None, "!")  # type: ignore[attr-defined]
        return node


def _loc_of(file: str, text: str, pos: int) -> Loc:
    line = text.count("\n", 0, pos) + 1
    return Loc(file, line, pos - (text.rfind("\n", 0, pos) + 1) + 1)


def _yaml_error_message(e: yaml.MarkedYAMLError) -> str:
    problem, context = e.problem, e.context
    if problem and context:
        cm = e.context_mark
        where = f" at line {cm.line + 1}, column {cm.column + 1}" if cm is not None else ""
        if context.startswith("while"):
            return f"invalid YAML: {problem} ({context}{where})"
        return f"invalid YAML: {context}{where}, {problem}"
    return f"invalid YAML: {problem or context or 'syntax error'}"


def parse_yaml(text: str, file: str, env: MappingType[str, str], report: Report) -> Node | None:
    """Parse one YAML document into located nodes, expanding env references in string scalars.

    Returns None for an empty document or when the text is not valid YAML
    (then the syntax error has been reported with its line and column).
    """
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks every character first (ReaderError)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Loc(file, mark.line + 1, mark.column + 1) if mark is not None else Loc(file)
        report(loc, "", _yaml_error_message(e))
        return None
    except yaml.reader.ReaderError as e:
        char = ord(e.character) if isinstance(e.character, str) else e.character
        report(_loc_of(file, text, e.position), "", f"invalid YAML: unacceptable character #x{char:04x}: {e.reason}")
        return None
    except yaml.YAMLError as e:
        report(Loc(file), "", f"invalid YAML: {e}")
        return None
    except RecursionError:
        report(Loc(file), "", f"invalid YAML: nested too deeply (a config needs at most {MAX_DEPTH} levels)")
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None or loader is None:
        return None
    return _Converter(loader, file, env, report).convert(root, "", 0)


class _Converter:
    def __init__(self, loader: _Loader, file: str, env: MappingType[str, str], report: Report) -> None:
        self._loader = loader
        self._file = file
        self._env = env
        self._report = report
        self._done: dict[int, Node] = {}
        self._active: set[int] = set()

    def _loc(self, mark: Any) -> Loc:
        return Loc(self._file, mark.line + 1, mark.column + 1)

    def convert(self, node: yaml.Node, path: str, depth: int) -> Node:
        key = id(node)
        done = self._done.get(key)
        if done is not None:
            return done
        loc = self._loc(node.start_mark)
        if key in self._active:
            self._report(loc, path, "an alias refers to a mapping or list that contains it (recursive structures are not allowed)")
            return Scalar(None, "", loc)
        if depth > MAX_DEPTH:
            self._report(loc, path, f"nested more than {MAX_DEPTH} levels deep")
            return Scalar(None, "", loc)
        self._active.add(key)
        try:
            if isinstance(node, yaml.ScalarNode):
                out: Node = self._scalar(node, path, loc)
            elif isinstance(node, yaml.SequenceNode):
                self._check_collection_tag(node, _SEQ_TAG, path, loc)
                out = Sequence(
                    tuple(self.convert(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node.value)), loc
                )
            else:
                self._check_collection_tag(node, _MAP_TAG, path, loc)
                out = self._mapping(node, path, loc, depth)
        finally:
            self._active.discard(key)
        self._done[key] = out
        return out

    def _check_collection_tag(self, node: yaml.Node, expected: str, path: str, loc: Loc) -> None:
        if node.tag != expected:
            self._report(loc, path, f"unsupported YAML tag {node.tag!r} (read as a plain {'list' if expected == _SEQ_TAG else 'mapping'})")

    def _mapping(self, node: yaml.MappingNode, path: str, loc: Loc, depth: int) -> Mapping:
        own: dict[str, Entry] = {}
        inherited: dict[str, Entry] = {}
        for knode, vnode in node.value:
            kloc = self._loc(knode.start_mark)
            if isinstance(knode, yaml.ScalarNode) and knode.tag == _MERGE_TAG:
                for src in self._merge_sources(vnode, path, depth):
                    for k, e in src.entries.items():
                        inherited.setdefault(k, e)
                continue
            if not isinstance(knode, yaml.ScalarNode):
                self._report(kloc, path, "a key must be a plain name, not a list or mapping")
                continue
            k = knode.value
            kpath = join_path(path, k)
            first = own.get(k)
            if first is not None:
                self._report(kloc, kpath, f"duplicate key {k!r} (first defined at line {first.key_loc.line}); the last one is used")
            own[k] = Entry(kloc, self.convert(vnode, kpath, depth + 1))
        entries = {k: e for k, e in inherited.items() if k not in own}
        entries.update(own)
        return Mapping(entries, loc)

    def _merge_sources(self, vnode: yaml.Node, path: str, depth: int) -> list[Mapping]:
        """The mappings a ``<<:`` merge key brings in (earlier ones win, as in YAML)."""
        value = self.convert(vnode, path, depth + 1)
        sources = list(value.items) if isinstance(value, Sequence) else [value]
        if all(isinstance(s, Mapping) for s in sources):
            return sources  # type: ignore[return-value]
        self._report(value.loc, path, "'<<' (merge key) needs a mapping or a list of mappings")
        return [s for s in sources if isinstance(s, Mapping)]

    def _construct(self, tag: str, text: str, style: str | None) -> Any:
        return self._loader.construct_object(yaml.ScalarNode(tag, text, style=style), deep=True)

    def _scalar(self, node: yaml.ScalarNode, path: str, loc: Loc) -> Scalar:
        text: str = node.value
        explicit = getattr(node, "tapio_explicit_tag", False)
        if node.tag == _STR_TAG:
            if "$" not in text:
                return Scalar(text, text, loc)
            exp = expand_env(text, self._env)
            for err in exp.errors:
                self._report(loc, path, err)
            for name in exp.unset:
                self._report(loc, path, _unset_message(name, exp, explicit, path), "warning")
            if not exp.whole or explicit:
                return Scalar(exp.text, exp.text, loc)
            # As the OpenTelemetry Collector does: a value that is one whole
            # reference takes the YAML type of what it expands to ("8080" -> 8080).
            tag = self._loader.resolve(yaml.ScalarNode, exp.text, (True, False))
            try:
                return Scalar(self._construct(tag, exp.text, None), exp.text, loc)
            except (yaml.YAMLError, ValueError, TypeError, OverflowError):
                return Scalar(exp.text, exp.text, loc)
        try:
            value = self._construct(node.tag, text, node.style)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            if explicit:
                problem = getattr(e, "problem", None) or str(e)
                self._report(loc, path, f"cannot read {text!r} with YAML tag {node.tag!r}: {problem}")
            # An implicit type whose constructor rejects the text (``0x_``) stays text.
            value = text
        if node.tag == _NULL_TAG:
            value = None
        return Scalar(value, text, loc)


# --- building, merging and reading trees ---------------------------------------


def from_python(value: Any, loc: Loc = NOWHERE) -> Node:
    """A tree for plain Python data (dicts, lists, scalars), with no source location."""
    if isinstance(value, MappingType):
        return Mapping({str(k): Entry(loc, from_python(v, loc)) for k, v in value.items()}, loc)
    if isinstance(value, (list, tuple)):
        return Sequence(tuple(from_python(v, loc) for v in value), loc)
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return Scalar(value, text, loc)


def to_python(node: Node) -> Any:
    """Plain Python data for a tree (dicts, lists, scalars)."""
    if isinstance(node, Mapping):
        return {k: to_python(e.node) for k, e in node.entries.items()}
    if isinstance(node, Sequence):
        return [to_python(n) for n in node.items]
    return node.value


def merge(base: Node, over: Node) -> Node:
    """``over`` laid on ``base``: mappings merge key by key, anything else is replaced by ``over``."""
    if not (isinstance(base, Mapping) and isinstance(over, Mapping)):
        return over
    entries = dict(base.entries)
    for k, e in over.entries.items():
        old = entries.get(k)
        if old is not None and isinstance(old.node, Mapping) and isinstance(e.node, Mapping):
            entries[k] = Entry(e.key_loc, merge(old.node, e.node))
        else:
            entries[k] = e
    return Mapping(entries, over.loc)

