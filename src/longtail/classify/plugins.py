"""Plugins: modules of the user's own stage-2 methods and heads, loaded without editing longtail.

A plugin is a module on the Python path or a ``.py`` file; importing it registers its methods
(:func:`longtail.classify.registry.register`) and defines its head classes
(:class:`longtail.classify.heads.Head` subclasses). The CLI loads those given with ``--plugin``
and those named in ``$LONGTAIL_PLUGINS`` (comma-separated); the registry and the bundle loader
load ``$LONGTAIL_PLUGINS`` themselves before they look a name up.

This module imports nothing from longtail but its errors (no torch), so the torch-free
commands can load plugins too.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from longtail.core.errors import LongtailError

__all__ = ["PLUGINS_ENV", "load_env_plugins", "load_plugins"]

PLUGINS_ENV = "LONGTAIL_PLUGINS"
_LOADED: set[str] = set()  # plugins already imported (module name or resolved .py path)


def load_plugins(specs: Iterable[str]) -> None:
    """Import each plugin: a module name on the Python path, or the path of a ``.py`` file.

    A plugin registers its methods when imported
    (:func:`longtail.classify.registry.register`); one already loaded is not imported again.

    Raises:
        LongtailError: a plugin that cannot be found or imported.
    """
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        path = Path(spec).expanduser()
        key = str(path.resolve()) if spec.endswith(".py") else spec
        if key in _LOADED:
            continue
        _LOADED.add(key)  # first: a plugin that asks the registry while loading is not reloaded
        try:
            if spec.endswith(".py"):
                _import_file(path)
            else:
                _import_module(spec)
        except BaseException:
            _LOADED.discard(key)
            raise


def _import_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise  # the plugin itself imports something missing: its own traceback says what
        raise LongtailError(
            f"plugin {name!r} cannot be imported ({e}): give a module on the Python path "
            "(PYTHONPATH) or the path of a .py file"
        ) from None


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise LongtailError(f"plugin file {str(path)!r} not found: give an existing .py file")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"longtail_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LongtailError(f"plugin file {str(path)!r} cannot be imported as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load_env_plugins() -> None:
    """Load the plugins named in ``$LONGTAIL_PLUGINS`` (comma-separated) not loaded yet."""
    env = os.environ.get(PLUGINS_ENV, "")
    if env:
        load_plugins(env.split(","))
