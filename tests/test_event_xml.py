"""Security round three (issue 24), item 3: the synthetic events of reconciliation are written by a real XML
writer, so a member's name cannot add fields to the event or leave it unparseable."""
from __future__ import annotations

import pytest

import wecom
from devtools.wecom_standin import make_members
from support import DEPARTMENT, TEST_CORP_ID, event_rows

from test_reconcile import Rounds, about  # noqa: E402  (the rounds-by-hand harness of the reconciliation tests)

NAMES = ["]]>", "Eve]]></Name><Name>Eve（CEO）", "<b>x</b>", "A & B", "&amp;", "张三", "王]]>五 & <李>",
         "x]]]]>y", "'\"quotes\"'", "tab\there"]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_through_the_event_xml(name):
    xml = wecom.event_xml("create_user", "user]]>1", TEST_CORP_ID, "2,3", 1700000000, name)
    change = wecom.parse_event(xml)
    assert change.fields["name"] == name.strip() and change.user_id == "user]]>1"
    assert change.departments == (2, 3) and change.change_type == "create_user"
    assert list(change.fields) == ["userid", "name", "department"]  # nothing added


def test_characters_xml_cannot_carry_still_give_a_parseable_event():
    change = wecom.parse_event(wecom.event_xml("create_user", "u1", TEST_CORP_ID, "2", 1700000000, "a\x01b\x1bc"))
    assert change.user_id == "u1" and change.fields["name"] == "a\ufffdb\ufffdc"


@pytest.mark.parametrize("name", ["]]>", "Eve]]></Name><Name>Eve（CEO）"])
def test_a_member_named_with_cdata_end_is_still_announced(service, standin, smtp_sink, name):
    """Before: a name that is only ']]>' left the event unparseable; the join was never mailed."""
    rounds = Rounds(service)
    rounds.run()
    newcomer = {"userid": "wangwu", "name": name, "department": [DEPARTMENT], "email": "wangwu@corp.example",
                "biz_mail": "", "status": 1}
    standin.set_members(DEPARTMENT, make_members(5, DEPARTMENT) + [newcomer])
    rounds.run()
    [(_, change_type, userid)] = rounds.run().announced
    assert (change_type, userid) == ("create_user", "wangwu")
    assert len(smtp_sink.messages) == 6 and {about(m)[1] for m in smtp_sink.messages} == {"wangwu"}
    [row] = [r for r in event_rows(service.engine) if r.source == "reconcile"]
    assert wecom.parse_event(row.xml).fields["name"] == name
