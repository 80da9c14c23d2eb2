"""HTTP bridge: translates the four worker callback contracts into JobService gRPC calls."""
