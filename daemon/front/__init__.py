"""HTTP: the OpenAI-compatible /v1 proxy (renaming internal adapter names to public ones), the
admin API (/api), /health, /status, /metrics, request body limits (`bodylimit`) and API keys
(`auth`).

Owns what clients may send and what they see. Knows nothing of how cycles run, documents are
ingested or status is gathered: it is handed callables for those by the service.
"""
