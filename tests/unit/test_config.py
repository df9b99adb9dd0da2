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
    # load_settings points EEP_CONFIG at the file: set through monkeypatch, so it is undone
    monkeypatch.setenv("EEP_CONFIG", str(cfg))
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


def test_a_bare_group_variable_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """eepctl's EEP_SERVER (a URL) in the same shell does not break the controller's config;
    EEP_SERVER_PORT still sets the port."""
    monkeypatch.setenv("EEP_SERVER", "http://127.0.0.1:8080")
    monkeypatch.setenv("EEP_SERVER_PORT", "9000")
    monkeypatch.setenv("EEP_ETCD", "not a group")
    s = Settings()
    assert s.server.port == 9000 and s.server.host == "127.0.0.1"


def test_an_unknown_section_in_the_config_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "eep.yaml"
    cfg.write_text("servr:\n  port: 7000\n")
    monkeypatch.setenv("EEP_CONFIG", str(cfg))
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['servr'\]; known: etcd"):
        Settings()


@pytest.mark.parametrize(
    ("env", "config", "words"),
    [
        ({"EEP_PLANNER_WORKERS": "abc"}, None, "invalid configuration: planner.workers"),
        ({}, "server: [1, 2\n", "cannot read the configuration"),
        ({}, "server:\n  port: 99999\n", "server.port: Input should be less than or equal"),
        ({}, "servr: {}\n", "unknown section(s) ['servr']"),
    ],
)
def test_eep_controller_names_a_bad_configuration_in_one_message(
    env: dict[str, str], config: str | None, words: str, tmp_path: Path
) -> None:
    import os
    import subprocess

    from tests.support.processes import BIN

    args = [str(BIN / "eep-controller"), "config"]
    if config is not None:
        (tmp_path / "eep.yaml").write_text(config)
        args += ["--config", str(tmp_path / "eep.yaml")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EEP_")}
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**clean, **env}, cwd=tmp_path
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr, out.stderr
