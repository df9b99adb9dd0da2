"""Controller configuration: small models grouped by concern, read from ``EEP_*`` env and YAML.

Environment names are ``EEP_<GROUP>_<FIELD>``, e.g. ``EEP_AUTH_TOKENS="t1:admin,t2:read"``,
``EEP_ETCD_ENDPOINTS="http://10.0.0.1:2379,http://10.0.0.2:2379"``, ``EEP_SERVER_PORT=8080``.
A YAML file (``--config`` or ``EEP_CONFIG``) holds the same groups as nested mappings;
environment variables win over the file.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from platformdirs import user_state_dir
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_PREFIX = "/eep/v1"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EtcdSettings(_Group):
    """Where the truth lives. No endpoints = start the embedded etcd."""

    endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password: SecretStr | None = None
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    data_dir: Path | None = Field(default=None, description="embedded etcd data directory")

    _split = field_validator("endpoints", mode="before")(_split_csv)

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or len(v) < 2:
            raise ValueError("prefix must start with '/' and not end with '/', e.g. /eep/v1")
        return v

    def resolved_data_dir(self) -> Path:
        return self.data_dir or Path(user_state_dir("eep")) / "etcd"


class Role(str, Enum):
    ADMIN = "admin"
    READ = "read"


class AuthSettings(_Group):
    """Bearer tokens: ``token:role`` pairs, roles ``admin`` (may mutate) and ``read``."""

    tokens: SecretStr = SecretStr("")
    open_reads: bool = True

    def token_roles(self) -> dict[str, Role]:
        roles: dict[str, Role] = {}
        for item in self.tokens.get_secret_value().split(","):
            item = item.strip()
            if not item:
                continue
            token, sep, role = item.rpartition(":")
            if not sep or not token:
                raise ValueError("auth tokens must look like 'token:admin,token2:read'")
            try:
                roles[token] = Role(role)
            except ValueError:
                raise ValueError(f"unknown role {role!r}: use admin or read") from None
        return roles

    @field_validator("tokens")
    @classmethod
    def _tokens_parse(cls, v: SecretStr) -> SecretStr:
        cls.model_construct(tokens=v).token_roles()
        return v


class ServerSettings(_Group):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    insecure: bool = False
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a shutdown still running after this stops hard (exit code 3); "
        "at half of it every thread's and task's stack is logged",
    )


class ElectionSettings(_Group):
    lease_ttl_s: int = Field(default=5, ge=2, le=300)
    replica_id: str | None = None


class OperationSettings(_Group):
    reconcile_interval_s: float = Field(default=0.2, gt=0)
    events_kept: int = Field(default=1000, ge=10)
    history_kept: int = Field(default=200, ge=1)
    link_bandwidth_bytes_per_s: float = Field(default=1.0e9, gt=0)


class PlannerSettings(_Group):
    """How the planner runs (its results never depend on it)."""

    workers: int | None = Field(
        default=None,
        ge=0,
        description="worker processes planning layers in parallel; none = cores - 1 (max 3), "
        "0 = plan in the controller process only",
    )


class Settings(BaseSettings):
    """Everything the controller reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="EEP_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    election: ElectionSettings = Field(default_factory=ElectionSettings)
    operations: OperationSettings = Field(default_factory=OperationSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _GroupEnv(settings_cls), _YamlSource(settings_cls))

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, secrets shown as ``***``."""
        data = self.model_dump(mode="json")
        if self.etcd.password is not None:
            data["etcd"]["password"] = "***"
        roles = self.auth.token_roles()
        data["auth"]["tokens"] = ",".join(f"***:{r.value}" for r in roles.values())
        return data


class _GroupEnv(EnvSettingsSource):
    """``EEP_<GROUP>_<FIELD>`` variables only. A bare ``EEP_<GROUP>`` is no setting: eepctl's
    ``EEP_SERVER`` (the controller's URL) is often set in the same shell."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        _, key, is_complex = super().get_field_value(field, field_name)
        return None, key, is_complex


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by ``EEP_CONFIG`` (set by ``--config``)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("EEP_CONFIG")
        if not path:
            return {}
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        unknown = sorted(str(k) for k in data if k not in self.settings_cls.model_fields)
        if unknown:
            known = ", ".join(self.settings_cls.model_fields)
            raise ValueError(f"config file {path}: unknown section(s) {unknown}; known: {known}")
        return data


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Settings from (in order of precedence) overrides, ``EEP_*`` env, the YAML file."""
    if config_file:
        os.environ["EEP_CONFIG"] = config_file
    return Settings(**overrides)
