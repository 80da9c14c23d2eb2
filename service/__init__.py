"""jobwire gRPC service: domain core, storage adapters, live fan-out, servicer."""
