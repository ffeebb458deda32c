"""cld: a continual-learning daemon that serves an LLM through vLLM and teaches it new documents.

The folders are the architecture, each layer importing only those below it
(tests/test_architecture.py checks this):

    cli, service   entry points: the `cld` commands; the daemon's wiring, start-up and shutdown
    front/         HTTP: the OpenAI-compatible /v1 proxy, /api, /status, /metrics, access control
    observe/       status object, status page, Prometheus metrics (read the state directory)
    learning/      the cycle: replay plan, training job and recipe, probes, decision, adapters
    ingestion/     inbox, watcher, readers, chunking, journal
    engine/        the model servers: vLLM's command line and client, supervisor, router
    config, layout, model, logs, systemd   the ground floor: settings, state-dir names, the base
                   model, logging, sd_notify

Owns the daemon. Knows nothing of how the replay buffer is built or searched: that is `replay/`,
which knows nothing of the daemon.
"""

__version__ = "0.1.0"
