"""Schema checks of the report tests' records: the helper-built ones and the checked-in fixtures
(the helpers themselves live in tests/support/reports.py)."""

from __future__ import annotations

import json

import pytest

from tests.support.reports import FIXTURES, make_record
from zoo.errors import BadInputError
from zoo.evaluate.record import RunRecord


# ---------------------------------------------------------------- schema checks of the fixtures themselves

def test_helper_records_round_trip(tmp_path):
    record = make_record(n=50, clean=40, robust=20)
    path = record.write(tmp_path)
    assert path == tmp_path / "cifar10" / "linf" / "score-wrn-28-10" / f"{record.run_id}.json"
    assert RunRecord.read(path) == record


def test_checked_in_records_follow_the_schema():
    files = sorted((FIXTURES / "records").rglob("*.json"))
    good = [p for p in files if not p.name.startswith("bad-")]
    assert len(good) >= 2
    for path in good:
        record = RunRecord.read(path)
        stored = json.loads(path.read_text())
        written = record.to_dict()
        # nothing lost or changed on reading (a version-1 fixture is written back as the current version)
        assert {k: written[k] for k in stored if k != "schema_version"} == \
            {k: v for k, v in stored.items() if k != "schema_version"}, path
        assert path.relative_to(FIXTURES / "records") == record.relative_path()


def test_checked_in_bad_records_are_rejected_with_their_name():
    bad = sorted((FIXTURES / "records").rglob("bad-*.json"))
    assert bad
    for path in bad:
        with pytest.raises(BadInputError, match=path.name):
            RunRecord.read(path)
