"""Gin plumbing in one place: parsing with clear errors, and the settings that key a run.

A run is identified by what its gin files *resolve to*, not by their paths: two
tables that bind the same settings share ids, and editing a value changes them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import pkgutil
import pprint
import re
import tokenize
from pathlib import Path
from typing import Any, Iterable, Sequence, cast

import gin
from gin import config as gin_config
from harness import gincheck
from harness.gincheck import GinError

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_ROOT = REPO_ROOT / "gin"

# Configurables defined in these modules never change the pretrained weights.
_NOT_PRETRAIN_MODULES = ("harness.evals", "harness.table", "harness.launch", "harness.paper")
# ... nor do these parameters of the root.
_NOT_PRETRAIN_PARAMS = {("job.run", "evaluations")}


def register_all() -> None:
    """Import every module that defines configurables, so any gin file may bind them."""
    for pkg_name in ("harness", "harness.evals", "methods"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name not in ("sweep", "collate", "bench"):
                importlib.import_module(f"{pkg_name}.{info.name}")


def method_gin(name: str) -> Path:
    """Path of a method's gin file; unknown names get the closest known ones."""
    path = GIN_ROOT / "methods" / f"{name}.gin"
    if not path.is_file():
        known = sorted(p.stem for p in (GIN_ROOT / "methods").glob("*.gin"))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise GinError(
            f"unknown method {name!r}: no file {path}.{hint} Known methods: {', '.join(known)}. "
            "Fix the table's `table.Table.methods` or `--only`, or add the method's gin file."
        )
    return path


BASE_GIN = GIN_ROOT / "base.gin"
SCALE_ROOT = GIN_ROOT / "scale"


def scale_gin(scale: str) -> Path:
    """``gin/scale/<scale>.gin``; an unknown scale gets the known ones."""
    path = SCALE_ROOT / f"{scale}.gin"
    if not path.is_file():
        known = sorted(p.stem for p in SCALE_ROOT.glob("*.gin"))
        raise GinError(
            f"table.Table.scale = {scale!r}: no file {path}. Fix: bind one of {', '.join(known)}, or add "
            f"gin/scale/{scale}.gin"
        )
    return path


def run_files(method: str, scale: str, files: Sequence[str] = ()) -> list[str]:
    """The gin files of one run, in the order they are parsed (later ones override):

    defaults (``gin/base.gin``: the wiring) -> the method's paper settings
    (``gin/methods/<method>.gin``) -> the scale (``gin/scale/<scale>.gin``) -> the method's
    shrink for that scale (``gin/scale/<scale>/<method>.gin``, when it exists) -> `files`
    (the table and what follows it on the command line: launcher, overlays); ``--bind``
    strings come last. A scale file among `files` (an overlay such as ``gin/scale/smoke.gin``)
    is followed by its own ``<method>.gin`` too.
    """

    def with_shrink(scale_file: Path) -> list[str]:
        shrink = scale_file.with_suffix("") / f"{method}.gin"
        return [str(scale_file), *([str(shrink)] if shrink.is_file() else [])]

    out = [str(BASE_GIN), str(method_gin(method)), *with_shrink(scale_gin(scale))]
    for f in files:
        path = Path(f) if Path(f).is_file() else REPO_ROOT / f
        out += with_shrink(path.resolve()) if path.resolve().parent == SCALE_ROOT else [f]
    return out


def parse(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Clears gin and parses `files` then `bindings`, later ones overriding earlier ones.

    Before gin sees them, the files and everything they include are checked for include
    cycles, missing includes and unclosed brackets (gin would recurse forever, or fail with
    no file named); after parsing, every bound value is checked against its parameter's type.

    Raises:
        GinError: with the file, the key and a suggestion when a name is unknown.
    """
    register_all()
    gin.clear_config()
    if str(REPO_ROOT) not in gin_config._LOCATION_PREFIXES:  # noqa: SLF001 - parse() runs once per planned run
        gin.add_config_file_search_path(str(REPO_ROOT))
    for f in files:
        if not Path(f).is_file() and not (REPO_ROOT / f).is_file():
            raise GinError(f"gin file not found: {f} (paths are relative to the current folder or {REPO_ROOT})")
    paths = [f if Path(f).is_file() else str(REPO_ROOT / f) for f in files]
    gincheck.check_files(list(zip(files, paths)), bindings)
    current = "--bind"
    try:
        for current, path in zip(files, paths):
            gin.parse_config_file(path)
        current = "--bind"
        gin.parse_config(list(bindings))
    except tokenize.TokenError as err:  # files are checked above, so this is a --bind string
        raise GinError(gincheck.unclosed_binding(bindings, err)) from err
    except (ValueError, SyntaxError, KeyError, ImportError, ModuleNotFoundError, OSError) as err:
        raise GinError(f"{current}: {_explain(err)}") from err
    gincheck.check_types(list(zip(files, paths)), bindings)


def _explain(err: Exception) -> str:
    """Gin's message, plus the closest known configurable or parameter names."""
    msg = str(err).strip().strip('"')
    if "No configurable matching" in msg:
        name = msg.split("'")[1]
        known = [k for k, _ in gin_config._REGISTRY.items() if not k.startswith("gin.")]  # noqa: SLF001
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        msg += f"\nFix: did you mean {', '.join(close)}?" if close else "\nFix: check the name and its `import` line."
    elif "doesn't have a parameter named" in msg:
        found = cast("re.Match[str]", re.search(r"'([^']+)' doesn't have a parameter named '([^']+)'", msg))
        selector, param = found.groups()
        fn = gin_config._REGISTRY.get_match(selector).wrapped  # noqa: SLF001
        names = list(inspect.signature(fn).parameters)
        close = difflib.get_close_matches(param, names, n=3, cutoff=0.5)
        msg += f"\nFix: did you mean {', '.join(close)}? " if close else "\nFix: "
        msg += f"{selector} takes {', '.join(n for n in names if n not in ('self', 'args', 'kwargs'))}."
    return msg


def explain(key: str, files: Sequence[str], bindings: Sequence[str] = ()) -> str:
    """``KEY = value`` as the parsed run resolves it, and every file and line that binds it, the
    last one winning (``python -m harness.sweep ... --dry-run --explain KEY``); call after `parse`."""
    shown = [f if Path(f).is_file() else str(REPO_ROOT / f) for f in files]
    rel = [
        (str(Path(f).resolve().relative_to(REPO_ROOT)) if Path(f).resolve().is_relative_to(REPO_ROOT) else f, f)
        for f in shown
    ]
    if "." not in key.rsplit("/", 1)[-1]:  # a macro
        target, value = (key, "gin.macro", "value"), gin_config._CONFIG.get((key, "gin.macro"), {}).get("value")  # noqa: SLF001
    else:
        scoped, param = key.rsplit(".", 1)
        try:
            pbk = gin_config.ParsedBindingKey.parse((scoped.rpartition("/")[0], scoped.rpartition("/")[2], param))
        except (ValueError, KeyError) as err:
            raise GinError(f"--explain {key}: {_explain(err)}") from err
        target = (*pbk.config_key, pbk.arg_name)
        value = gin_config._CONFIG.get(pbk.config_key, {}).get(pbk.arg_name)  # noqa: SLF001
    where = gincheck.binding_sources(rel, bindings, target)
    if not where:
        return f"{key}: bound by no file or --bind (the code's default holds)"
    overridden = f"; overrides {', '.join(where[:-1])}" if len(where) > 1 else ""
    return f"{key} = {_value(value)}   (set by {where[-1]}{overridden})"


def reference(key: str) -> Any:
    """The callable bound to `key` as ``@name`` (``@name()`` is called), e.g. ``job.run.method``;
    a list of references (``job.run.evaluations``) gives the list of their values."""
    value = gin.query_parameter(key)
    if isinstance(value, (list, tuple)):
        return [_resolve(v) for v in value]
    return _resolve(value)


def _resolve(value: object) -> object:
    if isinstance(value, gin_config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def _value(v: object) -> str:
    return pprint.pformat(v, width=10_000)


def _reachable_references(config: dict) -> list:
    """The ``@`` references reachable from ``job.run``'s bindings, transitively (a scoped
    reference also reaches the unscoped bindings of its configurable, as gin applies both)."""
    todo, seen, refs = [("", "job.run")], set(), []
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        for ref in gin_config.iterate_references(config.get(key, {})):
            refs.append(ref)
            scope = ref.scoped_selector.rpartition("/")[0]
            todo += [("", ref.configurable.selector), (scope, ref.configurable.selector)]
    return refs


def settings() -> dict[str, str]:
    """The parsed bindings that concern this run, as sorted ``{"scope/selector.param": repr}``.

    Macros appear as ``NAME``. Bindings of other methods' configurables (a table or
    scale file may bind several methods) are left out: a configurable defined in
    ``methods.*`` counts only when ``job.run`` reaches its module through ``@`` references
    (so a table's ``multitask.MultiTask.tasks = [@exemplar.Exemplar, ...]`` does not make
    exemplar's bindings part of rotnet's id), and a scoped binding
    (``vit/backbone.create.name``) only when a reached reference enters its scope.
    """
    config = gin_config._CONFIG  # noqa: SLF001 - gin has no public view of parsed, uncalled bindings
    refs = _reachable_references(config)
    used = {ref.configurable.wrapped.__module__ for ref in refs}
    scopes = {s for ref in refs for s in ref.scoped_selector.split("/")[:-1]}
    out = {}
    for (scope, selector), params in config.items():
        if selector == "gin.macro":
            out[scope] = _value(params["value"])
            continue
        if scope and not set(scope.split("/")) <= scopes:  # no reference enters this scope
            continue
        module = gin_config._REGISTRY[selector].wrapped.__module__  # noqa: SLF001
        if module.startswith("methods.") and module not in used:
            continue
        for param, v in params.items():
            out[f"{scope + '/' if scope else ''}{selector}.{param}"] = _value(v)
    return dict(sorted(out.items()))


def _affects_pretraining(key: str) -> bool:
    if "." not in key:  # a macro: conservatively part of pretraining
        return True
    scoped, param = key.rsplit(".", 1)
    selector = scoped.rsplit("/", 1)[-1]
    if (selector, param) in _NOT_PRETRAIN_PARAMS:
        return False
    module = gin_config._REGISTRY[selector].wrapped.__module__  # noqa: SLF001
    return not module.startswith(_NOT_PRETRAIN_MODULES)


def digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12]


def ids() -> tuple[str, str]:
    """(pretrain_id, run_id) of the parsed config.

    The pretraining id hashes every binding that can change the pretrained weights;
    the run id adds the evaluation bindings. Launcher and table bookkeeping (and a paper
    table's layout, ``paper.*``) are in neither, so moving a table to SLURM, listing it
    differently or printing it in a paper's layout re-runs nothing.
    """
    s = settings()
    pre = digest(f"{k} = {v}" for k, v in s.items() if _affects_pretraining(k))
    evals = [
        f"{k} = {v}"
        for k, v in s.items()
        if not _affects_pretraining(k) and not k.startswith(("table.", "launch.", "paper."))
    ]
    return pre, digest([pre, *evals])
