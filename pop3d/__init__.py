"""
pop3d: a POP3 server (RFC 1939, RFC 2449, RFC 3206) built on Twisted.

Compose `POP3Factory` with a cred portal whose realm is a `MaildropRealm`
over a store (`MaildirStore`, or `pop3d.testing.MemoryStore`), and listen on
any Twisted endpoint.  ``twistd pop3d`` does exactly that from the command
line (see `pop3d.tap`).
"""

from pop3d.checkers import PasswdFileChecker
from pop3d.errors import POP3Error
from pop3d.factory import POP3Factory
from pop3d.realm import MaildropRealm
from pop3d.service import POP3Service
from pop3d.stores.interfaces import (
    IMaildrop,
    IMaildropStore,
    IMessageBody,
    MessageInfo,
    MessageList,
)
from pop3d.stores.maildir import MaildirStore
from pop3d.stores.mbox import MboxFormat, MboxStore

__version__ = "0.1.0"

__all__ = [
    "IMaildrop",
    "IMaildropStore",
    "IMessageBody",
    "MaildirStore",
    "MaildropRealm",
    "MboxFormat",
    "MboxStore",
    "MessageInfo",
    "MessageList",
    "POP3Error",
    "POP3Factory",
    "POP3Service",
    "PasswdFileChecker",
    "__version__",
]
