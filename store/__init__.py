"""The user store: durable user records and nearest-preference search (built on the core, never imported by it).

Planned in issue 5: SQLite (WAL) records of fitted users, a FAISS index derived from them, and
an LRU of materialised embeddings. Until then the servable users are a checkpoint's own table.
"""
