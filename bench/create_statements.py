"""Count the statements and CPU time of one instance create, in one process.

Usage:
    python bench/create_statements.py \
        --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_create_statements \
        --creates 300

It drops and re-creates the database named in ``--database-url``, migrates it and
creates one organization. Then it runs ``services.instances.create_instance`` the
way the route does: through ``create_once``, with a unique Idempotency-Key, and
with the response rendered and stored. The first ``--warm-up`` creates are not
counted, so that the per-process caches are filled. The next ``--creates`` are. Each create has the body that
``create_load.py`` sends: ``m1.small``, two tags, one metadata key.

It reports per create:
- the statements SQLAlchemy sent (its ``before_cursor_execute`` event),
- the statements sent on the asyncpg connection directly, bypassing SQLAlchemy,
  and the BEGIN, COMMIT and ROLLBACK statements (asyncpg's query logger, minus
  the statements SQLAlchemy sent, which it logs too when they are executemany),
- the CPU time of this process (``time.process_time``: the service's Python
  work and the client side of each round trip),
- the CPU time of the PostgreSQL backends connected to the database (read from
  /proc, so the server must run on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import uuid
from typing import Any

import msgspec
from create_load import FLAVOR_ID, IMAGE_ID, database_cpu_seconds, recreate_database
from sqlalchemy import event

from mycloud_compute.api import views
from mycloud_compute.api.idempotency import json_response
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import idempotency, identity
from mycloud_compute.services import instances as service
from mycloud_compute.services.identity import Principal

REGION = "bench1"
ROUTE = "POST /v1/instances"
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")


class StatementCounter:
    """Counts the statements of a Database's writer engine while ``counting`` is set."""

    def __init__(self, db: Database) -> None:
        self.counting = False
        self.sqlalchemy: collections.Counter[str] = collections.Counter()
        self.driver: collections.Counter[str] = collections.Counter()
        engine = db.writer.sync_engine

        @event.listens_for(engine, "before_cursor_execute")
        def _count_sqlalchemy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if self.counting:
                self.sqlalchemy[statement] += 1

        @event.listens_for(engine, "connect")
        def _log_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection._connection.add_query_logger(self._count_driver)

    def _count_driver(self, record: Any) -> None:
        if self.counting:
            self.driver[record.query] += 1

    def totals(self) -> dict[str, int]:
        control = sum(count for query, count in self.driver.items()
                      if query.rstrip(";").split(" ")[0].upper() in TRANSACTION_CONTROL)
        direct = sum(count for query, count in self.driver.items()
                     if query.rstrip(";").split(" ")[0].upper() not in TRANSACTION_CONTROL
                     and query not in self.sqlalchemy)
        return {"sqlalchemy": sum(self.sqlalchemy.values()), "driver_direct": direct,
                "transaction_control": control}


def create_body(name: str) -> service.CreateRequest:
    return service.CreateRequest(
        name=name, flavor_id=uuid.UUID(FLAVOR_ID), image_id=uuid.UUID(IMAGE_ID), description="",
        networks=None, key_names=[], security_groups=None, metadata={"role": "web"},
        tags=["bench", "web"],
    )


async def create_one(db: Database, principal: Principal, name: str) -> None:
    body = msgspec.json.encode({"name": name, "flavor_id": FLAVOR_ID, "image_id": IMAGE_ID,
                                "tags": ["bench", "web"], "metadata": {"role": "web"}})
    key = idempotency.IdempotencyKey(principal.organization_id, name, ROUTE, idempotency.hash_body(body))
    request = create_body(name)
    response = await idempotency.create_once(
        db,
        key,
        lambda idempotency: service.create_instance(
            db, principal, request, request_id=f"req-{name}", idempotency=idempotency
        ),
        lambda row: json_response(views.instance(row, REGION), 202, f"/v1/instances/{row.id}"),
    )
    assert response.status_code == 202, response


async def run(database_url: str, creates: int, warm_up: int) -> dict[str, Any]:
    await recreate_database(database_url)
    db = Database(database_url, pool_size=2)
    # Before the first connection opens, so that every connection gets the query logger.
    counter = StatementCounter(db)
    try:
        organization_id = await identity.create_organization(db, "bench-statements")
        principal = Principal(organization_id, "bench-statements", "bench", frozenset({"read", "write"}))
        for number in range(warm_up):
            await create_one(db, principal, f"warm-up-{number}")

        _, database_before = await asyncio.to_thread(database_cpu_seconds, database_url, {})
        counter.counting = True
        cpu_before = time.process_time()
        wall_before = time.perf_counter()
        for number in range(creates):
            await create_one(db, principal, f"measured-{number}")
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        counter.counting = False
        database_cpu = await asyncio.to_thread(lambda: database_cpu_seconds(database_url, database_before)[0])
    finally:
        await db.dispose()

    totals = counter.totals()
    return {
        "creates": creates,
        "sqlalchemy_statements_per_create": totals["sqlalchemy"] / creates,
        "direct_driver_statements_per_create": totals["driver_direct"] / creates,
        "transaction_control_per_create": totals["transaction_control"] / creates,
        "process_cpu_ms_per_create": cpu / creates * 1000,
        "postgresql_cpu_ms_per_create": database_cpu / creates * 1000,
        "wall_ms_per_create": wall / creates * 1000,
        "statements": {**dict(counter.sqlalchemy), **{
            query: count for query, count in counter.driver.items() if query not in counter.sqlalchemy
        }},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url",
                        default="postgresql://postgres@127.0.0.1:5432/mycloud_bench_create_statements",
                        help="A dedicated database: it is dropped and re-created.")
    parser.add_argument("--creates", type=int, default=300, help="Measured creates.")
    parser.add_argument("--warm-up", type=int, default=20, help="Creates run before measuring.")
    parser.add_argument("--show-statements", action="store_true", help="Print each statement with its count.")
    args = parser.parse_args()
    result = asyncio.run(run(args.database_url, args.creates, args.warm_up))
    statements = result.pop("statements")
    print(json.dumps({key: round(value, 3) if isinstance(value, float) else value
                      for key, value in result.items()}, indent=1))
    if args.show_statements:
        for query, count in sorted(statements.items(), key=lambda item: -item[1]):
            print(f"{count:6d}  {' '.join(query.split())[:160]}")


if __name__ == "__main__":
    main()
