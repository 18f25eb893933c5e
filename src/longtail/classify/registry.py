"""The stage-2 methods longtail knows: the built-in ones, then any registered from outside.

``longtail classify`` (``--method``, ``stage2.methods``), ``sweep``, ``report`` and ``fit`` ask
this module which methods exist, in which order, and what each needs (:class:`Stage2Method`);
none of them lists method names itself.

Adding a method needs no edit of longtail: describe it and register it from your own module::

    from longtail.classify.heads import LinearHead
    from longtail.classify.registry import Stage2Method, register

    def fit(ctx):  # ctx: Stage2Context; returns a head, features (N, d) -> logits (N, C)
        counts = ctx.train_labels.bincount(minlength=ctx.num_classes).float()
        return LinearHead(ctx.joint_weight, ctx.joint_bias - (counts / counts.sum()).log())

    register(Stage2Method("logit_adjusted", fit, "post-hoc logit adjustment"))

then load that module with ``longtail classify RUN --plugin my_methods`` (a module on the Python
path, or a ``.py`` file; every command that looks methods or heads up takes ``--plugin``), or
name it in ``$LONGTAIL_PLUGINS`` (comma-separated), or import it before calling the Python API.
:mod:`longtail.classify.plugins` loads them.
"""

from __future__ import annotations

from collections.abc import Iterable

from longtail.classify.builtin import BUILTIN
from longtail.classify.interface import Stage2Context, Stage2Method
from longtail.classify.plugins import PLUGINS_ENV, load_env_plugins, load_plugins
from longtail.core.errors import LongtailError

__all__ = [
    "PLUGINS_ENV",
    "Stage2Context",
    "Stage2Method",
    "available",
    "find",
    "get",
    "load_plugins",
    "pinned",
    "register",
    "resolve",
    "unregister",
    "without_swag",
]

_METHODS: dict[str, Stage2Method] = {m.name: m for m in BUILTIN}


def register(method: Stage2Method, replace: bool = False) -> Stage2Method:
    """Add ``method`` after the methods registered so far (``all`` runs them in this order).

    Raises:
        LongtailError: a method of that name is registered and ``replace`` is false.
    """
    if not isinstance(method, Stage2Method):
        raise LongtailError(
            f"register() takes a Stage2Method, not {type(method).__name__}: wrap your fit "
            "function as Stage2Method(name, fit, ...)"
        )
    if method.name in _METHODS and not replace:
        raise LongtailError(
            f"a stage-2 method named {method.name!r} is already registered; choose another "
            "name, or pass replace=True to replace it"
        )
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove the method ``name`` (a no-op when there is none)."""
    _METHODS.pop(name, None)


def available() -> list[str]:
    """The registered method names, in registration order (built-in ones first)."""
    load_env_plugins()
    return list(_METHODS)


def get(name: str) -> Stage2Method:
    """The method ``name``.

    Raises:
        LongtailError: no method of that name is registered; the message lists those that are.
    """
    load_env_plugins()
    if name not in _METHODS:
        raise LongtailError(_unknown(name))
    return _METHODS[name]


def find(name: str) -> Stage2Method | None:
    """The method ``name``, or ``None`` (e.g. a ``results.json`` row of a plugin not loaded)."""
    load_env_plugins()
    return _METHODS.get(name)


def resolve(requested: Iterable[str], source: str = "") -> list[str]:
    """The methods to run for ``requested`` names, in run order.

    ``all`` stands for every registered method. Each method's ``requires`` come before it and
    its ``implies`` right after it; a name appears once, where it is first needed.

    Args:
        source: where the names came from (e.g. ``"stage2.methods"``), for the error message.

    Raises:
        LongtailError: an unknown name (the message lists the registered ones).
    """
    out: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in out or name in chain:
            return
        m = _METHODS.get(name)
        if m is None:
            raise LongtailError(_unknown(name, source))
        for r in m.requires:
            add(r, (*chain, name))
        if name not in out:
            out.append(name)
        for i in m.implies:
            add(i, (*chain, name))

    load_env_plugins()
    for name in requested:
        for n in list(_METHODS) if name == "all" else [name]:
            add(n, ())
    return out


def pinned(names: Iterable[str], infos: dict[str, dict]) -> tuple[list[str], list[str]]:
    """Config overrides that make ``names`` (and what they require and imply) choose again what
    they chose on validation, without validation deciding anything.

    Args:
        names: the methods to run again (:func:`resolve` adds their ``requires`` / ``implies``).
        infos: method name -> the ``info`` it recorded when it chose (``results.json``'s
            ``methods.<name>.info``).

    Returns:
        ``(overrides, unpinned)``: ``key=[value]`` strings from each method's ``pins``, and the
        methods that choose on validation (``needs_val``) but whose choice could not be pinned
        (no ``pins``, or a pinned key missing from its ``info``): run again, they choose anew.
    """
    overrides: list[str] = []
    unpinned: list[str] = []
    for name in resolve(names):
        m, info = get(name), infos.get(name, {})
        found = [(k, key) for k, key in m.pins if k in info]
        overrides += [f"{key}=[{float(info[k])!r}]" for k, key in found]
        if m.needs_val and (not m.pins or len(found) < len(m.pins)):
            unpinned.append(name)
    return overrides, unpinned


def without_swag(names: Iterable[str]) -> list[str]:
    """``names`` less the methods that need a SWAG posterior, or require one that does."""

    def needs(name: str) -> bool:
        m = get(name)
        return m.needs_swag or any(needs(r) for r in m.requires)

    return [n for n in names if not needs(n)]


def _unknown(name: str, source: str = "") -> str:
    where = f" in {source}" if source else ""
    return (
        f"unknown method {name!r}{where}; choose from {', '.join(_METHODS)} or all "
        f"(methods of your own: --plugin MODULE or ${PLUGINS_ENV})"
    )
