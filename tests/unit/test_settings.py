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


def test_secrets_are_not_printed_but_the_redis_url_still_says_where() -> None:
    env = {
        "SHOPREC_REDIS_URL": "rediss://app:hunter2@cache.internal:6380/2?ssl_ca_certs=ca.pem",
        "SHOPREC_KAFKA_SASL_PASSWORD": "swordfish",
        "SHOPREC_API_KEY": "k3y",
    }
    result = CliRunner().invoke(main, ["config"], env=env)
    assert result.exit_code == 0
    for secret in ("hunter2", "swordfish", "k3y"):
        assert secret not in result.output
    shown = "SHOPREC_REDIS_URL=rediss://app:***@cache.internal:6380/2?ssl_ca_certs=ca.pem"
    assert shown in result.output
    assert "SHOPREC_API_KEY=***\n" in result.output


def test_the_stack_env_file_is_read_from_the_stack_folder_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `stack up` writes stack.env into SHOPREC_STACK_DIR; later commands naming that folder
    # must find the stack's endpoints there, and a real variable still wins.
    (tmp_path / "stack.env").write_text("SHOPREC_KAFKA_BOOTSTRAP=10.1.2.3:19092\n")
    monkeypatch.delenv("SHOPREC_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("SHOPREC_STACK_DIR", str(tmp_path))
    assert Settings().kafka_bootstrap == "10.1.2.3:19092"
    assert Settings(_env_file=None).kafka_bootstrap == "127.0.0.1:9092"  # type: ignore[call-arg]
    monkeypatch.delenv("SHOPREC_STACK_DIR")
    assert Settings(stack_dir=tmp_path).kafka_bootstrap == "10.1.2.3:19092"
    monkeypatch.setenv("SHOPREC_KAFKA_BOOTSTRAP", "broker:9092")
    assert Settings(stack_dir=tmp_path).kafka_bootstrap == "broker:9092"


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
