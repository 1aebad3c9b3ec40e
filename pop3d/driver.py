"""
The driver of a `pop3d.session.Session`: it carries out what the session
asks for and tells it the outcome.

The session decides; the driver does: logins through the cred portal (and
the realm's LOGIN-DELAY refusal), the failed-login delay
(`pop3d.throttle`), SASL mechanisms, store calls, the UPDATE plan
(removal, EXPIRE, seen flags), releasing the maildrop, and the log lines.
Every reply goes to ``replies.deliver``, at once when it is ready at once (most
commands: no Deferred is made for them) or when the work it waited for is
done; `pop3d.protocol.POP3Protocol` puts it on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from twisted.cred.credentials import (
    ICredentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3d.credchecks import PortalVerifiers, login_at_once
from pop3d.credentials import PreparedUsernamePassword
from pop3d.errors import (
    LOGIN_FAILED,
    AuthUnavailable,
    LoginDelayed,
    LoginRefused,
    MaildropLocked,
    MaildropUnavailable,
    POP3Error,
)
from pop3d.expire import expired_messages
from pop3d.i18n import BUILTIN_LANGUAGES, Languages
from pop3d.logformat import (
    SESSION_IDS,
    LogoutValues,
    escape_braces,
    method_token,
    quote,
    render_format,
)
from pop3d.readahead import ReadAhead
from pop3d.realm import Avatar, release
from pop3d.sasl import (
    Authenticate,
    Challenge,
    ExchangeContext,
    ISASLExchange,
    ISASLMechanism,
    SASLError,
    SASLFailure,
)
from pop3d.saslprep import SASLprepError, prepare_credential
from pop3d.session import (
    DEFAULT_POLICY,
    INTERNAL_ERROR,
    Action,
    AnswerFailedLogin,
    APOPDigest,
    CloseForAbuse,
    DisconnectedBeforeLogin,
    EndSession,
    Link,
    LogIn,
    LoginRefusal,
    Mechanism,
    OpenMessage,
    Outcome,
    PasswordCredentials,
    ReleaseMaildrop,
    Reply,
    RunUpdate,
    Session,
    SessionPolicy,
    StartSASL,
    StepSASL,
)
from pop3d.stores.interfaces import IMaildrop, IMessageBody, ISeenFlags, MessageList
from pop3d.throttle import FailureDelay
from pop3d.userdb import IUserMaildrop, LoginContext, UserSettings, attach_login_context
from pop3d.wire import ResponseCode, Status

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.interfaces import IReactorTime

    from pop3d.metrics import LoginTiming, Metrics


class Replies(Protocol):
    """Where the replies of a session go (`pop3d.protocol.POP3Protocol`)."""

    def deliver(self, reply: Reply | Failure) -> None:
        """Send ``reply`` (for a bug: the Failure, answered -ERR [SYS/TEMP])."""


_NONE: frozenset[int] = frozenset()
#: What a client is told of a failure nobody expected (its details are logged).
INTERNAL_ERROR_STATUS = Status(False, INTERNAL_ERROR, ResponseCode.SYS_TEMP)


#: The response code of each way a SASL mechanism ends an exchange; the text
#: is the mechanism's (RFC 5034 section 4: "-ERR", with [AUTH] where the
#: client asked to act as someone it has not proven to be, RFC 3206 section 4).
SASL_FAILURE_CODES: dict[SASLFailure, ResponseCode | None] = {
    SASLFailure.MALFORMED: None,
    SASLFailure.UNSUPPORTED: None,
    SASLFailure.UNEXPECTED: None,
    SASLFailure.NOT_AUTHORIZED: ResponseCode.AUTH,
}


def sasl_failure_status(error: SASLError) -> Status:
    """The reply to a mechanism's `SASLError`: the one place SASL meets POP3 replies."""
    return Status(False, error.text, SASL_FAILURE_CODES[error.failure])


def unexpected_error(log: Logger, failure: Failure, peer: str) -> Status:
    """Log a failure nobody expected, with its traceback; answer -ERR [SYS/TEMP]."""
    log.failure("unexpected error answering {peer}", failure, peer=peer)
    return INTERNAL_ERROR_STATUS


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """
    The credentials of an APOP command (RFC 1939 section 7): the digest
    is MD5 of the greeting's timestamp followed by the shared secret.
    """

    def __init__(self, challenge: bytes, username: bytes, digest: bytes) -> None:
        self.challenge = challenge
        self.username = username
        self.digest = digest

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        # RFC 6856 section 2.2: the secret of the digest is SASLprep'd as a
        # stored string; one SASLprep refuses is used as it is.
        try:
            password = prepare_credential(password, stored=True)
        except SASLprepError:
            pass
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest.lower())


def cred_credentials(credentials: object) -> ICredentials:
    """The twisted.cred credentials of what a session asks to log in with."""
    if isinstance(credentials, PasswordCredentials):
        return PreparedUsernamePassword(credentials.username, credentials.password)
    if isinstance(credentials, APOPDigest):
        return APOPCredentials(credentials.challenge, credentials.username, credentials.digest)
    # A SASL mechanism's own credentials.
    return cast(ICredentials, credentials)


class SessionLogger(Logger):
    """
    The log of one session: every line starts with ``[SESSION-ID]`` and
    carries the id as the ``session`` field, so that an admin can follow
    one session with grep.

    Its events arrive with their text already made (`render_format`): the
    format is that text (braces doubled) with nothing left to flatten
    (``log_flattened``), as twisted.logger reads back an event that crossed
    a process, and every field stays in the event.  twistd's observer then
    writes it without running Python's string.Formatter, which cost a busy
    server more than the rest of a session's line.
    """

    def __init__(self, session_id: str, observer: ILogObserver = globalLogPublisher) -> None:
        # Not Logger.__init__, which imports the global publisher at every
        # call: a session makes a logger for each line it writes.  The lines
        # the session wrote before it stopped doing I/O, under the same
        # name: log filters and readers of the log keep working.
        self.namespace = SESSION_LOG_NAMESPACE
        self.source = None
        self.observer = observer
        self.session_id = session_id
        self._prefix = "[" + session_id + "] "

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        # Logger.emit's check that the level is one (a sort of every level
        # per line) is left out: pop3d passes LogLevel's constants only.
        kwargs["session"] = self.session_id
        text = render_format(format or "", kwargs)
        if text is None:
            # twisted.logger makes the text (and says what went wrong).
            kwargs["log_format"] = escape_braces(self._prefix) + (format or "")
        else:
            kwargs["log_format"] = escape_braces(self._prefix + text)
            kwargs["log_flattened"] = {}
        kwargs["log_logger"] = self
        kwargs["log_level"] = level
        kwargs["log_namespace"] = SESSION_LOG_NAMESPACE
        kwargs["log_source"] = None
        kwargs["log_time"] = time.time()
        self.observer(kwargs)


#: The namespace of every session's log lines.
SESSION_LOG_NAMESPACE = "pop3d.session.Session"


class SessionDriver:
    """
    Runs one `Session` against a cred ``portal`` whose realm gives
    `IMaildrop` avatars; answers go to ``replies``.  ``session_id`` names
    it in the log (by default the next of `pop3d.logformat.SESSION_IDS`),
    where its lines go to ``session_log`` (twisted.logger's global publisher).
    """

    # One per connection, thousands idle: no instance dictionary.
    __slots__ = (
        "_clock",
        "_exchange",
        "_failure_delay",
        "_failure_wait",
        "_hostname",
        "_login_timing",
        "_logout",
        "_maildrop",
        "_mechanisms",
        "_messages",
        "_metrics",
        "_policy",
        "_read_ahead",
        "_replies",
        "_session_id",
        "_session_log",
        "_timer_started",
        "logged_in_at",
        "portal",
        "session",
    )

    def __init__(
        self,
        portal: Portal,
        *,
        replies: Replies,
        link: Callable[[], Link],
        clock: IReactorTime,
        apop_challenge: bytes | None,
        failure_delay: FailureDelay | None = None,
        policy: SessionPolicy = DEFAULT_POLICY,
        mechanisms: Sequence[ISASLMechanism] = (),
        tls_available: bool = False,
        hostname: str = "localhost",
        languages: Languages = BUILTIN_LANGUAGES,
        session_id: str | None = None,
        metrics: Metrics | None = None,
        session_log: ILogObserver = globalLogPublisher,
        read_ahead: ReadAhead | None = None,
    ) -> None:
        #: The portal logins go through (a public seam: tests add checkers).
        self.portal = portal
        #: When the login succeeded (the clock's seconds), for ``pop3d who``.
        self.logged_in_at: float | None = None
        # Its logger is made when a line is written (`log`): an idle session keeps the id alone.
        self._session_id = session_id or SESSION_IDS.next_id()
        self._session_log = session_log
        self._policy = policy
        self._replies = replies
        self._clock = clock
        self._failure_delay = failure_delay
        self._mechanisms = mechanisms
        self._hostname = hostname
        self.session = Session(
            apop_challenge=apop_challenge,
            link=link,
            authentication=self,
            policy=policy,
            tls_available=tls_available,
            languages=languages,
        )
        self._maildrop: IMaildrop | None = None
        self._messages: MessageList | None = None
        self._logout: Callable[[], None] | None = None
        self._exchange: ISASLExchange | None = None
        self._failure_wait = 0.0
        self._metrics = metrics
        self._timer_started = 0.0
        self._login_timing: LoginTiming | None = None
        # Shared with the server's other sessions (None: nothing read ahead).
        self._read_ahead = read_ahead

    @property
    def log(self) -> SessionLogger:
        """Where this session's lines go, each with the session id."""
        return SessionLogger(self._session_id, self._session_log)

    # -- what the session asks of the portal (pop3d.session.Authentication) -------

    def password_logins(self) -> bool:
        return IUsernamePassword in self.portal.listCredentialsInterfaces()

    def usable_mechanisms(self) -> Sequence[Mechanism]:
        verifiers = PortalVerifiers(self.portal)
        return [m for m in self._mechanisms if m.usable(verifiers)]

    def configured_mechanisms(self) -> Sequence[Mechanism]:
        return cast(Sequence[Mechanism], self._mechanisms)

    # -- what the protocol tells ---------------------------------------------------

    def line(self, line: bytes) -> None:
        """A command line from the client (without its line ending)."""
        if self._metrics is not None:
            self._metrics.command(line)
        outcome = self.session.receive_line(line)
        if isinstance(outcome, Action):
            _PERFORMERS[type(outcome)](self, outcome)
        else:
            # Most commands: the reply is ready.
            self._replies.deliver(outcome)

    def tls_handshake_done(self, version: str) -> None:
        """A TLS handshake (STLS, or implicit TLS) completed with ``version``."""
        if self._metrics is not None:
            self._metrics.tls_handshake(version)

    def tls_handshake_failed(self) -> None:
        if self._metrics is not None:
            self._metrics.tls_handshake_failed()

    def line_too_long(self) -> None:
        self._carry_out(self.session.line_too_long())

    def connection_lost(self) -> None:
        if self._read_ahead is not None:
            self._read_ahead.forget(self)
        self._carry_out(self.session.connection_lost())

    def read_ahead(self) -> None:
        """
        A message went whole to a client that waits for each answer: the
        message it likely asks for next is read now, while it takes this
        one in (`pop3d.readahead`).  Never raises: a read-ahead that fails
        is logged, and the RETR that follows reads the message itself.
        """
        read_ahead, maildrop, messages = self._read_ahead, self._maildrop, self._messages
        if read_ahead is None or maildrop is None or messages is None:
            return
        try:
            index = self.session.next_in_order()
            if index is not None:
                read_ahead.read(self, maildrop, index, messages.sizes[index])
        except Exception:
            self.log.failure("reading a message ahead failed", Failure())

    # -- carrying out ------------------------------------------------------------------

    def _carry_out(self, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        if isinstance(outcome, Action):
            _PERFORMERS[type(outcome)](self, outcome)
        else:
            self._replies.deliver(outcome)

    def _report_failure(self, failure: Failure) -> None:
        """A bug while carrying something out: the protocol answers SYS/TEMP."""
        self._replies.deliver(failure)

    def _log_in(self, action: LogIn) -> None:
        credentials = cred_credentials(action.credentials)
        shown_user = action.username.decode("utf-8", "replace")
        context = self._login_context()
        attach_login_context(credentials, context)
        mind: object = context
        if self._metrics is not None:
            self._timer_started = self._clock.seconds()
            # Filled in by pop3d.metrics.TimingRealm (checker and store
            # times), which hands the realm inside it the context.
            mind = self._login_timing = _login_timing(self._timer_started, context)
        # The realm's richer avatar first (the user's settings), else the
        # maildrop alone; at once when the checker and the realm answer at
        # once (passwd-file and a Maildir, nearly every login).
        answer = login_at_once(self.portal, credentials, mind, IUserMaildrop, IMaildrop)
        if isinstance(answer, Deferred):
            answer.addBoth(self._login_answered, credentials, shown_user, action.method)
        else:
            self._login_answered(
                cast("Avatar | Failure", answer), credentials, shown_user, action.method
            )

    def _login_answered(
        self, answer: Avatar | Failure, credentials: ICredentials, shown_user: str, method: str
    ) -> None:
        """
        The portal's answer, taken at once or in one callback: every
        callback added to a Deferred that has fired already runs Twisted's
        callback loop (about 8,000 instructions), and a login's answer is
        nearly always ready.  A maildrop that cannot be listed is a failed
        login; a bug in either answer is reported as one.
        """
        if not isinstance(answer, Failure):
            try:
                opened = _opened_maildrop(answer)
            except Exception:
                answer = Failure()
            else:
                try:
                    self._logged_in(opened)
                except Exception:
                    self._report_failure(Failure())
                return
        try:
            self._login_failed(answer, credentials, shown_user, method)
        except Exception:
            self._report_failure(Failure())

    def _login_context(self) -> LoginContext:
        link = self.session.link
        return LoginContext(
            remote_ip=link.host,
            local_ip=link.local_host,
            # Dovecot's %c: "secured" over TLS or from this machine.
            secured=link.secure or link.local,
        )

    def _logged_in(self, opened: _Opened) -> None:
        maildrop, logout, messages, settings, user = opened
        self._maildrop, self._logout, self._messages = maildrop, logout, messages
        self.logged_in_at = self._clock.seconds()
        policy = None
        if settings is not None and self._policy.per_user:
            policy = self._policy.for_user(
                settings.login_delay, settings.expire_days, settings.expire_never
            )
        outcome = self.session.login_succeeded(messages, policy, user)
        self._log_login()
        if self._metrics is not None:
            self._count_login(self.session.counters.method, "ok")
        self._carry_out(outcome)

    def _log_login(self) -> None:
        session = self.session
        link = session.link
        tls = ""
        if link.tls_version is not None:
            tls = f" tls={link.tls_version} cipher={link.tls_cipher}"
        method = method_token(session.counters.method)
        # Rendered here, as the logout line is: the formatter is slow.
        self.log.info(
            "login: {summary}",
            summary=f"rip={link.host} method={method} user={quote(session.user or '')}{tls}",
            rip=link.host,
            peer=link.peer,
            method=method,
            user=session.user,
            tls_version=link.tls_version,
            tls_cipher=link.tls_cipher,
        )

    def _login_failed(
        self, failure: Failure, credentials: ICredentials, shown_user: str, method: str
    ) -> None:
        reason, detail, status, counted = _login_failure_status(failure)
        if self._metrics is not None:
            self._count_login(method, reason)
        link = self.session.link
        if reason == "internal":
            self.log.failure(
                "login of {quoted_user} from {peer} failed unexpectedly",
                failure,
                user=shown_user,
                quoted_user=quote(shown_user),
                peer=link.peer,
            )
        else:
            # The one format fail2ban reads (README, "Logs"): what the
            # client chose (the user name) comes last, quoted.
            shown_method = method_token(method)
            summary = (
                f"rip={link.host} method={shown_method} reason={reason} user={quote(shown_user)}"
            )
            if detail:
                summary += f" detail={quote(detail)}"
            self.log.info(
                "login failed: {summary}",
                summary=summary,
                rip=link.host,
                peer=link.peer,
                method=shown_method,
                reason=reason,
                user=shown_user,
                detail=detail,
            )
        throttle, host = self._failure_delay, self.session.link.host
        trusted = throttle is not None and throttle.trusts(host)
        if counted and throttle is not None:
            # Recorded even if the client has gone: the next guess waits longer.
            self._failure_wait = throttle.delay_for_failure(host, credentials)
        self._carry_out(self.session.login_refused(LoginRefusal(status, counted, trusted)))

    def _count_login(self, method: str, result: str) -> None:
        assert self._metrics is not None
        now = self._clock.seconds()
        elapsed = now - self._timer_started
        tls_version = self.session.link.tls_version if result == "ok" else None
        self._metrics.login(method, result, elapsed, tls_version)
        timing, self._login_timing = self._login_timing, None
        if timing is not None and result != "internal":
            self._metrics.login_timing(timing, result, now)

    def _answer_failed_login(self, action: AnswerFailedLogin) -> None:
        throttle, wait = self._failure_delay, self._failure_wait
        if throttle is None or wait <= 0:
            self._replies.deliver(action.reply)
            return
        waited = throttle.wait(wait)
        waited.addCallback(lambda _: self._replies.deliver(action.reply))
        waited.addErrback(self._report_failure)

    def _start_sasl(self, action: StartSASL) -> None:
        mechanism = cast(ISASLMechanism, action.mechanism)
        verifiers = PortalVerifiers(self.portal)
        context = ExchangeContext(verifiers, self._hostname, self._clock.seconds())
        self._exchange = mechanism.start(context)
        self._sasl_step(action.initial)

    def _step_sasl(self, action: StepSASL) -> None:
        self._sasl_step(action.response)

    def _sasl_step(self, response: bytes | None) -> None:
        exchange = self._exchange
        assert exchange is not None
        step: Deferred[Challenge | Authenticate] = maybeDeferred(exchange.step, response)
        step.addCallbacks(self._sasl_stepped, self._sasl_refused)
        step.addErrback(self._report_failure)

    def _sasl_stepped(self, result: Challenge | Authenticate) -> None:
        if isinstance(result, Challenge):
            self._carry_out(self.session.sasl_challenge(result.data))
            return
        self._exchange = None
        self._carry_out(self.session.sasl_succeeded(result.credentials, result.username))

    def _sasl_refused(self, failure: Failure) -> None:
        # After a failure the session is as if AUTH never happened.
        self._exchange = None
        if failure.check(SASLError):
            error = failure.value
            assert isinstance(error, SASLError)
            status = sasl_failure_status(error)
        else:
            status = self._unexpected(failure)
        self._carry_out(self.session.sasl_refused(status))

    def _open_message(self, action: OpenMessage) -> None:
        maildrop = self._maildrop
        assert maildrop is not None
        if self._metrics is not None:
            self._timer_started = self._clock.seconds()
        read_ahead = self._read_ahead
        if read_ahead is not None:
            body = read_ahead.take(self, action.index)
            if body is not None:
                self._message_opened(body)
                return
        try:
            opened = maildrop.open_message(action.index)
        except Exception:
            self._message_not_opened(Failure())
            return
        if isinstance(opened, Deferred):
            # One pair of callbacks, which catch their own failures.
            opened.addCallbacks(self._message_opened, self._message_not_opened)
        else:
            self._message_opened(opened)

    def _message_opened(self, body: IMessageBody) -> None:
        if self._metrics is not None:
            self._metrics.message_opened(self._clock.seconds() - self._timer_started)
        try:
            outcome = self.session.message_opened(body)
            if outcome is None:
                body.close()  # the client has gone
            elif isinstance(outcome, Action):
                self._carry_out(outcome)
            else:
                self._replies.deliver(outcome)
        except Exception:
            self._report_failure(Failure())

    def _message_not_opened(self, failure: Failure) -> None:
        if self._metrics is not None:
            self._metrics.message_opened(self._clock.seconds() - self._timer_started)
        if failure.check(POP3Error):
            error = failure.value
            assert isinstance(error, POP3Error)
            status = error.status()
        else:
            status = self._unexpected(failure)
        try:
            self._carry_out(self.session.message_gone(status))
        except Exception:
            self._report_failure(Failure())

    def _unexpected(self, failure: Failure) -> Status:
        return unexpected_error(self.log, failure, self.session.peer)

    # -- UPDATE (RFC 1939 section 6) ---------------------------------------------

    def _run_update(self, plan: RunUpdate) -> None:
        maildrop = self._maildrop
        assert maildrop is not None
        if self._read_ahead is not None:
            # No RETR follows QUIT: what was read ahead is let go before
            # UPDATE, not kept until the connection closes.
            self._read_ahead.forget_message(self)
        if self._metrics is not None:
            self._timer_started = self._clock.seconds()
        if plan.expire_days is None:
            self._remove(_NONE, plan, maildrop)
            return
        # RFC 2449 section 6.7: the messages retrieved that long ago.
        expired = expired_messages(
            maildrop, plan.expire_candidates, days=plan.expire_days, now=self._clock.seconds()
        )
        expired.addCallback(self._remove, plan, maildrop)
        expired.addErrback(self._report_failure)

    def _remove(self, expired: frozenset[int], plan: RunUpdate, maildrop: IMaildrop) -> None:
        doomed = plan.remove | expired if expired else plan.remove
        if not doomed:
            self._mark_seen(self.session.update_done(doomed), plan, doomed, maildrop)
            return
        removal: Deferred[None] = maybeDeferred(maildrop.remove, sorted(doomed))
        removal.addCallbacks(
            lambda _: self._mark_seen(self.session.update_done(doomed), plan, doomed, maildrop),
            lambda failure: self._mark_seen(
                self.session.update_failed(self._update_failure(failure)), plan, doomed, maildrop
            ),
        )
        removal.addErrback(self._report_failure)

    def _update_failure(self, failure: Failure) -> Status:
        user = self.session.user
        if failure.check(POP3Error):
            error = failure.value
            assert isinstance(error, POP3Error)
            self.log.warn("UPDATE for {user} incomplete: {reason}", user=user, reason=error.text)
            return error.status()
        self.log.failure("UPDATE for {user} failed", failure, user=user)
        return INTERNAL_ERROR_STATUS

    def _mark_seen(
        self,
        outcome: Outcome | None,
        plan: RunUpdate,
        doomed: frozenset[int],
        maildrop: IMaildrop,
    ) -> None:
        """Whether or not the removal worked, what was read is marked seen."""
        seen_flags = ISeenFlags(maildrop, None)
        if seen_flags is None:
            self._updated(None, outcome)
            return
        every = range(plan.message_count)
        kept = [i for i in every if i not in doomed] if doomed else every
        retrieved = sorted(plan.retrieved - doomed) if plan.retrieved else []
        result: object
        try:
            result = seen_flags.mark_seen(retrieved, kept)
        except Exception:
            self._marking_failed(Failure())
            result = None
        if result is None:
            # Nothing to do, or it failed at once: no Deferred to wait on.
            try:
                self._updated(None, outcome)
            except Exception:
                self._report_failure(Failure())
            return
        # A Deferred, or what else maybeDeferred waits on (a store's
        # ``async def mark_seen`` gives a coroutine).
        marking: Deferred[object] = maybeDeferred(lambda: result)
        marking.addErrback(self._marking_failed)
        marking.addCallback(self._updated, outcome)
        marking.addErrback(self._report_failure)

    def _marking_failed(self, failure: Failure) -> None:
        # The client's work is done: logged, not told.
        self.log.failure("marking messages seen failed", failure)

    def _updated(self, _: object, outcome: Outcome | None) -> None:
        if self._metrics is not None:
            self._metrics.update(self._clock.seconds() - self._timer_started)
        self._carry_out(outcome)

    # -- the end of a session ------------------------------------------------------

    def _end_session(self, action: EndSession) -> None:
        session = self.session
        counters = session.counters
        outcome, user, peer = action.outcome, session.user, session.peer
        messages = self._messages if self._messages is not None else MessageList()
        values = LogoutValues(
            top_count=counters.top_messages,
            top_bytes=counters.top_octets,
            retr_count=counters.retrieved_messages,
            retr_bytes=counters.retrieved_octets,
            deleted_count=counters.deleted_messages,
            deleted_bytes=counters.deleted_octets,
            message_count=len(messages),
            message_bytes=sum(messages.sizes),
            uidls=messages.uids,
        )
        # Rendered here, once: twisted.logger's formatter costs more than
        # the rest of a short session's work.  The fields stay in the event.
        method = method_token(counters.method)
        summary = (
            f"{outcome}: user={quote(user or '')} peer={peer} method={method} "
            + self._policy.logout_format.render(values)
        )
        # One logger for the line and the release: each costs a session
        # about 3,000 instructions.
        log = self.log
        log.info(
            "session {summary}",
            summary=summary,
            outcome=outcome,
            user=user,
            peer=peer,
            method=counters.method,
            retrieved_messages=counters.retrieved_messages,
            retrieved_octets=counters.retrieved_octets,
            deleted_messages=counters.deleted_messages,
            deleted_octets=counters.deleted_octets,
            top_messages=counters.top_messages,
            top_octets=counters.top_octets,
            message_count=values.message_count,
            message_octets=values.message_bytes,
        )
        if self._metrics is not None:
            self._metrics.session_counts(
                counters.retrieved_messages,
                counters.deleted_messages,
                counters.retrieved_octets + counters.top_octets,
            )
        self._release(log)
        if action.reply is not None:
            self._replies.deliver(action.reply)

    def _release_maildrop(self, action: ReleaseMaildrop) -> None:
        self._release()

    def _release(self, log: Logger | None = None) -> None:
        maildrop, self._maildrop = self._maildrop, None
        logout, self._logout = self._logout, None
        release(maildrop, logout, log if log is not None else self.log)

    def _disconnected_before_login(self, action: DisconnectedBeforeLogin) -> None:
        self.log.info(
            "disconnected before login: peer={peer} failed_logins={failed}",
            peer=self.session.peer,
            failed=action.failed_logins,
        )

    def _close_for_abuse(self, action: CloseForAbuse) -> None:
        self.log.info(
            "closing connection from {peer} after {count} bad commands",
            peer=self.session.peer,
            count=action.bad_commands,
        )
        self._replies.deliver(action.reply)


# Who carries out each request of the session.
_PERFORMERS: dict[type[Action], Callable[[SessionDriver, Action], None]] = {
    LogIn: SessionDriver._log_in,  # type: ignore[dict-item]
    AnswerFailedLogin: SessionDriver._answer_failed_login,  # type: ignore[dict-item]
    StartSASL: SessionDriver._start_sasl,  # type: ignore[dict-item]
    StepSASL: SessionDriver._step_sasl,  # type: ignore[dict-item]
    OpenMessage: SessionDriver._open_message,  # type: ignore[dict-item]
    RunUpdate: SessionDriver._run_update,  # type: ignore[dict-item]
    EndSession: SessionDriver._end_session,  # type: ignore[dict-item]
    ReleaseMaildrop: SessionDriver._release_maildrop,  # type: ignore[dict-item]
    DisconnectedBeforeLogin: SessionDriver._disconnected_before_login,  # type: ignore[dict-item]
    CloseForAbuse: SessionDriver._close_for_abuse,  # type: ignore[dict-item]
}


def _login_timing(started: float, context: LoginContext) -> LoginTiming:
    # Imported when metrics are kept (pop3d.metrics imports prometheus_client).
    from pop3d.metrics import LoginTiming

    return LoginTiming(started, context)


#: What a login opened: the maildrop, its logout, its listing and (from a
#: realm that knows them) the user's settings and canonical name.
_Opened = tuple[IMaildrop, Callable[[], None], MessageList, "UserSettings | None", "str | None"]


def _opened_maildrop(result: Avatar) -> _Opened:
    """The maildrop of a login, its logout, its listing, and the user's settings."""
    _, avatar, logout = result
    settings: UserSettings | None = None
    user: str | None = None
    if IUserMaildrop.providedBy(avatar):
        settings, user = avatar.settings, avatar.user
        avatar = avatar.maildrop
    maildrop = IMaildrop(avatar)
    try:
        listed = maildrop.messages
        # A store written against the older contract (a list of
        # MessageInfo) still works: its list is converted once.
        messages = listed if isinstance(listed, MessageList) else MessageList.of(listed)
    except Exception:
        # Answered as a failed login: the lock is not kept.
        maybeDeferred(maildrop.close)
        logout()
        raise
    return maildrop, logout, messages, settings, user


#: The typed failures of a login, in the order they are looked for: the
#: word the log line (and the metrics) give the reason, and whether the
#: error's text goes to the log as its detail.
_LOGIN_FAILURES: tuple[tuple[type[POP3Error], str, bool], ...] = (
    (MaildropLocked, "in-use", False),
    (MaildropUnavailable, "unavailable", True),
    # The password was right: the user database refuses this user.
    (LoginRefused, "refused", True),
    # Logged (once per outage) by the checker that could not ask.
    (AuthUnavailable, "auth-unavailable", True),
    # Not a failed login: neither counted nor made to wait.
    (LoginDelayed, "login-delay", False),
)


def _login_failure_status(failure: Failure) -> tuple[str, str, Status, bool]:
    """
    Why a login failed (for the log: a word and details), what the client
    is told, and whether it counts as a failed guess (it waits, and counts
    towards the hang-up).
    """
    if failure.check(UnauthorizedLogin, LoginFailed):
        return "credentials", "", Status(False, LOGIN_FAILED, ResponseCode.AUTH), True
    for kind, reason, detailed in _LOGIN_FAILURES:
        if failure.check(kind):
            error = failure.value
            assert isinstance(error, POP3Error)
            if error.counts_as_guess:
                # Answered as a wrong password: no detail, as for one.
                return reason, "", error.status(), True
            return reason, error.text if detailed else "", error.status(), False
    return "internal", "", INTERNAL_ERROR_STATUS, False
