"""The `jobwire` command: the composition root of the service, the bridge and the dashboard."""
