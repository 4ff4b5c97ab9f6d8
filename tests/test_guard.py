"""The refactor guard (tests/guard.py): every configuration's token ids as recorded. A change that
alters outputs on purpose re-records them (``python tests/guard.py --record``) and says which moved."""
import json

import pytest
from guard import RECORD, configurations, run

CONFIGS = configurations()


@pytest.fixture(scope="module")
def recorded():
    with open(RECORD) as f:
        return json.load(f)


def test_every_configuration_is_recorded(recorded):
    assert sorted(recorded) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_as_recorded(name, recorded):
    assert run(CONFIGS[name]) == recorded[name], f"{name}: outputs moved (python tests/guard.py --check lists all)"
