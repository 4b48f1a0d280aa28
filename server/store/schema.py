"""Tables (SQLAlchemy Core) and schema migrations.

Migrations are our own, not Alembic: a `schema_version` table holds one row
with the version reached, and `MIGRATIONS[i]` takes the schema from version
i to i + 1. `migrate` runs the missing steps in one transaction under a lock
(SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so several processes
starting at once migrate exactly once. A database newer than this code is
refused. To change the schema: append a step, never edit a shipped one.

Texts (preferences, messages, answers) are stored as JSON text produced with
`ensure_ascii=True`, so any Python string, control characters included,
round-trips verbatim on both back-ends."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)

from server.store.errors import SchemaTooNew

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

user_profiles = Table(
    "user_profiles",
    metadata,
    Column("user_id", String(256), primary_key=True),
    Column("preferences", Text, nullable=False),  # JSON list of {"text", "weight"}
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

completions = Table(
    "completions",
    metadata,
    Column("completion_id", String(128), primary_key=True),
    Column("choice_index", Integer, primary_key=True),
    Column("user_id", String(256), nullable=True),
    Column("messages", Text, nullable=False),  # JSON list of {"role", "content"}
    Column("prompt_key", String(64), nullable=False),  # sha256 of the messages
    Column("preferences", Text, nullable=False),  # JSON list of {"text", "weight"}; [] = none
    Column("preference_key", String(64), nullable=False),
    Column("answer", Text, nullable=False),  # JSON string
    Column("model", String(256), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_completions_created_at", "created_at"),
    Index("ix_completions_prompt", "prompt_key", "preference_key"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("feedback_id", String(64), nullable=False),
    Column("completion_id", String(128), nullable=False),
    Column("choice_index", Integer, nullable=False),
    Column("user_id", String(256), nullable=True),
    Column("rating_kind", String(8), nullable=True),  # "thumbs" | "scale"
    Column("rating", Integer, nullable=True),  # thumbs: 1 up / 0 down; scale: 1..5
    Column("other_completion_id", String(128), nullable=True),  # this one preferred over that one
    Column("other_choice_index", Integer, nullable=True),
    Column("comment", Text, nullable=True),  # JSON string
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("feedback_id", name="uq_feedback_feedback_id"),
    Index("ix_feedback_completion", "completion_id", "choice_index"),
    Index("ix_feedback_other", "other_completion_id"),
)


# Stored Responses API objects (`store`, `previous_response_id`, GET
# /v1/responses/{id}). Each row holds the whole conversation through its
# answer, so continuing it is one read, not a walk up the chain.
responses = Table(
    "responses",
    metadata,
    Column("response_id", String(128), primary_key=True),
    Column("user_id", String(256), nullable=True),
    Column("conversation", Text, nullable=False),  # JSON list of {"role", "content"}, instructions left out
    Column("call_names", Text, nullable=False),  # JSON {call_id: function name} of the calls in it
    Column("input_items", Text, nullable=False),  # JSON list of the request's own input items, with ids
    Column("response", Text, nullable=False),  # JSON: the response object as it was returned
    Column("created_at", BigInteger, nullable=False),
    Index("ix_responses_created_at", "created_at"),
)


# The Conversations API (/v1/conversations, and `conversation` on
# /v1/responses): a conversation and its items, in order. Kept until deleted
# (as OpenAI keeps them: no retention).
conversations = Table(
    "conversations",
    metadata,
    Column("conversation_id", String(128), primary_key=True),
    Column("user_id", String(256), nullable=True),
    Column("metadata", Text, nullable=False),  # JSON {str: str}
    Column("created_at", BigInteger, nullable=False),
)

conversation_items = Table(
    "conversation_items",
    metadata,
    Column("conversation_id", String(128), primary_key=True),
    Column("position", Integer, primary_key=True),  # 0, 1, ... in the order added (gaps where deleted)
    Column("item_id", String(128), nullable=False),
    Column("item", Text, nullable=False),  # JSON: the item as listed (with its id)
    UniqueConstraint("conversation_id", "item_id", name="uq_conversation_items_item_id"),
)


# Chat completions kept with `store: true` (GET /v1/chat/completions...): the
# chat.completion object as it was returned and the request's messages.
# `seq` breaks ties of `created_at` (one second) in the list's order; the
# metadata's pairs are rows of their own too, so a list filters on them in SQL.
chat_completions = Table(
    "chat_completions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("completion_id", String(128), nullable=False),
    Column("user_id", String(256), nullable=True),
    Column("model", String(256), nullable=False),
    Column("metadata", Text, nullable=False),  # JSON {str: str}
    Column("messages", Text, nullable=False),  # JSON: the request's messages, as sent
    Column("completion", Text, nullable=False),  # JSON: the chat.completion object as it was returned
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("completion_id", name="uq_chat_completions_completion_id"),
    Index("ix_chat_completions_order", "created_at", "seq"),
)

chat_completion_metadata = Table(
    "chat_completion_metadata",
    metadata,
    Column("completion_id", String(128), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(512), nullable=False),
    Index("ix_chat_completion_metadata_pair", "key", "value"),
)


# Who is answering a background response (`background: true`): a lease its
# gateway renews while it runs, so a response whose gateway died is seen as
# failed once the lease runs out instead of running forever; and whether a
# cancel was asked through another gateway (its runner reads it as it renews).
background_responses = Table(
    "background_responses",
    metadata,
    Column("response_id", String(128), primary_key=True),
    Column("token", String(64), nullable=False),  # the runner's
    Column("expires_at_ms", BigInteger, nullable=False),  # unix milliseconds
    Column("cancel_requested", Integer, nullable=False, default=0),
)


# The events of a background response created with `stream: true`, in
# order, so its stream can be read again from any point (GET
# /v1/responses/{id}?stream=true&starting_after=N; server/background_events.py).
# Deleted with their response.
response_events = Table(
    "response_events",
    metadata,
    Column("response_id", String(128), primary_key=True),
    Column("sequence_number", Integer, primary_key=True),
    Column("kind", String(64), nullable=False),  # the event's type
    Column("frame", Text, nullable=False),  # the SSE frame as sent
)


# Files (the Files API: POST /v1/files, a batch's input and its results),
# kept until deleted, their bytes in the database so every gateway over it
# reads them.
files = Table(
    "files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # the lists' order (created_at is seconds)
    Column("file_id", String(128), nullable=False, unique=True),
    Column("user_id", String(256), nullable=True),
    Column("purpose", String(32), nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
    Column("expires_at", BigInteger, nullable=True),  # unix seconds; null: kept until deleted (schema v8)
    Index("ix_files_order", "created_at", "seq"),
    Index("ix_files_expiry", "expires_at"),
)

# Batches (the Batch API: POST /v1/batches): the batch object as it is now,
# and the lease of the gateway running it (as background_responses').
batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # the list's order
    Column("batch_id", String(128), nullable=False, unique=True),
    Column("user_id", String(256), nullable=True),
    Column("batch", Text, nullable=False),  # JSON: the batch object
    Column("created_at", BigInteger, nullable=False),
    Column("token", String(64), nullable=True),  # its runner's; null once no run holds it
    Column("expires_at_ms", BigInteger, nullable=True),
    Column("cancel_requested", BigInteger, nullable=False, default=0),  # since v8 the unix time of the ask
    Index("ix_batches_order", "created_at", "seq"),
)
# A running batch's lease, for the gateways that look for one to resume
# (its runner's expired or released): schema v8.
batches_by_lease = Index("ix_batches_lease", batches.c.expires_at_ms)

# Who a batch's requests run as: the scope of the key that created it (its
# non-secret id, and the users it may act for, narrowed to the batch's
# user), so that a gateway resuming the batch sends them as its creator did,
# if that key is still accepted there.
batch_runs = Table(
    "batch_runs",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("key_id", String(64), nullable=True),  # null: created on a server without keys
    Column("users", Text, nullable=True),  # JSON list; null: every user
    Column("output_expires_s", BigInteger, nullable=True),  # its result files' expiry; null: kept until deleted
)

# A running batch's results so far, one row per input line, stored as they
# come (in input order): a gateway that resumes the batch sends only the
# lines after the last one stored. Moved into the output and error files
# when the batch ends.
batch_results = Table(
    "batch_results",
    metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("line", Integer, primary_key=True),  # 1-based, in the input file
    Column("ok", Integer, nullable=False),  # 1: a 2xx answer (output file); 0: the error file
    Column("result", Text, nullable=False),  # the result's JSON line
)


# Who is answering a response in a conversation (one at a time, across every
# gateway over this store): a lease its gateway renews while the answer is
# written, so a crashed gateway holds the conversation only until it runs out.
conversation_turns = Table(
    "conversation_turns",
    metadata,
    Column("conversation_id", String(128), primary_key=True),
    Column("token", String(64), nullable=False),  # the holder's
    Column("expires_at_ms", BigInteger, nullable=False),  # unix milliseconds
)


def _v1(conn: Connection) -> None:
    for table in (user_profiles, completions, feedback):
        table.create(conn)


def _v2(conn: Connection) -> None:
    responses.create(conn)


def _v3(conn: Connection) -> None:
    conversations.create(conn)
    conversation_items.create(conn)


def _v4(conn: Connection) -> None:
    conversation_turns.create(conn)


def _v5(conn: Connection) -> None:
    chat_completions.create(conn)
    chat_completion_metadata.create(conn)
    background_responses.create(conn)


def _v6(conn: Connection) -> None:
    response_events.create(conn)


def _v7(conn: Connection) -> None:
    files.create(conn)
    batches.create(conn)


def _add_column(conn: Connection, table: Table, name: str) -> None:
    """Adds a column a later schema gave an existing table (a new database
    has it already: its tables are created as they are defined now)."""
    if name not in {column["name"] for column in inspect(conn).get_columns(table.name)}:
        column = table.c[name]
        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                          f"{column.type.compile(dialect=conn.dialect)}"))


def _v8(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":  # batches.cancel_requested holds a unix time now: past 2038 too
        conn.execute(text("ALTER TABLE batches ALTER COLUMN cancel_requested TYPE BIGINT"))
    batch_runs.create(conn)
    batch_results.create(conn)
    _add_column(conn, files, "expires_at")
    for index in (batches_by_lease, *(i for i in files.indexes if i.name == "ix_files_expiry")):
        index.create(conn, checkfirst=True)  # a new database has them from _v7: they are on the tables


MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8]
LATEST = len(MIGRATIONS)
_PG_LOCK_ID = 0x5AD_5709E  # advisory lock key for migrations


def migrate(conn: Connection) -> int:
    """Brings the schema to LATEST inside the caller's transaction; returns
    the version found before."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_ID})
    schema_version.create(conn, checkfirst=True)
    found = conn.execute(select(schema_version.c.version)).scalar()
    if found is None:
        conn.execute(schema_version.insert().values(version=0))
        found = 0
    if found > LATEST:
        raise SchemaTooNew(
            f"the database schema is at version {found}, newer than this server's {LATEST}: upgrade pad-server"
        )
    for step in range(found, LATEST):
        MIGRATIONS[step](conn)
    if found != LATEST:
        conn.execute(schema_version.update().values(version=LATEST))
    return found
