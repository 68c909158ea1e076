"""Plans are a function of (seed, epoch, observed losses): the same as recorded from 0.2.0.

tests/data/plans_v0_2.json holds, for thirteen policy/schedule cases, every epoch's plan in training
order as gpuprune 0.2.0 made it (tests/data/record_plans.py). A redesign must reproduce them exactly;
an intended change of plans changes this file in the same commit and says so in the notes.
"""

import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).with_name("data")
sys.path.insert(0, str(DATA))
import record_plans  # noqa: E402

RECORDED = json.loads((DATA / "plans_v0_2.json").read_text())


def test_the_recording_covers_every_case():
    assert set(RECORDED["plans"]) == set(record_plans.CASES)
    assert (RECORDED["N"], RECORDED["epochs"]) == (record_plans.N, record_plans.EPOCHS)


@pytest.mark.parametrize("case", sorted(record_plans.CASES))
def test_same_plans_as_recorded(case):
    got = record_plans.run(case)
    want = RECORDED["plans"][case]
    for epoch, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), f"{case}: epoch {epoch} selects another set"
        assert g == w, f"{case}: epoch {epoch} has the same set in another order"
    assert len(got) == len(want)
