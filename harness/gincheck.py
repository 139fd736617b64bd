"""Checks of gin input that gin itself does not make, with messages naming the file, the line,
the key and the fix: include cycles and missing includes (gin recurses forever or raises an
OSError), unclosed brackets (a tokenizer error naming no file), and bound values whose type
does not fit their parameter (which would otherwise fail inside every job).
"""

from __future__ import annotations

import ast
import collections.abc
import inspect
import io
import os
import pprint
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, cast

import gin
from gin import config as gin_config
from gin import config_parser

REPO_ROOT = Path(__file__).resolve().parent.parent


class GinError(ValueError):
    """A user error in gin files or bindings; the message names file, key and fix."""


def _value(v: object) -> str:
    return pprint.pformat(v, width=10_000)


# ---------------------------------------------------------------------------------------------
# Files: include cycles, missing includes, unclosed brackets.


def _resolve_include(name: str) -> tuple[str | None, list[str]]:
    """Where gin finds an included file (its search paths, in order), and every place it looks."""
    prefixes = gin_config._LOCATION_PREFIXES if not os.path.isabs(name) else [""]  # noqa: SLF001
    tried = [os.path.join(prefix, name) for prefix in prefixes]
    found = next((t for t in tried if os.path.isfile(t)), None)
    return found, list(dict.fromkeys(os.path.abspath(t) for t in tried))


def _tokens(text: str, where: str) -> list[tokenize.TokenInfo]:
    """The tokens of gin text (gin uses Python's tokenizer); GinError naming the unclosed bracket."""
    tokens: list[tokenize.TokenInfo] = []
    opened: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append(tok)
            elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                opened.pop()
            tokens.append(tok)
    except IndentationError as err:  # a block's bindings that do not line up
        raise GinError(
            f"{where}, line {err.lineno}: {err.msg}: {(err.text or '').strip()}\n"
            "Fix: indent every binding of the block the same way."
        ) from None
    except tokenize.TokenError as err:
        if opened:
            tok = opened[0]
            closer = {"(": ")", "[": "]", "{": "}"}[tok.string]
            raise GinError(
                f"{where}, line {tok.start[0]}: {tok.string!r} is never closed: {tok.line.strip()}\n"
                f"Fix: close the bracket with {closer!r}."
            ) from None
        what = "a triple-quoted string" if "string" in str(err.args[0]) else "a statement (a trailing backslash?)"
        line = err.args[1][0] if len(err.args) > 1 else "?"
        raise GinError(
            f"{where}, line {line}: {what} is never closed before the end.\n"
            "Fix: close it (a value may span lines only inside brackets)."
        ) from None
    return tokens


def _includes(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """``(line, path)`` of each ``include 'path'`` statement among a file's tokens."""
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    significant = [t for t in tokens if t.type not in skip]
    out, depth, at_start = [], 0, True
    for i, tok in enumerate(significant):
        if (
            at_start
            and depth == 0
            and tok.type == tokenize.NAME
            and tok.string == "include"
            and i + 1 < len(significant)
            and significant[i + 1].type == tokenize.STRING
        ):
            try:
                path = ast.literal_eval(significant[i + 1].string)
            except (ValueError, SyntaxError):
                path = None
            if isinstance(path, str):
                out.append((tok.start[0], path))
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth = max(0, depth - 1)
        at_start = tok.type == tokenize.NEWLINE and depth == 0
    return out


def check_files(files: Sequence[tuple[str, str]], bindings: Sequence[str] = ()) -> None:
    """Walks the include graph of `files` (``(shown, path)`` pairs) and `bindings` as gin would, before gin does.

    Raises:
        GinError: on an include cycle, a missing included file or an unclosed bracket.
    """
    done: set[str] = set()

    def visit(shown: str, path: str, chain: list[tuple[str, str]]) -> None:
        real = os.path.realpath(path)
        if real in done:
            return
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        chain = [*chain, (shown, real)]
        for line, name in _includes(_tokens(text, shown)):
            found, tried = _resolve_include(name)
            if found is None:
                raise GinError(
                    f"{shown}, line {line}: include {name!r}: no such file (looked for "
                    f"{', '.join(tried)}).\nFix: correct the path; a relative one is looked up from the "
                    f"current folder and from {REPO_ROOT}."
                )
            target = os.path.realpath(found)
            if target in (r for _, r in chain):
                start = next(i for i, (_, r) in enumerate(chain) if r == target)
                cycle = " -> ".join([s for s, _ in chain[start:]] + [name])
                if start == len(chain) - 1:
                    raise GinError(
                        f"{shown}, line {line}: include {name!r} includes the file itself ({cycle}; gin "
                        f"would include it forever).\nFix: remove the include on line {line} of {shown}."
                    )
                raise GinError(
                    f"{shown}, line {line}: include {name!r} makes an include cycle: {cycle} (gin would "
                    f"include them forever).\nFix: remove one include of the cycle, e.g. line {line} of "
                    f"{shown}."
                )
            visit(name, found, chain)
        done.add(real)

    for shown, path in files:
        visit(shown, path, [])
    for b in bindings:  # a binding string may include files too
        try:
            included = _includes(_tokens(b, f"--bind {b!r}"))
        except GinError:  # an unclosed bracket: reported when gin parses the bindings
            continue
        for line, name in included:
            found, tried = _resolve_include(name)
            if found is None:
                raise GinError(
                    f"--bind {b!r}: include {name!r}: no such file (looked for {', '.join(tried)}).\n"
                    f"Fix: correct the path; a relative one is looked up from the current folder and "
                    f"from {REPO_ROOT}."
                )
            visit(name, found, [])


def unclosed_binding(bindings: Sequence[str], err: tokenize.TokenError) -> str:
    """The message for an unclosed bracket in a ``--bind`` string (the first that has one)."""
    for b in bindings:
        try:
            _tokens(b, f"--bind {b!r}")
        except GinError as inner:
            return str(inner).replace(", line 1:", ":", 1)
    return f"--bind: {err.args[0]} (a bracket or string opened in one binding is never closed). Fix: close it."


# ---------------------------------------------------------------------------------------------
# Bound values against parameter types.

# Kinds of simple values, in the order messages list them.
_KIND_NAMES = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "str",
    "list": "list or tuple",
    "dict": "dict",
    "None": "None",
}
_SEQUENCES = (collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _kind(value: object) -> str | None:
    """The simple kind of a bound value, or None for anything else (references, objects)."""
    if value is None:
        return "None"
    for t, name in (
        (bool, "bool"),
        (int, "int"),
        (float, "float"),
        (str, "str"),
        (list, "list"),
        (tuple, "list"),
        (dict, "dict"),
    ):
        if isinstance(value, t):
            return name
    return None


def _kinds(ann: object) -> frozenset[str] | None:
    """The kinds an annotation accepts, or None when it is not made of simple types alone."""
    if ann is None or ann is type(None):
        return frozenset({"None"})
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if ann in simple:
        return frozenset({simple[ann]})
    origin = typing.get_origin(ann) or ann
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(a) for a in typing.get_args(ann)]
        return None if any(p is None for p in parts) else frozenset().union(*cast("list[frozenset[str]]", parts))
    if origin in (list, tuple):
        return frozenset({"list"})
    if origin in _SEQUENCES:  # a str is a Sequence too, but messages ask for a list
        return frozenset({"list", "sequence"})
    if origin in _MAPPINGS:
        return frozenset({"dict"})
    return None


_SPECS: dict[object, dict[str, tuple[frozenset[str], object]]] = {}


def _param_specs(fn: Callable[..., Any]) -> dict[str, tuple[frozenset[str], object]]:
    """``{param: (accepted kinds, default)}`` for the parameters of `fn` whose type is decidable.

    The annotation decides; without one, the type of a non-None default (an int default takes
    floats too). A default of None always admits None.
    """
    if fn in _SPECS:
        return _SPECS[fn]
    specs: dict[str, tuple[frozenset[str], object]] = {}
    try:
        sig = inspect.signature(fn)
        target = gin_config._find_class_construction_fn(fn) if inspect.isclass(fn) else fn  # noqa: SLF001
        namespace = getattr(inspect.unwrap(target), "__globals__", None)
        if namespace is None:
            namespace = vars(sys.modules[fn.__module__])
    except (TypeError, ValueError, KeyError, AttributeError):
        _SPECS[fn] = specs
        return specs
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default
        if p.annotation is p.empty:
            by_default = {
                bool: {"bool"},
                int: {"int", "float"},
                float: {"float"},
                str: {"str"},
                list: {"list"},
                tuple: {"list"},
                dict: {"dict"},
            }
            named = by_default.get(type(default))
            kinds = frozenset(named | {"None"}) if named else None
        else:
            ann = p.annotation
            if isinstance(ann, str):  # `from __future__ import annotations`
                try:
                    ann = eval(ann, dict(namespace))  # noqa: S307 - the module's own annotation
                except Exception:  # noqa: BLE001 - an annotation we cannot evaluate decides nothing
                    continue
            kinds = _kinds(ann)
            if kinds is not None and default is None:
                kinds |= {"None"}
        if kinds:
            specs[name] = (kinds, default)
    _SPECS[fn] = specs
    return specs


def _macro_value(value: object) -> tuple[object, str, str]:
    """`value` with ``%MACRO`` references resolved: ``(value, shown, macro)``, where `shown` is how
    to print it (``%NAME ('x')``) and `macro` the name of the macro that binds the value ("" if none)."""
    first = macro = ""
    for _ in range(10):
        if not isinstance(value, gin_config.ConfigurableReference) or value.configurable.selector != "gin.macro":
            break
        macro = value.scoped_selector.rsplit("/", 1)[0]
        first = first or macro
        params = gin_config._CONFIG.get((macro, "gin.macro"))  # noqa: SLF001
        if params is None or "value" not in params:
            return value, "", ""
        value = params["value"]
    return value, f"%{first} ({_value(value)})" if first else _value(value), macro


def _accepts(kinds: frozenset[str], kind: str) -> bool:
    return kind in kinds or (kind == "int" and "float" in kinds) or (kind == "str" and "sequence" in kinds)


def _a(kind: str) -> str:
    return "None" if kind == "NoneType" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def check_types(files: Sequence[tuple[str, str]], bindings: Sequence[str]) -> None:
    """Compares every parsed binding with its parameter's simple type (conservatively).

    Raises:
        GinError: naming the binding's file and line (or ``--bind``), the key, the value and the type.
    """
    for (scope, selector), params in list(gin_config._CONFIG.items()):  # noqa: SLF001
        if selector.startswith("gin."):
            continue
        try:
            fn = gin_config._REGISTRY[selector].wrapped  # noqa: SLF001
        except KeyError:
            continue
        specs = _param_specs(fn)
        for param, bound in params.items():
            if param not in specs:
                continue
            value, shown, macro = _macro_value(bound)
            kind = _kind(value)
            kinds, default = specs[param]
            if kind is None or _accepts(kinds, kind):
                continue
            key = f"{scope + '/' if scope else ''}{selector}.{param}"
            takes = " or ".join(v for k, v in _KIND_NAMES.items() if k in kinds)
            if default is gin.REQUIRED or default is inspect.Parameter.empty:
                takes += " (no default)"
            else:
                takes += f" (default {_value(default)})"
            where = _binding_source(files, bindings, (scope, selector, param))
            what = _a(type(value).__name__)
            if macro:
                raise GinError(
                    f"{_binding_source(files, bindings, (macro, 'gin.macro', 'value'))}: {macro} = "
                    f"{_value(value)} is {what}, but {where} uses it as {key} = {shown.split(' (')[0]}, "
                    f"which takes {takes}.\nFix: give {macro} a value of type {takes.split(' (')[0]}."
                )
            raise GinError(
                f"{where}: {key} = {shown} is {what}; it takes {takes}.\n"
                f"Fix: give {key} a value of type {takes.split(' (')[0]}, or remove the binding to keep "
                "the default."
            )


def _binding_source(files: Sequence[tuple[str, str]], bindings: Sequence[str], key: tuple[str, str, str]) -> str:
    """The file and line (or ``--bind`` string) whose binding of `key` gin applied last."""
    return (binding_sources(files, bindings, key) or ["a gin file or --bind"])[-1]


def binding_sources(files: Sequence[tuple[str, str]], bindings: Sequence[str], key: tuple[str, str, str]) -> list[str]:
    """Every file and line (or ``--bind`` string) that binds `key` (``(scope, selector, param)``, or
    ``(NAME, "gin.macro", "value")`` for a macro), in the order gin applies them: the last one wins."""
    found: list[str] = []

    def statements(source: object) -> Iterable:
        try:
            yield from config_parser.ConfigParser(source, gin_config.ParserDelegate(skip_unknown=True))
        except Exception:  # noqa: BLE001 - gin parsed these already; a lookup failure only loses the location
            return

    def matches(st: config_parser.BindingStatement) -> bool:
        if not st.arg_name:
            return (f"{st.scope}/{st.selector}" if st.scope else st.selector, "gin.macro", "value") == key
        try:
            pbk = gin_config.ParsedBindingKey.parse((st.scope, st.selector, st.arg_name))
        except Exception:  # noqa: BLE001
            return False
        return (*pbk.config_key, pbk.arg_name) == key

    def visit(shown: str, path: str) -> None:
        with open(path, encoding="utf-8", errors="replace") as f:
            for st in statements(f):
                if isinstance(st, config_parser.IncludeStatement):
                    resolved, _ = _resolve_include(st.filename)
                    if resolved:
                        visit(st.filename, resolved)
                elif isinstance(st, config_parser.BindingStatement) and matches(st):
                    found.append(f"{shown}, line {st.location.line_num}")

    for shown, path in files:
        visit(shown, path)
    for b in bindings:
        if any(isinstance(st, config_parser.BindingStatement) and matches(st) for st in statements(b)):
            found.append(f"--bind {b!r}")
    return found
