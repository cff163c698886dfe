"""The exceptions Bulkhead raises, named as Qubes names them.

The class names are part of the Admin API: an error reply carries the
exception's class name (``2\\0QubesVMNotFoundError\\0...``) and Qubes' client
library raises the class of that name.  So the names (not the wording of the
messages) must match Qubes' ``qubes.exc``; both the daemon and the client side
of Bulkhead use this one module.
"""

from __future__ import annotations

from typing import Any


class QubesException(Exception):
    """An error that can be shown to the user as it is."""


class ProtocolError(AssertionError):
    """The client sent a request it should have known is malformed (HTTP 400)."""


class PermissionDenied(PermissionError):
    """The request is well formed but not allowed (HTTP 403)."""


def _name(vm: Any) -> str:
    return getattr(vm, "name", str(vm))


class QubesVMNotFoundError(QubesException, KeyError):
    def __init__(self, vmname: str) -> None:
        super().__init__(f"No such domain: {vmname!r}")
        self.vmname = vmname

    def __str__(self) -> str:  # KeyError would quote the message
        return QubesException.__str__(self)


class QubesVMAlreadyExistsError(QubesException):
    pass


class QubesVMError(QubesException):
    """A problem with a qube's state."""

    default_message = "Domain error: {!r}"

    def __init__(self, vm: Any, msg: str | None = None) -> None:
        super().__init__(msg or self.default_message.format(_name(vm)))
        self.vm = vm


class QubesVMInUseError(QubesVMError):
    default_message = "Domain is in use: {!r}"


class QubesVMNotStartedError(QubesVMError):
    default_message = "Domain is powered off: {!r}"


class QubesVMNotRunningError(QubesVMNotStartedError):
    default_message = "Domain not running (either powered off or paused): {!r}"


class QubesVMNotPausedError(QubesVMNotStartedError):
    default_message = "Domain is not paused: {!r}"


class QubesVMNotSuspendedError(QubesVMError):
    default_message = "Domain is not suspended: {!r}"


class QubesVMNotHaltedError(QubesVMError):
    default_message = "Domain is not powered off: {!r}"


class QubesVMShutdownTimeoutError(QubesVMError):
    default_message = "Domain shutdown timed out: {!r}"


class QubesNoTemplateError(QubesVMError):
    default_message = "Template for the domain {!r} not found"


class QubesMemoryError(QubesVMError, MemoryError):
    default_message = "Not enough memory to start domain {!r}"


class QubesPoolInUseError(QubesException):
    def __init__(self, pool_name: str, msg: str | None = None) -> None:
        super().__init__(msg or f"Storage pool is in use: {pool_name!r}")


class QubesValueError(QubesException, ValueError):
    """A value is invalid, out of bounds, of the wrong type..."""


class QubesPropertyValueError(QubesValueError):
    def __init__(self, holder: Any, prop: str, value: Any, msg: str | None = None) -> None:
        super().__init__(msg or f"Invalid value {value!r} for property {prop!r} of {_name(holder)!r}")
        self.holder = holder
        self.prop = prop
        self.value = value


class QubesNoSuchPropertyError(QubesException, AttributeError):
    def __init__(self, holder: Any, prop_name: str, msg: str | None = None) -> None:
        super().__init__(msg or f"Invalid property {prop_name!r} of {_name(holder)}")
        self.holder = holder
        self.prop = prop_name


class QubesNotImplementedError(QubesException, NotImplementedError):
    def __init__(self, msg: str | None = None) -> None:
        super().__init__(msg or "This feature is not available")


class _KeyLikeError(QubesException, KeyError):
    def __str__(self) -> str:
        return QubesException.__str__(self)


class QubesFeatureNotFoundError(_KeyLikeError):
    def __init__(self, domain: Any, feature: str) -> None:
        super().__init__(f"Feature not set for domain {_name(domain)}: {feature}")
        self.vm = domain
        self.feature = feature


class QubesTagNotFoundError(_KeyLikeError):
    def __init__(self, domain: Any, tag: str) -> None:
        super().__init__(f"Tag not set for domain {_name(domain)}: {tag}")
        self.vm = domain
        self.tag = tag


class QubesLabelNotFoundError(_KeyLikeError):
    def __init__(self, label: str) -> None:
        super().__init__(f"Label does not exist: {label}")
        self.label = label


class StoragePoolException(QubesException):
    """A storage pool or volume operation failed."""


class QubesVolumeRevisionNotFoundError(_KeyLikeError):
    pass


class QubesPoolNotFoundError(_KeyLikeError):
    pass


class QubesVolumeNotFoundError(_KeyLikeError):
    pass


class BackendError(QubesException):
    """The VM backend (QEMU) could not do what was asked; the message says why."""


# Client-side only: the daemon could not be reached or answered nonsense.
class QubesDaemonCommunicationError(QubesException):
    pass


class QubesDaemonAccessError(QubesDaemonCommunicationError):
    pass


def by_name(name: str) -> type[BaseException] | None:
    """The exception class a wire error names, or None if it is not one of ours."""
    obj = globals().get(name)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None
