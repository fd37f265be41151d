"""Options every `billing` command group shares (one definition, imported by each module)."""

from __future__ import annotations

import click

from billing.persistence import DEFAULT_URL, ENV_VAR

db_option = click.option(
    "--db",
    "db",
    envvar=ENV_VAR,
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help=f"Database URL (env {ENV_VAR}), e.g. postgresql://user@host/db.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
