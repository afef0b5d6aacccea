"""Typed configuration: one settings model per service.

Each service subclasses `ServiceSettings` with its own fields (each with a default and a
description) and an env prefix. Values come from, highest priority first: explicit overrides
(CLI flags), environment variables (``WMPO_<SERVICE>_<FIELD>``), an optional YAML file, defaults.
The YAML file may hold every service's settings in sections named after the services
(``policy:``, ``worldmodel:``, ``trainer:``); a file without such a section configures just that service.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from wmpo.common.errors import UserError

_yaml_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("wmpo_yaml_values")


class ConfigError(UserError):
    """Configuration that cannot be used; the message names the setting and its source."""


class _YamlSource(PydanticBaseSettingsSource):
    """Values read from the YAML file passed to `ServiceSettings.load` (lower priority than env)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        values = _yaml_values.get({})
        return values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_values.get({}))


class ServiceSettings(BaseSettings):
    """Settings common to every service; subclasses add their own and set `section` and the env prefix."""

    model_config = SettingsConfigDict(env_prefix="WMPO_", extra="forbid", validate_default=True)
    section: ClassVar[str] = "common"

    log_level: str = Field(default="INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(default=False, description="Log one JSON object per line (for log shippers).")
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)

    @classmethod
    def env_prefix(cls) -> str:
        """The prefix of this service's environment variables, e.g. ``WMPO_POLICY_``."""
        return str(cls.model_config.get("env_prefix", ""))

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Self:
        """Build the settings from overrides, env vars, `config_file` and defaults (in that order).

        Overrides whose value is None are ignored, so CLI options can be passed straight through.
        Raises `ConfigError` with one readable line per problem.
        """
        values = _read_yaml(config_file, cls) if config_file else {}
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"{config_file}: unknown {cls.section} setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(cls.model_fields))}"
            )
        token = _yaml_values.set(values)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc, config_file)) from None
        finally:
            _yaml_values.reset(token)

    @classmethod
    def describe_fields(cls) -> list[tuple[str, str, Any, str]]:
        """(name, env var, default, description) of every setting, for docs and `config` commands."""
        rows = []
        for name, info in cls.model_fields.items():
            env = f"{cls.env_prefix()}{name}".upper()
            rows.append((name, env, info.get_default(call_default_factory=True), info.description or ""))
        return rows


def _read_yaml(path: Path, cls: type[ServiceSettings]) -> dict[str, Any]:
    """This service's values from a YAML file: its own section of a sectioned file, or the whole file."""
    section = cls.section
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(loaded).__name__}")
    sectioned = section in loaded or any(
        isinstance(value, dict) and key not in cls.model_fields for key, value in loaded.items()
    )
    if not sectioned:
        return dict(loaded)
    own = loaded.get(section) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
    return dict(own)


def _describe(cls: type[ServiceSettings], exc: ValidationError, config_file: Path | None) -> str:
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "(settings)"
        env = f"{cls.env_prefix()}{name}".upper()
        where = f" (from ${env})" if env in os.environ else (f" (from {config_file})" if config_file else "")
        problems.append(f"{cls.section}.{name}: {err['msg']}, got {err.get('input')!r}{where}")
    return "invalid configuration: " + "; ".join(problems)
