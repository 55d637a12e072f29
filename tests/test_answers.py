"""crv.service.state.Answers: the hot reads' recent answers, state in, decision out."""

from __future__ import annotations

import time

from crv.service.state import Answers


def test_an_answer_is_reused_until_its_cluster_changes() -> None:
    answers = Answers(ttl=60)
    v = answers.version("c")
    answers.put("c", "n1", {"generation": 3}, v)
    answers.put("d", "n1", {"generation": 9}, answers.version("d"))
    assert answers.get("c", "n1") == {"generation": 3}
    answers.drop("c")
    assert answers.get("c", "n1") is None
    assert answers.get("d", "n1") == {"generation": 9}  # another cluster keeps its answers


def test_an_answer_read_while_its_cluster_changed_is_not_kept() -> None:
    """The read started (version taken), a change came in, the read finished: keeping its
    answer would hide the change."""
    answers = Answers(ttl=60)
    before = answers.version("c")
    answers.drop("c")  # a change, delivered while the read was at the store
    answers.put("c", "n1", {"generation": 3}, before)
    assert answers.get("c", "n1") is None
    answers.put("c", "n1", {"generation": 4}, answers.version("c"))
    assert answers.get("c", "n1") == {"generation": 4}


def test_an_answer_ends_after_its_time_and_everything_can_go_at_once() -> None:
    answers = Answers(ttl=0.05)
    answers.put("c", "n1", 1, answers.version("c"))
    assert answers.get("c", "n1") == 1
    time.sleep(0.06)
    assert answers.get("c", "n1") is None
    answers.put("c", "n2", 2, answers.version("c"))
    old = answers.version("c")
    answers.drop()
    assert answers.get("c", "n2") is None and answers.version("c") == old + 1


def test_answers_are_bounded() -> None:
    answers = Answers(ttl=60, most=3)
    for i in range(3):
        answers.put("c", i, i, answers.version("c"))
    answers.put("c", 3, 3, answers.version("c"))  # full: everything goes, then it is kept
    assert [answers.get("c", i) for i in range(4)] == [None, None, None, 3]
