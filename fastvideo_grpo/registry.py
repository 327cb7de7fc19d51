"""A tiny name -> factory registry used for model adapters and rewards (looked up from config).

Each entry declares, when it is registered, which of its parameters name files or folders
(``paths``) and, when the factory forwards ``**kwargs`` to a class, which callable's parameters it
accepts (``signature_of``). Start-up checks (preflight.py) then refuse unknown config keys and walk
the declared paths, with nothing guessed from parameter names.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Generic, Optional, Sequence, Set, Tuple, TypeVar

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

    def register(self, name: str, paths: Sequence[str] = (), signature_of: Optional[Callable] = None,
                 wraps: Optional[str] = None):
        """Decorator. ``paths``: the factory's parameters that name files or folders (must exist at
        start-up when set); ``signature_of``: the callable whose parameters it accepts (default: itself);
        ``wraps``: the parameter naming another entry that receives the remaining keyword arguments."""
        def deco(factory):
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            self._paths[name] = tuple(paths)
            self._signature[name] = signature_of or factory
            self._wraps[name] = wraps
            return factory

        return deco

    def names(self):
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return self._factories[name]

    def signature_of(self, name: str) -> Callable:
        self.get(name)
        return self._signature[name]

    def declared_paths(self, name: str) -> Tuple[str, ...]:
        self.get(name)
        return self._paths[name]

    def check_kwargs(self, name: str, kwargs: Dict, where: str) -> Dict[str, str]:
        """Refuse keys ``name`` does not take (ValueError naming ``where`` and the accepted keys); return
        the declared path parameters that are set, as ``{"<where>.<key>": path}``."""
        inner = self._wraps.get(name) if name in self._factories else None
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
