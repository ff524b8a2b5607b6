"""The coordinator's dashboard: an HTTP API (FastAPI) with bundled pages, live updates and Prometheus /metrics.

`api.create_app` builds it over a data directory; `fedfleet serve` runs it next to gRPC and MQTT
(`server.coordinator`). `views` reads the store, `metrics` exports it; `static/` holds the pages.
"""
