"""Settings: YAML file, ZTAI_* overrides, clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztai.config import load_settings, with_upstreams
from ztai.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ztai.yaml"
    path.write_text(text)
    return path


def test_defaults_need_no_file_and_use_sqlite_in_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.store_url == f"sqlite:///{tmp_path / '.ztai' / 'ztai.db'}"
    assert settings.server.port == 8787 and settings.identity.default_ttl_seconds == 300


def test_yaml_values_and_relative_paths(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "trust_domain: acme.io\ndata_dir: state\nserver: {port: 9000}\n")
    )
    assert settings.trust_domain == "acme.io" and settings.server.port == 9000
    assert settings.data_path == tmp_path / "state"
    assert settings.policy_path == tmp_path / "policies"
    assert settings.issuer == "spiffe://acme.io/service/ztai"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server: {port: 9000, host: 0.0.0.0}\n")
    monkeypatch.setenv("ZTAI_SERVER__PORT", "9100")
    monkeypatch.setenv("ZTAI_STORE__URL", "postgresql+psycopg://x@db/ztai")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"  # untouched keys of the same section survive
    assert settings.store_url == "postgresql+psycopg://x@db/ztai"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server: {port: high}\n", "server.port"),
        ("server: {prot: 1}\n", "server.prot"),
        ("identity: {default_ttl_seconds: 9000, max_ttl_seconds: 60}\n", "identity"),
        ("trust_domain: Not Valid\n", "trust_domain"),
        ("upstreams: {x: {base_url: ftp://x}}\n", "upstreams.x.base_url"),
        ("unknown_section: 1\n", "unknown_section"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert key in raised.value.message


def test_invalid_environment_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTAI_SERVER__PORT", "-5")
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(write(tmp_path, ""))


def test_yaml_syntax_errors_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(write(tmp_path, "server: [unclosed\n"))
    with pytest.raises(ConfigError, match="ztai init"):
        load_settings(tmp_path / "absent.yaml")


def test_extra_upstreams_are_added_on_top(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "upstreams: {a: {base_url: 'http://a/v1', models: [a]}}\n"))
    merged = with_upstreams(settings, {"mock": {"base_url": "http://127.0.0.1:9100/v1", "models": ["mock"]}})
    assert set(merged.upstreams) == {"a", "mock"}
    assert merged.config_dir == settings.config_dir
    with pytest.raises(ConfigError, match="base_url"):
        with_upstreams(settings, {"bad": {"base_url": "nope"}})


def test_init_writes_the_detect_defaults() -> None:
    """`ztai init`'s ztai.yaml states the same detector defaults the code has (embeddings: secrets only;
    the identifying personal-data types the shipped policy tokenizes)."""
    import yaml

    from ztai.cli.main import CONFIG_TEMPLATE
    from ztai.config import DetectSettings

    written = yaml.safe_load(CONFIG_TEMPLATE.format(trust_domain="example.org"))["detect"]
    assert DetectSettings(**written) == DetectSettings()
    assert written["embeddings"]["input"] == ["secrets"]


def test_agent_sessions_are_shared_whenever_several_processes_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    one = load_settings()
    assert one.session_backend() == "memory" and one.shared_state_problem(1) is None
    assert one.session_backend(2) == "sql" and one.shared_state_problem(2) is None
    assert load_settings(server={"workers": 3}).session_backend() == "sql"
    assert load_settings(store={"url": "postgresql+psycopg://u@h/db"}).session_backend() == "sql"
    assert load_settings(store={"redis_url": "redis://h:6379/0"}).session_backend(4) == "redis"
    memory = load_settings(agents={"session_store": "memory"})
    problem = memory.shared_state_problem(2)
    assert problem is not None and "store.redis_url" in problem and "--workers 1" in problem
    with pytest.raises(ConfigError, match="session_store redis needs store.redis_url"):
        load_settings(agents={"session_store": "redis"})


def test_redis_timeouts_are_short_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().store.redis_timeout_seconds == 2.0
    assert load_settings(store={"redis_timeout_seconds": 0.5}).store.redis_timeout_seconds == 0.5
    for wrong in (0, -1, 31):
        with pytest.raises(ConfigError, match="redis_timeout_seconds"):
            load_settings(store={"redis_timeout_seconds": wrong})
