"""Configuration from env and YAML; secrets masked; tokens parsed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from eep_controller.config import Role, Settings, load_settings


def test_env_groups_map_to_nested_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EEP_AUTH_TOKENS", "t1:admin,t2:read")
    monkeypatch.setenv("EEP_ETCD_ENDPOINTS", "http://a:2379, http://b:2379")
    monkeypatch.setenv("EEP_SERVER_PORT", "9090")
    monkeypatch.setenv("EEP_ETCD_CA_CERT", "/etc/ca.pem")
    s = Settings()
    assert s.auth.token_roles() == {"t1": Role.ADMIN, "t2": Role.READ}
    assert s.etcd.endpoints == ["http://a:2379", "http://b:2379"]
    assert s.server.port == 9090
    assert str(s.etcd.ca_cert) == "/etc/ca.pem"


def test_yaml_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "eep.yaml"
    cfg.write_text("server:\n  port: 7000\n  host: 127.0.0.2\netcd:\n  prefix: /custom\n")
    monkeypatch.setenv("EEP_SERVER_PORT", "7001")
    monkeypatch.delenv("EEP_CONFIG", raising=False)
    s = load_settings(str(cfg))
    assert s.server.port == 7001
    assert s.server.host == "127.0.0.2"
    assert s.etcd.prefix == "/custom"


def test_masked_config_never_shows_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EEP_AUTH_TOKENS", "supersecret:admin")
    monkeypatch.setenv("EEP_ETCD_PASSWORD", "hunter2")
    text = str(Settings().masked())
    assert "supersecret" not in text and "hunter2" not in text
    assert "***:admin" in text


@pytest.mark.parametrize("tokens", ["nocolon", "t:superuser", ":admin"])
def test_malformed_tokens_are_rejected(tokens: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EEP_AUTH_TOKENS", tokens)
    with pytest.raises(ValidationError):
        Settings()


def test_bad_prefix_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EEP_ETCD_PREFIX", "eep/")
    with pytest.raises(ValidationError, match="prefix"):
        Settings()
