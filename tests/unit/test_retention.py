"""Which registered versions a registry keeps (anomaly.retention): pure, on hand-built versions."""

import json

import pytest

from anomaly.retention import Version, plan, pinned, served_versions

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
    p = plan(versions, keep=1, served=["5"])
    assert p.delete == ("6",)  # 7 is the newest unprotected one
    assert p.kept["1"] == "not made by a retrain" and p.kept["9"] == "not made by a retrain"
    assert p.kept["2"] == "holds an alias: @champion" and p.kept["8"] == "holds an alias: @challenger"
    assert p.kept["3"] == "served: held @champion"
    assert p.kept["4"] == "pinned: tag keep=True"
    assert p.kept["5"] == "served: named in an alias's history"
    assert p.kept["7"].startswith("newest 1")
    assert set(p.kept) | set(p.delete) == {v.version for v in versions}


def test_having_held_any_alias_but_the_challengers_is_having_served():
    """The challenger alias moves to every new challenger: each refused one held it. Any other alias (the
    champion's, one a second fleet's workers follow) serves; so does the challenger's when workers follow
    it (a canary fleet: None)."""
    prod = Version("1", (), dict(R, prod_since="2026-11-01T00:00:00Z"))
    was_challenger = Version("2", (), dict(R, challenger_since="2026-11-01T00:00:00Z",
                                           challenger_until="2026-11-02T00:00:00Z"))
    rolled_from = Version("3", (), dict(R, champion_until="2026-11-03T00:00:00Z"))  # moved to in the UI: no _since
    p = plan([prod, was_challenger, rolled_from], keep=0)
    assert p.delete == ("2",) and p.kept["1"] == "served: held @prod" and p.kept["3"] == "served: held @champion"
    assert plan([was_challenger], keep=0, challenger_alias="candidate").delete == ()
    assert plan([was_challenger], keep=0, challenger_alias=None).kept["2"] == "served: held @challenger"
    assert plan([Version("4", (), dict(R, _since="x"))], keep=0).delete == ("4",)  # no alias named


def test_versions_are_ordered_as_numbers_not_as_text():
    p = plan([Version(str(v), (), dict(R)) for v in (9, 10, 11, 2)], keep=2)
    assert p.delete == ("2", "9")


def test_pins_read_true_in_any_case_and_nothing_else():
    assert pinned({"keep": "true"}) and pinned({"keep": " YES "}) and pinned({"keep": "1"})
    assert not pinned({"keep": "false"}) and not pinned({"keep": ""}) and not pinned({})


def test_the_versions_served_are_every_history_and_every_logged_move_but_the_challengers():
    """The log names a holder that a move in the MLflow UI put there (it stamped nothing), once this tool
    moved the alias on from it."""
    tags = {"champion_history": json.dumps(["1", 3]), "prod_history": '["7"]',
            "champion_log": json.dumps([{"from": None, "to": "1"}, {"from": "9", "to": "10"}, "junk"]),
            "broken_history": "not json", "dict_history": '{"a": 1}', "challenger_history": '["2", "4"]',
            "challenger_log": json.dumps([{"from": "2", "to": "5"}]), "pruned_log": json.dumps([{"deleted": ["6"]}])}
    assert served_versions(tags) == {"1", "3", "7", "9", "10"}
    assert served_versions(tags, challenger_alias="prod") == {"1", "2", "3", "4", "5", "9", "10"}
    assert served_versions(tags, challenger_alias=None) == {"1", "2", "3", "4", "5", "7", "9", "10"}


def test_kept_counts_group_the_reasons():
    p = plan([Version("1", ("champion",), dict(R)), Version("2", ("challenger",), dict(R)), *refused(0),
              Version("3", (), dict(R)), Version("4", (), {})], keep=5)
    assert p.kept_counts() == {"holds an alias": 2, "newest 5": 1, "not made by a retrain": 1}
