"""The PFI Grafana dashboards as data, one module per dashboard (each defines ``DASHBOARD``)."""
