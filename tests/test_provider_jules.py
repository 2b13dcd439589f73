"""The Jules provider against a stateful fake Jules API on loopback: session creation, polling to
completion, deltas, failures, error mapping, cancellation (the session is deleted, polling stops),
probe, and one request end to end over real NATS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from llmsrv import errors
from llmsrv.config import ProviderConfig
from llmsrv.messages import FunctionCall, Message, MessageToolCall
from llmsrv.providers import Call
from llmsrv.providers.codecs import HttpRequest
from llmsrv.providers.jules import JulesProvider, build_prompt, known_model, source_context

from .conftest import running, user
from .fakes import CANCEL_CLOSE_BOUND_S, Deltas, FakeUpstream, Hang, Json, Reply, Request, cancel_when

CANARY = "AIza-canary-5e1f7b9d"
SID = "1234567890"
FIXTURES = Path(__file__).with_name("fixtures") / "jules"


class FastJules(JulesProvider):
    POLL_INITIAL_S = 0.01
    POLL_MAX_S = 0.04
    STOP_TIMEOUT_S = 0.3


def agent(i: int, text: str) -> dict[str, Any]:
    return {"name": f"sessions/{SID}/activities/a{i}", "id": f"a{i}", "originator": "agent",
            "agentMessaged": {"agentMessage": text}}


def event(i: int, kind: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": f"sessions/{SID}/activities/e{i}", "id": f"e{i}", "originator": "system",
            kind: payload or {}}


PLAN = event(1, "planGenerated", {"plan": {"id": "p1", "steps": [{"id": "s1", "index": 0, "title": "Look"}]}})
PROGRESS = event(2, "progressUpdated", {"title": "Reading", "description": "Reading the prompt"})
COMPLETED = event(9, "sessionCompleted")


# The input fields of a Session (R/sessions#Session; automationMode in jules.google/docs/api/reference/types);
# the output-only ones (name, id, state, ...) are ignored by the API when sent, like any Google API.
SESSION_INPUT = {"prompt", "sourceContext", "title", "requirePlanApproval", "automationMode"}
OUTPUT_ONLY = {"name", "id", "createTime", "updateTime", "state", "url", "outputs"}


def create_problems(body: Any) -> list[str]:
    """What the Jules API refuses in a ``POST /sessions`` body, in Google's own words (ESF's
    "Invalid JSON payload received" / "Invalid value at" messages for unknown names and wrong types)."""
    if not isinstance(body, dict):
        return ["Invalid JSON payload received. Expected an object."]
    found = [f'Invalid JSON payload received. Unknown name "{k}" at \'session\': Cannot find field.'
             for k in body if k not in SESSION_INPUT | OUTPUT_ONLY]
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        found.append("Request contains an invalid argument. (session.prompt is required)")
    if "requirePlanApproval" in body and not isinstance(body["requirePlanApproval"], bool):
        found.append(f"Invalid value at 'session.require_plan_approval' (TYPE_BOOL), {body['requirePlanApproval']!r}")
    context = body.get("sourceContext")
    if context is not None:
        if not isinstance(context, dict) or not str(context.get("source", "")).startswith("sources/"):
            found.append("Request contains an invalid argument. (session.source_context.source)")
        else:
            found += [f'Invalid JSON payload received. Unknown name "{k}" at \'session.source_context\': '
                      "Cannot find field." for k in context if k not in ("source", "githubRepoContext")]
            repo = context.get("githubRepoContext", {})
            found += [f'Invalid JSON payload received. Unknown name "{k}" at '
                      "'session.source_context.github_repo_context': Cannot find field."
                      for k in (repo if isinstance(repo, dict) else {"<not an object>": 0}) if k != "startingBranch"]
    return found


def invalid_argument(problems: list[str]) -> Json:
    """Google's 400 for a refused request body (google.rpc.Status with a BadRequest detail)."""
    return Json({"error": {"code": 400, "message": problems[0], "status": "INVALID_ARGUMENT", "details": [
        {"@type": "type.googleapis.com/google.rpc.BadRequest",
         "fieldViolations": [{"field": "session", "description": p} for p in problems]}]}}, status=400)


class FakeJules:
    """A Jules API whose session moves one step per poll: ``steps[k]`` = (state, new activities).

    Activities are served two per page, so a poll follows ``nextPageToken``. ``hang_poll`` makes
    that poll's ``GET /sessions/{id}`` never answer; ``hang_delete`` does the same for DELETE.
    """

    def __init__(self, steps: list[tuple[str, list[dict[str, Any]]]], *, outputs: list[Any] | None = None,
                 fail: dict[str, Json] | None = None, hang_poll: int | None = None,
                 hang_delete: bool = False) -> None:
        self.steps = steps
        self.outputs = outputs or []
        self.fail = fail or {}  # "create" | "poll" | "activities" | "sources" -> reply
        self.hang_poll = hang_poll
        self.hang_delete = hang_delete
        self.polls = 0
        self.poll_times: list[float] = []
        self.deletes: list[float] = []
        self.problems: list[str] = []  # what the real API would have refused in a create body

    @property
    def step(self) -> tuple[str, list[dict[str, Any]]]:
        return self.steps[min(self.polls, len(self.steps)) - 1]

    def visible(self) -> list[dict[str, Any]]:
        return [a for _, new in self.steps[: min(self.polls, len(self.steps))] for a in new]

    def __call__(self, r: Request) -> Reply:
        if r.method == "POST" and r.path == "/sessions":
            if problems := create_problems(r.json()):
                self.problems += problems
                return invalid_argument(problems)
            return self.fail.get("create") or Json({"name": f"sessions/{SID}", "id": SID, "state": "QUEUED",
                                                    "prompt": r.json()["prompt"]})
        if r.method == "GET" and r.path == f"/sessions/{SID}":
            self.polls += 1
            self.poll_times.append(trio.current_time())
            if self.polls == self.hang_poll:
                return Hang()
            return self.fail.get("poll") or Json({"name": f"sessions/{SID}", "id": SID, "state": self.step[0],
                                                  "outputs": self.outputs})
        if r.method == "GET" and r.path == f"/sessions/{SID}/activities":
            if "activities" in self.fail:
                return self.fail["activities"]
            offset = int(dict(p.split("=") for p in r.query.split("&")).get("pageToken", "0"))
            items = self.visible()
            page: dict[str, Any] = {"activities": items[offset: offset + 2]}
            if offset + 2 < len(items):
                page["nextPageToken"] = str(offset + 2)
            return Json(page)
        if r.method == "DELETE" and r.path == f"/sessions/{SID}":
            self.deletes.append(trio.current_time())
            return Hang() if self.hang_delete else Json({})
        if r.method == "GET" and r.path == "/sources":
            return self.fail.get("sources") or Json({"sources": [{"name": "sources/github/o/r", "id": "github/o/r"}]})
        return Json({"error": {"code": 404, "message": f"no route {r.method} {r.path}"}}, status=404)


def provider(url: str) -> FastJules:
    return FastJules(ProviderConfig(base_url=url), {"JULES_API_KEY": CANARY})


def call(model: str = "default", messages: list[Message] | None = None) -> Call:
    return Call(model=model, messages=messages or [Message("user", "hi")], max_tokens=100, temperature=0.2)


ROUND_TRIP_CALLS = [MessageToolCall(id="c1", function=FunctionCall(name="grep", arguments='{"q": "bug"}')),
                    MessageToolCall(id="c2", function=FunctionCall(name="run_tests", arguments="{}"))]


# ---- pure parts ------------------------------------------------------------------------------

@pytest.mark.parametrize(("messages", "prompt"), [
    ([Message("user", "hi")], "hi"),
    ([Message("system", "be brief"), Message("user", "hi")], "be brief\n\nhi"),
    ([Message("system", "a"), Message("user", "q1"), Message("assistant", "r1"), Message("system", "b"),
      Message("user", "q2")], "a\n\nb\n\nUser: q1\n\nAssistant: r1\n\nUser: q2"),
    ([Message("assistant", "r"), Message("tool", "42")], "Assistant: r\n\nTool: 42"),
    ([Message("user", "fix it"), Message("assistant", "", tool_calls=[ROUND_TRIP_CALLS[0], ROUND_TRIP_CALLS[1]]),
      Message("tool", "ok", tool_call_id="c2"), Message("tool", "a.py", tool_call_id="c1")],
     'User: fix it\n\nAssistant:\nTool call c1: grep {"q": "bug"}\nTool call c2: run_tests {}\n\n'
     "Tool result for c2 (run_tests): ok\n\nTool result for c1 (grep): a.py"),
], ids=["lone-user", "system-first", "conversation", "no-user", "tool-round-trip-out-of-order"])
def test_build_prompt(messages: list[Message], prompt: str) -> None:
    assert build_prompt(messages) == prompt


@pytest.mark.parametrize(("model", "context"), [
    ("default", None),
    ("sources/github/o/r", {"source": "sources/github/o/r"}),
    ("sources/github/o/r@dev", {"source": "sources/github/o/r", "githubRepoContext": {"startingBranch": "dev"}}),
], ids=["repoless", "source", "source-branch"])
def test_source_context(model: str, context: object) -> None:
    assert source_context(model) == context


# ---- one call --------------------------------------------------------------------------------

async def test_create_poll_complete_and_deltas() -> None:
    fake = FakeJules([("PLANNING", [PLAN]), ("IN_PROGRESS", [PROGRESS, agent(3, "Hello")]),
                      ("IN_PROGRESS", []), ("IN_PROGRESS", [agent(4, "World"), COMPLETED])])
    deltas: list[str] = []
    async with FakeUpstream(fake) as up:
        started = trio.current_time()
        done = await provider(up.url).complete(
            call(messages=[Message("system", "be brief"), Message("user", "hi")]), deltas.append)
        took = trio.current_time() - started
    create = up.requests[0]
    assert (create.method, create.path) == ("POST", "/sessions")
    assert create.headers["x-goog-api-key"] == CANARY
    assert create.headers["content-type"] == "application/json"
    assert "authorization" not in create.headers
    assert create.json() == {"prompt": "be brief\n\nhi", "requirePlanApproval": False}
    assert fake.problems == []
    assert done.text == "Hello\n\nWorld"
    assert deltas == ["Hello", "\n\nWorld"] and "".join(deltas) == done.text
    assert done.finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)  # estimated, ~4 chars a token
    assert fake.polls == 4 and not fake.deletes
    tokens = [r.query for r in up.requests if r.path.endswith("/activities")]
    assert all("pageSize=100" in q for q in tokens)
    assert any("pageToken=2" in q for q in tokens)  # nextPageToken was followed
    assert all(r.headers["x-goog-api-key"] == CANARY for r in up.requests)
    assert took < 1.5  # the fast intervals were used: the default ones (0.5 s doubling) take over 2 s


async def test_source_context_sent_only_for_a_source_model() -> None:
    fake = FakeJules([("COMPLETED", [agent(1, "done")])])
    async with FakeUpstream(fake) as up:
        done = await provider(up.url).complete(call("sources/github/o/r@main"))
    assert done.text == "done"
    assert up.requests[0].json()["sourceContext"] == {"source": "sources/github/o/r",
                                                      "githubRepoContext": {"startingBranch": "main"}}
    assert fake.problems == []


async def test_a_tool_round_trip_goes_into_the_prompt_with_each_result_beside_its_call() -> None:
    messages = [Message("system", "be careful"), Message("user", "fix it"),
                Message("assistant", "Looking.", tool_calls=ROUND_TRIP_CALLS),
                Message("tool", "ok", tool_call_id="c2"), Message("tool", "a.py", tool_call_id="c1")]
    fake = FakeJules([("COMPLETED", [agent(1, "Fixed a.py")])])
    async with FakeUpstream(fake) as up:
        done = await provider(up.url).complete(call(messages=messages))
    assert fake.problems == []
    assert up.requests[0].json() == {"requirePlanApproval": False, "prompt": (
        "be careful\n\nUser: fix it\n\nAssistant: Looking.\n"
        'Tool call c1: grep {"q": "bug"}\nTool call c2: run_tests {}\n\n'
        "Tool result for c2 (run_tests): ok\n\nTool result for c1 (grep): a.py")}
    assert done.text == "Fixed a.py"


async def test_a_body_the_api_refuses_fails_as_google_answers_it() -> None:
    """The fake refuses what the real API refuses: an unknown Session field is Google's 400
    INVALID_ARGUMENT ("Unknown name ... Cannot find field"), which is VALIDATION_ERROR here."""
    fake = FakeJules([("COMPLETED", [])])
    async with FakeUpstream(fake) as up:
        jules = provider(up.url)
        with pytest.raises(errors.ValidationFailed) as info:
            await jules._fetch(HttpRequest(method="POST", path="/sessions",
                                           body={"prompt": "hi", "tittle": "typo"}), dict)
    assert info.value.error_code == "VALIDATION_ERROR"
    assert 'Unknown name "tittle"' in info.value.message
    assert fake.problems == ['Invalid JSON payload received. Unknown name "tittle" at \'session\': Cannot find field.']


# ---- Google's SDK's recorded shapes (tests/fixtures/jules/SOURCES.md) ----------------------------

def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


async def test_the_sdk_repoless_session_completes_with_its_patch() -> None:
    """jules-sdk's repoless mock: a create reply with only id and name, a session whose state is
    lower case (so only the ``sessionCompleted`` activity says it is done) and a changeSet output."""
    session, activities = fixture("repoless_session.json"), fixture("repoless_activities.json")
    sid = session["id"]

    def handler(r: Request) -> Reply:
        if (r.method, r.path) == ("POST", "/sessions"):
            problems.extend(create_problems(r.json()))
            return Json({"id": sid, "name": f"sessions/{sid}"})
        if (r.method, r.path) == ("GET", f"/sessions/{sid}"):
            return Json(session)
        if (r.method, r.path) == ("GET", f"/sessions/{sid}/activities"):
            return Json(activities)
        return Json({"error": {"code": 404, "message": "no route"}}, status=404)

    problems: list[str] = []
    async with FakeUpstream(handler) as up:
        done = await provider(up.url).complete(call())
    assert problems == [] and "sourceContext" not in up.requests[0].json()
    patch = session["outputs"][0]["changeSet"]["gitPatch"]
    assert done.text == f"Add hello function\n\n{patch['unidiffPatch']}"
    assert not [r for r in up.requests if r.method == "DELETE"]  # completed: nothing to stop


@pytest.mark.parametrize(("kind", "outcome"), [
    ("agentMessaged", "Hello there!"),
    ("progressUpdated", "Analyzing the request..."),
    ("sessionFailed", "failed: Something went wrong."),
], ids=["agent-message-is-the-answer", "progress-stands-in-without-messages", "failure-reason"])
async def test_the_sdk_activity_shapes(kind: str, outcome: str) -> None:
    activity = {**fixture("mapper_activities.json")[kind], "name": f"sessions/{SID}/activities/456"}
    fake = FakeJules([("IN_PROGRESS", [activity]), ("COMPLETED", [COMPLETED])])
    async with FakeUpstream(fake) as up:
        if kind == "sessionFailed":
            with pytest.raises(errors.ProviderError, match=outcome):
                await provider(up.url).complete(call())
        else:
            assert (await provider(up.url).complete(call())).text == outcome
    assert fake.problems == []


class BackoffJules(FastJules):
    # Wider than FastJules so that a busy machine's scheduling delay (tens of ms) cannot blur the steps.
    POLL_INITIAL_S = 0.05
    POLL_MAX_S = 0.2


async def test_backoff_doubles_to_the_cap_and_resets_on_progress() -> None:
    fake = FakeJules([("IN_PROGRESS", [])] * 5 + [("IN_PROGRESS", [agent(1, "x")]), ("IN_PROGRESS", []),
                                                   ("COMPLETED", [COMPLETED])])
    async with FakeUpstream(fake) as up:
        await BackoffJules(ProviderConfig(base_url=up.url), {"JULES_API_KEY": CANARY}).complete(call())
    gaps = [b - a for a, b in zip(fake.poll_times, fake.poll_times[1:], strict=False)]
    # 0.1, 0.2, 0.2 (cap), 0.2, 0.2, then progress at poll 6 -> 0.05 again; trio never wakes early
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.2
    assert gaps[2] < 0.4  # capped: without the cap it would be 0.4 plus the request time
    assert gaps[5] < gaps[4]  # 0.05 after progress against 0.2


async def test_completed_without_messages_returns_the_outputs() -> None:
    outputs = [{"pullRequest": {"url": "https://github.com/o/r/pull/7", "title": "Fix"}}]
    fake = FakeJules([("IN_PROGRESS", [PROGRESS]), ("COMPLETED", [COMPLETED])], outputs=outputs)
    async with FakeUpstream(fake) as up:
        done = await provider(up.url).complete(call())
    assert done.text == "Pull request: Fix https://github.com/o/r/pull/7"


async def test_failed_session_is_a_provider_error_with_the_reason_redacted() -> None:
    failed = event(5, "sessionFailed", {"reason": f"sandbox crashed (key {CANARY})"})
    fake = FakeJules([("IN_PROGRESS", [agent(1, "trying")]), ("IN_PROGRESS", [failed])])
    async with FakeUpstream(fake) as up:
        with pytest.raises(errors.ProviderError) as info:
            await provider(up.url).complete(call())
    assert info.value.error_code == "PROVIDER_ERROR"
    assert "sandbox crashed" in info.value.message and CANARY not in info.value.message
    assert not fake.deletes  # a failed session has nothing left to stop


async def test_failed_state_without_activity() -> None:
    fake = FakeJules([("IN_PROGRESS", []), ("FAILED", [])])
    async with FakeUpstream(fake) as up:
        with pytest.raises(errors.ProviderError, match="no reason given"):
            await provider(up.url).complete(call())


async def test_awaiting_user_feedback_returns_the_question() -> None:
    fake = FakeJules([("IN_PROGRESS", []), ("AWAITING_USER_FEEDBACK", [agent(1, "Which file?")])])
    async with FakeUpstream(fake) as up:
        done = await provider(up.url).complete(call())
    assert (done.text, done.finish_reason) == ("Which file?", "stop")
    assert not fake.deletes


async def test_awaiting_user_feedback_without_a_message_fails() -> None:
    fake = FakeJules([("AWAITING_USER_FEEDBACK", [])])
    async with FakeUpstream(fake) as up:
        with pytest.raises(errors.ProviderError, match="user input"):
            await provider(up.url).complete(call())
    assert not fake.deletes


async def test_awaiting_plan_approval_fails_and_deletes_the_session() -> None:
    fake = FakeJules([("AWAITING_PLAN_APPROVAL", [PLAN])])
    async with FakeUpstream(fake) as up:
        with pytest.raises(errors.ProviderError, match="AWAITING_PLAN_APPROVAL"):
            await provider(up.url).complete(call())
    assert len(fake.deletes) == 1


@pytest.mark.parametrize(("status", "error", "code"), [
    (401, errors.MissingCredentials, "MISSING_CREDENTIALS"),
    (403, errors.MissingCredentials, "MISSING_CREDENTIALS"),
    (404, errors.ProviderNotFound, "PROVIDER_NOT_FOUND"),
    (429, errors.RateLimited, "RATE_LIMITED"),
    (500, errors.ProviderError, "PROVIDER_ERROR"),
], ids=["401", "403", "404", "429", "500"])
async def test_create_error_mapping(status: int, error: type[errors.LlmsrvError], code: str) -> None:
    reply = Json({"error": {"code": status, "message": f"API key {CANARY} rejected", "status": "X"}},
                 status=status, headers={"retry-after": "3"})
    fake = FakeJules([("COMPLETED", [])], fail={"create": reply})
    async with FakeUpstream(fake) as up:
        with pytest.raises(error) as info:
            await provider(up.url).complete(call())
    assert info.value.error_code == code
    assert CANARY not in info.value.message and CANARY not in str(info.value)
    if status == 429:
        assert info.value.retry_after_ms == 3000
    assert fake.polls == 0 and not fake.deletes


async def test_error_while_polling_deletes_the_session() -> None:
    fake = FakeJules([("IN_PROGRESS", [])], fail={"activities": Json({"error": {"message": "boom"}}, status=500)})
    async with FakeUpstream(fake) as up:
        with pytest.raises(errors.ProviderError, match="HTTP 500"):
            await provider(up.url).complete(call())
    assert len(fake.deletes) == 1


async def test_unknown_model_makes_no_request() -> None:
    async with FakeUpstream(FakeJules([])) as up:
        jules = provider(up.url)
        with pytest.raises(errors.ProviderNotFound):
            await jules.complete(call("gpt-4o"))
    assert up.requests == []
    assert known_model("default") and known_model("sources/github/o/r") and not known_model("sources/")


# ---- cancellation ----------------------------------------------------------------------------

async def test_cancel_mid_poll_deletes_the_session_and_stops_polling() -> None:
    fake = FakeJules([("IN_PROGRESS", [agent(1, "working")])])  # never completes
    deltas: list[str] = []
    async with FakeUpstream(fake) as up:
        jules = provider(up.url)
        deltas = Deltas()
        # cancel once the session runs and has reported: the first delta arrived
        cancel = await cancel_when(deltas.wait, lambda: jules.complete(call(), deltas))
        assert cancel.caught  # the cancellation propagated out of complete()
        # the delete was sent during the cancellation, before complete() returned
        assert len(fake.deletes) == 1 and cancel.at <= fake.deletes[0] <= cancel.ended
        polls = fake.polls
        await trio.sleep(5 * FastJules.POLL_MAX_S)  # room for polls that must not come
    assert fake.polls == polls  # nothing polls after the cancellation
    assert max(fake.poll_times) < fake.deletes[0]
    assert deltas.items == ["working"]


async def test_cancel_during_an_inflight_poll_closes_it_and_deletes() -> None:
    fake = FakeJules([("IN_PROGRESS", [])], hang_poll=3)
    async with FakeUpstream(fake) as up:
        jules = provider(up.url)
        # cancel once the third poll is held by the fake (it never answers)
        cancel = await cancel_when(lambda: up.wait_until(lambda: fake.polls >= 3), lambda: jules.complete(call()))
        assert cancel.caught
        assert jules.transport._gate.statistics().borrowed_tokens == 0  # nothing leaked in the limiter
        gone = await up.wait_disconnect()
        assert cancel.at <= gone < cancel.ended  # the hanging GET was abandoned during the cancellation...
        assert gone - cancel.at < CANCEL_CLOSE_BOUND_S  # ...at once
        assert len(fake.deletes) == 1 and gone <= fake.deletes[0]
        await trio.sleep(5 * FastJules.POLL_MAX_S)  # room for polls that must not come
    assert fake.polls == 3


async def test_cleanup_is_bounded_when_delete_hangs() -> None:
    fake = FakeJules([("IN_PROGRESS", [])], hang_delete=True)
    async with FakeUpstream(fake) as up:
        # cancel once the session exists and is being polled: there is something to delete
        cancel = await cancel_when(lambda: up.wait_until(lambda: fake.polls >= 1),
                                   lambda: provider(up.url).complete(call()))
        assert cancel.caught and len(fake.deletes) == 1
    overrun = cancel.ended - cancel.at
    # the hanging delete was waited for, but only STOP_TIMEOUT_S (plus slack for a busy machine)
    assert FastJules.STOP_TIMEOUT_S <= overrun < FastJules.STOP_TIMEOUT_S + 1.0


# ---- probe and status ------------------------------------------------------------------------

async def test_probe_lists_sources_and_never_starts_a_session() -> None:
    ok = FakeJules([])
    refused = FakeJules([], fail={"sources": Json({"error": {"message": f"bad key {CANARY}"}}, status=403)})
    async with FakeUpstream(ok) as up:
        status = await provider(up.url).probe()
    assert status.available and status.state == "available"
    assert [(r.method, r.path) for r in up.requests] == [("GET", "/sources")]
    assert up.requests[0].headers["x-goog-api-key"] == CANARY
    async with FakeUpstream(refused) as up:
        status = await provider(up.url).probe()
    assert (status.available, status.state) == (False, "invalid")
    assert status.reason and "403" in status.reason and CANARY not in status.reason


def test_status_and_defaults() -> None:
    missing = JulesProvider(ProviderConfig(), {})
    assert missing.status().state == "missing" and "JULES_API_KEY" in (missing.status().reason or "")
    ready = JulesProvider(ProviderConfig(), {"JULES_API_KEY": CANARY})
    assert ready.status().available
    assert ready.base_url == "https://jules.googleapis.com/v1alpha"


# ---- end to end over NATS ----------------------------------------------------------------------

async def test_end_to_end_over_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JULES_API_KEY", CANARY)
    monkeypatch.setattr(JulesProvider, "POLL_INITIAL_S", 0.01)
    monkeypatch.setattr(JulesProvider, "POLL_MAX_S", 0.04)
    fake = FakeJules([("IN_PROGRESS", [agent(1, "The answer")]), ("COMPLETED", [COMPLETED])])
    async with FakeUpstream(fake) as up, running(nats_url, providers={"jules": {"base_url": up.url}}) as h:
        reply = await h.client.complete({"messages": user("what is it?"), "model": "jules:default",
                                         "timeout_ms": 5000})
    assert reply.text == "The answer"
    assert reply.model == "jules:default"
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 3
    assert [(a.provider, a.outcome) for a in reply.attempts] == [("jules", "ok")]
    assert up.requests[0].json()["prompt"] == "what is it?"
