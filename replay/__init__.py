"""Replay buffer of the base model's original text (FAISS index, selection strategies).

Owns the buffer on disk and everything done with it. Knows nothing of the daemon: it is given text
and settings and returns passages.

    corpus   corpus files → passages (streamed; the held-out rule)
    embed    embedder registry; the default all-MiniLM-L6-v2
    store    passages (SQLite) and their vectors on disk
    index    FAISS: kind by size, build, tune, save, load
    synth    text the base model writes: synthetic corpus, behaviour-rehearsal pairs
    build    the build recipe (`python -m replay.build JOB.json`) and the manifest
    buffer   a built buffer opened for reading
    select   strategies (nearest, random, diverse, mix) and a cycle's replay
    files    the replay folder's file names
    durable  atomic writes, durable moves, locks: shared with the daemon (the lower package)
"""
