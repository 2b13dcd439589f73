"""The ``jules`` provider: Google's Jules coding agent, a task API (sessions), not a chat API.

Every field we send or read, and where it is defined (Jules API ``v1alpha``; REST reference
``R`` = https://developers.google.com/jules/api/reference/rest/v1alpha; the JSON names are
camelCase on the wire, unknown fields in replies are ignored):

==============================================  ===================================================================
field                                           documented at
==============================================  ===================================================================
header ``X-Goog-Api-Key``                       https://jules.google/docs/api/reference ("Authentication")
``POST /sessions``                              R/sessions/create (body and reply: a ``Session``)
  ``prompt``                                    R/sessions#Session ("Required")
  ``requirePlanApproval: false``                R/sessions#Session ("Input only ... If not set, plans will be
                                                auto-approved"); sent explicitly anyway
  ``sourceContext.source``                      R/sessions#SourceContext ("Format: sources/{source}")
  ``...githubRepoContext.startingBranch``       R/sessions#GitHubRepoContext
  no ``sourceContext`` (repoless)               NOT in R (it calls sourceContext "Required"): the Jules changelog
                                                https://jules.google/docs/changelog/2026-01-26-4 ("Repoless support
                                                in the REST API"); jules-sdk omits it (tests/repoless.test.ts)
  reply ``name``, ``id``                        R/sessions#Session (``id`` is the ``{session}`` of ``name``)
``GET /sessions/{id}``                          R/sessions/get
  ``state``                                     R/sessions#State; the values (QUEUED, PLANNING,
                                                AWAITING_PLAN_APPROVAL, AWAITING_USER_FEEDBACK, IN_PROGRESS,
                                                PAUSED, FAILED, COMPLETED) in
                                                https://jules.google/docs/api/reference/types ("SessionState")
  ``outputs[].pullRequest.url``, ``.title``     R/sessions#SessionOutput, R/sessions#PullRequest
  ``outputs[].changeSet.gitPatch``              shape: R/sessions.activities#ChangeSet, #GitPatch (as an activity
                                                artifact); as a session output NOT in R: the changelog above ("file
                                                outputs") and jules-sdk ``RestSessionOutput`` (src/types.ts)
    ``.unidiffPatch``                           R/sessions.activities#GitPatch
    ``.suggestedCommitMessage``                 R/sessions.activities#GitPatch
``GET /sessions/{id}/activities``               R/sessions.activities/list
  query ``pageSize=100``, ``pageToken``         same page ("between 1 and 100 ... defaults to 50")
  ``activities[]``, ``nextPageToken``           same page ("If this field is omitted, there are no subsequent
                                                pages")
  ``activities[].name``, ``.id``                R/sessions.activities#Activity
  ``.agentMessaged.agentMessage``               R/sessions.activities#AgentMessaged
  ``.progressUpdated.title``/``.description``   R/sessions.activities#ProgressUpdated
  ``.sessionCompleted``                         R/sessions.activities#SessionCompleted (an empty object)
  ``.sessionFailed.reason``                     R/sessions.activities#SessionFailed
``DELETE /sessions/{id}``                       NOT in R (methods: approvePlan, create, get, list, sendMessage);
                                                jules-sdk ``Session.delete()`` (src/session.ts; #99, #105, #184)
``GET /sources?pageSize=1`` (the probe)         R/sources/list
error replies ``{"error": {...}}``              Google's error model (https://google.aip.dev/193), read by the
                                                HTTP transport (``http.py``), not here
==============================================  ===================================================================

``jules-sdk`` is Google's own TypeScript SDK, https://github.com/google-labs-code/jules-sdk (paths under
packages/core/, read at commit 19fc117a). Recorded shapes used by the tests: tests/fixtures/jules/
(SOURCES.md names each one's origin).

Theory of operation
-------------------
One call is one Jules session:

1. ``POST /sessions`` with ``{"prompt": ..., "requirePlanApproval": false}`` (plans are approved
   automatically, so the agent never waits on us), plus a ``sourceContext`` only when the model names
   a source. No ``title`` (Jules makes one) and no ``automationMode`` (no pull request is opened).
   The prompt is the system messages first, then the conversation: a lone user message as is,
   otherwise each message as ``"User: ..."`` / ``"Assistant: ..."``; the parts are separated by
   blank lines (``codecs.conversation_text``). Jules has no tool-call fields: a tool round trip is
   written into the prompt, each assistant call as ``Tool call <id>: <name> <arguments>`` and each
   result as ``Tool result for <id> (<name>): ...``, so results pair with their calls in any order.
2. Poll until the session settles, waiting ``POLL_INITIAL_S`` doubling to ``POLL_MAX_S`` between
   polls (back to ``POLL_INITIAL_S`` whenever something new happened). Polling is waiting for the
   agent, not a retry policy: an HTTP error while polling ends the call with the mapped error. Each
   poll is ``GET /sessions/{id}`` (the state) and then ``GET /sessions/{id}/activities`` following
   ``nextPageToken`` (in that order, so a settled state always comes with its final activities).
   Each new ``agentMessaged`` activity is reported through ``on_delta`` as it is first seen.
3. The outcome:
   * ``sessionCompleted`` activity or state ``COMPLETED``: ``text`` is the agent messages joined by
     blank lines (exactly what the deltas add up to); without any agent message, the session's
     outputs (pull request, change set patch) or the last progress update.
   * ``sessionFailed`` activity or state ``FAILED``: ``errors.ProviderError`` with the reason.
   * ``AWAITING_USER_FEEDBACK`` (the agent asked something and waits): the agent messages so far,
     ``finish_reason`` "stop", the session is left waiting; with no agent message at all, a
     ``ProviderError``. ``AWAITING_PLAN_APPROVAL`` (should not happen, we ask for auto-approval)
     and ``PAUSED`` (paused by a person in the Jules app) fail with a ``ProviderError``: nobody in
     llmsrv will approve or resume them.
4. A session given up while it still runs or waits on us (cancellation, deadline, an error while
   polling, a plan awaiting approval) is deleted in a shielded cleanup bounded by ``STOP_TIMEOUT_S``
   (``DELETE /sessions/{id}``). The API has no cancel/stop method (the REST reference lists create,
   get, list, sendMessage, approvePlan); deletion is the only way to end a session, and Google's SDK
   implements it. A failed delete is ignored. A call cancelled during ``POST /sessions`` has no
   session id yet, so that session cannot be stopped.

Models: ``jules:default`` is a repoless session (an ephemeral environment with only the prompt as
context). ``jules:sources/github/OWNER/REPO`` works on that connected source (``GET /sources`` lists
them) from its default branch, ``jules:sources/github/OWNER/REPO@BRANCH`` from ``BRANCH``
(``githubRepoContext.startingBranch``). A ``[routing.aliases]`` entry can give one a short name.

Jules reports no token counts: ``usage`` is estimated with ``estimate_tokens`` from the prompt and
the returned text. ``max_tokens``, ``temperature`` and ``tools`` have no Jules equivalent and are
ignored. Jules tasks take minutes: raise ``[providers.jules] timeout_ms`` and the request's
``timeout_ms`` accordingly. The key goes in ``X-Goog-Api-Key`` (env ``JULES_API_KEY``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import trio

from .. import errors
from ..config import ProviderConfig, ServerConfig
from ..messages import Message, Usage
from ..redact import clip
from . import Call, Completion, OnDelta, ProviderStatus, estimate_tokens
from .auth import ApiKeyHeader, Key
from .codecs import HttpRequest, conversation_text
from .http import HttpTransport

log = logging.getLogger("llmsrv.providers.jules")

DEFAULT_MODEL = "default"
SOURCE_PREFIX = "sources/"
WAITING_STATES = frozenset({"AWAITING_USER_FEEDBACK", "AWAITING_PLAN_APPROVAL", "PAUSED"})
# Nothing runs upstream any more, or it waits on a person: such a session is never deleted.
SETTLED_STATES = frozenset({"COMPLETED", "FAILED", "AWAITING_USER_FEEDBACK", "PAUSED"})


# ---- wire shapes (unknown fields are ignored) ------------------------------------------------

class _AgentMessaged(msgspec.Struct, rename="camel"):
    agent_message: str = ""


class _ProgressUpdated(msgspec.Struct):
    title: str = ""
    description: str = ""


class _SessionFailed(msgspec.Struct):
    reason: str = ""


class _Activity(msgspec.Struct, rename="camel"):
    name: str = ""
    id: str = ""
    agent_messaged: _AgentMessaged | None = None
    progress_updated: _ProgressUpdated | None = None
    session_completed: dict[str, Any] | None = None
    session_failed: _SessionFailed | None = None


class _ActivityPage(msgspec.Struct, rename="camel"):
    activities: list[_Activity] = []
    next_page_token: str = ""


class _PullRequest(msgspec.Struct):
    url: str = ""
    title: str = ""


class _GitPatch(msgspec.Struct, rename="camel"):
    unidiff_patch: str = ""
    suggested_commit_message: str = ""


class _ChangeSet(msgspec.Struct, rename="camel"):
    git_patch: _GitPatch | None = None


class _Output(msgspec.Struct, rename="camel"):
    pull_request: _PullRequest | None = None
    change_set: _ChangeSet | None = None


class _Session(msgspec.Struct):
    name: str = ""
    id: str = ""
    state: str = ""
    outputs: list[_Output] = []


@dataclass
class _Run:
    """What one call has seen of its session so far."""

    id: str
    state: str = "QUEUED"
    seen: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    progress: str = ""
    outputs: list[_Output] = field(default_factory=list)
    completed: bool = False
    failure: str | None = None  # set once the session failed ("" = no reason given)

    @property
    def settled(self) -> bool:
        """Nothing runs upstream any more, or it waits on a person (not on us)."""
        return self.completed or self.failure is not None or self.state in SETTLED_STATES


# ---- pure helpers -----------------------------------------------------------------------------

def known_model(model: str) -> bool:
    """``default`` (repoless) or ``sources/...`` (a connected source, optionally ``@BRANCH``)."""
    return model == DEFAULT_MODEL or (model.startswith(SOURCE_PREFIX) and len(model) > len(SOURCE_PREFIX))


def build_prompt(messages: Sequence[Message]) -> str:
    """System text first, then the conversation (a lone user message as is), blank-line separated."""
    return conversation_text(messages)


def source_context(model: str) -> dict[str, Any] | None:
    """The ``sourceContext`` a model names (None for a repoless session)."""
    if model == DEFAULT_MODEL:
        return None
    source, _, branch = model.partition("@")
    context: dict[str, Any] = {"source": source}
    if branch:
        context["githubRepoContext"] = {"startingBranch": branch}
    return context


def _output_text(run: _Run) -> str:
    """The answer of a completed session without agent messages: its outputs, else its last progress."""
    parts: list[str] = []
    for output in run.outputs:
        pr = output.pull_request
        if pr is not None and pr.url:
            parts.append(" ".join(p for p in ("Pull request:", pr.title, pr.url) if p))
        patch = output.change_set.git_patch if output.change_set is not None else None
        if patch is not None and (patch.suggested_commit_message or patch.unidiff_patch):
            parts.append("\n\n".join(p for p in (patch.suggested_commit_message, patch.unidiff_patch) if p))
    return "\n\n".join(parts) or run.progress


# ---- the provider -----------------------------------------------------------------------------

T = TypeVar("T")


class JulesProvider:
    """The Jules task API as a provider: create a session, poll it, delete it when abandoned."""

    name = "jules"
    key_env = ("JULES_API_KEY",)
    default_base_url = "https://jules.googleapis.com/v1alpha"

    # Waiting for the agent between polls (class attributes so tests can shorten them).
    POLL_INITIAL_S = 0.5
    POLL_MAX_S = 5.0
    STOP_TIMEOUT_S = 2.0  # the shielded cleanup that deletes an abandoned session
    PAGE_SIZE = 100  # activities per page, the API's maximum

    def __init__(self, cfg: ProviderConfig, env: Mapping[str, str] | None = None, *,
                 server: ServerConfig | None = None) -> None:
        env = os.environ if env is None else env
        self.cfg = cfg
        self.base_url = (cfg.base_url or self.default_base_url).rstrip("/")
        self._key = Key.configured(env, cfg.api_key_env, self.key_env)
        self.key = self._key.value
        self.auth = ApiKeyHeader(self._key, "X-Goog-Api-Key", provider=self.name)
        self.transport = HttpTransport.configured(self.name, self.base_url, cfg, server, self.auth.secrets)

    def status(self) -> ProviderStatus:
        return self._key.status()

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return self.auth.secrets()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def _fetch(self, request: HttpRequest, kind: type[T]) -> T:
        session = await self.auth.session(self.transport)
        return await self.transport.fetch(request, lambda data: msgspec.convert(data, kind), headers=session.headers)

    async def _get(self, path: str, kind: type[T], params: Mapping[str, str] | None = None) -> T:
        return await self._fetch(HttpRequest(method="GET", path=path, params=params), kind)

    # ---- probe -------------------------------------------------------------------------------

    async def probe(self) -> ProviderStatus:
        """``GET /sources``: proves the key without starting a session."""
        try:
            await self._get("/sources", object, {"pageSize": "1"})
        except errors.MissingCredentials as exc:
            return ProviderStatus(False, exc.message, state="invalid")
        return ProviderStatus(True)

    # ---- one call ----------------------------------------------------------------------------

    async def complete(self, call: Call, on_delta: OnDelta | None = None) -> Completion:
        if not known_model(call.model):
            raise errors.ProviderNotFound(
                f"unknown jules model {call.model!r}: use jules:default (repoless) or "
                f"jules:sources/github/OWNER/REPO[@BRANCH]")
        prompt = build_prompt(call.messages)
        body: dict[str, Any] = {"prompt": prompt, "requirePlanApproval": False}
        context = source_context(call.model)
        if context is not None:
            body["sourceContext"] = context
        session = await self._fetch(HttpRequest(method="POST", path="/sessions", body=body), _Session)
        session_id = session.id or session.name.rpartition("/")[2]
        if not session_id:
            raise errors.ProviderError("jules: the created session has no id")
        run = _Run(session_id, state=session.state or "QUEUED")
        try:
            await self._follow(run, on_delta)
        except BaseException:
            if not run.settled:
                await self._stop(run.id)
            raise
        text = "\n\n".join(run.messages) if run.messages else _output_text(run)
        usage = Usage(prompt_tokens=estimate_tokens(prompt), completion_tokens=estimate_tokens(text))
        return Completion(text=text, usage=usage, finish_reason="stop")

    async def _follow(self, run: _Run, on_delta: OnDelta | None) -> None:
        """Poll until the session completes or waits on a person; raise when it failed or is stuck."""
        delay = self.POLL_INITIAL_S
        while True:
            await trio.sleep(delay)
            session: _Session = await self._get(f"/sessions/{run.id}", _Session)
            run.state = session.state or run.state
            run.outputs = session.outputs
            progressed = await self._read_activities(run, on_delta)
            if run.state == "FAILED" and run.failure is None:
                run.failure = ""
            if run.failure is not None:
                reason = clip(run.failure, 500, self.secrets) or "no reason given"
                raise errors.ProviderError(f"jules session {run.id} failed: {reason}")
            if run.completed or run.state == "COMPLETED":
                run.completed = True
                return
            if run.state == "AWAITING_USER_FEEDBACK":
                if run.messages:
                    return  # the agent asked or answered and waits: that is the reply
                raise errors.ProviderError(f"jules session {run.id} waits for user input but posted no message")
            if run.state in WAITING_STATES:
                raise errors.ProviderError(
                    f"jules session {run.id} is {run.state} and nobody in llmsrv will act on it")
            delay = self.POLL_INITIAL_S if progressed else min(delay * 2, self.POLL_MAX_S)

    async def _read_activities(self, run: _Run, on_delta: OnDelta | None) -> bool:
        """Read every page of activities; handle the unseen ones in order. True if any was new."""
        token = ""
        progressed = False
        while True:
            params = {"pageSize": str(self.PAGE_SIZE)}
            if token:
                params["pageToken"] = token
            page: _ActivityPage = await self._get(f"/sessions/{run.id}/activities", _ActivityPage, params)
            for activity in page.activities:
                key = activity.name or activity.id
                if key in run.seen:
                    continue
                run.seen.add(key)
                progressed = True
                self._observe(run, activity, on_delta)
            if not page.next_page_token or page.next_page_token == token:
                return progressed
            token = page.next_page_token

    @staticmethod
    def _observe(run: _Run, activity: _Activity, on_delta: OnDelta | None) -> None:
        if activity.agent_messaged is not None and activity.agent_messaged.agent_message:
            text = activity.agent_messaged.agent_message
            if on_delta is not None:
                on_delta(("\n\n" if run.messages else "") + text)
            run.messages.append(text)
        if activity.progress_updated is not None:
            update = activity.progress_updated
            run.progress = update.description or update.title or run.progress
        if activity.session_completed is not None:
            run.completed = True
        if activity.session_failed is not None:
            run.failure = activity.session_failed.reason

    async def _stop(self, session_id: str) -> None:
        """Best effort, shielded and bounded: delete a session we walk away from."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.STOP_TIMEOUT_S):
            try:
                session = await self.auth.session(self.transport)
                await self.transport.check(HttpRequest(method="DELETE", path=f"/sessions/{session_id}"),
                                           headers=session.headers)
            except errors.LlmsrvError as exc:
                log.warning("jules: could not delete abandoned session %s: %s", session_id, exc.message)
