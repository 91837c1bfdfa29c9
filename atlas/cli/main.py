"""The ``atlas`` command: ``serve``, ``agent``, ``user ...``, ``usage``, ``chat`` and ``ask``.

Each subcommand's module is imported only when it runs, so ``atlas --help`` stays instant.
Exit codes: 0 success, 1 a failure at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from atlas import __version__
from atlas.config import (
    DEFAULT_AGENT_BIND, DEFAULT_SERVE_BIND, SETTINGS, ConfigError, default_text, load_settings,
)

# Settings each server command accepts as flags (names from config.SETTINGS).
SERVE_SETTINGS = {s.name for s in SETTINGS}
AGENT_SETTINGS = {
    "data_dir", "bind", "agent_secret", "provider_url", "provider_urls", "provider_timeout",
    "provider_retries", "provider_transport", "provider_max_connections", "provider_proxy", "agents_file",
    "log_level", "log_format",
}
USER_SETTINGS = {"data_dir", "database_url", "log_level"}
LIMIT_SETTINGS = {
    "limit_tokens_per_day", "limit_tokens_per_month", "limit_requests_per_minute",
    "limit_concurrent_requests",
}
LIMIT_FLAGS = (
    ("--tokens-per-day", "tokens_per_day", "tokens per UTC day"),
    ("--tokens-per-month", "tokens_per_month", "tokens per UTC month"),
    ("--requests-per-minute", "requests_per_minute", "requests per minute"),
    ("--concurrent-requests", "concurrent_requests", "requests in flight at once"),
)


def add_setting_flags(parser: argparse.ArgumentParser, names: set[str], *, default_bind: str) -> None:
    """A flag per setting, its help naming its variable and default; settings that may hold a
    secret have no flag (a command line is visible to every user of the machine) and are listed
    after the flags."""
    env_only = []
    for setting in SETTINGS:
        if setting.name not in names:
            continue
        default = default_text(setting, default_bind=default_bind)
        described = f"{setting.help} [env {' / '.join(setting.env)}"
        described += f"; default {default}]" if default is not None else "]"
        if setting.flag:
            parser.add_argument(setting.flag, dest=setting.name, default=None, metavar="VALUE", help=described)
        else:
            env_only.append(f"  {setting.env[0]}: {described.replace('%', '%%')}")
    if env_only:
        parser.epilog = "settings read only from the environment (they may hold secrets):\n" + "\n".join(env_only)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas",
        description="Atlas: a self-hosted gateway between people and AI agents.",
    )
    parser.add_argument("--version", action="version", version=f"atlas {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help=f"run the transport and the agent in one process (default {DEFAULT_SERVE_BIND})"
    )
    add_setting_flags(serve, SERVE_SETTINGS, default_bind=DEFAULT_SERVE_BIND)
    serve.set_defaults(handler="atlas.gateway.server:main", default_bind=DEFAULT_SERVE_BIND)

    agent = commands.add_parser(
        "agent", help=f"run the agent HTTP API alone (default {DEFAULT_AGENT_BIND})"
    )
    add_setting_flags(agent, AGENT_SETTINGS, default_bind=DEFAULT_AGENT_BIND)
    agent.set_defaults(handler="atlas.agent_api.server:main", default_bind=DEFAULT_AGENT_BIND)

    user = commands.add_parser("user", help="manage built-in users (works while serve runs)")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", help="create a user and print its token once")
    add.add_argument("user_id")
    add.add_argument("--virtual-key", required=True, help="the provider key billed for this user")
    add.add_argument("--provider-url", default=None, help="this user's provider base URL")
    user_commands.add_parser("list", help="list users (keys masked)")
    remove = user_commands.add_parser("remove", help="delete a user and its token")
    remove.add_argument("user_id")
    set_key = user_commands.add_parser("set-key", help="replace a user's virtual key")
    set_key.add_argument("user_id")
    set_key.add_argument("--virtual-key", required=True)
    set_key.add_argument("--provider-url", default=None)
    rotate = user_commands.add_parser("rotate-token", help="issue a new token, revoke the old one")
    rotate.add_argument("user_id")
    limit = user_commands.add_parser(
        "limit", help="set a user's own limits (over the server defaults); without options, show them",
        description="Each value is a number, `none` (unlimited for this user, whatever the "
        "defaults) or `default` (the server's default again). The server applies a change "
        "within its auth cache time.",
    )
    limit.add_argument("user_id")
    for flag, dest, label in LIMIT_FLAGS:
        limit.add_argument(flag, dest=dest, default=None, metavar="N|none|default", help=label)
    limit.add_argument("--clear", action="store_true", help="remove the user's own limits first")
    for action in (add, user_commands.choices["list"], remove, set_key, rotate, limit):
        add_setting_flags(action, USER_SETTINGS, default_bind=DEFAULT_SERVE_BIND)
    user.set_defaults(handler="atlas.cli.users:main", default_bind=DEFAULT_SERVE_BIND)

    usage = commands.add_parser(
        "usage", help="usage per user and UTC day, limits and what is left (works while serve runs)"
    )
    usage.add_argument("user_id", nargs="?", default=None, metavar="USER", help="one user (default: all)")
    usage.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                       help="first day shown (default: 30 days ago)")
    usage.add_argument("--json", action="store_true",
                       help="the usage object (one user) or a list of them, for scripts")
    add_setting_flags(usage, USER_SETTINGS | LIMIT_SETTINGS, default_bind=DEFAULT_SERVE_BIND)
    usage.set_defaults(handler="atlas.cli.usage:main", default_bind=DEFAULT_SERVE_BIND)

    for name, summary in (
        ("chat", "interactive chat with an agent in a running Atlas"),
        ("ask", "ask one question and stream the answer to stdout"),
    ):
        client = commands.add_parser(name, help=summary)
        client.set_defaults(handler=f"atlas.cli.{name}:main")
        client.add_argument("--url", default=None, help="Atlas base URL [env ATLAS_URL]")
        client.add_argument("--user", default=None, help="user id (room) [env ATLAS_USER]")
        client.add_argument("--token", default=None, help="auth token [env ATLAS_TOKEN]")
        client.add_argument("--agent", default=None, help="agent id")
        client.add_argument("--conversation", default=None, help="conversation id")
        if name == "ask":
            client.add_argument("question", help="the question, or - to read it from stdin")
            client.add_argument("--json", action="store_true", help="print the final agent:done object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, _, function_name = args.handler.partition(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    try:
        if hasattr(args, "default_bind"):
            flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
            args.settings = load_settings(flags, default_bind=args.default_bind)
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"atlas: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # A server that cannot listen (port in use, address not available) fails inside trio.
        os_errors, rest = group.split(OSError)
        if os_errors is None or rest is not None:
            raise
        error = first_leaf(os_errors)
        bind = getattr(getattr(args, "settings", None), "bind", "the bind address")
        print(f"atlas: cannot listen on {bind}: {error.strerror or error}", file=sys.stderr)
        return 1


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


if __name__ == "__main__":
    sys.exit(main())
