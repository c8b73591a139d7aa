from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_FIXTURES = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
