"""`make faults`: the service, the bridge and the store are killed, frozen, starved of
disk and restarted under concurrent callbacks; afterwards every acknowledged callback
must be stored exactly once (checked over gRPC). Loopback only, bounded in time."""
