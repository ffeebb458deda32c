"""Documents in: handing files in to the inbox (`inbox`, `submit` for `cld ingest`), watching it
(`watch`), reading formats (`readers`), normalising and chunking (`chunking`), and the journal
(`journal`, SQLite) that makes intake crash-safe (`ingest`).

Owns every document from the inbox to a chunked journal entry, processed/ or quarantine/. Knows
nothing of training, serving or HTTP.
"""
