"""
The failures that may reach a client, each with its response code.

A store, realm or checker signals a failure by raising (or failing its
Deferred with) exactly one of these types; the session turns them into
``-ERR`` lines.  Anything else is a bug: it is logged with its traceback and
the client sees only ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

from pop3d.wire import ResponseCode, Status, Text


class POP3Error(Exception):
    """
    A failure with a text fit for the client and an optional RFC 2449/3206
    response code.
    """

    code: ResponseCode | None = None
    #: A failed login of this kind counts as a failed guess: it waits
    #: ``--login-failure-delay`` and counts towards the hang-up.
    counts_as_guess = False

    def __init__(self, text: str | Text, code: ResponseCode | None = None) -> None:
        super().__init__(str(text))
        #: The English text, for logs.
        self.text = str(text)
        #: What the client is told, translatable (`pop3d.wire.Text`).
        self.message = text
        if code is not None:
            self.code = code

    def status(self) -> Status:
        return Status(False, self.message, self.code)


class MaildropLocked(POP3Error):
    """The maildrop is held by another session, in this or another process."""

    code = ResponseCode.IN_USE

    def __init__(self, text: str = "maildrop is locked by another session") -> None:
        super().__init__(text)


class MaildropUnavailable(POP3Error):
    """
    The maildrop (or one of its messages) cannot be read or changed.

    ``permanent`` distinguishes a condition that needs an administrator
    (permissions, a file where a directory should be) from one that may pass
    (an I/O error): RFC 3206 ``SYS/PERM`` versus ``SYS/TEMP``.
    """

    def __init__(self, text: str, *, permanent: bool = False) -> None:
        super().__init__(text, ResponseCode.SYS_PERM if permanent else ResponseCode.SYS_TEMP)
        self.permanent = permanent


class MessageGone(POP3Error):
    """A message of the snapshot was removed from disk by another program."""

    def __init__(self, text: str = "message was removed by another program") -> None:
        super().__init__(text)


class DeletionFailed(POP3Error):
    """Some messages marked as deleted could not be removed during UPDATE."""

    code = ResponseCode.SYS_TEMP

    def __init__(self, failed: int) -> None:
        super().__init__(
            Text.of("{failed} message(s) could not be deleted, try again later", failed=failed)
        )
        self.failed = failed


class LoginDelayed(POP3Error):
    """
    RFC 2449 section 8.1.1: the user logged in less than the login delay
    ago.  Raised only after their credentials were verified.
    """

    code = ResponseCode.LOGIN_DELAY

    def __init__(self, delay: int, remaining: int) -> None:
        super().__init__(
            Text.of(
                "last login less than {delay} seconds ago, try again in {remaining} seconds",
                delay=delay,
                remaining=remaining,
            )
        )
        self.remaining = remaining


#: The reply to a failed login (a message id in the translations).
LOGIN_FAILED = "invalid user name or password"


class LoginRefused(POP3Error):
    """
    The password was right but the user may not log in (Dovecot's
    ``nologin`` field, with its ``reason``): ``-ERR [AUTH] reason``;
    without a reason, the reply to a wrong password, as Dovecot answers.
    """

    code = ResponseCode.AUTH

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or LOGIN_FAILED)
        #: The database's reason.  None: the client is told what a wrong
        #: password is told, and the refusal counts as one (the same wait,
        #: the same hang-up), or its speed would say the password was right.
        self.reason = reason or None
        self.counts_as_guess = self.reason is None


class AuthUnavailable(POP3Error):
    """
    The user database cannot answer (down, slow, refusing us): the client
    may try again later, ``-ERR [SYS/TEMP]``.  Whoever raises it has
    logged the cause; the driver adds no traceback.
    """

    code = ResponseCode.SYS_TEMP

    def __init__(self, text: str = "authentication service unavailable, try again later") -> None:
        super().__init__(text)
