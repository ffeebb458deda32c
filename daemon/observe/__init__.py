"""What an operator sees: the status object (`status`: `cld status`, /api/status), the status page
(`statuspage`: /status) and Prometheus metrics (`metrics`: /metrics), all read from the state
directory, so they are right with the daemon stopped or just restarted.

Owns the views. Knows nothing of how cycles run (it reads their records) or of HTTP.
"""
