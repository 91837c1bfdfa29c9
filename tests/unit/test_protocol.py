"""``decode_client_message``: every client message type, and every error it raises with its code,
its exact message and the request id it echoes (docs/protocol.md, "Messages")."""

from __future__ import annotations

import pytest

from atlas.protocol import (
    AgentCancel,
    AgentStream,
    AgentText,
    Broadcast,
    Ping,
    PrefsGet,
    PrefsSet,
    ProtocolError,
    UsageGet,
    decode_client_message,
)

KNOWN = ("known: agent:cancel, agent:list, agent:resume, agent:stream, agent:text, broadcast, ping, prefs:get, "
         "prefs:set, usage:get")


@pytest.mark.parametrize(("frame", "expected"), [
    ('{"type": "agent:stream", "message": "hi", "id": "r1", "agentId": "poet", "conversationId": "c1",'
     ' "options": {"temperature": 0.5}}',
     AgentStream("hi", id="r1", agent_id="poet", conversation_id="c1", options={"temperature": 0.5})),
    ('{"type": "agent:stream", "message": "hi"}', AgentStream("hi")),
    ('{"type": "agent:text", "message": "hi", "id": "t1"}', AgentText("hi", id="t1")),
    ('{"type": "agent:cancel", "id": "r1"}', AgentCancel("r1")),
    ('{"type": "prefs:get"}', PrefsGet()),
    ('{"type": "prefs:set", "prefs": {"theme": "dark", "n": null}}', PrefsSet({"theme": "dark", "n": None})),
    ('{"type": "broadcast", "data": {"x": [1, 2]}}', Broadcast({"x": [1, 2]})),
    ('{"type": "broadcast"}', Broadcast(None)),
    ('{"type": "ping"}', Ping()),
    ('{"type": "usage:get"}', UsageGet()),
    ('{"type": "usage:get", "since": "2025-01-01"}', UsageGet(since="2025-01-01")),
])
def test_every_message_type_decodes(frame, expected):
    message = decode_client_message(frame)
    assert type(message) is type(expected)
    assert message == expected
    assert decode_client_message(frame.encode()) == expected  # bytes as well as str


def test_agent_text_is_not_taken_for_agent_stream():
    # AgentText subclasses AgentStream: the tag, not isinstance, tells the relay which one it got.
    assert type(decode_client_message('{"type": "agent:text", "message": "x"}')) is AgentText
    assert type(decode_client_message('{"type": "agent:stream", "message": "x"}')) is AgentStream


def error_of(frame: str | bytes) -> tuple[str, str, str | None]:
    with pytest.raises(ProtocolError) as caught:
        decode_client_message(frame)
    error = caught.value
    assert str(error) == error.message
    assert (error.body().code, error.body().message) == (error.code, error.message)
    return error.code, error.message, error.request_id


@pytest.mark.parametrize("frame", ["not json", '{"type": ', "", '{"type": "ping"} trailing', b"\xff\xfe"])
def test_not_json_is_bad_json(frame):
    assert error_of(frame) == ("bad_json", "the frame is not valid JSON", None)


@pytest.mark.parametrize("frame", ["[1, 2]", '"ping"', "null", "42", "[" * 10_000 + "]" * 10_000])
def test_not_an_object_is_bad_message(frame):
    assert error_of(frame) == ("bad_message", 'a message must be a JSON object with a "type"', None)


@pytest.mark.parametrize(("frame", "request_id"), [
    ("{}", None),
    ('{"id": "r9", "message": "hi"}', "r9"),
    ('{"type": null, "id": "r9"}', "r9"),
])
def test_no_type_is_bad_message(frame, request_id):
    assert error_of(frame) == ("bad_message", 'the message has no "type" field', request_id)


@pytest.mark.parametrize(("frame", "shown", "request_id"), [
    ('{"type": "agent:strem", "id": "r2"}', "'agent:strem'", "r2"),
    ('{"type": "AGENT:STREAM"}', "'AGENT:STREAM'", None),
    ('{"type": 5, "id": "r3"}', "'int'", "r3"),
    ('{"type": ["ping"]}', "'list'", None),
    ('{"type": "' + "x" * 200 + '"}', repr("x" * 64), None),  # a long type is cut to 64 characters
])
def test_unknown_type(frame, shown, request_id):
    assert error_of(frame) == ("unknown_type", f"unknown message type {shown}; {KNOWN}", request_id)


@pytest.mark.parametrize(("frame", "message", "request_id"), [
    ('{"type": "agent:stream", "id": "r1"}',
     "agent:stream: Object missing required field `message`", "r1"),
    ('{"type": "agent:text", "message": 5, "id": "r1"}',
     "agent:text: Expected `str`, got `int` - at `$.message`", "r1"),
    ('{"type": "agent:stream", "message": "hi", "mesage": "typo", "id": "r1"}',
     "agent:stream: Object contains unknown field `mesage`", "r1"),
    ('{"type": "agent:stream", "message": "hi", "options": [1]}',
     "agent:stream: Expected `object | null`, got `array` - at `$.options`", None),
    ('{"type": "agent:cancel"}', "agent:cancel: Object missing required field `id`", None),
    ('{"type": "prefs:set", "prefs": []}', "prefs:set: Expected `object`, got `array` - at `$.prefs`", None),
    ('{"type": "prefs:get", "prefs": {}}', "prefs:get: Object contains unknown field `prefs`", None),
    ('{"type": "ping", "id": "p1"}', "ping: Object contains unknown field `id`", "p1"),
    ('{"type": "usage:get", "since": 20250101}', "usage:get: Expected `str | null`, got `int` - at `$.since`", None),
])
def test_a_bad_field_is_bad_message_naming_the_field(frame, message, request_id):
    assert error_of(frame) == ("bad_message", message, request_id)


@pytest.mark.parametrize("bad_id", ["7", "{}", '["r1"]', "true"])
def test_only_a_string_id_is_echoed(bad_id):
    # A non-string id is itself the error; there is no request it could belong to.
    code, message, request_id = error_of('{"type": "agent:stream", "message": "hi", "id": ' + bad_id + "}")
    assert (code, request_id) == ("bad_message", None)
    assert message.startswith("agent:stream: Expected `str | null`, got ") and message.endswith("- at `$.id`")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("frame", [
    '{"type": "broadcast", "data": ' + nested(10_000) + "}",
    '{"type": "prefs:set", "prefs": {"a": ' + nested(10_000) + "}}",
])
def test_too_deep_nesting_is_bad_message(frame):
    assert error_of(frame) == ("bad_message", "the message is nested too deeply", None)


def test_a_deep_array_is_not_a_message():
    assert error_of(nested(10_000)) == ("bad_message", 'a message must be a JSON object with a "type"', None)


def test_too_deep_nesting_does_not_hide_an_unknown_type():
    code, message, request_id = error_of('{"type": "nope", "id": "n1", "x": ' + nested(10_000) + "}")
    assert (code, request_id) == ("unknown_type", "n1")
    assert message.startswith("unknown message type 'nope'")


def test_moderate_nesting_is_fine():
    message = decode_client_message('{"type": "broadcast", "data": ' + nested(100) + "}")
    depth, value = 0, message.data
    while value:
        depth, value = depth + 1, value[0]
    assert depth == 99  # the innermost list is empty


@pytest.mark.parametrize("frame", [
    '{"type": "agent:stream", "id": "r1", "message": "hi", "options": {"a": ' + nested(10_000) + "}}",
    # the id after the deep value; brackets, quotes and escapes inside strings are text
    '{"type": "agent:stream", "message": "[{\\"]", "options": {"a": ' + nested(10_000) + '}, "id": "r1"}',
    # an "id" nested inside a value is not the request's
    b'{"options": {"id": "inner", "a": ' + nested(10_000).encode() + b'}, "type": "agent:text", "id": "r1"}',
])
def test_too_deep_nesting_still_echoes_the_request_id(frame):
    assert error_of(frame) == ("bad_message", "the message is nested too deeply", "r1")


def test_too_deep_nesting_with_a_nested_id_only_echoes_nothing():
    frame = '{"type": "agent:text", "options": {"id": "inner", "a": ' + nested(10_000) + "}}"
    assert error_of(frame) == ("bad_message", "the message is nested too deeply", None)
