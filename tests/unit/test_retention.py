"""Which registered versions a registry keeps (anomaly.retention): pure, on hand-built versions."""

import json

import pytest

from anomaly.retention import Version, plan, pinned, rollback_versions

R = {"retrain": "true"}  # a version a retrain registered


def refused(n: int) -> list[Version]:
    return [Version(str(v), (), dict(R, **{"retrain.decision": "kept"})) for v in range(1, n + 1)]


def test_the_newest_refused_challengers_are_kept_and_the_older_ones_go_oldest_first():
    p = plan(list(reversed(refused(6))), keep=2)
    assert p.delete == ("1", "2", "3", "4")
    assert set(p.kept) == {"5", "6"} and all(why.startswith("newest 2") for why in p.kept.values())


def test_keep_zero_deletes_every_unprotected_one_and_keep_above_the_count_deletes_none():
    assert plan(refused(3), keep=0).delete == ("1", "2", "3")
    assert plan(refused(3), keep=5).delete == ()
    with pytest.raises(ValueError):
        plan(refused(3), keep=-1)


def test_versions_a_rule_protects_are_kept_whatever_their_age_and_do_not_count_toward_keep():
    versions = [
        Version("1", (), {}),  # trained by hand: no retrain tag
        Version("2", ("champion",), dict(R)),  # serving
        Version("3", (), dict(R, champion_since="2026-11-01T00:00:00Z", champion_until="2026-11-02T00:00:00Z")),
        Version("4", (), dict(R, keep="True")),  # pinned in the UI
        Version("5", (), dict(R)),  # on the rollback stack
        Version("6", (), dict(R, keep="false")),  # not a pin
        Version("7", (), dict(R)),
        Version("8", ("challenger",), dict(R)),
        Version("9", (), dict(R, retrain="false")),
    ]
    p = plan(versions, keep=1, rollback=["5"])
    assert p.delete == ("6",)  # 7 is the newest unprotected one
    assert p.kept["1"] == "not made by a retrain" and p.kept["9"] == "not made by a retrain"
    assert p.kept["2"] == "holds an alias: @champion" and p.kept["8"] == "holds an alias: @challenger"
    assert p.kept["3"] == "served: held @champion"
    assert p.kept["4"] == "pinned: tag keep=True"
    assert p.kept["5"] == "served: on a rollback stack"
    assert p.kept["7"].startswith("newest 1")
    assert set(p.kept) | set(p.delete) == {v.version for v in versions}


def test_having_held_any_alias_but_the_challengers_is_having_served():
    """The challenger alias moves to every new challenger: each refused one held it. Any other alias (the
    champion's, one a second fleet's workers follow) serves."""
    prod = Version("1", (), dict(R, prod_since="2026-11-01T00:00:00Z"))
    was_challenger = Version("2", (), dict(R, challenger_since="2026-11-01T00:00:00Z"))
    p = plan([prod, was_challenger], keep=0)
    assert p.delete == ("2",) and p.kept["1"] == "served: held @prod"
    assert plan([was_challenger], keep=0, challenger_alias="candidate").delete == ()


def test_versions_are_ordered_as_numbers_not_as_text():
    p = plan([Version(str(v), (), dict(R)) for v in (9, 10, 11, 2)], keep=2)
    assert p.delete == ("2", "9")


def test_pins_read_true_in_any_case_and_nothing_else():
    assert pinned({"keep": "true"}) and pinned({"keep": " YES "}) and pinned({"keep": "1"})
    assert not pinned({"keep": "false"}) and not pinned({"keep": ""}) and not pinned({})


def test_the_rollback_stacks_are_every_history_tag_but_the_challengers_read_as_a_list():
    tags = {"champion_history": json.dumps(["1", 3]), "prod_history": '["7"]', "champion_log": '[{"to": "9"}]',
            "broken_history": "not json", "dict_history": '{"a": 1}', "challenger_history": '["2", "4"]'}
    assert rollback_versions(tags) == {"1", "3", "7"}
    assert rollback_versions(tags, challenger_alias="prod") == {"1", "2", "3", "4"}


def test_kept_counts_group_the_reasons():
    p = plan([Version("1", ("champion",), dict(R)), Version("2", ("challenger",), dict(R)), *refused(0),
              Version("3", (), dict(R)), Version("4", (), {})], keep=5)
    assert p.kept_counts() == {"holds an alias": 2, "newest 5": 1, "not made by a retrain": 1}
