"""triage.receive.scp: what a malformed peer makes pynetdicom raise ends that association, not its thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from triage.receive.scp import _guarded, context_problem


class FakeAssociation:
    def __init__(self) -> None:
        self.requestor = SimpleNamespace(address="10.0.0.7")
        self.calls: list[str] = []

    def abort(self) -> None:
        self.calls.append("abort")

    def kill(self) -> None:
        self.calls.append("kill")


def test_an_exception_in_the_association_thread_aborts_it_without_a_traceback(capsys: Any) -> None:
    assoc = FakeAssociation()

    def negotiate() -> None:
        raise TypeError("'abstract_syntax' must be str, bytes or UID, not 'NoneType'")

    t = threading.Thread(target=_guarded(assoc, negotiate))  # type: ignore[arg-type]
    t.start()
    t.join(5)
    assert assoc.calls == ["abort", "kill"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


def test_a_normal_association_thread_is_left_alone() -> None:
    assoc = FakeAssociation()
    ran: list[int] = []
    _guarded(assoc, lambda: ran.append(1))()  # type: ignore[arg-type]
    assert ran == [1] and assoc.calls == []


def _rq(*contexts: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(presentation_context_definition_list=list(contexts))


def test_context_problem_names_the_context_and_what_is_wrong() -> None:
    echo, implicit = "1.2.840.10008.1.1", "1.2.840.10008.1.2"
    ok = SimpleNamespace(context_id=1, abstract_syntax=echo, transfer_syntax=[implicit])
    none = SimpleNamespace(context_id=3, abstract_syntax=None, transfer_syntax=[implicit])
    long_ts = SimpleNamespace(context_id=5, abstract_syntax=echo, transfer_syntax=["1." + "2" * 70])
    assert context_problem(_rq(ok)) == ""
    assert context_problem(_rq(ok, none)).startswith("presentation context 3: 'abstract_syntax' must be")
    assert "presentation context 5" in context_problem(_rq(long_ts))
    assert context_problem(SimpleNamespace()) == ""
