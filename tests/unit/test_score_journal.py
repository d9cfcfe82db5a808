"""The scoring journal (`jobs/score_journal.py`) on its own: what a stopped run left is taken back only when it is
the same setup, and a line a kill cut short neither breaks the file nor joins the next answer."""

from __future__ import annotations

from cytoloop.serving.inference import CellResult
from jobs.score_journal import ScoreJournal

SETUP = {"version": "local-abc", "routing": {"review_below": 0.7}, "allowed": None, "runtime": None}


def answer(i: int) -> CellResult:
    return CellResult(
        i, f"/cells/{i}.png", f"id{i}", "monocyte", {"monocyte": 0.9, "neutrophil": 0.1}, 0.9, 0.33, None, "accept", 12
    )


def test_a_killed_writer_s_answers_are_taken_back_and_its_cut_line_is_dropped(tmp_path):
    path = tmp_path / "scores.csv.journal"
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {}
        for i in range(3):
            journal.write(f"/cells/{i}.png", answer(i))
    with path.open("a") as handle:
        handle.write('{"path": "/cells/3.png", "result": {"ind')  # the kill came mid-line
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {f"/cells/{i}.png": answer(i) for i in range(3)}
        journal.write("/cells/4.png", answer(4))
    with ScoreJournal(path, SETUP) as journal:
        assert sorted(journal.answers) == ["/cells/0.png", "/cells/1.png", "/cells/2.png", "/cells/4.png"]


def test_a_journal_of_other_settings_is_set_aside_and_taken_back_by_a_run_of_its_settings(tmp_path):
    """A run with a stray setting set the journal aside as `.old`, and the next stray run overwrote that: run A,
    then B, then B again and A again, and A's hours of answers were gone. Now each setup's journal is kept aside
    under its own name and taken back by the next run of that setup."""
    path = tmp_path / "scores.csv.journal"
    with ScoreJournal(path, SETUP) as journal:
        journal.write("/cells/0.png", answer(0))
    other = {**SETUP, "routing": {"review_below": 0.5}}
    with ScoreJournal(path, other) as journal:
        assert journal.answers == {}  # not the other setup's answers
        journal.write("/cells/1.png", answer(1))
    with ScoreJournal(path, other) as journal:
        assert journal.answers == {"/cells/1.png": answer(1)}
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {"/cells/0.png": answer(0)}  # taken back
        journal.write("/cells/2.png", answer(2))
    with ScoreJournal(path, other) as journal:
        assert journal.answers == {"/cells/1.png": answer(1)}
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {"/cells/0.png": answer(0), "/cells/2.png": answer(2)}
    assert len(list(tmp_path.glob("scores.csv.journal.*.old"))) == 1  # the other setup's, nothing else
    path.write_text('{"journal": "cytoloop-sc')  # killed while writing its first line: no answers to keep
    with ScoreJournal(path, other) as journal:
        assert journal.answers == {"/cells/1.png": answer(1)}
        journal.write("/cells/3.png", answer(3))
    with ScoreJournal(path, other) as journal:
        assert journal.answers == {"/cells/1.png": answer(1), "/cells/3.png": answer(3)}


def test_a_second_run_on_one_journal_is_refused_while_the_first_writes(tmp_path):
    """The second truncated the journal and wrote over the first's answers from its own offset."""
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    from cytoloop.errors import UsageError

    path = tmp_path / "scores.csv.journal"
    with ScoreJournal(path, SETUP) as journal:
        journal.write("/cells/0.png", answer(0))
        with ThreadPoolExecutor(1) as another:  # another run, in a thread of its own
            second = another.submit(ScoreJournal, path, {**SETUP, "routing": {"review_below": 0.5}})
            with pytest.raises(UsageError, match="being written by another scoring run"):
                second.result()
        with pytest.raises(UsageError, match="being written by another scoring run"):
            ScoreJournal(path, SETUP)  # or in this thread
        journal.write("/cells/1.png", answer(1))
    with ScoreJournal(path, SETUP) as journal:
        assert sorted(journal.answers) == ["/cells/0.png", "/cells/1.png"]


def test_a_file_of_undecodable_bytes_at_the_journal_s_path_is_no_journal_not_a_crash(tmp_path):
    """A file not UTF-8 at OUT.journal ended the run in the general "an input file is not UTF-8 text", naming no
    file; it is read as a journal with no header (as one cut in its first line), and scoring starts afresh."""
    path = tmp_path / "scores.csv.journal"
    path.write_bytes(b"\xff\xfe\x00garbage from elsewhere\n\xe9\n")
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {}
        journal.write("/cells/0.png", answer(0))
    with ScoreJournal(path, SETUP) as journal:
        assert journal.answers == {"/cells/0.png": answer(0)}
