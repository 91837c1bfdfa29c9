"""Agents from a TOML file: ``settings.agents_file``, else ``DATA_DIR/agents.toml`` when it exists,
else the built-in ``atlas-assistant``.

The file holds an array of ``[[agents]]`` tables; option names follow VoltAgent's
(``maxOutputTokens``, ``topP``, ...). Anything the loader cannot use raises ``ConfigError``
naming the file, the agent and the field, so start-up stops with one line.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from atlas.config import ConfigError, Settings
from atlas.llm.types import AgentBudget

AgentId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
TokenCount = Annotated[int, msgspec.Meta(ge=1)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class SamplingOptions(msgspec.Struct, kw_only=True, rename="camel"):
    """The generation options that an agent's defaults and a request's options share
    (VoltAgent's names, camel-cased)."""

    temperature: Temperature | None = None
    max_output_tokens: TokenCount | None = None
    top_p: TopP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    seed: int | None = None
    stop_sequences: list[str] | None = None


class AgentSpec(SamplingOptions, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """One agent: who it is, its system prompt, its model and its default options."""

    id: AgentId
    model: NonEmpty
    name: str = ""
    description: str = ""
    instructions: str = ""

    def describe(self) -> dict[str, Any]:
        """The agent as ``GET /agents`` shows it (VoltAgent's shape)."""
        return {
            "id": self.id,
            "name": self.name or self.id,
            "description": self.description,
            "status": "idle",
            "model": self.model,
            "tools": [],
            "subAgents": [],
            "memory": None,
            "isTelemetryEnabled": False,
            # For the transport's admission step (it bounds the provider request from outside):
            # sizes only, never the instructions themselves.
            "budget": msgspec.to_builtins(self.budget()),
        }

    def budget(self) -> AgentBudget:
        return AgentBudget(len(self.instructions.encode()), self.max_output_tokens)


DEFAULT_AGENT = AgentSpec(
    id="atlas-assistant",
    name="Atlas Assistant",
    description="A helpful general-purpose assistant.",
    instructions="You are Atlas, a helpful assistant. Answer clearly and concisely.",
    model="gpt-4o-mini",
)


class _AgentsFile(msgspec.Struct, forbid_unknown_fields=True):
    agents: list[dict[str, Any]] = []


def agents_file_path(settings: Settings) -> Path | None:
    if settings.agents_file is not None:
        return settings.agents_file
    candidate = settings.data_dir / "agents.toml"
    return candidate if candidate.is_file() else None


def load_agents(settings: Settings) -> dict[str, AgentSpec]:
    """The agents by id, in file order. Raises ``ConfigError`` for a file Atlas cannot use."""
    path = agents_file_path(settings)
    if path is None:
        return {DEFAULT_AGENT.id: DEFAULT_AGENT}
    setting = f"agents file {str(path)!r}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(setting, exc.strerror or str(exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(setting, f"not valid TOML: {exc}") from None
    return parse_agents(data, setting)


def parse_agents(data: dict[str, Any], setting: str) -> dict[str, AgentSpec]:
    try:
        document = msgspec.convert(data, _AgentsFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(setting, _describe(exc, "agents")) from None
    agents: dict[str, AgentSpec] = {}
    for index, table in enumerate(document.agents):
        raw_id = table.get("id")
        label = f"agent {raw_id!r}" if isinstance(raw_id, str) else f"agents[{index}]"
        try:
            agent = msgspec.convert(table, AgentSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(setting, f"{label}: {_describe(exc)}") from None
        if agent.id in agents:
            raise ConfigError(setting, f"{label}: field `id`: duplicate agent id")
        agents[agent.id] = agent
    if not agents:
        raise ConfigError(setting, "defines no agents (add at least one [[agents]] table)")
    return agents


def _describe(exc: msgspec.ValidationError, root: str = "") -> str:
    """msgspec's message, rephrased so the field comes first: ``field `x`: expected ...``."""
    message, _, where = str(exc).partition(" - at `$")
    if message.startswith("Object contains unknown field"):
        field = message.rpartition(" ")[2]
        prefix = f"{where.rstrip('`').lstrip('.')}." if where else ""
        return f"unknown field `{prefix}{field.strip('`')}`"
    if message.startswith("Object missing required field"):
        field = message.rpartition(" ")[2].strip("`")
        return f"field `{field}` is required"
    field = where.rstrip("`").lstrip(".") or root
    return f"field `{field}`: {message[0].lower()}{message[1:]}" if field else message
