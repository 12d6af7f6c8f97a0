"""The settings object: documented, strict, and the README's table is the code's."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from cli.main import main
from shoprec.settings import Settings

README = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    missing = [n for n, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_environment_configures_and_typos_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPREC_TOP_K", "7")
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", "a:1,b:2")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.top_k == 7
    assert s.faust_broker == "kafka://a:1;kafka://b:2"
    with pytest.raises(ValidationError):
        Settings(_env_file=None, top_kk=3)  # type: ignore[call-arg]
    monkeypatch.setenv("SHOPREC_TOP_K", "0")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_readme_configuration_table_matches_the_code() -> None:
    result = CliRunner().invoke(main, ["config", "--markdown"], env={"SHOPREC_TOP_K": "3"})
    assert result.exit_code == 0, result.output
    table = result.output.strip().splitlines()
    assert len(table) == len(Settings.model_fields) + 2
    readme = README.read_text()
    stale = [row for row in table if row not in readme]
    assert stale == [], "README's configuration table is stale: run `shoprec config --markdown`"


def test_secrets_are_not_printed() -> None:
    result = CliRunner().invoke(
        main, ["config"], env={"SHOPREC_REDIS_URL": "redis://:hunter2@h:6379/0"}
    )
    assert result.exit_code == 0
    assert "hunter2" not in result.output


def test_help_names_environment_variables() -> None:
    result = CliRunner().invoke(main, ["stack", "up", "--help"])
    assert "SHOPREC_BROKER" in result.output


@pytest.mark.parametrize("fetch_wait", [None, 40])
def test_settings_survive_the_trip_to_a_child_process(
    monkeypatch: pytest.MonkeyPatch, fetch_wait: int | None
) -> None:
    """Workers, benches and replays hand settings to children as SHOPREC_* variables."""
    parent = Settings(
        _env_file=None,  # type: ignore[call-arg]
        broker="tansu",
        top_k=7,
        consumer_fetch_max_wait_ms=fetch_wait,
    )
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SHOPREC_{name.upper()}", raising=False)
    for key, value in parent.as_env().items():
        monkeypatch.setenv(key, value)
    child = Settings(_env_file=None)  # type: ignore[call-arg]
    assert child == parent
    assert child.fetch_max_wait_ms == (5 if fetch_wait is None else fetch_wait)
