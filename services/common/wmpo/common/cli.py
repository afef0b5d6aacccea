"""The `wmpo` command line. Services add their sub-commands through the ``wmpo.cli`` entry-point
group (``<name> = "<module>:<typer app>"``), so this module imports no service code itself.

Errors a user can fix (`UserError`) are printed as one line ``wmpo: error: ...`` with exit code 2.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from wmpo.common import __version__
from wmpo.common.config import ServiceSettings
from wmpo.common.errors import UserError
from wmpo.common.logs import configure_logging

ENTRY_POINT_GROUP = "wmpo.cli"
_REPORTED_PACKAGES = (
    "torch", "transformers", "diffusers", "grpcio", "protobuf", "numpy", "nvidia-pytriton", "redis", "metaworld",
)  # fmt: skip

app = typer.Typer(
    name="wmpo",
    help="WMPO: improve VLA policies with RL inside a learned video world model, and serve them to robots.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.", envvar="WMPO_LOG_LEVEL")] = "INFO",
    log_json: Annotated[bool, typer.Option(help="Log JSON lines.", envvar="WMPO_LOG_JSON")] = False,
) -> None:
    try:
        configure_logging(log_level, json=log_json)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None


@app.command()
def version(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Print the wmpo version and the versions of the main libraries it runs on."""
    libs: dict[str, str | None] = {}
    for name in _REPORTED_PACKAGES:
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = None
    if as_json:
        typer.echo(json.dumps({"wmpo": __version__, "python": sys.version.split()[0], "libraries": libs}))
        return
    typer.echo(f"wmpo {__version__} (python {sys.version.split()[0]})")
    for name, ver in libs.items():
        typer.echo(f"  {name:<16} {ver or 'not installed'}")


def add_config_command(service_app: typer.Typer, settings_cls: type[ServiceSettings]) -> None:
    """Give a service's CLI a `config` command that prints its effective settings and where to set them."""

    def config(
        config_file: Annotated[
            Path | None,
            typer.Option("--config", help="YAML file (a whole RUN.yaml or this service's section)."),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the values as one JSON object.")] = False,
    ) -> None:
        settings = settings_cls.load(config_file)
        values = settings.model_dump(mode="json")
        if as_json:
            typer.echo(json.dumps(values, sort_keys=True))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"wmpo {settings_cls.section} settings", title_justify="left")
        for column in ("setting", "value", "environment variable", "description"):
            table.add_column(column, overflow="fold")
        for name, env, default, doc in settings_cls.describe_fields():
            value = values[name]
            shown = repr(value) + ("" if value == _jsonable(default) else "  (set)")
            table.add_row(name, shown, env, doc)
        Console(width=160).print(table)

    config.__doc__ = f"Show the {settings_cls.section} service's effective settings (defaults, YAML, env)."
    service_app.command("config")(config)


def check_device(device: str) -> None:
    """Refuse a `--device` this machine cannot run (one line, exit 2): cpu, or cuda[:N] with CUDA present."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


_registered = False


def build_app() -> typer.Typer:
    """The root app with every service's sub-commands attached (done once, on first call)."""
    global _registered  # noqa: PLW0603
    if not _registered:
        _registered = True
        _register_services()
    return app


def _register_services() -> None:
    """Attach every service's typer app found in the ``wmpo.cli`` entry points."""
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            sub: Any = ep.load()
        except ImportError as exc:  # a service whose extra is not installed
            missing = typer.Typer(help=f"(unavailable: {exc})")

            @missing.callback(invoke_without_command=True)
            def _unavailable(_exc: ImportError = exc, _name: str = ep.name) -> None:
                raise UserError(f"`wmpo {_name}` needs `pip install 'wmpo[{_name}]'` ({_exc})")

            sub = missing
        app.add_typer(sub, name=ep.name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `wmpo` script: run the CLI, turning `UserError` into one line and exit 2."""
    try:
        build_app()(args=argv, prog_name="wmpo", standalone_mode=True)
    except UserError as exc:
        typer.echo(f"wmpo: error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
