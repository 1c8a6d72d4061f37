"""The WeCom API client against the local stand-in: tokens, members, and every failure an admin can meet."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests

import config
from store import db, migrate, tokens
from support import ROOT, TEST_CORP_ID, TEST_SECRET, base_env
from wecom_api import Member, WeComClient, WeComError, token_key
from devtools.wecom_standin import WeComStandIn, make_members


class MemoryTokenStore:
    """The TokenStore interface in memory, counting writes."""

    def __init__(self):
        self.tokens: dict[str, tuple[str, float]] = {}
        self.puts = 0

    def get(self, key):
        return self.tokens.get(key)

    def put(self, key, token, expires_at):
        self.tokens[key] = (token, expires_at)
        self.puts += 1


@pytest.fixture
def wecom_api():
    """A stand-in whose department 2 has members with, without and with only a business address."""
    members = make_members(3, 2) + [{"userid": "noaddr", "name": "无邮箱", "department": [2],
                                     "email": "", "biz_mail": ""},
                                    {"userid": "bizonly", "name": "Biz", "department": [2, 5],
                                     "email": "", "biz_mail": "bizonly@corp.example"}]
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET, {2: members, 7: make_members(2, 7, prefix="other")}) as server:
        yield server


def make_client(standin, store=None, observe=None, timeout=(2.0, 5.0), **env) -> WeComClient:
    settings = config.from_env(base_env(WECOM_API_BASE=standin.api_base, **env))
    return WeComClient(settings, store if store is not None else MemoryTokenStore(), observe=observe,
                       timeout=timeout)


def test_members_are_listed_with_names_and_addresses(wecom_api):
    members = make_client(wecom_api).list_members([2])[2]

    assert [m.userid for m in members] == ["user0001", "user0002", "user0003", "noaddr", "bizonly"]
    assert members[0].name and members[0].email == "user0001@corp.example"
    assert members[0].departments == (2,)
    assert members[3] == Member("noaddr", "无邮箱", (2,), "", "")
    assert members[4].biz_mail == "bizonly@corp.example" and members[4].departments == (2, 5)


def test_gettoken_goes_to_the_configured_base(wecom_api):
    make_client(wecom_api).check_token()

    assert wecom_api.calls["gettoken"] == 1 and wecom_api.tokens_issued == 1


def test_token_is_reused_across_calls_and_across_clients_sharing_a_store(wecom_api):
    store = MemoryTokenStore()
    first, second = make_client(wecom_api, store), make_client(wecom_api, store)

    first.list_members([2])
    first.list_members([2, 7])
    second.list_members([7])

    assert wecom_api.calls["gettoken"] == 1 and store.puts == 1
    assert wecom_api.calls["user/list"] == 4


def test_a_token_about_to_expire_is_replaced(wecom_api):
    store = MemoryTokenStore()
    client = make_client(wecom_api, store)
    client.check_token()
    key, (token, _) = next(iter(store.tokens.items()))
    store.tokens[key] = (token, time.time() + 30)  # inside the one-minute margin

    client.list_members([2])

    assert wecom_api.calls["gettoken"] == 2 and store.tokens[key][0] != token


def test_expired_token_is_refreshed_once_and_the_listing_succeeds(wecom_api):
    client = make_client(wecom_api)
    client.check_token()
    wecom_api.expire_tokens()

    members = client.list_members([2])[2]

    assert len(members) == 5
    assert wecom_api.calls["gettoken"] == 2 and wecom_api.calls["user/list"] == 2


def test_token_refreshed_by_another_process_is_used_without_fetching(wecom_api):
    store = MemoryTokenStore()
    stale, fresh = make_client(wecom_api, store), make_client(wecom_api, store)
    stale.check_token()
    wecom_api.expire_tokens()
    fresh.check_token()  # the other process already replaced the shared token

    assert len(stale.list_members([2])[2]) == 5
    assert wecom_api.calls["gettoken"] == 2  # no third fetch


def test_token_rejected_forever_is_permanent_and_bounded(wecom_api):
    wecom_api.script("user/list", ("forever", {"errcode": 40014, "errmsg": "invalid access_token"}))

    with pytest.raises(WeComError) as caught:
        make_client(wecom_api).list_members([2])

    assert caught.value.permanent and caught.value.errcode == 40014
    assert "WECOM_CONTACT_SECRET" in str(caught.value)
    # A first token and one refresh after its rejection; the listing tried with each: no third round.
    assert wecom_api.calls["gettoken"] == 2 and wecom_api.tokens_issued == 2
    assert wecom_api.calls["user/list"] == 2


@pytest.mark.parametrize("answer, transient, hint", [
    ({"errcode": 45009, "errmsg": "api freq out of limit"}, True, "limit"),
    ({"errcode": 45033, "errmsg": "api concurrent out of limit"}, True, "concurrent"),
    ({"errcode": 45011, "errmsg": "api minute-freq out of limit"}, True, "frequency"),
    ({"errcode": -1, "errmsg": "system busy"}, True, "busy"),
    (("http", 500), True, "HTTP 500"),
    (("http", 502), True, "HTTP 502"),
    (("http", 200), True, "not JSON"),
    (("http", 404), False, "WECOM_API_BASE"),
    ({"errcode": 60020, "errmsg": "not allow to access from your ip, from ip: 203.0.113.9"}, False, "企业可信IP"),
    ({"errcode": 60011, "errmsg": "no privilege to access/modify contact/party/agent"}, False, "可见范围"),
    ({"errcode": 60123, "errmsg": "invalid party id"}, False, "WECOM_DEPARTMENT_ID"),
    ({"errcode": 48002, "errmsg": "api forbidden"}, False, "通讯录同步 Secret"),
    ({"errcode": 40001, "errmsg": "invalid credential"}, False, "WECOM_CONTACT_SECRET"),
    ({"errcode": 86001, "errmsg": "something new"}, False, "86001"),
])
def test_user_list_failures_say_whether_a_retry_can_help(wecom_api, answer, transient, hint):
    wecom_api.script("user/list", answer)

    with pytest.raises(WeComError) as caught:
        make_client(wecom_api).list_members([2])

    assert caught.value.permanent is not transient
    assert hint in str(caught.value)
    assert wecom_api.calls["user/list"] == 1


@pytest.mark.parametrize("env, errcode, hint", [
    ({"WECOM_CONTACT_SECRET": "another-secret-0123456789"}, 40001, "通讯录同步"),
    ({"WECOM_CORP_ID": "wwffffffffffffffff"}, 40013, "WECOM_CORP_ID"),
])
def test_bad_credentials_are_permanent_and_name_the_setting(wecom_api, env, errcode, hint):
    with pytest.raises(WeComError) as caught:
        make_client(wecom_api, **env).check_token()

    assert caught.value.permanent and caught.value.errcode == errcode and hint in str(caught.value)
    assert wecom_api.calls["gettoken"] == 1


def test_unreachable_server_is_transient():
    with WeComStandIn(TEST_CORP_ID, TEST_SECRET) as gone:
        client = make_client(gone)
    with pytest.raises(WeComError) as caught:
        client.check_token()

    assert not caught.value.permanent and "WECOM_API_BASE" in str(caught.value)


def test_read_timeout_is_transient(wecom_api):
    wecom_api.script("user/list", ("sleep", 5))
    client = make_client(wecom_api, timeout=(2.0, 0.2))
    client.check_token()

    with pytest.raises(WeComError) as caught:
        client.list_members([2])

    assert not caught.value.permanent and "in time" in str(caught.value)


def test_refused_user_list_falls_back_to_list_id_filtered_by_department(wecom_api):
    wecom_api.script("user/list", ("forever", {"errcode": 48009, "errmsg": "api forbidden for this ip"}))

    listed = make_client(wecom_api).list_members([2, 7])

    assert sorted(m.userid for m in listed[2]) == ["bizonly", "noaddr", "user0001", "user0002", "user0003"]
    assert [m.userid for m in listed[7]] == ["other0001", "other0002"]
    assert all(m.name == m.email == m.biz_mail == "" for m in listed[2] + listed[7])
    assert wecom_api.calls["user/list"] == 1 and wecom_api.calls["user/list_id"] == 1


def test_list_id_is_paged_until_the_cursor_is_empty(wecom_api):
    wecom_api.set_members(9, make_members(10_500, 9, prefix="many"))
    wecom_api.script("user/list", ("forever", {"errcode": 48009, "errmsg": "api forbidden for this ip"}))

    listed = make_client(wecom_api).list_members([9])

    assert len(listed[9]) == 10_500 and wecom_api.calls["user/list_id"] == 2


def test_fetch_child_walks_simplelist_and_merges_members(wecom_api):
    wecom_api.children = {2: [3], 3: [4]}
    wecom_api.set_members(3, make_members(2, 3, prefix="child"))
    wecom_api.set_members(4, make_members(1, 4, prefix="grandchild")
                        + [{"userid": "user0001", "name": "x", "department": [2, 4]}])

    listed = make_client(wecom_api).list_members([2], fetch_child=True)

    userids = [m.userid for m in listed[2]]
    assert userids[:5] == ["user0001", "user0002", "user0003", "noaddr", "bizonly"]
    assert sorted(userids[5:]) == ["child0001", "child0002", "grandchild0001"]
    assert wecom_api.calls["department/simplelist"] == 1 and wecom_api.calls["user/list"] == 3


def test_overlapping_watched_departments_list_each_department_once(wecom_api):
    wecom_api.children = {2: [7]}

    listed = make_client(wecom_api).list_members([2, 7], fetch_child=True)

    assert len(listed[2]) == 7 and len(listed[7]) == 2
    assert wecom_api.calls["user/list"] == 2


def test_secret_and_access_token_never_appear_in_error_messages(wecom_api):
    store = MemoryTokenStore()
    client = make_client(wecom_api, store)
    client.check_token()
    (sealed, _), = store.tokens.values()
    token = tokens.unseal(sealed, TEST_SECRET, token_key(TEST_CORP_ID, TEST_SECRET))  # stored sealed (issue 24)
    echo = {"errcode": 99999, "errmsg": f"echo corpsecret={TEST_SECRET} access_token={token}"}
    failures = [(("forever", echo), 5.0), (("http", 500), 5.0), (("sleep", 5), 0.2),
                (("forever", {"errcode": 40014, "errmsg": f"invalid access_token {token}"}), 5.0)]
    messages = []
    for answer, read_timeout in failures:
        wecom_api.clear_script()
        wecom_api.script("user/list", answer)
        with pytest.raises(WeComError) as caught:
            make_client(wecom_api, store, timeout=(2.0, read_timeout)).list_members([2])
        messages.append(str(caught.value))
    wecom_api.clear_script()
    with pytest.raises(WeComError) as caught:
        make_client(wecom_api, MemoryTokenStore(), WECOM_CORP_ID="wwbad").check_token()
    messages.append(str(caught.value))

    for message in messages:
        assert TEST_SECRET not in message and token not in message, message
    assert "***" in messages[0]


def test_observe_sees_every_http_call_with_its_outcome(wecom_api):
    seen = []
    client = make_client(wecom_api, observe=lambda api, errcode: seen.append((api, errcode)))
    wecom_api.script("user/list", {"errcode": 42001, "errmsg": "access_token expired"})

    client.list_members([2])  # gettoken, 42001, gettoken, then the listing
    wecom_api.script("user/list", ("http", 503))
    with pytest.raises(WeComError):
        client.list_members([2])

    assert seen == [("gettoken", 0), ("user/list", 42001), ("gettoken", 0), ("user/list", 0),
                    ("user/list", "http_503")]


def test_token_is_shared_through_the_state_database(wecom_api, db_url):
    engine = db.make_engine(db_url)
    migrate.upgrade(engine)

    make_client(wecom_api, tokens.TokenStore(engine)).list_members([2])
    make_client(wecom_api, tokens.TokenStore(engine)).list_members([7])
    wecom_api.expire_tokens()
    assert len(make_client(wecom_api, tokens.TokenStore(engine)).list_members([2])[2]) == 5

    assert wecom_api.calls["gettoken"] == 2
    stored = tokens.TokenStore(engine).get(token_key(TEST_CORP_ID, TEST_SECRET))
    assert stored is not None and stored[1] > time.time() + 7000


def test_a_ten_thousand_member_department_is_listed(wecom_api):
    wecom_api.set_members(8, make_members(10_000, 8))

    assert len(make_client(wecom_api).list_members([8])[8]) == 10_000


def test_standin_command_serves_until_sigterm():
    command = [sys.executable, "-m", "devtools.wecom_standin", "--corp-id", TEST_CORP_ID,
               "--secret", TEST_SECRET, "--department", "2", "--members", "5", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("WECOM_API_BASE=http://127.0.0.1:")
        base = line.split("=", 1)[1]
        token = requests.get(base + "gettoken", params={"corpid": TEST_CORP_ID, "corpsecret": TEST_SECRET},
                             timeout=5).json()["access_token"]
        users = requests.get(base + "user/list", params={"access_token": token, "department_id": 2},
                             timeout=5).json()["userlist"]
        assert len(users) == 5
        process.terminate()
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.stdout.close()
