"""A qube as the client sees it: properties, features, tags, volumes, power.

Every method is one Admin API call (or a few) on the qube's name; nothing
here knows how the daemon runs qubes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, NamedTuple

from .. import errors
from .holder import PropertyHolder
from .storage import Volume
from .named import Named

if TYPE_CHECKING:  # pragma: no cover
    from .app import App
    from .run import Sink


class Features:
    """A qube's features (``admin.vm.feature.*``), a mapping of name to string value."""

    def __init__(self, vm: "VM") -> None:
        self.vm = vm

    def _call(self, method: str, arg: str | None = None, payload: bytes = b"") -> bytes:
        return self.vm.app.call(self.vm.name, "admin.vm.feature." + method, arg, payload)

    def keys(self) -> list[str]:
        return [f for f in self._call("List").decode("utf-8").splitlines() if f]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __getitem__(self, name: str) -> str:
        try:
            return self._call("Get", name).decode("utf-8")
        except errors.QubesFeatureNotFoundError:
            raise KeyError(name) from None

    def get(self, name: str, default: str | None = None) -> str | None:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __setitem__(self, name: str, value: Any) -> None:
        # Qubes stores features as strings; a true bool is "1", a false one ""
        if isinstance(value, bool):
            value = "1" if value else ""
        self._call("Set", name, str(value).encode("utf-8"))

    def __delitem__(self, name: str) -> None:
        try:
            self._call("Remove", name)
        except errors.QubesFeatureNotFoundError:
            raise KeyError(name) from None

    def items(self) -> list[tuple[str, str]]:
        return [(name, self[name]) for name in self.keys()]

    def check_with_template(self, name: str, default: str | None = None) -> str | None:
        """The feature of the qube, else of its template (``CheckWithTemplate``)."""
        try:
            return self._call("CheckWithTemplate", name).decode("utf-8")
        except errors.QubesFeatureNotFoundError:
            return default


class Tags:
    """A qube's tags (``admin.vm.tag.*``), a set of strings."""

    def __init__(self, vm: "VM") -> None:
        self.vm = vm

    def _call(self, method: str, arg: str | None = None) -> bytes:
        return self.vm.app.call(self.vm.name, "admin.vm.tag." + method, arg)

    def __iter__(self) -> Iterator[str]:
        return iter([t for t in self._call("List").decode("utf-8").splitlines() if t])

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, str) and self._call("Get", tag) == b"1"

    def add(self, tag: str) -> None:
        self._call("Set", tag)

    def remove(self, tag: str) -> None:
        try:
            self._call("Remove", tag)
        except errors.QubesTagNotFoundError:
            raise KeyError(tag) from None

    def discard(self, tag: str) -> None:
        try:
            self.remove(tag)
        except KeyError:
            pass


class RunResult(NamedTuple):
    """What :meth:`VM.run` collected."""

    returncode: int
    stdout: bytes
    stderr: bytes


class VM(Named, PropertyHolder):
    """A qube, named ``name``; its properties are attributes (``vm.netvm``, ``vm.label``)."""

    _method_prefix = "admin.vm.property."

    def __init__(self, app: "App", name: str, klass: str | None = None) -> None:
        super().__init__(app, name)
        self._klass = klass
        self._features = Features(self)
        self._tags = Tags(self)
        self._volumes: dict[str, Volume] | None = None

    # --- identity -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self._dest

    @property
    def app(self) -> "App":
        return self._app

    @property
    def klass(self) -> str:
        """The qube's class (AppVM, TemplateVM...), from the listing or the ``klass`` property."""
        if self._klass is None:
            info = self._app.domains.listed(self.name)
            self._klass = info["class"] if info and "class" in info else self.get_property("klass")
        return self._klass

    @property
    def features(self) -> Features:
        return self._features

    @property
    def tags(self) -> Tags:
        return self._tags


    def _fetch_all(self) -> dict[str, str] | None:
        # When the app caches (qvm-ls), one call brings every qube's properties.
        if self._app.cache_enabled:
            raw = self._app.domains.prefetched_properties(self.name)
            if raw is not None:
                return raw
        return super()._fetch_all()

    # --- power ------------------------------------------------------------------
    def start(self) -> None:
        self._call("admin.vm.Start")

    def shutdown(self, force: bool = False, wait: bool = False) -> None:
        """Ask the qube to shut down (``admin.vm.Shutdown``, argument ``force``/``wait``/``force+wait``).

        ``force`` shuts it down even if other running qubes use it (as netvm);
        ``wait`` returns only once it is halted.
        """
        arg = "+".join(a for a, on in (("force", force), ("wait", wait)) if on) or None
        self._call("admin.vm.Shutdown", arg)

    def kill(self) -> None:
        self._call("admin.vm.Kill")

    def pause(self) -> None:
        self._call("admin.vm.Pause")

    def unpause(self) -> None:
        self._call("admin.vm.Unpause")

    def current_state(self) -> dict[str, str]:
        """``admin.vm.CurrentState``: ``mem=... mem_static_max=... cputime=... power_state=...``."""
        body = self._call("admin.vm.CurrentState").decode("ascii")
        return dict(item.split("=", 1) for item in body.split() if "=" in item)

    def get_power_state(self) -> str:
        """Halted, Transient, Running, Paused, Suspended, Halting, Dying, Crashed or NA.

        When the app caches (qvm-ls), the state ``admin.vm.List`` reported is
        used instead of asking again.
        """
        if self._app.cache_enabled:
            info = self._app.domains.listed(self.name)
            if info and "state" in info:
                return info["state"]
        return self.current_state().get("power_state", "NA")

    def is_running(self) -> bool:
        """True unless halted or crashed (a paused or transient qube is running, as in Qubes)."""
        return self.get_power_state() not in ("Halted", "Crashed", "NA")

    def is_halted(self) -> bool:
        return self.get_power_state() == "Halted"

    def is_paused(self) -> bool:
        return self.get_power_state() == "Paused"

    def is_networked(self) -> bool:
        """True if the qube can reach a network: it provides one, or has a netvm."""
        if getattr(self, "provides_network", False):
            return True
        return getattr(self, "netvm", None) is not None

    # --- storage ------------------------------------------------------------------
    @property
    def volumes(self) -> dict[str, Volume]:
        if self._volumes is None:
            names = self._call("admin.vm.volume.List").decode("ascii").splitlines()
            self._volumes = {n: Volume(self._app, self.name, n) for n in names if n}
        return self._volumes

    def get_disk_utilization(self) -> int:
        return sum(v.usage for v in self.volumes.values())

    # --- running commands ----------------------------------------------------
    def run_stream(self, command: str, user: str | None = None,
                   stdin: "BinaryIO | int | None" = None, stdout: "Sink" = None,
                   stderr: "Sink" = None, *, service: bool = False,
                   forward_signals: bool = False, source: str = "dom0") -> int:
        """Run ``command`` (a shell command; with ``service``, a qrexec service name)
        in the running qube, relaying stdin/stdout/stderr; returns its exit code.

        ``user`` defaults to the qube's ``default_user``.  Raises
        :class:`~bulkhead.client.run.RunError` if the command could not start.
        """
        from .run import run_stream
        return run_stream(self._app.connection, self.name, command,
                          user or self.default_user_name(), stdin=stdin, stdout=stdout,
                          stderr=stderr, service=service, forward_signals=forward_signals,
                          source=source)

    def run(self, command: str, user: str | None = None, input: bytes = b"") -> RunResult:
        """Run a shell command to completion, collecting its output."""
        out, err = io.BytesIO(), io.BytesIO()
        code = self.run_stream(command, user, stdin=io.BytesIO(input), stdout=out, stderr=err)
        return RunResult(code, out.getvalue(), err.getvalue())

    def default_user_name(self) -> str:
        """The user commands run as by default (the ``default_user`` property, ``user`` if unset)."""
        try:
            value = self.get_property("default_user")
        except errors.QubesNoSuchPropertyError:
            return "user"
        return value if isinstance(value, str) and value else "user"
