"""The usage ledger and limits: the reservation rule, the ledger's durability, admission's
waits and refusals (with an injected clock), and every way to read the ledger."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
import trio
import trio.testing
from fake_auth import open_fake_auth
from fake_provider import Bill, prompt_tokens
from servers import SECRETS, atlas_command, new_key, open_atlas
from usage_helpers import Clock, ledger_file, open_requests, proxy_text, usage_files, write_agents

from atlas.gateway.admission import Admission, Refused
from atlas.llm.types import Usage
from atlas.store import Charge, Hold, JsonStore, Limits, UsageDay, UserGone
from atlas.store.usage import Busy, Fits, OverQuota, PeriodUsage, ResolvedLimits, plan
from atlas.store.users import create_user, set_limits

DAY = ResolvedLimits(tokens_per_day=1000)


# The reservation rule


def test_plan_lowers_the_cap_to_what_the_settled_budget_leaves():
    assert plan(PeriodUsage("2025-01-15", settled_day=0), DAY, prompt=100, output=4096) == Fits(1000, 900)
    assert plan(PeriodUsage("2025-01-15", settled_day=850), DAY, prompt=100, output=20) == Fits(120, 20)
    assert plan(PeriodUsage("2025-01-15", settled_day=880), DAY, prompt=100, output=50) == Fits(120, 20)


def test_plan_refuses_when_not_even_one_token_fits():
    refusal = plan(PeriodUsage("2025-01-15", settled_day=900), DAY, prompt=100, output=20)
    assert refusal == OverQuota("tokensPerDay", 1000, 900, "2025-01-16T00:00:00Z")
    assert isinstance(plan(PeriodUsage("2025-01-15", settled_day=899), DAY, prompt=100, output=20), Fits)


def test_plan_waits_for_reservations_rather_than_refusing():
    """Room held by requests in flight is Busy (wait, or rate_limited), never OverQuota."""
    usage = PeriodUsage("2025-01-15", settled_day=0, held_day=990)
    assert plan(usage, DAY, prompt=100, output=20) == Busy()


def test_plan_names_the_limit_that_resets_last():
    limits = ResolvedLimits(tokens_per_day=1000, tokens_per_month=5000)
    usage = PeriodUsage("2025-01-20", settled_day=1000, settled_month=5000)
    refusal = plan(usage, limits, prompt=10, output=10)
    assert isinstance(refusal, OverQuota) and refusal.limit == "tokensPerMonth"
    assert refusal.reset_at == "2025-02-01T00:00:00Z"
    december = plan(PeriodUsage("2025-12-05", settled_month=5000), limits, prompt=1, output=1)
    assert december.reset_at == "2026-01-01T00:00:00Z"


def test_plan_counts_every_choice():
    assert plan(PeriodUsage("2025-01-15"), DAY, prompt=100, output=4096, choices=3) == Fits(1000, 300)


# The ledger


async def test_settle_is_durable_on_return_and_replaces_the_reservation(tmp_path):
    store = JsonStore(tmp_path)
    store.prepare()
    ledger = store.usage_ledger()
    hold = await ledger.reserve("alice", "2025-01-15", DAY, prompt=50, output=100)
    assert isinstance(hold, Hold) and hold.tokens == 150 and ledger.held("alice") == 150
    await ledger.settle(hold, Charge(20, 30, 50))
    assert ledger.held("alice") == 0
    assert ledger_file(tmp_path, "alice")["days"] == [{
        "date": "2025-01-15", "requests": 1, "promptTokens": 20, "completionTokens": 30, "totalTokens": 50,
    }]
    # A new process (a new ledger on the same files) sees it, and counts it.
    again = JsonStore(tmp_path).usage_ledger()
    hold = await again.reserve("alice", "2025-01-15", DAY, prompt=50, output=10_000)
    assert hold.cap == 1000 - 50 - 50


async def test_concurrent_settlements_are_written_together_and_all_kept(tmp_path):
    store = JsonStore(tmp_path)
    store.prepare()
    writes = []
    add = store.add_usage

    def counting_add(user_id, days, **kwargs):
        writes.append(len(days))
        add(user_id, days, **kwargs)

    store.add_usage = counting_add
    ledger = store.usage_ledger()
    holds = [await ledger.reserve("bob", "2025-01-15", DAY, prompt=1, output=9) for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for hold in holds:
            nursery.start_soon(ledger.settle, hold, Charge(1, 1, 2))
    day = ledger_file(tmp_path, "bob")["days"][0]
    assert day["requests"] == 50 and day["totalTokens"] == 100
    assert len(writes) < 50  # group commit: settlements that arrive during a write share the next


def test_the_append_log_is_compacted_and_survives_a_torn_write(tmp_path):
    store = JsonStore(tmp_path)
    store.prepare()
    store.COMPACT_BYTES = 300
    for n in range(20):
        store.add_usage("dana", [UsageDay("2025-01-15", 1, 2, 3, 5)])
    assert (tmp_path / "usage" / "dana.json").exists()  # folded at least once
    logs = [p.name for p in (tmp_path / "usage").glob("dana+*.log")]
    assert len(logs) <= 1
    # A crash mid-append leaves half a line: it was never acknowledged, so it does not count,
    # and the next write cuts it off rather than gluing itself to it.
    record = store.load_usage("dana")
    log = store.usage_log_path("dana", record.generation)
    with open(log, "ab") as torn:
        torn.write(b'[{"date":"2025-01-15","requests":1')
    assert store.load_usage("dana").days == record.days
    store.close()  # the process that was writing died: the next one opens the log afresh
    after_crash = JsonStore(tmp_path)
    after_crash.add_usage("dana", [UsageDay("2025-01-15", 1, 2, 3, 5)])
    day = JsonStore(tmp_path).load_usage("dana").days[0]
    assert (day.requests, day.total_tokens) == (21, 105)
    assert log.read_bytes().endswith(b"5}]\n")  # the half line is gone, not glued to
    after_crash.close()


def test_a_log_kept_open_follows_its_user_through_removal_and_compaction(tmp_path):
    """The server keeps each user's usage log open between settlements. Removing the user
    from another process (``atlas user remove``), and adding them again under the same id, must
    neither lose the new user's usage nor give them the old one's."""
    server, cli = JsonStore(tmp_path), JsonStore(tmp_path)
    server.prepare()
    create_user(cli, "erin", "sk-test-usage-erin-0123", None)
    server.add_usage("erin", [UsageDay("2025-01-15", 1, 2, 3, 5)], owner_must_exist=True)
    cli.remove_user("erin")
    with pytest.raises(UserGone):
        server.add_usage("erin", [UsageDay("2025-01-15", 1, 2, 3, 5)], owner_must_exist=True)
    create_user(cli, "erin", "sk-test-usage-erin-4567", None)
    server.add_usage("erin", [UsageDay("2025-01-16", 1, 1, 1, 2)], owner_must_exist=True)
    assert [(d.date, d.requests) for d in cli.load_usage("erin").days] == [("2025-01-16", 1)]
    # Past the compaction size the log is folded and the next generation's log is opened.
    server.COMPACT_BYTES = 200
    for _ in range(10):
        server.add_usage("erin", [UsageDay("2025-01-16", 1, 1, 1, 2)], owner_must_exist=True)
    assert cli.load_usage("erin").generation >= 1
    assert cli.load_usage("erin").days[0].requests == 11
    open_fds = len(os.listdir("/proc/self/fd"))
    server.close()
    assert len(os.listdir("/proc/self/fd")) < open_fds  # the open log and the lock go with close


async def test_a_release_costs_nothing_and_frees_the_room(tmp_path):
    store = JsonStore(tmp_path)
    store.prepare()
    ledger = store.usage_ledger()
    hold = await ledger.reserve("carol", "2025-01-15", DAY, prompt=10, output=990)
    assert isinstance(await ledger.reserve("carol", "2025-01-15", DAY, prompt=10, output=10), Busy)
    await ledger.settle(hold, None)
    assert ledger.held("carol") == 0 and usage_files(tmp_path, "carol") == []
    assert isinstance(await ledger.reserve("carol", "2025-01-15", DAY, prompt=10, output=990), Hold)


# Admission, with an injected clock


def admission(tmp_path, clock, **kwargs) -> Admission:
    store = JsonStore(tmp_path)
    store.prepare()
    return Admission(store.usage_ledger(), clock=clock, **kwargs)


async def test_a_request_waits_for_one_in_flight_to_settle(tmp_path):
    gate = admission(tmp_path, Clock(), wait_seconds=5)
    first_in = trio.Event()
    release = trio.Event()
    caps = []

    async def first():
        async with gate.admit("dan", DAY, prompt=100, output=800) as ticket:
            first_in.set()
            await release.wait()
            ticket.answered()
            await ticket.settle(Usage(40, 60, 100))

    async def second():
        await first_in.wait()
        async with gate.admit("dan", DAY, prompt=100, output=800) as ticket:
            caps.append(ticket.cap)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert caps == []  # waiting: the first holds 900 of 1000
        release.set()
    assert caps == [800]  # 1000 - 100 settled leaves room for the whole request


async def test_budget_held_too_long_is_rate_limited_not_quota_exceeded(tmp_path, autojump_clock):
    gate = admission(tmp_path, Clock(), wait_seconds=2)
    async with gate.admit("erin", DAY, prompt=100, output=800):
        with pytest.raises(Refused) as refused:
            async with gate.admit("erin", DAY, prompt=100, output=800):
                pass
    assert refused.value.code == "rate_limited" and refused.value.status == 429
    assert refused.value.retry_after == 1


async def test_quota_exceeded_names_the_reset(tmp_path):
    gate = admission(tmp_path, Clock("2025-03-31T23:00:00+00:00"))
    async with gate.admit("fay", DAY, prompt=100, output=900) as ticket:
        ticket.answered()
        await ticket.settle(Usage(500, 480, 980))
    with pytest.raises(Refused) as refused:
        async with gate.admit("fay", DAY, prompt=100, output=10):
            pass
    error = refused.value
    assert (error.code, error.status, error.limit) == ("quota_exceeded", 402, "tokensPerDay")
    assert error.reset_at == "2025-04-01T00:00:00Z"
    assert "980 of 1,000" in error.message and "2025-04-01T00:00:00Z" in error.message
    assert error.to_json()["resetAt"] == "2025-04-01T00:00:00Z"


async def test_day_and_month_roll_over(tmp_path):
    clock = Clock("2025-01-31T23:59:00+00:00")
    gate = admission(tmp_path, clock)
    limits = ResolvedLimits(tokens_per_day=300, tokens_per_month=500)

    async def spend(total: int) -> None:
        async with gate.admit("gus", limits, prompt=10, output=10) as ticket:
            ticket.answered()
            await ticket.settle(Usage(total - 5, 5, total))

    async def refusal() -> Refused:
        with pytest.raises(Refused) as refused:
            async with gate.admit("gus", limits, prompt=10, output=10):
                pass
        return refused.value

    await spend(295)
    assert (await refusal()).reset_at == "2025-02-01T00:00:00Z"  # the day's limit
    clock.set("2025-02-01T00:00:01+00:00")  # a new day and a new month
    await spend(200)
    await spend(90)
    assert (await refusal()).limit == "tokensPerDay"
    clock.set("2025-02-02T08:00:00+00:00")
    await spend(200)  # 490 this month
    refused = await refusal()
    assert (refused.limit, refused.reset_at) == ("tokensPerMonth", "2025-03-01T00:00:00Z")
    clock.set("2025-03-01T00:00:00+00:00")
    await spend(100)
    # January's usage is kept on its own day.
    report = await gate.report("gus", limits, since="2025-01-01")
    assert [(d["date"], d["totalTokens"]) for d in report["days"]] == [
        ("2025-01-31", 295), ("2025-02-01", 290), ("2025-02-02", 200), ("2025-03-01", 100)]
    assert report["remaining"] == {"tokensToday": 200, "tokensThisMonth": 400}


async def test_requests_per_minute(tmp_path):
    clock = Clock()
    gate = admission(tmp_path, clock)
    limits = ResolvedLimits(requests_per_minute=2)
    for _ in range(2):
        async with gate.admit("hal", limits, prompt=1, output=1):
            pass
    clock.advance(20)
    with pytest.raises(Refused) as refused:
        async with gate.admit("hal", limits, prompt=1, output=1):
            pass
    assert refused.value.code == "rate_limited" and refused.value.retry_after == 40
    clock.advance(40)
    async with gate.admit("hal", limits, prompt=1, output=1):
        pass


async def test_concurrent_requests(tmp_path):
    gate = admission(tmp_path, Clock())
    limits = ResolvedLimits(concurrent_requests=2)
    async with gate.admit("ivy", limits, prompt=1, output=1), gate.admit("ivy", limits, prompt=1, output=1):
        with pytest.raises(Refused) as refused:
            async with gate.admit("ivy", limits, prompt=1, output=1):
                pass
        assert refused.value.code == "rate_limited" and refused.value.retry_after == 1
    async with gate.admit("ivy", limits, prompt=1, output=1):
        assert gate.in_flight("ivy") == 1
    assert gate.in_flight("ivy") == 0


async def test_unanswered_requests_cost_nothing_and_silent_providers_the_worst_case(tmp_path):
    gate = admission(tmp_path, Clock())
    async with gate.admit("jo", DAY, prompt=100, output=50):
        pass  # the provider never answered
    async with gate.admit("jo", DAY, prompt=100, output=50) as ticket:
        ticket.answered()  # answered, then nothing reported (a cut stream, a cancel)
    async with gate.admit("jo", ResolvedLimits(), prompt=30, output=20) as ticket:
        ticket.answered()
    day = (await gate.report("jo", DAY))["days"][0]
    assert (day["requests"], day["promptTokens"], day["completionTokens"]) == (2, 130, 70)


# End to end: the ledger through every reader, on a real server


async def test_usage_is_recorded_and_readable_every_way(tmp_path, provider):
    provider.behaviour = Bill(tokens=5)
    clock = Clock("2025-06-10T09:00:00+00:00")
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url, clock=clock,
                          limit_tokens_per_day=10_000, limit_requests_per_minute=100) as server:
        token = server.tokens["alice"]
        async with open_requests(server.ws_url("alice", token)) as client:
            done = await client.ask("hello there")
            assert done["type"] == "agent:done", done
            await client.ask("and again", kind="agent:text")
            usage = await client.usage()
        async with httpx.AsyncClient() as http:
            proxied = await proxy_text(http, server.url, "alice", token)
            assert proxied.status_code == 200, proxied.text
            headers = {"Authorization": f"Bearer {token}"}
            status = (await http.get(f"{server.url}/party/alice", headers=headers)).json()
            over_http = (await http.get(f"{server.url}/party/alice/usage", headers=headers)).json()
            since = (await http.get(f"{server.url}/parties/main/alice/usage?since=2025-06-11", headers=headers)).json()
            bad_since = await http.get(f"{server.url}/party/alice/usage?since=June", headers=headers)
            no_token = await http.get(f"{server.url}/party/alice/usage")

    billed = [r.body for r in provider.completions()]
    assert len(billed) == 3
    expected_total = sum(prompt_tokens(body) + 5 for body in billed)
    assert usage["type"] == "usage" and usage["userId"] == "alice"
    assert usage["days"][0]["requests"] == 2
    assert usage["limits"] == {"tokensPerDay": 10_000, "requestsPerMinute": 100}
    day = over_http["days"][0]
    assert day == {"date": "2025-06-10", "requests": 3, "promptTokens": expected_total - 15,
                   "completionTokens": 15, "totalTokens": expected_total}
    assert over_http["remaining"] == {"tokensToday": 10_000 - expected_total}
    assert status["usageToday"] == {k: v for k, v in day.items() if k != "date"}
    assert since["days"] == []
    assert bad_since.status_code == 400 and "YYYY-MM-DD" in bad_since.json()["error"]["message"]
    assert no_token.status_code == 401
    assert ledger_file(server.data_dir, "alice")["days"][0]["totalTokens"] == expected_total

    # The operator's view: one command.
    table = run_atlas("usage", "alice", "--since", "2025-01-01", "--data-dir", str(server.data_dir),
                      "--limit-tokens-per-day", "10000")
    assert "alice" in table and "2025-06-10" in table and f"{expected_total:,}" in table
    assert "10,000 tokens/day" in table
    one = json.loads(run_atlas("usage", "alice", "--json", "--since", "2025-01-01",
                               "--data-dir", str(server.data_dir)))
    assert one["days"] == over_http["days"] and one["limits"] == {}
    every = json.loads(run_atlas("usage", "--json", "--since", "2025-01-01", "--data-dir", str(server.data_dir)))
    assert [entry["userId"] for entry in every] == ["alice"]


def run_atlas(*args: str) -> str:
    result = subprocess.run(atlas_command(*args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_usage_get_rejects_a_bad_date(tmp_path):
    async with open_atlas(tmp_path, users={"alice": None}) as server:
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            await client.ws.send_message(json.dumps({"type": "usage:get", "since": "yesterday"}))
            error = await client.wait_frame(lambda f: f["type"] == "error")
    assert error["error"]["code"] == "bad_message" and "YYYY-MM-DD" in error["error"]["message"]


# Limits from their three sources, and their order


async def test_limits_come_from_defaults_then_the_user_then_the_auth_api(tmp_path, provider):
    provider.behaviour = Bill(tokens=3)
    write_agents(tmp_path / "data")
    async with open_atlas(tmp_path, users={"alice": None, "bob": None}, provider_url=provider.url,
                          auth_cache_seconds=0, limit_tokens_per_day=5000,
                          limit_concurrent_requests=4) as server:
        async def limits_of(user: str) -> dict:
            async with open_requests(server.ws_url(user, server.tokens[user])) as client:
                return (await client.usage())["limits"]

        assert await limits_of("alice") == {"tokensPerDay": 5000, "concurrentRequests": 4}
        # `atlas user limit` (here as the operator runs it) overrides the default, field by field.
        run_atlas("user", "limit", "alice", "--tokens-per-day", "0", "--concurrent-requests", "none",
                  "--data-dir", str(server.data_dir))
        assert await limits_of("alice") == {"tokensPerDay": 0}
        assert await limits_of("bob") == {"tokensPerDay": 5000, "concurrentRequests": 4}
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            refused = await client.ask()
        assert refused["error"]["code"] == "quota_exceeded" and refused["error"]["resetAt"]
        set_limits(JsonStore(server.data_dir), "alice", {"tokens_per_day": "default"})
        assert await limits_of("alice") == {"tokensPerDay": 5000}
        set_limits(JsonStore(server.data_dir), "alice", {}, clear=True)
        assert await limits_of("alice") == {"tokensPerDay": 5000, "concurrentRequests": 4}
    assert len(provider.completions()) == 0

    # External auth: the auth API's `limits` override the defaults the same way.
    async with open_fake_auth() as auth:
        token = f"token-ext-{new_key('t')}"
        SECRETS.add(token)
        auth.users[token] = {"id": "zoe", "virtualKey": new_key("zoe"),
                             "limits": {"tokensPerDay": None, "requestsPerMinute": 0}}
        async with open_atlas(tmp_path, data_dir=tmp_path / "ext", auth_url=auth.url,
                              provider_url=provider.url, auth_cache_seconds=0,
                              limit_tokens_per_day=5000, limit_tokens_per_month=90_000) as server:
            async with open_requests(server.ws_url("zoe", token)) as client:
                assert (await client.usage())["limits"] == {"tokensPerMonth": 90_000, "requestsPerMinute": 0}
                refused = await client.ask()
                assert refused["error"]["code"] == "rate_limited" and refused["error"]["retryAfter"] >= 1
                auth.users[token]["limits"] = {"tokensPerDay": "lots"}  # malformed: fail closed
                broken = await client.ask()
                assert broken["error"]["code"] == "auth_unavailable"
    assert len(provider.completions()) == 0


async def test_a_user_without_limits_keeps_the_agents_own_cap(tmp_path, provider):
    """Limits off: the request reaches the provider exactly as before (no output cap added)."""
    provider.behaviour = Bill(tokens=3)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            assert (await client.ask())["type"] == "agent:done"
    assert "max_tokens" not in provider.completions()[0].body


async def test_chat_shows_usage_and_refusals_as_a_person_wants(tmp_path, provider):
    from test_cli_clients import ATLAS, client_env, open_terminal

    provider.behaviour = Bill(tokens=4)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          auth_cache_seconds=0, limit_tokens_per_day=50_000) as server:
        env = client_env(server.url, server.tokens["alice"], ATLAS_USER="alice")
        async with open_terminal([*ATLAS, "chat"], env) as term:
            await term.expect("you> ")
            await term.type("hello\r")
            await term.expect("w w w w")
            await term.expect("you> ")
            await term.type("/usage\r")
            await term.expect("today: 1 requests")
            await term.expect("of 50,000 tokens today")
            await term.expect("resets in")
            await term.expect("last reply:")
            set_limits(JsonStore(server.data_dir), "alice", {"tokens_per_day": 10})
            await term.type("hello again\r")
            await term.expect("[error] quota_exceeded: this request needs at least")
            await term.expect("local time")
            await term.expect("you> ")
            await term.type("\x04")
            assert await term.wait_exit() == 0
        assert "Traceback" not in term.output


async def test_the_web_page_says_what_was_used_and_when_it_resets(tmp_path, provider):
    test_web = pytest.importorskip("test_web")
    if not test_web.os.path.exists(test_web.CHROMIUM):
        pytest.skip("Chromium is not installed (scripts/install-test-deps.sh)")
    provider.behaviour = Bill(tokens=4)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          limit_tokens_per_day=10) as server:

        def steps(page):
            page.wait_for_selector(test_web.ONLINE)
            test_web.send(page, "hello")
            page.wait_for_selector('.msg.assistant[data-status="error"]')
            return page.locator(".msg.assistant .meta").last.text_content()

        shown = await test_web.in_browser(
            test_web.sign_in_url(server.url, "alice", server.tokens["alice"]), steps)
    assert shown.startswith("Limit reached: this request needs at least")
    assert "more than the whole daily limit of 10 (0 used today)" in shown
    assert "It resets" in shown and "T00:00:00Z" not in shown  # the reader's own time, not ISO
    assert provider.requests == []


async def test_a_removed_users_usage_is_gone_and_stays_gone(tmp_path, provider):
    provider.behaviour = Bill(tokens=2)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url) as server:
        async with open_requests(server.ws_url("alice", server.tokens["alice"])) as client:
            assert (await client.ask())["type"] == "agent:done"
        assert usage_files(server.data_dir, "alice")
        run_atlas("user", "remove", "alice", "--data-dir", str(server.data_dir))
        assert usage_files(server.data_dir, "alice") == []
    # A settlement that races the removal does not write the usage back (built-in auth).
    store = JsonStore(tmp_path / "race")
    store.prepare()
    from atlas.store.users import create_user, remove_user

    SECRETS.add(create_user(store, "bob", new_key("bob"), None))
    ledger = store.usage_ledger(owner_must_exist=True)
    hold = await ledger.reserve("bob", "2025-01-15", DAY, prompt=10, output=10)
    remove_user(store, "bob")
    await ledger.settle(hold, Charge(5, 5, 10))
    assert usage_files(tmp_path / "race", "bob") == [] and ledger.held("bob") == 0


async def test_usage_and_limits_on_either_store(tmp_path, provider, backend):
    """The same ledger and limits with the JSON files and with PostgreSQL: recorded per request,
    read by the server and by `atlas usage`, limits set with `atlas user limit`."""
    provider.behaviour = Bill(tokens=3)
    async with open_atlas(tmp_path, users={"alice": None}, provider_url=provider.url,
                          auth_cache_seconds=0, **backend.settings) as server:
        token = server.tokens["alice"]
        async with open_requests(server.ws_url("alice", token)) as client:
            assert (await client.ask())["type"] == "agent:done"
            run_atlas("user", "limit", "alice", "--tokens-per-day", "0", *backend.cli_args())
            refused = await client.ask()
            assert refused["error"]["code"] == "quota_exceeded"
            served = await client.usage(since="2000-01-01")
    printed = json.loads(run_atlas("usage", "alice", "--json", "--since", "2000-01-01", *backend.cli_args()))
    assert printed == {**{k: v for k, v in served.items() if k != "type"}}
    assert printed["days"][0]["requests"] == 1
    assert printed["days"][0]["totalTokens"] == provider.billed()
    assert printed["limits"] == {"tokensPerDay": 0}
