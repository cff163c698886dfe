"""Events: how the parts of dom0 learn about each other's changes.

As in qubes-core-admin, every object that has a life of its own (a qube, the
app) is an :class:`Emitter`.  ``fire_event('property-set:netvm', name=...,
newvalue=..., oldvalue=...)`` calls, in order:

1. the *class* handlers, methods marked ``@handler('property-set:netvm')`` on
   the emitter's class or any base (a subclass that redefines a handler
   method replaces it);
2. the *instance* handlers registered with :meth:`Emitter.add_handler`.

An event name matches a handler registered for the exact name, for
``'prefix:*'`` when the event is ``prefix:<anything>``, or for ``'*'``.
Handlers are called as ``handler(subject, event, **kwargs)``.

*Pre-events* (``pre_event=True``, e.g. ``property-pre-set:*``,
``domain-pre-start``) let a handler veto the action by raising; an exception
from any handler propagates to the caller of :meth:`fire_event`.  The
non-``None`` values the handlers return are collected and returned.

After the handlers, every event goes to :meth:`Emitter._forward_event`.  A
qube forwards to its app, the app hands it to its *observers* (the store,
which persists changes, and each ``admin.Events`` stream); so one hook sees
every event of every qube, without any of them knowing who listens.

While ``events_enabled`` is False (an object being constructed or loaded from
the store) nothing fires: loading is not a change.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

Handler = Callable[..., Any]

_EVENTS_ATTR = "_bulkhead_handles_events"


def handler(*events: str) -> Callable[[Handler], Handler]:
    """Mark a method of an :class:`Emitter` subclass as the handler of ``events``."""
    if not events:
        raise TypeError("handler() needs at least one event name")

    def decorator(func: Handler) -> Handler:
        setattr(func, _EVENTS_ATTR, tuple(events))
        return func

    return decorator


def event_matches(pattern: str, event: str) -> bool:
    """True if a handler registered for ``pattern`` wants ``event``."""
    if pattern == "*" or pattern == event:
        return True
    if pattern.endswith(":*"):
        return event.startswith(pattern[:-1])
    return False


class Emitter:
    """Mixin giving an object events (see the module documentation)."""

    #: class handlers: event pattern -> functions, collected by __init_subclass__
    _class_handlers: dict[str, list[Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Walk the MRO from the most basic class so a subclass' method of the
        # same name replaces its base's (its base's is then not called).
        by_attr: dict[str, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if callable(value) and hasattr(value, _EVENTS_ATTR):
                    by_attr[attr] = value  # an override keeps its base's place in the order
        handlers: dict[str, list[Handler]] = {}
        for func in by_attr.values():
            for pattern in getattr(func, _EVENTS_ATTR):
                handlers.setdefault(pattern, []).append(func)
        cls._class_handlers = handlers

    # ``events_enabled`` is an instance attribute; the class default keeps
    # objects that never call Emitter.__init__ working.
    events_enabled: bool = True

    def _instance_handlers(self) -> dict[str, list[Handler]]:
        try:
            return self.__dict__["_bulkhead_instance_handlers"]
        except KeyError:
            handlers: dict[str, list[Handler]] = {}
            self.__dict__["_bulkhead_instance_handlers"] = handlers
            return handlers

    def add_handler(self, event: str, func: Handler) -> None:
        """Call ``func(subject, event, **kwargs)`` for ``event`` (wildcards allowed)."""
        handlers = self._instance_handlers().setdefault(event, [])
        if func not in handlers:
            handlers.append(func)

    def remove_handler(self, event: str, func: Handler) -> None:
        handlers = self._instance_handlers().get(event, [])
        if func in handlers:
            handlers.remove(func)

    def _matching_handlers(self, event: str) -> list[Handler]:
        found: list[Handler] = []
        for pattern, funcs in type(self)._class_handlers.items():
            if event_matches(pattern, event):
                found.extend(funcs)
        # Copy: a handler may add or remove handlers while we iterate.
        for pattern, funcs in list(self._instance_handlers().items()):
            if event_matches(pattern, event):
                found.extend(list(funcs))
        return found

    def fire_event(self, event: str, pre_event: bool = False, **kwargs: Any) -> list[Any]:
        """Call every handler of ``event``; returns what they returned (not None)."""
        if not self.events_enabled:
            return []
        results = []
        for func in self._matching_handlers(event):
            result = func(self, event, **kwargs)
            if inspect.isawaitable(result):
                # A coroutine handler fired synchronously would never run:
                # that is a programming error, not something to hide.
                close = getattr(result, "close", None)
                if close:
                    close()
                raise TypeError(f"async handler {func!r} for {event!r}: use fire_event_async")
            if result is not None:
                results.append(result)
        self._forward_event(event, pre_event, kwargs)
        return results

    async def fire_event_async(self, event: str, pre_event: bool = False,
                               **kwargs: Any) -> list[Any]:
        """Like :meth:`fire_event`, awaiting handlers that are coroutines (in order)."""
        if not self.events_enabled:
            return []
        results = []
        for func in self._matching_handlers(event):
            result = func(self, event, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                results.append(result)
        self._forward_event(event, pre_event, kwargs)
        return results

    def _forward_event(self, event: str, pre_event: bool, kwargs: dict[str, Any]) -> None:
        """Hand a fired event to whoever observes this object (overridden)."""
