"""The index schema (SQLAlchemy Core), portable across SQLite and PostgreSQL.

Patient (PatientID + IssuerOfPatientID) → Study → Series → Instance → Version.
An instance has one *current* version; corrections leave *superseded* versions and
conflicts *quarantined* ones. The blobs of a version are named by their SHA-256.
``change`` is the monotonic change sequence.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# BigInteger ids on PostgreSQL, INTEGER PRIMARY KEY (rowid alias) on SQLite
_Id = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", String(32), nullable=False),
)

patient = Table(
    "patient",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),  # '' when absent
    Column("issuer", String(64), nullable=False),  # IssuerOfPatientID, '' when absent
    Column("patient_name", String(324), nullable=False, default=""),
    Column("patient_name_norm", String(324), nullable=False, default=""),  # upper case
    Column("birth_date", String(8), nullable=False, default=""),
    Column("sex", String(16), nullable=False, default=""),
    Column("num_studies", Integer, nullable=False, default=0),
    UniqueConstraint("patient_id", "issuer", name="uq_patient_key"),
    Index("ix_patient_name_norm", "patient_name_norm"),
)

study = Table(
    "study",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("patient_fk", _Id, ForeignKey("patient.id"), nullable=False, index=True),
    Column("study_date", String(8), nullable=False, default="", index=True),
    Column("study_time", String(16), nullable=False, default=""),
    Column("accession_number", String(64), nullable=False, default="", index=True),
    Column("study_id", String(16), nullable=False, default=""),
    Column("description", String(64), nullable=False, default=""),
    Column("referring_physician", String(324), nullable=False, default=""),
    Column("modalities", String(256), nullable=False, default=""),  # '\\'-joined, sorted
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("updated_at", String(32), nullable=False, default=""),
    # study stability (docs/hcm.md): 0 from any change of its content until it has been
    # quiet for [hcm].stable_after; changed_at is that last change (migration 4)
    Column("settled", Integer, nullable=False, default=0),
    Column("changed_at", String(32), nullable=False, default=""),
    Column("stable_events", Integer, nullable=False, default=0),
    Index("ix_study_unsettled", "settled", "changed_at"),
)

series = Table(
    "series",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), nullable=False, unique=True),
    Column("study_fk", _Id, ForeignKey("study.id"), nullable=False, index=True),
    Column("modality", String(16), nullable=False, default="", index=True),
    Column("series_number", Integer, nullable=True),
    Column("description", String(64), nullable=False, default=""),
    Column("body_part", String(64), nullable=False, default=""),
    Column("series_date", String(8), nullable=False, default=""),
    Column("num_instances", Integer, nullable=False, default=0),
)

instance = Table(
    "instance",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("series_fk", _Id, ForeignKey("series.id"), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("num_frames", Integer, nullable=True),
    Column("current_version_fk", _Id, nullable=True),
)

version = Table(
    "version",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("instance_fk", _Id, ForeignKey("instance.id"), nullable=False),
    Column("state", String(16), nullable=False),  # models.VersionState
    Column("digest", String(64), nullable=False),  # SHA-256 of the data set (content)
    Column("header_key", String(64), nullable=False, index=True),
    Column("pixel_key", String(64), nullable=True, index=True),
    Column("trailer_key", String(64), nullable=True, index=True),
    Column("prefix", LargeBinary, nullable=False),  # preamble + file meta as received
    Column("transfer_syntax", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("dicom_json", Text, nullable=False),  # PS3.18 F.2, bulk data as BulkDataURI
    Column("institution", String(64), nullable=False),
    Column("source_ae", String(16), nullable=False, default=""),
    Column("source_host", String(64), nullable=False, default=""),
    Column("protocol", String(16), nullable=False),
    Column("received_at", String(32), nullable=False),
    # bytes this version added to the blob store (the rest was already there): the
    # measure of what content addressing saves (migration 3; NULL = stored before it)
    Column("new_bytes", BigInteger, nullable=True),
    Index("ix_version_instance_digest", "instance_fk", "digest"),
    Index("ix_version_state", "state"),
)

change = Table(
    "change",
    metadata,
    Column("seq", _Id, primary_key=True, autoincrement=True),
    Column("at", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False, default=""),
    Column("sop_uid", String(64), nullable=False, default=""),
    Column("version_fk", _Id, nullable=True),
    Column("patient_id", String(64), nullable=False, default=""),  # migration 4
    Column("issuer", String(64), nullable=False, default=""),
)

# Which institutions sent a study's current content: the tenancy filter of the query
# engine (anim.index.search, docs/security.md) reads it (migration 5).
study_source = Table(
    "study_source",
    metadata,
    Column("study_fk", _Id, ForeignKey("study.id"), nullable=False),
    Column("institution", String(64), nullable=False),
    UniqueConstraint("study_fk", "institution", name="uq_study_source"),
    Index("ix_study_source_institution", "institution", "study_fk"),
)

# Compromise containment (docs/security.md): an institution's AEs and tokens are refused
# from revoked_at on, and what it sent from *after* on is hidden from every query and
# retrieval (kept, restorable) until restored_at (migration 7).
revocation = Table(
    "revocation",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("institution", String(64), nullable=False, index=True),
    Column("after", String(32), nullable=False),  # ISO 8601 UTC
    Column("revoked_at", String(32), nullable=False),
    Column("restored_at", String(32), nullable=False, default=""),  # '' = in force
    Column("reason", String(256), nullable=False, default=""),
)

# Patients' restrictions (EHDS Art. 8): a restricted study is hidden from every
# institution but those that sent it, national roles included (migration 8).
restriction = Table(
    "restriction",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("created_at", String(32), nullable=False),
    Column("reason", String(256), nullable=False, default=""),
)

# Garbage collection's condemned blobs (anim.maintenance): unreferenced blobs gc is about
# to remove ("condemned"), and those it removed ("deleted"). A store removes the rows of
# its blobs in its own transaction; finding "deleted" tells it to put them again. The row
# lock gc holds while it removes a blob is what makes gc safe against concurrent ingest.
blob_condemned = Table(
    "blob_condemned",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("state", String(16), nullable=False),  # condemned | deleted
    Column("modified", Float, nullable=False),  # the blob's modified time gc saw
    Column("at", String(32), nullable=False),
)

# Named counters. "change" hands out the change sequence: taken with a row lock at the
# end of each write transaction, so numbers are committed in order and without holes
# even with several archive processes on one database (a database sequence is neither).
counter = Table(
    "counter",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Webhooks: how far each endpoint's fan-out has read the change sequence ...
webhook_cursor = Table(
    "webhook_cursor",
    metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)

# ... and the persistent outbox of notifications, delivered in order per study.
webhook_outbox = Table(
    "webhook_outbox",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("endpoint", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered
    Column("attempts", Integer, nullable=False, default=0),
    Column("due_ms", BigInteger, nullable=False, default=0),  # next attempt, epoch ms
    Column("lease_ms", BigInteger, nullable=False, default=0),  # claimed until, epoch ms
    Column("last_error", String(256), nullable=False, default=""),
    Column("delivered_at", String(32), nullable=False, default=""),
    UniqueConstraint("endpoint", "seq", name="uq_webhook_outbox_seq"),
    Index("ix_webhook_outbox_pending", "endpoint", "state", "study_uid", "id"),
)
