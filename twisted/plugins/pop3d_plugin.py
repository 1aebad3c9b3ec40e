"""
The twistd dropin: ``twistd pop3d``, the ``--auth`` checkers
``passwd-file:``, ``sql:``, ``ldap:`` and ``oauth2:``, and the
``--mail-location`` kinds ``maildir:`` and ``mbox:``.
"""

from twisted.application.service import ServiceMaker

from pop3d.authdb.ldap import LdapCheckerFactory
from pop3d.authdb.oauth2 import OAuth2CheckerFactory
from pop3d.authdb.sql import SQLCheckerFactory
from pop3d.checkers import PasswdFileCheckerFactory
from pop3d.stores.locations import MaildirLocation, MboxLocation

pop3d = ServiceMaker(
    "pop3d",
    "pop3d.tap",
    "A POP3 server (RFC 1939) for Maildirs and mbox files",
    "pop3d",
)

passwdFile = PasswdFileCheckerFactory()
sqlDatabase = SQLCheckerFactory()
oauth2 = OAuth2CheckerFactory()
ldapDirectory = LdapCheckerFactory()

maildirLocation = MaildirLocation()
mboxLocation = MboxLocation()
