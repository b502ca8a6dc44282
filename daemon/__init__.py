"""The long-running manager: a job daemon on a unix socket, its Prometheus metrics, the
read-only dashboard's data, and database maintenance (online backup, integrity checks)."""
