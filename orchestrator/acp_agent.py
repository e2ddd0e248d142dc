"""The ``acp`` kind: an agent that speaks the Agent Client Protocol over its stdin and stdout.

A plan's ``agents: {zed: {acp: {command: [gemini, --experimental-acp]}}}`` becomes an
:class:`AcpAgent`. Each attempt renders the task's prompt (as a preset's is, saved beside the
logs, its digest in the provenance), starts the command under the task's isolation with a
pipe on its stdin and stdout (:func:`orchestrator.process.run_command` with ``talk``), and
holds one conversation (:class:`Conversation`): ``initialize``, ``session/new`` with the
worktree as its cwd, one ``session/prompt`` turn. While the turn runs the agent's
``session/update`` notifications are read (its message, tool calls, ``usage_update``) and
its permission requests answered by the plan's policy (:func:`decide`). On a timeout, a
stall or a cancellation the turn is ended with ``session/cancel`` before the agent's
processes are.

The messages are the ``agent-client-protocol`` package's (``acp.schema``): each one the agent
sends is validated by its model before anything of it is used. The package's own connection
runs on asyncio only, so the JSON-RPC exchange here is written on anyio, which serves trio
too. The client offers the agent no file system and no terminal: the agent works in its
worktree with its own tools, under the task's sandbox, and the orchestrator never reads or
writes a file for it.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from pydantic import ValidationError

from envelopes import (
    DEFAULT_ACP_ALLOW,
    AgentInfo,
    AgentSpec,
    ErrorInfo,
    Metrics,
    ToolKind,
    Usage,
    digest,
    env_values,
    loads_bounded,
)

from ._fs import last_line
from ._version import __version__
from .attempt import AttemptOutcome, AttemptRequest, give_prompt
from .command_agent import CommandAgent, ended_abnormally, metrics_of, run_program
from .presets._reading import (
    MAX_TEXT_CHARS,
    classify,
    cost,
    count,
    failure,
    ident,
    make_usage,
    one_line,
    text,
)

if TYPE_CHECKING:
    from .pipes import Pipes

__all__ = ["MAX_MESSAGE_BYTES", "AcpAgent", "Conversation", "decide"]

#: Longest line (one JSON-RPC message) read from an agent.
MAX_MESSAGE_BYTES = 16 << 20
#: Most locations a permission request may name (one naming more is refused).
MAX_LOCATIONS = 100
#: Most parts, and bytes, of a location's path (a longer one is refused, not resolved).
MAX_PATH_PARTS = 256
MAX_PATH_BYTES = 4096
#: Most refused permission requests listed in a task's output.
MAX_REFUSALS_LISTED = 50
#: JSON-RPC's "method not found", for what the client does not offer (files, terminals).
METHOD_NOT_FOUND = -32601
#: ACP's error code for "authentication required".
AUTH_REQUIRED = -32000

#: Kinds of tool call that act on places, which must then all be named and in the worktree.
_PLACED: frozenset[str] = frozenset({"read", "edit", "delete", "move", "search"})


class _Unanswered(Exception):
    """The agent's output ended before it answered a request (the request's method)."""


class _Failed(Exception):
    """The conversation cannot go on: the attempt fails with this error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.error = failure(kind, message)


def decide(
    tool_call: Mapping[str, Any],
    options: Sequence[Mapping[str, Any]],
    *,
    cwd: Path,
    allow: frozenset[str],
) -> tuple[bool, dict[str, Any]]:
    """Answer a permission request by the policy: (granted, the response's ``outcome``).

    Granted when the tool call's ``kind`` is in *allow* and every location it names is
    inside *cwd* (links resolved); a kind that acts on files must name them. The option
    chosen is an ``allow_once`` one (else ``allow_always``) to grant, ``reject_once`` (else
    ``reject_always``) to refuse; with no such option the request is answered ``cancelled``.
    """
    kind = tool_call.get("kind") or "other"
    locations = tool_call.get("locations") or []
    if not isinstance(kind, str) or not isinstance(locations, list):
        return False, _refusal(options)
    places = [_object(location).get("path") for location in locations[: MAX_LOCATIONS + 1]]
    granted = kind in allow and (bool(places) or kind not in _PLACED)
    granted = granted and len(places) <= MAX_LOCATIONS
    granted = granted and all(_inside(place, cwd) for place in places)
    if not granted:
        return False, _refusal(options)
    chosen = _option(options, ("allow_once", "allow_always"))
    return (True, chosen) if chosen is not None else (False, {"outcome": "cancelled"})


def _option(options: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> dict[str, Any] | None:
    """The answer selecting the first of *options* of the first of *kinds* it has, if any."""
    for kind in kinds:
        for option in options:
            if option.get("kind") == kind and isinstance(option.get("optionId"), str):
                return {"outcome": "selected", "optionId": option["optionId"]}
    return None


def _refusal(options: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The answer refusing: the agent's reject option, else ``cancelled``."""
    return _option(options, ("reject_once", "reject_always")) or {"outcome": "cancelled"}


def _object(value: Any) -> dict[str, Any]:
    """*value* when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _inside(place: Any, cwd: Path) -> bool:
    """Whether *place* (a path the agent named, relative to *cwd* or absolute) is in *cwd*.

    A path of more than MAX_PATH_BYTES, or of more than MAX_PATH_PARTS parts, is not:
    resolving it (in the event loop) would cost time the agent chooses."""
    if not isinstance(place, str) or not place or "\0" in place:
        return False
    if len(place) > MAX_PATH_BYTES or place.count("/") > MAX_PATH_PARTS:
        return False
    root = os.path.realpath(cwd)
    resolved = os.path.realpath(os.path.join(root, place))
    return resolved == root or resolved.startswith(root + os.sep)


class Conversation:
    """One attempt's exchange with an ACP agent: what it said, spent and asked, and how it
    ended. :meth:`talk` is given to ``run_command``; the attempt then reads the rest."""

    def __init__(self, prompt: str, *, cwd: Path, allow: frozenset[str], grace: float) -> None:
        self._prompt = prompt
        self._cwd = cwd
        self._allow = allow
        self._grace = grace
        self._pipes: Pipes | None = None
        self._schema: Any = None
        self._cancelling = False
        self._next_id = 0
        self._message: list[str] = []
        self._message_chars = 0
        #: The prompt turn's ``stopReason`` once it ended (None: it did not).
        self.stop_reason: str | None = None
        #: Why the conversation could not go on, if it could not.
        self.error: ErrorInfo | None = None
        self.session_id: str | None = None
        self.tool_calls = 0
        self.granted = 0
        self.refused: list[dict[str, str | None]] = []
        self.cost_usd: float | None = None
        self.context: dict[str, int] | None = None
        self.turn_usage: dict[str, Any] | None = None
        #: The request the agent's output ended without answering, if it did so.
        self.unanswered: str | None = None
        #: Whether the agent answered ``session/cancel`` by ending its turn.
        self.cancelled_cleanly = False

    async def talk(self, pipes: Pipes) -> None:
        """The whole conversation, on *pipes*; its end is in the attributes, never raised.

        Cancelled (the attempt's timeout, a stall, the run cancelled), it asks the agent to
        end its turn (``session/cancel``) and waits for that up to the grace period,
        shielded, before the cancellation goes on.
        """
        self._pipes = pipes
        try:
            await self._converse()
        except _Failed as exc:
            self.error = exc.error
        except _Unanswered as exc:
            self.unanswered = str(exc)
        except OSError:  # it closed its stdin: how it exited will tell why
            pass
        except (ValueError, TypeError, KeyError) as exc:
            # What the agent sent is valid JSON-RPC but not what a step expects: its fault.
            self.error = failure("agent_error", f"the agent's answer cannot be used: {exc}")
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._grace):
                await self._cancel()
            raise

    async def _converse(self) -> None:
        schema = self._schema = await anyio.to_thread.run_sync(
            importlib.import_module, "acp.schema"
        )
        hello = schema.InitializeRequest(
            protocol_version=1,
            client_capabilities=schema.ClientCapabilities(
                fs=schema.FileSystemCapabilities(read_text_file=False, write_text_file=False),
                terminal=False,
            ),
            client_info=schema.Implementation(name="worktree-orchestrator", version=__version__),
        )
        answer = self._valid(schema.InitializeResponse, await self._call("initialize", hello))
        if answer.protocol_version != 1:
            found = answer.protocol_version
            raise _Failed("agent_error", f"the agent speaks ACP version {found}, not 1")
        opened = schema.NewSessionRequest(cwd=str(self._cwd), mcp_servers=[])
        session = self._valid(schema.NewSessionResponse, await self._call("session/new", opened))
        self.session_id = ident(session.session_id)
        if self.session_id is None:
            raise _Failed("agent_error", "the agent's session id is not a short printable string")
        turn = schema.PromptRequest(
            session_id=self.session_id,
            prompt=[schema.TextContentBlock(type="text", text=self._prompt)],
        )
        ended = self._valid(schema.PromptResponse, await self._call("session/prompt", turn))
        self.stop_reason = ended.stop_reason
        if ended.usage is not None:
            self.turn_usage = ended.usage.model_dump()

    def _valid(self, model: Any, result: Any) -> Any:
        """*result* as *model*; a failed attempt (``agent_error``) when it is not one."""
        try:
            return model.model_validate(result)
        except ValidationError as exc:
            where = model.__name__
            raise _Failed(
                "agent_error", f"the agent's {where} is not valid: {exc.errors()[0]['msg']}"
            ) from None

    async def _call(self, method: str, params: Any) -> Any:
        """Send a request; handle what the agent sends meanwhile; return the request's result."""
        self._next_id += 1
        ident_ = self._next_id
        body = params.model_dump(by_alias=True, exclude_none=True, mode="json")
        await self._send({"jsonrpc": "2.0", "id": ident_, "method": method, "params": body})
        while True:
            message = await self._receive()
            if message is None:  # how it then exited (or did not) tells why
                raise _Unanswered(method)
            if "method" in message:
                await self._handle(message)
            elif message.get("id") == ident_:
                if "error" in message:
                    raise self._refusal(method, message["error"])
                return message.get("result")

    def _refusal(self, method: str, error: Any) -> _Failed:
        """The error the agent answered *method* with, as a failure of a kind to act on."""
        error = error if isinstance(error, dict) else {}
        message = text(error.get("message"), 500) or "no message"
        code = error.get("code")
        kind = "auth" if code == AUTH_REQUIRED else classify(message) or "agent_error"
        return _Failed(kind, f"{method} failed: {message}")

    async def _handle(self, message: dict[str, Any]) -> None:
        """A request or notification from the agent."""
        method = message.get("method")
        params = _object(message.get("params"))
        request_id = message.get("id")
        answerable = isinstance(request_id, int | str) and len(str(request_id)) <= 200
        if method == "session/update" and not answerable:
            self._update(params.get("update"))
        elif method == "session/request_permission" and answerable:
            outcome = self._permission(params)
            await self._send({"jsonrpc": "2.0", "id": request_id, "result": {"outcome": outcome}})
        elif answerable:
            error = {"code": METHOD_NOT_FOUND, "message": "not offered by this client"}
            await self._send({"jsonrpc": "2.0", "id": request_id, "error": error})

    def _permission(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The outcome of a permission request, by the policy; the decision is counted. A
        request its model refuses, or one made while the turn is being cancelled, is
        answered ``cancelled``."""
        try:
            request = self._schema.RequestPermissionRequest.model_validate(params)
        except ValidationError:
            request = None
        if request is None or self._cancelling:
            self._refused(
                None, "a permission request that is not valid" if request is None else None
            )
            return {"outcome": "cancelled"}
        tool_call = request.tool_call.model_dump(mode="json", by_alias=True)
        options = [o.model_dump(mode="json", by_alias=True) for o in request.options]
        granted, outcome = decide(tool_call, options, cwd=self._cwd, allow=self._allow)
        if granted:
            self.granted += 1
        else:
            self._refused(tool_call.get("kind"), text(tool_call.get("title"), 400))
        return outcome

    def _refused(self, kind: Any, title: str | None) -> None:
        """Count a refusal, listing it while fewer than MAX_REFUSALS_LISTED are."""
        if len(self.refused) < MAX_REFUSALS_LISTED:
            self.refused.append(
                {
                    "kind": kind if isinstance(kind, str) else None,
                    "title": one_line(title) if title else None,
                }
            )

    def _update(self, update: Any) -> None:
        """A ``session/update``: the agent's message, a tool call, or what it has spent."""
        if not isinstance(update, dict):
            return
        kind = update.get("sessionUpdate")
        if kind == "agent_message_chunk":
            content = update.get("content")
            if isinstance(content, dict) and content.get("type") == "text":
                self._say(text(content.get("text")) or "")
        elif kind == "tool_call":
            self.tool_calls += 1
        elif kind == "usage_update":
            self._spent(update)

    def _say(self, chunk: str) -> None:
        room = MAX_TEXT_CHARS - self._message_chars
        if room > 0 and chunk:
            self._message.append(chunk[:room])
            self._message_chars += min(len(chunk), room)

    def _spent(self, update: Mapping[str, Any]) -> None:
        """A ``usage_update``: the context used and its size, and the session's cost so far."""
        used, size = count(update.get("used")), count(update.get("size"))
        if used is not None and size is not None:
            self.context = {"used": used, "size": size}
        spent = _object(update.get("cost"))
        amount = cost(spent.get("amount")) if spent.get("currency") == "USD" else None
        if amount is not None:
            self.cost_usd = amount  # the session's so far: the last one counts

    @property
    def message(self) -> str:
        """What the agent said (its message chunks, joined; at most MAX_TEXT_CHARS)."""
        return "".join(self._message)

    def usage(self) -> Usage | None:
        """What the agent said it spent: the turn's tokens and the session's cost."""
        tokens = self.turn_usage or {}
        return make_usage(
            input_tokens=tokens.get("input_tokens"),
            output_tokens=tokens.get("output_tokens"),
            cache_read_tokens=tokens.get("cached_read_tokens"),
            cache_write_tokens=tokens.get("cached_write_tokens"),
            total_tokens=tokens.get("total_tokens"),
            cost_usd=self.cost_usd,
            cost_source="reported" if self.cost_usd is not None else None,
            session_id=self.session_id,
        )

    def output(self) -> dict[str, Any]:
        """The task's output: what the agent said and how its turn went."""
        return {
            "result": self.message,
            "session_id": self.session_id,
            "stop_reason": self.stop_reason,
            "tool_calls": self.tool_calls,
            "permissions": {"granted": self.granted, "refused": self.refused},
            "context": self.context,
        }

    async def _cancel(self) -> None:
        """Ask the agent to end its turn, and read until it has (permission requests are
        answered ``cancelled`` meanwhile, as the protocol asks)."""
        if self.session_id is None or self._pipes is None or self.stop_reason is not None:
            return
        self._cancelling = True  # from here on, permission requests are answered cancelled
        try:
            await self._send(
                {
                    "jsonrpc": "2.0",
                    "method": "session/cancel",
                    "params": {"sessionId": self.session_id},
                }
            )
            while (message := await self._receive()) is not None:
                if "method" in message:
                    await self._handle(message)
                elif message.get("id") == self._next_id:
                    self.cancelled_cleanly = True
                    return
        except (OSError, _Failed, _Unanswered):
            return

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._pipes is not None
        await self._pipes.send(json.dumps(message).encode("ascii") + b"\n")

    async def _receive(self) -> dict[str, Any] | None:
        """The agent's next message (a JSON object); None at the end of its output. A line
        that is not JSON (a log line on stdout) is passed over."""
        from .pipes import LineTooLong

        assert self._pipes is not None
        while True:
            try:
                line = await self._pipes.receive_line(MAX_MESSAGE_BYTES)
            except LineTooLong:
                raise _Failed(
                    "agent_error",
                    f"the agent wrote a message of more than {MAX_MESSAGE_BYTES >> 20} MiB",
                ) from None
            if line is None:
                return None
            try:
                message = loads_bounded(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                return message


@dataclass(frozen=True)
class AcpAgent:
    """An Agent Client Protocol agent, started by ``command`` in the task's worktree."""

    command: tuple[str, ...]
    allow: frozenset[ToolKind] = frozenset(DEFAULT_ACP_ALLOW)
    env: Mapping[str, str] = field(default_factory=dict)

    #: A program, which can be sandboxed.
    in_process = False
    #: Its stdout (the conversation, as it wrote it) and stderr go to the log files.
    writes_logs = True

    @classmethod
    def from_spec(cls, spec: AgentSpec) -> AcpAgent:
        """The agent a plan's ``agents`` entry with ``acp`` describes."""
        if spec.acp is None:
            raise ValueError("an ACP agent needs acp: {command: [...]}")
        return cls(
            command=tuple(spec.acp.command),
            allow=frozenset(spec.acp.allow),
            env=env_values(spec.env),
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AcpAgent:
        """The agent of ``{"acp": {"command": [...], "allow": [...]}, "env": ...}``."""
        from .command_agent import refuse_task_settings

        spec = AgentSpec.model_validate(dict(options))
        refuse_task_settings(spec, "the agent", allowed={"acp"})
        return cls.from_spec(spec)

    @property
    def _program(self) -> CommandAgent:
        """The command, as a command agent runs it (placeholders, program lookup)."""
        return CommandAgent(command=self.command, env=self.env)

    def info(self, program: str | None = None) -> AgentInfo:
        """Provenance: the command as written and the program it resolved to."""
        return AgentInfo(kind="acp", command=list(self.command), program=program)

    def fingerprint(self, plan_dir: Path) -> str:
        """The command's fingerprint (its program and the plan's files it runs) and the
        permission policy. Blocking."""
        return digest({"command": self._program.fingerprint(plan_dir), "allow": sorted(self.allow)})

    async def run_attempt(self, request: AttemptRequest) -> AttemptOutcome:
        """Render the prompt, start the agent, hold one prompt turn, and judge how it went."""
        prompt = await give_prompt(request)
        if isinstance(prompt, AttemptOutcome):
            return prompt
        argv = self._program.argv(
            plan_dir=request.plan_dir,
            worktree=request.cwd,
            task_id=request.task_id,
            run_id=request.run_id,
            path_var=request.env.get("PATH", ""),
            venv_bin=request.venv.bin_dir if request.venv else None,
        )
        request.record_command(argv, os.path.realpath(argv[0]) if os.sep in argv[0] else argv[0])
        talk = Conversation(
            prompt.text, cwd=request.cwd, allow=frozenset(self.allow), grace=request.kill_grace
        )
        ran = await run_program(request, argv, talk=talk.talk)
        if isinstance(ran, AttemptOutcome):
            return replace(ran, prompt_sha256=prompt.sha256)
        spawn, proc = ran
        metrics = metrics_of(proc)
        if talk.stop_reason is not None and not (proc.timed_out or proc.stalled):
            outcome = _judge(talk, proc.exit_code, metrics)
        elif talk.error is not None and not (proc.timed_out or proc.stalled):
            outcome = AttemptOutcome("failed", exit_code=proc.exit_code, error=talk.error)
        else:
            outcome = await ended_abnormally(request, spawn, proc) or await _unanswered(
                request, talk, proc.exit_code, metrics
            )
        return replace(outcome, metrics=metrics, usage=talk.usage(), prompt_sha256=prompt.sha256)


async def _unanswered(
    request: AttemptRequest, talk: Conversation, exit_code: int | None, metrics: Metrics
) -> AttemptOutcome:
    """The outcome of an agent that exited by itself before its prompt turn ended."""
    tail = await anyio.to_thread.run_sync(last_line, request.stderr_path)
    message = f"the agent exited with code {exit_code} " + (
        f"without answering {talk.unanswered}" if talk.unanswered else "before its turn ended"
    )
    error = failure(classify(tail) or "agent_error", message + (f": {tail}" if tail else ""))
    return AttemptOutcome("failed", exit_code=exit_code, metrics=metrics, error=error)


#: What a prompt turn's ``stopReason`` other than ``end_turn`` means for the task.
_STOPPED: dict[str, tuple[str, str]] = {
    "max_tokens": ("turn_limit", "the agent reached its token limit"),
    "max_turn_requests": ("turn_limit", "the agent reached its limit of model requests"),
    "refusal": ("agent_error", "the agent refused the task"),
    "cancelled": ("agent_error", "the agent cancelled its turn"),
}


def _judge(talk: Conversation, exit_code: int | None, metrics: Metrics) -> AttemptOutcome:
    """The outcome of a prompt turn that ended: succeeded on ``end_turn``, else why not."""
    usage = talk.usage()
    if talk.stop_reason == "end_turn":
        return AttemptOutcome(
            "succeeded", exit_code=exit_code, output=talk.output(), metrics=metrics, usage=usage
        )
    kind, message = _STOPPED.get(talk.stop_reason or "", ("agent_error", "the turn ended oddly"))
    error = failure(kind, f"{message} (stopReason {talk.stop_reason})")
    return AttemptOutcome("failed", exit_code=exit_code, metrics=metrics, error=error, usage=usage)
