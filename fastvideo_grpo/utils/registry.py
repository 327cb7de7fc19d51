"""A tiny name -> factory registry for the plug-ins looked up from config (model families, rewards,
objectives, advantage estimators).

Each entry declares, when it is registered, which of its parameters name files or folders
(``paths``) and, when the factory forwards ``**kwargs`` to a class, which callable's parameters it
accepts (``signature_of``), other names it answers to (``aliases``: older recipe values keep working),
and anything else its users read from the registration (``info``, e.g. a model family's prompt
encoding). Start-up checks (preflight.py) then refuse unknown config keys and walk the declared
paths, with nothing guessed from parameter names.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Generic, Optional, Sequence, Set, Tuple, TypeVar

T = TypeVar("T")


def accepted_parameters(fn: Callable) -> Optional[Set[str]]:
    """Keyword parameters ``fn`` accepts; None when it takes arbitrary ``**kwargs``. For a class, the
    ``__init__`` parameters along its bases while each passes ``**kwargs`` on to the next."""
    if inspect.isclass(fn):
        names: Set[str] = set()
        for klass in fn.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            params = list(inspect.signature(init).parameters.values())
            names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return names
        return names
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not p.VAR_POSITIONAL}


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable[..., T]] = {}
        self._paths: Dict[str, Tuple[str, ...]] = {}
        self._signature: Dict[str, Callable] = {}
        self._wraps: Dict[str, Optional[str]] = {}
        self._info: Dict[str, Dict[str, Any]] = {}
        self._aliases: Dict[str, str] = {}

    def register(self, name: str, paths: Sequence[str] = (), signature_of: Optional[Callable] = None,
                 wraps: Optional[str] = None, aliases: Sequence[str] = (), **info):
        """Decorator. ``paths``: the factory's parameters that name files or folders (must exist at
        start-up when set); ``signature_of``: the callable whose parameters it accepts (default: itself);
        ``wraps``: the parameter naming another entry that receives the remaining keyword arguments;
        ``aliases``: other names of the entry; ``info``: declarations its users read (``info(name)``)."""
        def deco(factory):
            for n in (name, *aliases):
                if n in self._factories or n in self._aliases:
                    raise ValueError(f"{self.kind} {n!r} is registered twice")
            self._factories[name] = factory
            self._paths[name] = tuple(paths)
            self._signature[name] = signature_of or factory
            self._wraps[name] = wraps
            self._info[name] = dict(info)
            self._aliases.update({a: name for a in aliases})
            return factory

        return deco

    def names(self):
        return sorted(self._factories)

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (itself, or the entry it is an alias of); ValueError if unknown."""
        name = self._aliases.get(name, name)
        if name not in self._factories:
            aliases = f" (aliases: {', '.join(sorted(self._aliases))})" if self._aliases else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}{aliases}")
        return name

    def get(self, name: str) -> Callable[..., T]:
        return self._factories[self.canonical(name)]

    def info(self, name: str) -> Dict[str, Any]:
        """What the entry declared at registration beyond its factory (empty when nothing)."""
        return self._info[self.canonical(name)]

    def signature_of(self, name: str) -> Callable:
        return self._signature[self.canonical(name)]

    def declared_paths(self, name: str) -> Tuple[str, ...]:
        return self._paths[self.canonical(name)]

    def resolve_wrapped(self, name: str, kwargs: Dict) -> Tuple[str, Dict]:
        """The entry that finally does the work and its keyword arguments: ``name`` itself, or, for an entry
        registered with ``wraps`` (a binary threshold, a win rate over a judge), the entry it names, followed
        through further wrappers (e.g. for the planner's reward memory)."""
        inner = self._wraps.get(self.canonical(name))
        if inner and isinstance(kwargs.get(inner), str):
            named = {p.name for p in inspect.signature(self.get(name)).parameters.values()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            return self.resolve_wrapped(kwargs[inner], {k: v for k, v in kwargs.items() if k not in named})
        return self.canonical(name), dict(kwargs)

    def check_kwargs(self, name: str, kwargs: Dict, where: str) -> Dict[str, str]:
        """Refuse keys ``name`` does not take (ValueError naming ``where`` and the accepted keys); return
        the declared path parameters that are set, as ``{"<where>.<key>": path}``."""
        inner = self._wraps.get(self.canonical(name))
        if inner and isinstance(kwargs.get(inner), str):  # the wrapped entry takes the other keys
            named = {p.name for p in inspect.signature(self.get(name)).parameters.values()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
            own = {k: v for k, v in kwargs.items() if k in named}
            rest = {k: v for k, v in kwargs.items() if k not in own}
            return {**self._own_paths(name, own, where), **self.check_kwargs(kwargs[inner], rest, where)}
        accepted = accepted_parameters(self.signature_of(name))
        if accepted is not None:
            unknown = sorted(set(kwargs) - accepted)
            if unknown:
                raise ValueError(f"{where}: {self.kind} {name!r} does not take {unknown}; accepted: {sorted(accepted)}")
        return self._own_paths(name, kwargs, where)

    def _own_paths(self, name: str, kwargs: Dict, where: str) -> Dict[str, str]:
        return {f"{where}.{k}": str(kwargs[k]) for k in self.declared_paths(name)
                if isinstance(kwargs.get(k), str) and kwargs[k]}

    def build(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)
