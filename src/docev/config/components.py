"""The parameters of a ``_component_`` callable, read from its source file when it is not imported yet, and
the config's ``_component_`` sections checked against them (``component_errors``, ``tokenizer_errors``).

Checking a config's ``optimizer``/``lr_scheduler``/``loss``/``metric_logger`` arguments needs only the
callable's parameter names and defaults, but importing ``torch.optim`` or ``torchtune.training`` to get
them costs seconds (torchtune imports torchao and ``torch._dynamo``), and every command that reads a
config would pay it: ``docev config validate``, the data steps, each KFP task. So the defining module is
located with the import system's finders (no module is executed), parsed with :mod:`ast`, and re-exports
(``from .adamw import AdamW``) are followed. Anything the parser cannot settle (a class without its own
``__init__``, a name made at run time) falls back to importing it, so the result is always what
:func:`inspect.signature` would give, and an unimportable path is reported the same way either way.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.machinery
import inspect
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from docev.config.sections import Component, TokenizerSection

UNKNOWN = object()  # a default that is not a literal (its type is not checked)
_MAX_HOPS = 4  # re-exports followed before giving up and importing


@dataclass(frozen=True)
class Params:
    """Keyword parameters of a callable: names in order with their defaults (``inspect.Parameter.empty``
    when required, :data:`UNKNOWN` when not a literal), and whether it takes ``**kwargs``."""

    defaults: dict[str, Any]
    var_keyword: bool


def component_params(path: str) -> Params | None:
    """Parameters of the callable at the dotted ``path``; None when it has no readable signature.
    Raises ImportError/AttributeError/ValueError when the path cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    if module_name not in sys.modules:
        static = _static(module_name, attr, _MAX_HOPS)
        if static is not None:
            return static
    target = getattr(importlib.import_module(module_name), attr)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    return Params({n: p.default for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)},
                  any(p.kind is p.VAR_KEYWORD for p in params.values()))  # fmt: skip


@lru_cache(maxsize=64)
def _module_file(module_name: str) -> Path | None:
    """The source file of a module, found the way ``import`` finds it but without executing any package."""
    if not module_name:
        return None
    locations: list[str] | None = None
    spec = None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:  # already imported (e.g. docev itself): its spec says where it is
            spec = getattr(sys.modules[name], "__spec__", None)
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


@lru_cache(maxsize=64)
def _parsed(file: Path) -> ast.Module | None:
    try:
        return ast.parse(file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _static(module_name: str, attr: str, hops: int) -> Params | None:
    file = _module_file(module_name)
    tree = _parsed(file) if file is not None and hops > 0 else None
    if tree is None:
        return None
    found: Params | None = None
    for node in tree.body:  # the last top-level binding of the name wins, as at run time
        if not isinstance(node, _SIMPLE):
            if any(_binds(n, attr) for n in ast.walk(node)):
                return None  # bound under an if/try/with: only running it tells which binding holds
            continue
        if not _binds(node, attr):
            continue
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found = _function_params(node.args, drop_self=False)
        elif isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            found = _function_params(init.args, drop_self=True) if init is not None else None
        elif isinstance(node, ast.ImportFrom):
            alias = next(a for a in node.names if (a.asname or a.name) == attr)
            source = _absolute(module_name, node, file is not None and file.name == "__init__.py")
            found = _static(source, alias.name, hops - 1) if source else None
        else:
            found = None  # an assignment or a plain import: made at run time
    return found


_SIMPLE = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ImportFrom, ast.Import, ast.Assign,
           ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Pass)  # fmt: skip


def _binds(node: ast.AST, attr: str) -> bool:
    """Whether the statement binds the name ``attr`` in its scope."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == attr
    if isinstance(node, ast.ImportFrom):
        return any((a.asname or a.name) == attr for a in node.names)
    if isinstance(node, ast.Import):
        return any((a.asname or a.name.split(".")[0]) == attr for a in node.names)
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == attr for t in node.targets)
    if isinstance(node, ast.AnnAssign | ast.AugAssign):
        return isinstance(node.target, ast.Name) and node.target.id == attr
    return False


def _absolute(module_name: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The module an ``from … import`` statement reads (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = module_name if is_package else module_name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _function_params(args: ast.arguments, *, drop_self: bool) -> Params:
    positional = [*args.posonlyargs, *args.args]
    if drop_self and positional:
        positional = positional[1:]
    pos_defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    defaults: dict[str, Any] = {}
    for arg, default in zip(positional, pos_defaults, strict=True):
        defaults[arg.arg] = _literal(default)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        defaults[arg.arg] = inspect.Parameter.empty if default is None else _literal(default)
    return Params(defaults, args.kwarg is not None)


def _literal(node: Any) -> Any:
    if node is inspect.Parameter.empty:
        return node
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return UNKNOWN


COMPONENT_SECTIONS = ("optimizer", "lr_scheduler", "loss", "metric_logger")
# Arguments the recipe passes itself; a config must not set them.
_RECIPE_SUPPLIED = {"params", "optimizer", "num_training_steps"}


def resolve_component(path: str) -> Any:
    """The callable a ``_component_`` dotted path names (``ImportError`` naming the path when there is none)."""
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ImportError(f"cannot import {path!r}") from None
    if not callable(target):
        raise ImportError(f"{path!r} is not callable")
    return target


def _checked_params(path: str) -> tuple[list[str], Params | None]:
    """(the import error, if any; the callable's parameters, None when they cannot be checked: no readable
    signature, or ``**kwargs``). The signature is read without importing where it can be."""
    try:
        params = component_params(path)
    except (ImportError, AttributeError, ValueError):
        return [f"_component_: cannot import {path!r}"], None
    return [], None if params is None or params.var_keyword else params


def tokenizer_errors(section: TokenizerSection) -> list[str]:
    """``tokenizer._component_`` is instantiated with the section's fields: it must import and take them all."""
    errors, params = _checked_params(section.component)
    if params is None:
        return errors
    return [
        f"{key}: not an argument of {section.component}" for key in section.arguments() if key not in params.defaults
    ]


def component_errors(section: Component | None) -> list[str]:
    """Check a ``_component_`` section against the callable's signature: importable, known keyword
    arguments (with a suggestion), and simple scalar types. Messages start with the sub-path. The
    signature is read from source when the module is not imported yet (above)."""
    if section is None:
        return []
    path = section.component
    errors, params = _checked_params(path)
    if params is None:
        return errors
    names = [n for n in params.defaults if n not in _RECIPE_SUPPLIED]
    errors = []
    for key, value in (section.model_extra or {}).items():
        if key not in params.defaults or key in _RECIPE_SUPPLIED:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (accepted: {', '.join(names)})"
            errors.append(f"{key}: unknown argument of {path}{hint}")
            continue
        expected = params.defaults[key]
        if isinstance(expected, bool) and not isinstance(value, bool):
            errors.append(f"{key}: expected a boolean, got {value!r}")
        elif isinstance(expected, int | float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            errors.append(f"{key}: expected a number, got {value!r}")
    return errors
