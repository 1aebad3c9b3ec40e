"""
pop3d: a POP3 server (RFC 1939, RFC 2449, RFC 3206) built on Twisted.

Compose `POP3Factory` with a cred portal whose realm is a `MaildropRealm`
over a store (`MaildirStore`, or `pop3d.testing.MemoryStore`), and listen on
any Twisted endpoint.  ``twistd pop3d`` does exactly that from the command
line (see `pop3d.tap`).

The names below are imported when first used, not with the package: a
module of it imported alone (the pure `pop3d.wire`, or what a counting
helper process runs) brings only what it needs, not Twisted's servers,
TLS and cred with the rest of pop3d.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What type checkers and editors see (each name re-exported).
    from pop3d.checkers import PasswdFileChecker as PasswdFileChecker
    from pop3d.errors import POP3Error as POP3Error
    from pop3d.factory import POP3Factory as POP3Factory
    from pop3d.realm import MaildropRealm as MaildropRealm
    from pop3d.service import POP3Service as POP3Service
    from pop3d.stores.interfaces import IMaildrop as IMaildrop
    from pop3d.stores.interfaces import IMaildropStore as IMaildropStore
    from pop3d.stores.interfaces import IMessageBody as IMessageBody
    from pop3d.stores.interfaces import MessageInfo as MessageInfo
    from pop3d.stores.interfaces import MessageList as MessageList
    from pop3d.stores.maildir import MaildirStore as MaildirStore
    from pop3d.stores.mbox import MboxFormat as MboxFormat
    from pop3d.stores.mbox import MboxStore as MboxStore

__version__ = "0.1.0"

#: Each name of the package's API, and the module that defines it.
_DEFINED_IN = {
    "IMaildrop": "pop3d.stores.interfaces",
    "IMaildropStore": "pop3d.stores.interfaces",
    "IMessageBody": "pop3d.stores.interfaces",
    "MaildirStore": "pop3d.stores.maildir",
    "MaildropRealm": "pop3d.realm",
    "MboxFormat": "pop3d.stores.mbox",
    "MboxStore": "pop3d.stores.mbox",
    "MessageInfo": "pop3d.stores.interfaces",
    "MessageList": "pop3d.stores.interfaces",
    "POP3Error": "pop3d.errors",
    "POP3Factory": "pop3d.factory",
    "POP3Service": "pop3d.service",
    "PasswdFileChecker": "pop3d.checkers",
}

__all__ = [*_DEFINED_IN, "__version__"]


def __getattr__(name: str) -> Any:
    """A name of the package's API, imported from its module the first time it is used."""
    module = _DEFINED_IN.get(name)
    if module is None:
        raise AttributeError(f"module 'pop3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next use finds it as any module's name
    return value


def __dir__() -> list[str]:
    """
    The package's API, its module attributes and its submodules imported so
    far (as a package's attributes), not the names this file imports.
    """
    submodules = (
        name
        for name, value in globals().items()
        if isinstance(value, ModuleType) and value.__name__ == f"{__name__}.{name}"
    )
    return sorted({*__all__, *(name for name in globals() if name.startswith("__")), *submodules})
