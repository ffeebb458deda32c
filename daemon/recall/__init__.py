"""Recall: the served model answers from the documents cld holds, from the moment they are ingested.

`index` keeps every ingested document's passages and their vectors (state/recall/, one file per
document) in step with the journal; `frame` is pure: what a request asks, and how recalled passages
are put in front of it; `recaller` is what the front calls for each request.
"""
