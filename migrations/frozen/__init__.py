"""Application code as old migrations need it, copied here as it was when they were written: never edit it.

A migration that imported its helpers from `app` (a slug, an email's stored form, the usage roll-up) did
something else on a fresh database whenever that code changed later: a migration must do today what it did
when it was written. So each module here is a frozen copy of the app code of its day, used only by the
migrations it names; the app's own copy is free to change. A later migration that needs other behaviour gets
a module of its own (a new name), never a change to one of these; tests/test_migrations.py checks that no
migration, nor anything here, imports from `app` (but for the index helpers of `app.migrations`, which say how
an index is built, not what a migration changes).

The `duplicates` tool lists these copies against the app's modules (and 0011's ledger reader against 0020's):
that is by design, not code to share.
"""
