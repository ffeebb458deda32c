"""The model servers: vLLM's command line, environment and HTTP client (`vllm`), its supervision
as a child that dies with the daemon (`supervisor`, `reaper`), and which served name answers each
public model name (`router`).

Owns every conversation with vLLM and the mapping `cld` / `cld-base` → what vLLM serves. Knows
nothing of documents, training, probes or HTTP clients of cld.
"""
