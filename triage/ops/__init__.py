"""ops: logs, metrics, systemd notification and the nightly scheduler: what runs beside the data path."""
