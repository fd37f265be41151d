"""Persistence: the only package that imports SQLAlchemy.

Tables and their Alembic migrations, engine creation from a URL, repositories that speak in
domain records (`billing.records`), and the unit of work that makes each command one transaction.
"""

from sqlalchemy.engine import Engine

from billing.persistence.engine import (
    DEFAULT_URL,
    ENV_VAR,
    DatabaseError,
    create_engine,
    current_revision,
    default_url,
    describe_error,
    display_url,
    head_revision,
    normalize_url,
    sqlite_file,
    upgrade,
)
from billing.persistence.parts import CustomerBalances, PartWrite, StoredPart, StoredRun, SubscriptionState
from billing.persistence.repository import (
    ConcurrentModification,
    CustomerView,
    PersistenceError,
    StoredBook,
    StoredCommand,
    SubscriptionView,
)
from billing.persistence.unit_of_work import UnitOfWork, utc_now

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "ConcurrentModification",
    "CustomerBalances",
    "CustomerView",
    "DatabaseError",
    "Engine",
    "PartWrite",
    "PersistenceError",
    "StoredBook",
    "StoredCommand",
    "StoredPart",
    "StoredRun",
    "SubscriptionState",
    "SubscriptionView",
    "UnitOfWork",
    "create_engine",
    "current_revision",
    "default_url",
    "describe_error",
    "display_url",
    "head_revision",
    "normalize_url",
    "sqlite_file",
    "upgrade",
    "utc_now",
]
